"""Geometric joint transforms of a raw numpy sample: random scale and random crop.

The recipe of the ATRC / InvPT / TaskExpert family (Brüggemann et al., ICCV 2021; Ye & Xu,
ECCV 2022), as the Multi-Task-Transformer code computes it (``data/transforms.py``:
``RandomScaling``, ``RandomCrop``): every task map moves with the image. Random scaling resizes
to ``int(h·s) × int(w·s)`` (truncated), the image bilinearly in floating point (the reference loads
images as float32), every task map (normals included) by nearest neighbour, and divides depth by
``s``; the crop window's offsets are uniform integers and ``cat_max_ratio`` redraws it up to 10
times.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np


def _rng(seed: int | None):
    return np.random.default_rng(seed) if seed is not None else np.random


def resize_map(arr: np.ndarray, size: tuple[int, int], interpolation: int) -> np.ndarray:
    """Resizes an (H, W) or (H, W, C) array to ``size`` = (h, w) with OpenCV (as the field does)."""
    out = cv2.resize(arr, (size[1], size[0]), interpolation=interpolation)
    return out[..., None] if arr.ndim == 3 and out.ndim == 2 else out


class RandomScale:
    """Rescales the image and every task map by one factor drawn from ``U(lo, hi)``.

    The new size is ``(int(h·s), int(w·s))`` (truncation, as the reference). Image: bilinear on
    float32 (the result stays float32; :class:`~mtl.data.photometric.PhotoMetricDistortion`
    truncates it to uint8 as the reference does). Label, binary and normal maps: nearest (the
    reference does not blend normals). Depth: nearest, then divided by the factor (enlarging the
    picture brings the scene closer).

    Args:
        scale: ``(lo, hi)`` range of the factor.
        normals: ``"nearest"`` (the reference) or ``"bilinear"`` (blend, then re-normalise to unit
            length; a smoother target, which the field's published numbers were not trained with).
        seed: optional seed of a private generator.
    """

    def __init__(
        self, scale: Sequence[float] = (0.5, 2.0), normals: str = "nearest", seed: int | None = None
    ) -> None:
        lo, hi = (float(v) for v in scale)
        if not 0 < lo <= hi:
            raise ValueError(f"RandomScale: scale must be (lo, hi) with 0 < lo <= hi, got {tuple(scale)}")
        _check_normals_mode(normals)
        self.lo, self.hi = lo, hi
        self.normals = normals
        self.rng = _rng(seed)

    def __call__(self, sample: dict) -> dict:
        s = float(self.rng.uniform(self.lo, self.hi))
        return rescale(sample, s, normals=self.normals)


NORMALS_MODES = ("nearest", "bilinear")


def _check_normals_mode(mode: str) -> None:
    if mode not in NORMALS_MODES:
        raise ValueError(f"normals resampling must be one of {NORMALS_MODES}, got {mode!r}")


def scaled_size(h: int, w: int, s: float) -> tuple[int, int]:
    """``(int(h·s), int(w·s))``, at least 1: the reference's truncation of the scaled size."""
    return max(1, int(h * s)), max(1, int(w * s))


def rescale(sample: dict, s: float, size: tuple[int, int] | None = None, *, normals: str = "nearest") -> dict:
    """Applies :class:`RandomScale`'s resampling rules for a factor ``s`` (or to a fixed ``size``).

    With ``size``, depth is divided by the geometric mean of the two axis factors.

    Args:
        sample: raw sample (numpy maps).
        s: scale factor (ignored for the size when ``size`` is given).
        size: ``(h, w)`` to resize to instead of :func:`scaled_size`.
        normals: ``"nearest"`` or ``"bilinear"`` (blend, then re-normalise), see :class:`RandomScale`.
    """
    _check_normals_mode(normals)
    h, w = sample["image"].shape[:2]
    if size is None:
        size = scaled_size(h, w, s)
    else:
        s = float(np.sqrt(size[0] / h * size[1] / w))
    out = {}
    for key, value in sample.items():
        if key == "image":
            value = resize_map(np.asarray(value, dtype=np.float32), size, cv2.INTER_LINEAR)
        elif key == "depth":
            value = resize_map(value, size, cv2.INTER_NEAREST) / np.float32(s)
        elif key == "normals" and normals == "bilinear":
            value = _rescale_normals(value, size)
        elif isinstance(value, np.ndarray) and value.ndim >= 2:
            value = resize_map(value, size, cv2.INTER_NEAREST)
        out[key] = value
    return out


def _rescale_normals(value: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    # per-channel arithmetic: reductions over the last axis of (H, W, 3) are several times slower
    valid_src = (value[..., 0] != 0) | (value[..., 1] != 0) | (value[..., 2] != 0)
    valid = resize_map(valid_src.view(np.uint8), size, cv2.INTER_NEAREST) > 0
    value = resize_map(value, size, cv2.INTER_LINEAR)
    x, y, z = value[..., 0], value[..., 1], value[..., 2]
    norm2 = x * x + y * y + z * z
    valid &= norm2 > 1e-12
    inv = np.where(valid, 1.0 / np.sqrt(np.maximum(norm2, 1e-12)), 0.0).astype(np.float32)
    value *= inv[..., None]
    return value


class Resize:
    """Resizes the image and every task map to a fixed ``(h, w)`` with :func:`rescale`'s rules.

    For recipes that train and test at one fixed size (MTLoRA's 448×448 PASCAL-Context) rather
    than padding. Evaluation then happens at that size.

    Args:
        size: ``(h, w)``.
        normals: ``"bilinear"`` (blend, then re-normalise; the default) or ``"nearest"``.
    """

    def __init__(self, size: Sequence[int], normals: str = "bilinear") -> None:
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"Resize: size must be (h, w) of positive ints, got {size}")
        _check_normals_mode(normals)
        self.size = (int(size[0]), int(size[1]))
        self.normals = normals

    def __call__(self, sample: dict) -> dict:
        if sample["image"].shape[:2] == self.size:
            return sample
        out = rescale(sample, 1.0, size=self.size, normals=self.normals)
        if isinstance(out.get("meta"), dict):  # the unpadded size evaluation crops to
            out["meta"] = {**out["meta"], "size": self.size}
        return out


class RandomCrop:
    """Crops a random window of ``size`` (clipped to the image) from the image and every map.

    Args:
        size: ``(h, w)`` of the window.
        cat_max_ratio: if < 1, check the window up to 10 times: keep it when at least two
            semseg classes are present and none covers ``cat_max_ratio`` or more of the labelled
            pixels, else draw another; after 10 failed checks the last drawn window is used
            unchecked (mmsegmentation's rule, as the reference applies it).
        ignore_index: label ignored when counting classes.
        seed: optional seed of a private generator.
    """

    def __init__(
        self,
        size: Sequence[int],
        cat_max_ratio: float = 0.75,
        ignore_index: int = 255,
        seed: int | None = None,
    ) -> None:
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"RandomCrop: size must be (h, w) of positive ints, got {size}")
        self.size = (int(size[0]), int(size[1]))
        self.cat_max_ratio = float(cat_max_ratio)
        self.ignore_index = ignore_index
        self.rng = _rng(seed)

    def _window(self, h: int, w: int) -> tuple[int, int, int, int]:
        ch, cw = min(self.size[0], h), min(self.size[1], w)
        y = int(self.rng.uniform(0, h - ch + 1))  # uniform integer offsets
        x = int(self.rng.uniform(0, w - cw + 1))
        return y, x, ch, cw

    def __call__(self, sample: dict) -> dict:
        h, w = sample["image"].shape[:2]
        y, x, ch, cw = self._window(h, w)
        seg = sample.get("semseg")
        if seg is not None and self.cat_max_ratio < 1.0:
            for _ in range(10):
                counts = np.bincount(seg[y : y + ch, x : x + cw].ravel(), minlength=256)
                counts = np.delete(counts, self.ignore_index) if self.ignore_index < 256 else counts
                counts = counts[counts > 0]
                if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                    break
                y, x, ch, cw = self._window(h, w)
        out = {}
        for k, v in sample.items():
            if isinstance(v, np.ndarray) and v.ndim >= 2:
                v = np.ascontiguousarray(v[y : y + ch, x : x + cw])
            out[k] = v
        return out
