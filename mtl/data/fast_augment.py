"""The field's training augmentation in one pass: scale, crop and flip fused into index gathers.

The recipe is the one of :mod:`mtl.data.geometric` and :mod:`mtl.data.transforms` (ATRC / InvPT /
TaskExpert, as the Multi-Task-Transformer code computes it: ``RandomScaling``, ``RandomCrop`` with
``cat_max_ratio``, ``RandomHorizontalFlip``, ``PhotoMetricDistortion``), with the same random
draws in the same order from the same generator, so that one seed gives the same scale, window,
flip and colour parameters as the step-by-step pipeline. What changes is the cost:

- A nearest-neighbour resize followed by a crop and a flip is one gather of rows and columns
  (OpenCV's nearest index ``⌊d·src/dst⌋``): every task map, and the window checks of
  ``cat_max_ratio``, read only the pixels of the crop. Label, depth and normal maps are identical
  to the step-by-step pipeline's, bit for bit.
- The image is resized as before (bilinear in float32), then only the window is truncated to
  uint8 (when a photometric step follows, as it truncates) and flipped (``cv2.flip``).

- From the decoded-sample cache (:mod:`mtl.data.cache`, ``views=True``) the maps arrive as
  read-only views of the mapped file, the normals as their packed 8-bit codes
  (:class:`~mtl.data.cache.CodedMap`): only the window's codes are gathered (a flip adds
  :data:`~mtl.data.cache.NORMALS_FLIP` to the x codes) and decoded, here or, on the device path,
  on the accelerator. A crop window rejected by ``cat_max_ratio`` and
  drawn again (always, when the scaled image is smaller than the crop) is not checked again; the
  draws themselves are unchanged.

Every output equals the step-by-step pipeline's bit for bit (``tests/data/test_augment_stats.py``).
- The photometric parameters are drawn here and either applied at once (8-bit arithmetic, as
  :class:`~mtl.data.photometric.PhotoMetricDistortion`) or carried in the sample
  (``photometric``, see :func:`draw_to_tensor`) for :mod:`mtl.data.device_augment` to apply on
  the accelerator, batched, together with the normalisation.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch

from mtl.data.cache import CodedMap
from mtl.data.geometric import resize_map, scaled_size
from mtl.data.photometric import PhotoMetricDistortion, PhotometricDraw

PHOTOMETRIC_PARAMS = 9
"""Length of the per-sample photometric parameter vector (:func:`draw_to_tensor`)."""


def draw_to_tensor(draw: PhotometricDraw | None) -> torch.Tensor:
    """One draw as a float64 vector: ``[b_on, β, c_on, α_c, contrast_first, s_on, α_s, h_on, δ]``.

    ``None`` (no photometric distortion) is all zeros: every step off.
    """
    if draw is None:
        return torch.zeros(PHOTOMETRIC_PARAMS, dtype=torch.float64)
    return torch.tensor(
        [
            draw.brightness is not None, draw.brightness or 0.0,
            draw.contrast is not None, draw.contrast or 0.0, draw.contrast_first,
            draw.saturation is not None, draw.saturation or 0.0,
            draw.hue is not None, draw.hue or 0,
        ],
        dtype=torch.float64,
    )  # fmt: skip


def tensor_to_draw(params: torch.Tensor) -> PhotometricDraw:
    """The inverse of :func:`draw_to_tensor` (for tests and the worker-side path)."""
    b_on, b, c_on, c, first, s_on, s, h_on, h = params.tolist()
    return PhotometricDraw(
        brightness=b if b_on else None,
        contrast=c if c_on else None,
        contrast_first=bool(first),
        saturation=s if s_on else None,
        hue=int(h) if h_on else None,
    )


def nearest_index(src: int, dst: int) -> np.ndarray:
    """Source index of each destination pixel of OpenCV's ``INTER_NEAREST`` resize: ``⌊d·src/dst⌋``."""
    ifx = 1.0 / (dst / src)  # OpenCV's arithmetic, in double
    return np.minimum(np.floor(np.arange(dst) * ifx).astype(np.int64), src - 1)


def label_counts(labels: np.ndarray) -> np.ndarray:
    """Pixel count of every label value, as ``np.bincount(labels.ravel(), minlength=256)`` (int64).

    A uint8 map of fewer than 2**24 pixels is counted by OpenCV's histogram (float32 counts, exact
    below 2**24, several times faster than ``bincount``).
    """
    if labels.dtype == np.uint8 and labels.size < 1 << 24:
        return cv2.calcHist([labels], [0], None, [256], [0, 256]).ravel().astype(np.int64)
    return np.bincount(labels.ravel(), minlength=256)


