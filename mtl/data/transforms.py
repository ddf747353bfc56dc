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

The field's recipe (ATRC / InvPT / TaskExpert, as the released Multi-Task-Transformer code computes
it, ``utils/common_config.py: get_transformations`` and ``data/transforms.py``): at training time
random scale 0.5–2.0, random crop with ``cat_max_ratio`` 0.75, horizontal flip, photometric
distortion, normalisation, padding to the fixed size (centred) and the ignore rule of the human
parts (:class:`IgnoreUnannotatedParts`); at test time normalisation, padding and that rule only.
:func:`build_transform` assembles either from config.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from mtl.data.fast_augment import FastTrainAugment
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

    The image becomes ``(x / 255 − mean) / std`` in float32, the three operations in that order
    as the reference's ``Normalize`` does them (so the values agree to the last bit).

    Args:
        mean: per-channel mean of the image in [0, 1] units.
        std: per-channel standard deviation.
        normalise: ``False``: keep a uint8 image as a uint8 ``3×H×W`` tensor, for
            :func:`mtl.data.device_augment.prepare_batch` to normalise on the device, and uint8
            label maps as uint8 (8× fewer bytes to copy and transfer; ``prepare_batch`` makes them
            int64 on the device).
    """

    def __init__(
        self,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        normalise: bool = True,
    ) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.normalise = normalise

    def __call__(self, sample: dict) -> dict:
        out: dict = {}
        for key, value in sample.items():
            if key == "image" and not self.normalise and value.dtype == np.uint8:
                out[key] = torch.from_numpy(np.ascontiguousarray(value)).permute(2, 0, 1).contiguous()
            elif key == "image":
                img = torch.from_numpy(np.ascontiguousarray(value)).permute(2, 0, 1)
                img = img.to(torch.float32, memory_format=torch.contiguous_format)
                out[key] = img.div_(255.0).sub_(self.mean).div_(self.std)
            elif key in LABEL_TASKS and not self.normalise and value.dtype == np.uint8:
                out[key] = torch.from_numpy(np.ascontiguousarray(value))  # int64 on the device
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
    """Pads the tensors of a sample to a fixed ``(h, w)``, the sample centred.

    As the reference's ``PadImage``: ``⌊Δh/2⌋`` rows above and the rest below, ``⌊Δw/2⌋``
    columns on the left and the rest on the right. Image: 0 (the mean colour after
    normalisation); label and binary maps: 255 (ignore); depth: 0 (missing); normals: 0
    (invalid). ``meta["size"]`` keeps the unpadded size and ``meta["pad_offset"]`` the
    ``(top, left)`` of the sample in the padded frame, so evaluation can crop the padding away
    (the metrics ignore padded pixels by their targets anyway).

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
        top, left = ph // 2, pw // 2
        out = {}
        if sample["image"].dtype == torch.uint8:  # normalised later on the device: it zeroes the padding
            out["image_box"] = torch.tensor([top, left, h, w])
        for key, value in sample.items():
            if isinstance(value, torch.Tensor) and value.ndim >= 2 and (ph or pw):
                fill = (
                    255
                    if key in LABEL_TASKS or key in BINARY_TASKS
                    else (-1 if key == "edge_labelmap" else 0)
                )
                value = F.pad(value, (left, pw - left, top, ph - top), value=fill)
            elif key == "meta" and isinstance(value, dict):
                value = {**value, "pad_offset": (top, left)}
            out[key] = value
        return out


