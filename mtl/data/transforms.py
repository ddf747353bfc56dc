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

from mtl.data.cache import NORMALS_PAD_CODE, CodedMap
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
    """

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, sample: dict) -> dict:
        out: dict = {}
        for key, value in sample.items():
            if key == "image":
                img = torch.from_numpy(np.ascontiguousarray(value)).permute(2, 0, 1)
                img = img.to(torch.float32, memory_format=torch.contiguous_format)
                out[key] = img.div_(255.0).sub_(self.mean).div_(self.std)
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


def pad_fill(key: str) -> int:
    """The padding value of a map: 255 (ignore) for label and binary maps, -1 for the PASCAL edge
    label map, 0 otherwise (the normalised mean colour, missing depth, invalid normals)."""
    if key in LABEL_TASKS or key in BINARY_TASKS:
        return 255
    return -1 if key == "edge_labelmap" else 0


class Pad:
    """Pads the tensors of a sample to a fixed ``(h, w)``, the sample centred.

    As the reference's ``PadImage``: ``⌊Δh/2⌋`` rows above and the rest below, ``⌊Δw/2⌋``
    columns on the left and the rest on the right, filled with :func:`pad_fill`. ``meta["size"]``
    keeps the unpadded size and ``meta["pad_offset"]`` the ``(top, left)`` of the sample in the
    padded frame, so evaluation can crop the padding away (the metrics ignore padded pixels by
    their targets anyway).

    Args:
        size: ``(h, w)`` after padding.
    """

    def __init__(self, size: Sequence[int]) -> None:
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"Pad: size must be (h, w) of positive ints, got {size}")
        self.size = (int(size[0]), int(size[1]))

    def margins(self, sample: dict, h: int, w: int) -> tuple[int, int, int, int]:
        """``(top, bottom, left, right)`` of a sample of size ``h × w``."""
        ph, pw = self.size[0] - h, self.size[1] - w
        if ph < 0 or pw < 0:
            sid = sample.get("meta", {}).get("id", "?")
            raise ValueError(
                f"sample {sid!r}: size {h}×{w} exceeds the pad size {self.size[0]}×{self.size[1]}; "
                "set data.pad_to (and the crop size) to at least the image size, or use the dataset copy "
                "the README names (NYUD-v2: 448×576, not MTI-Net's 480×640)"
            )
        return ph // 2, ph - ph // 2, pw // 2, pw - pw // 2

    @staticmethod
    def pad_tensors(sample: dict, margins: tuple[int, int, int, int]) -> dict:
        """Every map (a tensor of ≥ 2 dims) of ``sample`` padded by ``margins``; ``meta`` gets
        ``pad_offset``."""
        top, bottom, left, right = margins
        out = {}
        for key, value in sample.items():
            if isinstance(value, torch.Tensor) and value.ndim >= 2 and any(margins):
                value = F.pad(value, (left, right, top, bottom), value=pad_fill(key))
            elif key == "meta" and isinstance(value, dict):
                value = {**value, "pad_offset": (top, left)}
            out[key] = value
        return out

    def __call__(self, sample: dict) -> dict:
        h, w = sample["image"].shape[-2:]
        return self.pad_tensors(sample, self.margins(sample, h, w))


class PackForDevice:
    """:class:`ToTensor` and :class:`Pad` of the device path (``data.photometric_on_device``): each
    map padded in one copy and shipped in its compact form, for
    :func:`mtl.data.device_augment.prepare_batch` to finish on the accelerator.

    Takes the output of :class:`~mtl.data.fast_augment.FastTrainAugment` with
    ``photometric="device"`` and gives (``(H, W)`` the padded size):

    - ``image``: uint8 ``(H, W, 3)``, channels last, padded with 0; ``image_box``: the
      ``(top, left, h, w)`` of the picture in the padded frame;
    - label maps (uint8): uint8 ``(H, W)``, padded with 255;
    - binary maps (uint8): uint8 ``(1, H, W)``, padded with 255;
    - ``normals`` as packed codes (:class:`~mtl.data.cache.CodedMap`): int32 ``(H, W)``, padded
      with the invalid code;
    - ``depth`` and anything else: as :class:`ToTensor` then :class:`Pad` give them.

    An 8-bit map crosses the collation and the host → device copy in 1 byte per pixel instead of 4
    or 8, normals in 4 instead of 12; the worker does no layout change and no float conversion.
    ``prepare_batch`` gives the batch :class:`ToTensor`'s and :class:`Pad`'s dtypes, layouts and
    values, bit for bit.

    Args:
        size: ``(h, w)`` after padding, or ``None`` (no padding).
    """

    def __init__(self, size: Sequence[int] | None) -> None:
        self.pad = Pad(size) if size is not None else None
        self.to_tensor = ToTensor()

    def __call__(self, sample: dict) -> dict:
        image = sample["image"]
        if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3):
            raise TypeError(
                "PackForDevice: expects FastTrainAugment(photometric='device')'s uint8 (H, W, 3) image, "
                f"got {type(image).__name__} {getattr(image, 'dtype', '')} {getattr(image, 'shape', '')}"
            )
        h, w = image.shape[:2]
        margins = self.pad.margins(sample, h, w) if self.pad is not None else (0, 0, 0, 0)
        top, bottom, left, right = margins

        def border(array: np.ndarray, fill: float) -> torch.Tensor:
            if any(margins):
                array = cv2.copyMakeBorder(array, top, bottom, left, right, cv2.BORDER_CONSTANT, value=fill)
            return torch.from_numpy(np.ascontiguousarray(array))

        out: dict = {"image_box": torch.tensor([top, left, h, w])}
        rest: dict = {}
        for key, value in sample.items():
            eight_bit = isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim == 2
            if key == "image":
                out[key] = border(value, 0)
            elif isinstance(value, CodedMap):
                out[key] = border(value.code.view(np.int32), NORMALS_PAD_CODE)
            elif eight_bit and (key in LABEL_TASKS or key in BINARY_TASKS):
                padded = border(value, pad_fill(key))
                out[key] = padded[None] if key in BINARY_TASKS else padded
            else:
                rest[key] = value
        out.update(Pad.pad_tensors(self.to_tensor(rest), margins))
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
        photometric_on_device: train only, with ``fast``: pack the sample for the device
            (:class:`PackForDevice`: the image as uint8 with its drawn photometric parameters, 8-bit
            maps, packed normals); the module distorts, normalises and widens the batch on its
            device (:func:`mtl.data.device_augment.prepare_batch`).

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
        if mode == "device":
            return Compose([*steps, PackForDevice(pad_to), IgnoreUnannotatedParts()])
        steps.append(ToTensor())
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
