"""Photometric distortion and normalisation of a training batch on the accelerator.

The second half of the field's train augmentation (mmsegmentation's ``PhotoMetricDistortion`` as the
Multi-Task-Transformer code applies it, then ImageNet normalisation; see
:mod:`mtl.data.photometric`), batched in torch on the device the batch is on. The random choices
are not drawn here: the loader workers draw them per sample, from the generator that
:class:`~mtl.data.resumable.SeededAugmentation` seeds with ``(seed, epoch, index)``, and carry them
in the batch (``batch["photometric"]``, :func:`mtl.data.fast_augment.draw_to_tensor`), so exact
resume holds and the distribution is the worker path's.

The arithmetic is the worker path's: brightness and contrast in float32 with clipping and
truncation, OpenCV's 8-bit RGB → HSV (integer tables, ``hsv_shift`` 12) and HSV → RGB (float32
sectors, rounded), each saturation and hue step with its own round trip. It matches
``cv2.cvtColor`` on every one of the 2²⁴ colours (``tests/data/test_augment_stats.py``).

A batch whose ``image`` is uint8 is one these steps still have to be applied to: the worker
pipeline (:class:`~mtl.data.transforms.PackForDevice`) ships it unnormalised and channels last (4×
fewer bytes through collation and the host → device copy, no layout change in the worker) and
padded with zeros, with ``image_box`` = ``(top, left, h, w)`` of the picture in the padded frame,
its label and binary maps as uint8 and its normals as packed 8-bit codes; :func:`prepare_batch`
distorts, normalises and zeroes the padding (the mean colour, as
:class:`~mtl.data.transforms.Pad` pads a normalised image) and widens and decodes the maps.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from mtl.data.cache import NORMALS_BITS, NORMALS_LUT
from mtl.data.transforms import BINARY_TASKS, IMAGENET_MEAN, IMAGENET_STD, LABEL_TASKS

HSV_SHIFT = 12


@functools.cache
def _tables() -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's ``sdiv_table`` and ``hdiv_table180`` (``saturate_cast<int>``: round half to even)."""
    i = np.arange(256, dtype=np.float64)
    with np.errstate(divide="ignore"):
        sdiv = np.where(i > 0, np.rint((255 << HSV_SHIFT) / i), 0)
        hdiv = np.where(i > 0, np.rint((180 << HSV_SHIFT) / (6.0 * i)), 0)
    return sdiv.astype(np.int64), hdiv.astype(np.int64)


_SECTORS = ((1, 3, 0), (1, 0, 2), (3, 0, 1), (0, 2, 1), (0, 1, 3), (2, 1, 0))  # (b, g, r) tab indices

_CONSTANTS = {
    "sdiv": lambda: torch.as_tensor(_tables()[0], dtype=torch.int32),
    "hdiv": lambda: torch.as_tensor(_tables()[1], dtype=torch.int32),
    "sectors": lambda: torch.tensor(_SECTORS),  # (6, 3): sector → tab index of b, g, r
    "mean": lambda: torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1),
    "std": lambda: torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1),
    "normals": lambda: torch.as_tensor(NORMALS_LUT),
}


@functools.cache
def _constant(name: str, device: torch.device) -> torch.Tensor:
    """One of this module's tables on ``device``, uploaded once per device: a host → device copy in
    every batch would be a blocking one (it waits for the device's queued work, stalling the step)."""
    return _CONSTANTS[name]().to(device)


def rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    """OpenCV's 8-bit ``COLOR_RGB2HSV`` of a (B, 3, H, W) integer-valued tensor → int32 (H 0..180, S, V)."""
    sdiv, hdiv = _constant("sdiv", rgb.device), _constant("hdiv", rgb.device)
    x = rgb.to(torch.int32)
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    v = torch.maximum(torch.maximum(r, g), b)
    diff = v - torch.minimum(torch.minimum(r, g), b)
    half = 1 << (HSV_SHIFT - 1)
    s = (diff * sdiv[v] + half) >> HSV_SHIFT
    h = torch.where(v == r, g - b, torch.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * hdiv[diff] + half) >> HSV_SHIFT  # arithmetic shift: floor, as OpenCV's on ints
    h = torch.where(h < 0, h + 180, h)
    return torch.stack([h, s, v], dim=1)


def _one_minus_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``1 − a·b`` rounded once to float32, as the fused multiply-add OpenCV's vectorised loop compiles to.

    The product of two float32 numbers is exact in float64, so one rounding of the float64 result
    is the FMA's.
    """
    return (1.0 - a.to(torch.float64) * b.to(torch.float64)).to(torch.float32)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """OpenCV's 8-bit ``COLOR_HSV2RGB`` of a (B, 3, H, W) integer-valued tensor → float32 integers 0..255."""
    f = hsv.to(torch.float32)
    # float32 constants as OpenCV's; 0-dim CPU tensors enter a device's kernels as scalars (no copy)
    h = f[:, 0] * torch.tensor(6.0 / 180.0, dtype=torch.float32)
    s = f[:, 1] * torch.tensor(1.0 / 255.0, dtype=torch.float32)
    v = f[:, 2] * torch.tensor(1.0 / 255.0, dtype=torch.float32)
    sector = torch.floor(h)
    h = h - sector
    sector = torch.remainder(sector, 6).to(torch.int64)
    tab = torch.stack([v, v * (1.0 - s), v * _one_minus_product(s, h), v * _one_minus_product(s, 1.0 - h)])
    lut = _constant("sectors", f.device)
    out = []
    for channel in (2, 1, 0):  # r, g, b
        idx = lut[:, channel][sector]
        out.append(torch.gather(tab, 0, idx[None]).squeeze(0))
    rgb = torch.stack(out, dim=1) * 255.0
    # truncated, as OpenCV's vectorised loop does (its scalar tail, the last pixels of a row that do not
    # fill a vector block, rounds instead: the worker path's only difference, ±1 on those pixels)
    return torch.floor(rgb).clamp_(0, 255)