def gather(value: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``value[rows][:, cols]`` (channels kept) as a C-contiguous array, by two ``take`` calls.

    (Fancy indexing of the columns is faster to produce for 8-bit maps but hands out a
    column-major array, which makes OpenCV's histogram of the window check about 9× slower and
    costs a copy in ``ToTensor``: measured, not taken.)
    """
    return value.take(rows, axis=0).take(cols, axis=1)


class FastTrainAugment:
    """Random scale, crop (with ``cat_max_ratio``), flip and photometric draw in one pass.

    Draws, in this order and from NumPy's global generator (which
    :class:`~mtl.data.resumable.SeededAugmentation` seeds per sample), exactly what the
    step-by-step pipeline draws: the scale factor, the crop windows, the flip, the photometric
    choices.

    Args:
        scale: ``(lo, hi)`` of the scale factor, or ``None``.
        crop: ``(h, w)`` of the crop window, or ``None``.
        cat_max_ratio: the class-dominance limit of the window (see
            :class:`~mtl.data.geometric.RandomCrop`).
        hflip: flip probability (0: no draw).
        photometric: ``None`` (off), ``"worker"`` (apply here) or ``"device"`` (carry the
            parameters as ``sample["photometric"]`` and the image as uint8).
        ignore_index: label ignored by the window check.
    """

    def __init__(
        self,
        *,
        scale: Sequence[float] | None = None,
        crop: Sequence[int] | None = None,
        cat_max_ratio: float = 0.75,
        hflip: float = 0.5,
        photometric: str | None = None,
        ignore_index: int = 255,
    ) -> None:
        if photometric not in (None, "worker", "device"):
            raise ValueError(
                f"FastTrainAugment: photometric must be None, 'worker' or 'device', got {photometric!r}"
            )
        if scale is not None:
            lo, hi = (float(v) for v in scale)
            if not 0 < lo <= hi:
                raise ValueError(
                    f"FastTrainAugment: scale must be (lo, hi) with 0 < lo <= hi, got {tuple(scale)}"
                )
            self.scale: tuple[float, float] | None = (lo, hi)
        else:
            self.scale = None
        if crop is not None and (len(crop) != 2 or min(crop) < 1):
            raise ValueError(f"FastTrainAugment: crop must be (h, w) of positive ints, got {crop}")
        self.crop = (int(crop[0]), int(crop[1])) if crop is not None else None
        self.cat_max_ratio = float(cat_max_ratio)
        self.hflip = float(hflip)
        self.photometric = photometric
        self.ignore_index = ignore_index
        self.distortion = PhotoMetricDistortion() if photometric is not None else None

    def _window(self, h: int, w: int) -> tuple[int, int, int, int]:
        ch, cw = min(self.crop[0], h), min(self.crop[1], w)
        y = int(np.random.uniform(0, h - ch + 1))
        x = int(np.random.uniform(0, w - cw + 1))
        return y, x, ch, cw

    def _choose_window(
        self, seg: np.ndarray | None, ny: np.ndarray, nx: np.ndarray
    ) -> tuple[int, int, int, int]:
        sh, sw = len(ny), len(nx)
        if self.crop is None:
            return 0, 0, sh, sw
        y, x, ch, cw = self._window(sh, sw)
        if seg is not None and self.cat_max_ratio < 1.0:
            rejected: set[tuple[int, int]] = set()  # a redraw of a rejected window is rejected again
            for _ in range(10):
                if (y, x) not in rejected:
                    counts = label_counts(gather(seg, ny[y : y + ch], nx[x : x + cw]))
                    counts = np.delete(counts, self.ignore_index) if self.ignore_index < 256 else counts
                    counts = counts[counts > 0]
                    if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                        break
                    rejected.add((y, x))
                y, x, ch, cw = self._window(sh, sw)  # drawn as often as before: the same generator state
        return y, x, ch, cw

    def __call__(self, sample: dict) -> dict:
        h, w = sample["image"].shape[:2]
        s = float(np.random.uniform(*self.scale)) if self.scale is not None else None
        sh, sw = scaled_size(h, w, s) if s is not None else (h, w)
        ny, nx = nearest_index(h, sh), nearest_index(w, sw)
        y, x, ch, cw = self._choose_window(sample.get("semseg"), ny, nx)
        flip = self.hflip > 0 and np.random.random() < self.hflip
        out_rows, out_cols = np.arange(y, y + ch), np.arange(x, x + cw)
        if flip:
            out_cols = out_cols[::-1]
        rows, cols = ny[out_rows], nx[out_cols]  # the source row / column of each output pixel
        out: dict = {}
        for key, value in sample.items():
            if key == "image":
                if s is not None:  # the whole image, as RandomScale: bilinear in float32
                    value = resize_map(np.asarray(value, dtype=np.float32), (sh, sw), cv2.INTER_LINEAR)
                value = value[y : y + ch, x : x + cw]
                if self.distortion is not None:
                    value = value.astype(np.uint8)  # the photometric step's truncation
                value = cv2.flip(value, 1) if flip else np.ascontiguousarray(value)
                if np.may_share_memory(value, sample["image"]):  # never hand out the input (a cache view)
                    value = value.copy()
                value = value[..., None] if value.ndim == 2 and sample["image"].ndim == 3 else value
            elif isinstance(value, CodedMap):  # the cache's normals: the window's codes gathered
                value = CodedMap(gather(value.code, rows, cols))
                value = value.flipped() if flip else value
                # decoded here, or on the device path by prepare_batch on the accelerator
                value = value if self.photometric == "device" else value.decode()
            elif isinstance(value, np.ndarray) and value.ndim >= 2:
                value = gather(value, rows, cols)
                if key == "depth" and s is not None:
                    value = value / np.float32(s)
                elif key == "normals" and flip:
                    value[..., 0] = np.negative(value[..., 0])
            out[key] = value
        if self.distortion is not None:
            image = out["image"]
            draw = self.distortion.draw()
            if self.photometric == "worker":
                image = self.distortion.apply(image, draw)
            else:
                out["photometric"] = draw_to_tensor(draw)
            out["image"] = image
        return out