class IgnoreUnannotatedParts:
    """Ignores a human-parts map that shows no part pixel (all values 0 or 255 → all 255).

    The reference's ``AddIgnoreRegions`` applies this after cropping and padding, in training
    and at test time: a training crop that cuts every annotated person away carries no parts
    supervision at all (its background pixels are ignored too), as do images whose people have
    no part annotation (the loaders already give those all 255).

    Args:
        key: the task key of the parts map.
        ignore_index: the ignore label.
    """

    def __init__(self, key: str = "human_parts", ignore_index: int = 255) -> None:
        self.key = key
        self.ignore_index = ignore_index

    def _unannotated(self, value: torch.Tensor | np.ndarray) -> bool:
        """Whether every value is 0 or the ignore label."""
        array = value.numpy() if isinstance(value, torch.Tensor) and value.device.type == "cpu" else value
        eight_bit = isinstance(array, np.ndarray) and array.dtype == np.uint8 and array.ndim >= 2
        if eight_bit and self.ignore_index == 255:
            # no value in 1..254: OpenCV's range mask, ~20× faster than the comparisons below
            rows = np.ascontiguousarray(array).reshape(array.shape[0], -1)
            return cv2.countNonZero(cv2.inRange(rows, 1, 254)) == 0
        return bool(((value == 0) | (value == self.ignore_index)).all())

    def __call__(self, sample: dict) -> dict:
        value = sample.get(self.key)
        if value is None or not self._unannotated(value):
            return sample
        full = torch.full_like if isinstance(value, torch.Tensor) else np.full_like
        return {**sample, self.key: full(value, self.ignore_index)}


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
    scale_normals: str = "nearest",
    fast: bool = False,
    photometric_on_device: bool = False,
) -> Compose:
    """Assembles the train or test pipeline.

    Args:
        train: add training-time augmentation (the test pipeline is ToTensor, Pad and
            :class:`IgnoreUnannotatedParts` only).
        hflip: horizontal-flip probability (0 disables).
        scale: ``(lo, hi)`` of :class:`RandomScale`, or ``None``.
        crop: ``(h, w)`` of :class:`RandomCrop`, or ``None``.
        cat_max_ratio: :class:`RandomCrop`'s class-dominance limit.
        photometric: add :class:`~mtl.data.photometric.PhotoMetricDistortion`.
        pad_to: ``(h, w)`` of :class:`Pad`, or ``None``.
        resize: ``(h, w)`` every sample is first resized to (train and test), or ``None``.
        scale_normals: how :class:`RandomScale` resamples normals: ``"nearest"`` (the
            reference) or ``"bilinear"`` (blend, then re-normalise).
        fast: train only: scale, crop, flip and the photometric draw in one pass
            (:class:`~mtl.data.fast_augment.FastTrainAugment`; same draws, same samples, less work).
            Needs ``scale_normals="nearest"``.
        photometric_on_device: train only, with ``fast``: ship the image as uint8 with its drawn
            photometric parameters; the module distorts and normalises the batch on its device
            (:func:`mtl.data.device_augment.prepare_batch`).

    Returns:
        A :class:`Compose`.
    """
    steps: list[Callable[[dict], dict]] = [Resize(resize)] if resize is not None else []
    if photometric_on_device and not (train and fast):
        raise ValueError("data.photometric_on_device needs the fast train pipeline (data.fast_augment=true)")
    if train and fast:
        if scale_normals != "nearest":
            raise ValueError(
                f"data.fast_augment resamples normals by nearest neighbour (the reference's), got "
                f"data.augment.scale_normals={scale_normals!r}; set data.fast_augment=false to blend them"
            )
        mode = ("device" if photometric_on_device else "worker") if photometric else None
        steps.append(
            FastTrainAugment(
                scale=scale, crop=crop, cat_max_ratio=cat_max_ratio, hflip=hflip, photometric=mode
            )
        )
        steps.append(ToTensor(normalise=mode != "device"))
    elif train:
        if scale is not None:
            steps.append(RandomScale(scale, normals=scale_normals))
        if crop is not None:
            steps.append(RandomCrop(crop, cat_max_ratio=cat_max_ratio))
        if hflip > 0:
            steps.append(RandomHorizontalFlip(hflip))
        if photometric:
            steps.append(PhotoMetricDistortion())
    if not (train and fast):
        steps.append(ToTensor())
    if pad_to is not None:
        steps.append(Pad(pad_to))
    steps.append(IgnoreUnannotatedParts())
    return Compose(steps)
