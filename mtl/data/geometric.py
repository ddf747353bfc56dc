"""Geometric joint transforms of a raw numpy sample: random scale and random crop.

The recipe of the ATRC / InvPT / TaskExpert family (Brüggemann et al., ICCV 2021; Ye & Xu,
ECCV 2022), after mmsegmentation's ``Resize(ratio_range)`` and ``RandomCrop(cat_max_ratio)``:
every task map moves with the image, with the resampling each encoding needs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image


def _rng(seed: int | None):
    return np.random.default_rng(seed) if seed is not None else np.random


def _resize(arr: np.ndarray, size: tuple[int, int], resample: int) -> np.ndarray:
    """Resizes an (H, W) or (H, W, C) array to ``size`` = (h, w) channel by channel with PIL."""
    h, w = size
    if arr.dtype == np.uint8 and (arr.ndim == 2 or arr.shape[2] in (3, 4)):
        return np.asarray(Image.fromarray(arr).resize((w, h), resample))
    if arr.ndim == 2:
        return np.asarray(Image.fromarray(arr.astype(np.float32), mode="F").resize((w, h), resample))
    return np.stack([_resize(arr[..., c], size, resample) for c in range(arr.shape[2])], axis=-1)


class RandomScale:
    """Rescales the image and every task map by one factor drawn from ``U(lo, hi)``.

    Image: bilinear. Label and binary maps: nearest. Depth: nearest, then divided by the
    factor (enlarging the picture brings the scene closer). Normals: bilinear, then
    re-normalised to unit length; pixels invalid (zero) after nearest resampling stay zero.

    Args:
        scale: ``(lo, hi)`` range of the factor.
        seed: optional seed of a private generator.
    """

    def __init__(self, scale: Sequence[float] = (0.5, 2.0), seed: int | None = None) -> None:
        lo, hi = (float(v) for v in scale)
        if not 0 < lo <= hi:
            raise ValueError(f"RandomScale: scale must be (lo, hi) with 0 < lo <= hi, got {tuple(scale)}")
        self.lo, self.hi = lo, hi
        self.rng = _rng(seed)

    def __call__(self, sample: dict) -> dict:
        s = float(self.rng.uniform(self.lo, self.hi))
        return rescale(sample, s)


def rescale(sample: dict, s: float) -> dict:
    """Applies :class:`RandomScale`'s resampling rules for a given factor ``s``."""
    h, w = sample["image"].shape[:2]
    size = (max(1, int(round(h * s))), max(1, int(round(w * s))))
    out = {}
    for key, value in sample.items():
        if key == "image":
            value = _resize(value, size, Image.BILINEAR)
        elif key == "depth":
            value = _resize(value, size, Image.NEAREST) / np.float32(s)
        elif key == "normals":
            valid = _resize((np.abs(value).sum(axis=2) > 0).astype(np.uint8), size, Image.NEAREST) > 0
            value = _resize(value, size, Image.BILINEAR)
            norm = np.sqrt((value * value).sum(axis=2, keepdims=True))
            valid &= norm[..., 0] > 1e-6
            value = np.where(valid[..., None], value / np.maximum(norm, 1e-6), 0.0).astype(np.float32)
        elif isinstance(value, np.ndarray) and value.ndim >= 2:
            value = _resize(value, size, Image.NEAREST)
        out[key] = value
    return out


class RandomCrop:
    """Crops a random window of ``size`` (clipped to the image) from the image and every map.

    Args:
        size: ``(h, w)`` of the window.
        cat_max_ratio: if < 1, redraw the window (up to 10 times) until no single semseg
            class covers more than this fraction of its labelled pixels and at least two
            classes are present (mmsegmentation's rule).
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
                labels, counts = np.unique(seg[y : y + ch, x : x + cw], return_counts=True)
                counts = counts[labels != self.ignore_index]
                if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                    break
                y, x, ch, cw = self._window(h, w)
        out = {}
        for k, v in sample.items():
            if isinstance(v, np.ndarray) and v.ndim >= 2:
                v = np.ascontiguousarray(v[y : y + ch, x : x + cw])
            out[k] = v
        return out
