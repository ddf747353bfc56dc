"""Photometric distortion of the image only (task maps are untouched).

The recipe of mmsegmentation's ``PhotoMetricDistortion`` used by the ATRC / InvPT family
(Brüggemann et al., ICCV 2021; Ye & Xu, ECCV 2022), as the Multi-Task-Transformer code computes
it (``data/transforms.py``, ``PhotoMetricDistortion``), in 8-bit arithmetic throughout:

1. the image is truncated to uint8 (the float image of random scaling: ``astype(uint8)``);
2. with probability ½, brightness: ``x + β``, ``β ~ U(−32, 32)``;
3. a fair coin puts contrast (``α·x``, ``α ~ U(0.5, 1.5)``, probability ½) here or at step 6;
4. with probability ½, saturation: RGB → 8-bit HSV (OpenCV: H in 0..179, S and V in 0..255),
   ``S ← α·S``, ``α ~ U(0.5, 1.5)``, back to RGB;
5. with probability ½, hue: RGB → 8-bit HSV, ``H ← (H + δ) mod 180`` with an integer
   ``δ ∈ [−18, 17]`` (OpenCV units of 2°), back to RGB;
6. contrast, when the coin of step 3 put it last.

Every arithmetic step clips to [0, 255] and truncates to uint8 (``astype``), as the reference
does; saturation and hue each make their own HSV round trip.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class PhotometricDraw:
    """The random choices of one :class:`PhotoMetricDistortion` call (``None``: step skipped).

    Attributes:
        brightness: the value ``β`` added to every channel.
        contrast: the factor ``α`` every channel is multiplied by.
        contrast_first: contrast comes right after brightness (else last).
        saturation: the factor of the HSV saturation.
        hue: the integer shift of the HSV hue, in OpenCV units (2°).
    """

    brightness: float | None = None
    contrast: float | None = None
    contrast_first: bool = True
    saturation: float | None = None
    hue: int | None = None


def _convert(img: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """``α·x + β`` in float32, clipped to [0, 255], truncated to uint8 (the reference's ``convert``)."""
    out = img.astype(np.float32) * np.float32(alpha) + np.float32(beta)
    return np.clip(out, 0, 255).astype(np.uint8)


class PhotoMetricDistortion:
    """Random brightness, contrast, saturation and hue of the image, in 8-bit arithmetic.

    Args:
        brightness_delta: brightness shift drawn from ``U(-delta, delta)`` (0–255 units).
        contrast_range: contrast factor range.
        saturation_range: saturation factor range.
        hue_delta: the hue shift is an integer drawn uniformly from ``[-hue_delta, hue_delta)``
            in OpenCV units (0–180 per turn), i.e. 2° steps (the reference's range).
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
        if hue_delta < 0:
            raise ValueError(f"PhotoMetricDistortion: hue_delta must be >= 0, got {hue_delta}")
        self.brightness_delta = float(brightness_delta)
        self.contrast_range = tuple(contrast_range)
        self.saturation_range = tuple(saturation_range)
        self.hue_delta = int(hue_delta)
        self.rng = np.random.default_rng(seed) if seed is not None else np.random

    def _coin(self) -> bool:
        return self.rng.random() < 0.5

    def draw(self) -> PhotometricDraw:
        """Draws the random choices of one call."""
        brightness = (
            float(self.rng.uniform(-self.brightness_delta, self.brightness_delta)) if self._coin() else None
        )
        contrast_first = self._coin()
        contrast = float(self.rng.uniform(*self.contrast_range)) if self._coin() else None
        saturation = float(self.rng.uniform(*self.saturation_range)) if self._coin() else None
        hue = None
        if self._coin():  # an integer in [-hue_delta, hue_delta)
            hue = int(np.floor(self.rng.uniform(-self.hue_delta, self.hue_delta))) if self.hue_delta else 0
        return PhotometricDraw(brightness, contrast, contrast_first, saturation, hue)

    @staticmethod
    def apply(img: np.ndarray, draw: PhotometricDraw) -> np.ndarray:
        """Applies the steps of ``draw`` to an ``H × W × 3`` RGB image (truncated to uint8 first).

        Returns:
            The distorted uint8 image.
        """
        img = np.asarray(img).astype(np.uint8)
        if draw.brightness is not None:
            img = _convert(img, beta=draw.brightness)
        if draw.contrast_first and draw.contrast is not None:
            img = _convert(img, alpha=draw.contrast)
        if draw.saturation is not None:
            hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
            hsv[..., 1] = _convert(hsv[..., 1], alpha=draw.saturation)
            img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        if draw.hue is not None:
            hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
            hsv[..., 0] = (hsv[..., 0].astype(np.int64) + draw.hue) % 180
            img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        if not draw.contrast_first and draw.contrast is not None:
            img = _convert(img, alpha=draw.contrast)
        return img

    def __call__(self, sample: dict) -> dict:
        return {**sample, "image": self.apply(sample["image"], self.draw())}
