"""Photometric distortion of the image only (task maps are untouched).

The recipe of mmsegmentation's ``PhotoMetricDistortion`` used by the ATRC / InvPT family
(Brüggemann et al., ICCV 2021; Ye & Xu, ECCV 2022): random brightness, then contrast either
before or after a trip through HSV for saturation and hue, each applied with probability ½;
the image is clipped to [0, 255] after every step.
"""

from __future__ import annotations

import cv2
import numpy as np


class PhotoMetricDistortion:
    """Random brightness, contrast, saturation and hue of the image.

    Args:
        brightness_delta: brightness shift drawn from ``U(-delta, delta)`` (0–255 units).
        contrast_range: contrast factor range.
        saturation_range: saturation factor range.
        hue_delta: hue shift drawn from ``U(-delta, delta)`` in OpenCV units (0–180 per turn),
            i.e. ±2·delta degrees.
        seed: optional seed of a private generator (``None``: numpy's global state, which
            Lightning seeds per worker).
    """

    def __init__(
        self,
        *,
        brightness_delta: float = 32.0,
        contrast_range: tuple[float, float] = (0.5, 1.5),
        saturation_range: tuple[float, float] = (0.5, 1.5),
        hue_delta: int = 18,
        seed: int | None = None,
    ) -> None:
        for name, (lo, hi) in (("contrast_range", contrast_range), ("saturation_range", saturation_range)):
            if not 0 <= lo <= hi:
                raise ValueError(f"PhotoMetricDistortion: {name} must satisfy 0 <= lo <= hi, got {(lo, hi)}")
        self.brightness_delta = float(brightness_delta)
        self.contrast_range = tuple(contrast_range)
        self.saturation_range = tuple(saturation_range)
        self.hue_delta = int(hue_delta)
        self.rng = np.random.default_rng(seed) if seed is not None else np.random

    def _coin(self) -> bool:
        return self.rng.random() < 0.5

    def _contrast(self, img: np.ndarray) -> np.ndarray:
        if self._coin():
            img = np.clip(img * np.float32(self.rng.uniform(*self.contrast_range)), 0, 255)
        return img

    def __call__(self, sample: dict) -> dict:
        img = sample["image"].astype(np.float32)
        if self._coin():
            img = np.clip(
                img + np.float32(self.rng.uniform(-self.brightness_delta, self.brightness_delta)), 0, 255
            )
        contrast_first = self._coin()
        if contrast_first:
            img = self._contrast(img)
        do_sat, do_hue = self._coin(), self._coin()
        if do_sat or do_hue:
            hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)  # float32: H in degrees, S in [0, 1], V in [0, 255]
            if do_sat:
                hsv[..., 1] = np.clip(hsv[..., 1] * self.rng.uniform(*self.saturation_range), 0, 1)
            if do_hue:
                # an integer in [-hue_delta, hue_delta] in OpenCV units, i.e. 2° steps
                shift = 2.0 * float(np.floor(self.rng.uniform(-self.hue_delta, self.hue_delta + 1)))
                hsv[..., 0] = (hsv[..., 0] + shift) % 360.0
            img = np.clip(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB), 0, 255)
        if not contrast_first:
            img = self._contrast(img)
        return {**sample, "image": np.rint(img).astype(np.uint8)}
