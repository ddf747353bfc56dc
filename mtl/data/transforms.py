"""Joint transforms over an image and all of its task maps.

A raw sample is the dict every dataset of :mod:`mtl.data` returns, in the decoded
encodings of the real datasets (as the released Multi-Task-Transformer loaders decode them)::

    image        uint8   (H, W, 3) RGB
    semseg       uint8   (H, W)    class ids, 255 = ignore
    human_parts  uint8   (H, W)    0 = background, 1..K parts, 255 = ignore
    saliency     uint8   (H, W)    {0, 1}, 255 = ignore
    edge         uint8   (H, W)    {0, 1}, 255 = ignore
    normals      float32 (H, W, 3) unit vectors (x right, y up, z towards the viewer), 0 = invalid
    depth        float32 (H, W)    metres, 0 = missing
    meta         dict              at least ``id`` and ``size``

:class:`ToTensor` turns it into the training sample (``image`` ImageNet-normalised
``3×H×W`` float, label maps ``int64 H×W``, dense targets ``C×H×W`` float). A new task's
floating-point map (``(H, W)`` or ``(H, W, C)``) becomes a ``C×H×W`` float target like depth
and normals, and is resampled by nearest neighbour and padded with 0.

The field's recipe (ATRC / InvPT / TaskExpert, as in the released Multi-Task-Transformer code): at training
time random scale 0.5–2.0, random crop with ``cat_max_ratio`` 0.75, horizontal flip,
photometric distortion, normalisation and padding to the fixed size; at test time
normalisation and padding only. :func:`build_transform` assembles either from config.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from mtl.data.geometric import RandomCrop, RandomScale, Resize
from mtl.data.photometric import PhotoMetricDistortion

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

LABEL_TASKS = ("semseg", "human_parts")
"""Tasks stored as integer class maps (``int64 H×W``, 255 = ignore)."""
BINARY_TASKS = ("saliency", "edge")
"""Tasks stored as binary maps (``float32 1×H×W`` in {0, 1}, 255 = ignore)."""


class Compose:
    """Applies transforms in order.

    Args:
        transforms: callables ``dict -> dict``.
    """

    def __init__(self, transforms: Sequence[Callable[[dict], dict]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, sample: dict) -> dict:
        for t in self.transforms:
            sample = t(sample)
        return sample


class RandomHorizontalFlip:
    """Flips the image and every task map; negates the x component of normals.

    Args:
        p: flip probability.
        seed: optional seed for a private generator (``None`` uses numpy's global state,
            which Lightning seeds per worker).
    """

    def __init__(self, p: float = 0.5, seed: int | None = None) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"RandomHorizontalFlip: p must be in [0, 1], got {p}")
        self.p = p
        self.rng = np.random.default_rng(seed) if seed is not None else np.random

    def __call__(self, sample: dict) -> dict:
        if self.rng.random() >= self.p:
            return sample
        out = {}
        for key, value in sample.items():
            if isinstance(value, np.ndarray) and value.ndim >= 2:
                value = np.ascontiguousarray(value[:, ::-1])
                if key == "normals":
                    value = value * np.array([-1.0, 1.0, 1.0], dtype=value.dtype)
            out[key] = value
        return out


class ToTensor:
    """Converts a raw numpy sample into tensors and normalises the image.

    Args:
        mean: per-channel mean of the image in [0, 1] units.
        std: per-channel standard deviation.
    """

    def __init__(
        self,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        # (x / 255 - mean) / std == x * scale - bias: one pass over the image.
        self.scale = 1.0 / (255.0 * self.std)
        self.bias = self.mean / self.std

    def __call__(self, sample: dict) -> dict:
        out: dict = {}
        for key, value in sample.items():
            if key == "image":
                img = torch.from_numpy(np.ascontiguousarray(value)).permute(2, 0, 1)
                img = img.to(torch.float32, memory_format=torch.contiguous_format)
                out[key] = img.mul_(self.scale).sub_(self.bias)
            elif key in LABEL_TASKS:
                out[key] = torch.from_numpy(np.asarray(value, dtype=np.int64))
            elif key in BINARY_TASKS:
                out[key] = torch.from_numpy(np.asarray(value, dtype=np.float32))[None]
            elif key == "edge_labelmap":  # full context labels for the exact PASCAL edge evaluation
                out[key] = torch.from_numpy(np.asarray(value, dtype=np.int64))
            elif key == "depth":
                out[key] = torch.from_numpy(np.asarray(value, dtype=np.float32))[None]
            elif key == "normals":
                arr = np.ascontiguousarray(value, dtype=np.float32)
                # A permuted view: default_collate stacks it into a contiguous batch anyway.
                out[key] = torch.from_numpy(arr).permute(2, 0, 1)
            elif isinstance(value, np.ndarray) and value.ndim in (2, 3) and value.dtype.kind == "f":
                t = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))  # another task's target
                out[key] = t[None] if t.ndim == 2 else t.permute(2, 0, 1)
            else:
                out[key] = value
        return out


class Pad:
    """Pads the tensors of a sample at the bottom and right to a fixed ``(h, w)``.

    Image: 0 (the mean colour after normalisation); label and binary maps: 255 (ignore);
    depth: 0 (missing); normals: 0 (invalid). ``meta["size"]`` keeps the unpadded size so
    evaluation can crop the padding away.

    Args:
        size: ``(h, w)`` after padding.
    """

    def __init__(self, size: Sequence[int]) -> None:
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"Pad: size must be (h, w) of positive ints, got {size}")
        self.size = (int(size[0]), int(size[1]))

    def __call__(self, sample: dict) -> dict:
        h, w = sample["image"].shape[-2:]
        ph, pw = self.size[0] - h, self.size[1] - w
        if ph < 0 or pw < 0:
            sid = sample.get("meta", {}).get("id", "?")
            raise ValueError(
                f"sample {sid!r}: size {h}×{w} exceeds the pad size {self.size[0]}×{self.size[1]}; "
                "set data.pad_to (and the crop size) to at least the image size, or use the dataset copy "
                "the README names (NYUD-v2: 448×576, not MTI-Net's 480×640)"
            )
        if ph == 0 and pw == 0:
            return sample
        out = {}
        for key, value in sample.items():
            if isinstance(value, torch.Tensor) and value.ndim >= 2:
                fill = (
                    255
                    if key in LABEL_TASKS or key in BINARY_TASKS
                    else (-1 if key == "edge_labelmap" else 0)
                )
                value = F.pad(value, (0, pw, 0, ph), value=fill)
            out[key] = value
        return out


def build_transform(
    *,
    train: bool,
    hflip: float = 0.5,
    scale: Sequence[float] | None = None,
    crop: Sequence[int] | None = None,
    cat_max_ratio: float = 0.75,
    photometric: bool = False,
    pad_to: Sequence[int] | None = None,
    resize: Sequence[int] | None = None,
) -> Compose:
    """Assembles the train or test pipeline.

    Args:
        train: add training-time augmentation (the test pipeline is ToTensor + Pad only).
        hflip: horizontal-flip probability (0 disables).
        scale: ``(lo, hi)`` of :class:`RandomScale`, or ``None``.
        crop: ``(h, w)`` of :class:`RandomCrop`, or ``None``.
        cat_max_ratio: :class:`RandomCrop`'s class-dominance limit.
        photometric: add :class:`~mtl.data.photometric.PhotoMetricDistortion`.
        pad_to: ``(h, w)`` of :class:`Pad`, or ``None``.
        resize: ``(h, w)`` every sample is first resized to (train and test), or ``None``.

    Returns:
        A :class:`Compose`.
    """
    steps: list[Callable[[dict], dict]] = [Resize(resize)] if resize is not None else []
    if train:
        if scale is not None:
            steps.append(RandomScale(scale))
        if crop is not None:
            steps.append(RandomCrop(crop, cat_max_ratio=cat_max_ratio))
        if hflip > 0:
            steps.append(RandomHorizontalFlip(hflip))
        if photometric:
            steps.append(PhotoMetricDistortion())
    steps.append(ToTensor())
    if pad_to is not None:
        steps.append(Pad(pad_to))
    return Compose(steps)