def _convert(
    x: torch.Tensor, alpha: torch.Tensor | None = None, beta: torch.Tensor | None = None
) -> torch.Tensor:
    """``α·x + β`` in float32, clipped to [0, 255], truncated (the worker path's ``_convert``)."""
    if alpha is not None:
        x = x * alpha
    if beta is not None:
        x = x + beta
    return torch.floor(x.clamp(0, 255))


def photometric(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Applies each sample's drawn distortion to a uint8 (B, 3, H, W) batch.

    Args:
        images: uint8 RGB images.
        params: (B, 9) float64 parameters of :func:`mtl.data.fast_augment.draw_to_tensor`.

    Returns:
        The distorted images, float32 with integer values in 0..255.
    """
    p = params.to(images.device)
    col = lambda i: p[:, i].to(torch.float32).view(-1, 1, 1, 1)  # noqa: E731  (float32 as np.float32(x))
    on = lambda i: p[:, i].view(-1, 1, 1, 1) != 0  # noqa: E731
    x = images.to(torch.float32)
    x = torch.where(on(0), _convert(x, beta=col(1)), x)
    first, contrast = on(4), on(2)
    x = torch.where(contrast & first, _convert(x, alpha=col(3)), x)
    if images.is_cuda or bool(on(5).any()):  # no host sync on a GPU: compute, then select
        hsv = rgb_to_hsv(x)
        sat = _convert(hsv[:, 1:2].to(torch.float32), alpha=col(6)).to(torch.int32)
        x = torch.where(on(5), hsv_to_rgb(torch.cat([hsv[:, :1], sat, hsv[:, 2:]], dim=1)), x)
    if images.is_cuda or bool(on(7).any()):
        hsv = rgb_to_hsv(x)
        hue = torch.remainder(hsv[:, :1] + p[:, 8].to(torch.int32).view(-1, 1, 1, 1), 180)
        x = torch.where(on(7), hsv_to_rgb(torch.cat([hue, hsv[:, 1:]], dim=1)), x)
    return torch.where(contrast & ~first, _convert(x, alpha=col(3)), x)


def normalise(images: torch.Tensor, box: torch.Tensor | None = None) -> torch.Tensor:
    """``(x / 255 − mean) / std`` as :class:`~mtl.data.transforms.ToTensor`; 0 outside ``box``.

    Args:
        images: (B, 3, H, W) with values in 0..255.
        box: (B, 4) ``(top, left, h, w)`` of each picture in the padded frame, or ``None``.
    """
    mean, std = _constant("mean", images.device), _constant("std", images.device)
    x = images.to(torch.float32).div_(255.0).sub_(mean).div_(std)
    if box is None:
        return x
    box = box.to(x.device).view(-1, 4, 1, 1)
    rows = torch.arange(x.shape[-2], device=x.device).view(1, -1, 1)
    cols = torch.arange(x.shape[-1], device=x.device).view(1, 1, -1)
    inside = (
        (rows >= box[:, 0])
        & (rows < box[:, 0] + box[:, 2])
        & (cols >= box[:, 1])
        & (cols < box[:, 1] + box[:, 3])
    )
    return torch.where(inside[:, None], x, 0.0)  # padding is 0 (the normalised mean colour), as Pad fills it


def decode_normals(packed: torch.Tensor) -> torch.Tensor:
    """Packed normals codes (B, H, W) int32 → float32 (B, 3, H, W), as
    :func:`mtl.data.cache.decode_normals` (the same table: the same bits)."""
    lut = _constant("normals", packed.device)
    mask = (1 << NORMALS_BITS) - 1
    codes = torch.stack([(packed >> (NORMALS_BITS * k)) & mask for k in range(3)], dim=1)
    return lut[codes.long()]


def prepare_batch(batch: dict) -> dict:
    """Finishes a batch that :class:`~mtl.data.transforms.PackForDevice` packed (its ``image`` uint8,
    channels last): photometric distortion (when drawn), normalisation, the uint8 label maps
    (:data:`~mtl.data.transforms.LABEL_TASKS`) made int64, the uint8 binary maps float32 and the
    packed normals decoded, so that the batch is what :class:`~mtl.data.transforms.ToTensor` and
    :class:`~mtl.data.transforms.Pad` would have given.

    Batches with a float image (validation, test, or the worker-side path) pass through.
    """
    image = batch.get("image")
    if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8:
        return batch
    if image.ndim != 4 or image.shape[-1] != 3:
        raise ValueError(
            f"prepare_batch: a uint8 image batch must be (B, H, W, 3) as PackForDevice ships it, "
            f"got {tuple(image.shape)}"
        )
    out = dict(batch)
    params = out.pop("photometric", None)
    box = out.pop("image_box", None)
    image = image.permute(0, 3, 1, 2).contiguous()
    x = photometric(image, params) if params is not None else image
    out["image"] = normalise(x, box)
    for key, value in batch.items():
        if not isinstance(value, torch.Tensor):
            continue
        if key in LABEL_TASKS and value.dtype == torch.uint8:
            out[key] = value.long()
        elif key in BINARY_TASKS and value.dtype == torch.uint8:
            out[key] = value.float()
        elif key == "normals" and value.dtype == torch.int32:
            out[key] = decode_normals(value)
    return out
