"""Pixel-wise regression metrics for depth and surface normals, pooled over the split.

Conventions follow the NYUD-v2 multi-task literature (Eigen & Fergus, ICCV 2015;
Vandenhende et al., TPAMI 2021): errors are summed over every valid pixel of the split and
divided by the number of valid pixels, never averaged per image.
"""

from __future__ import annotations

import math

import torch
from torchmetrics import Metric


class DepthMetric(Metric):
    """Depth RMSE over valid pixels (ground truth > 0).

    Args:
        min_depth: ground-truth values at or below this are missing.
    """

    full_state_update = False

    def __init__(self, min_depth: float = 0.0) -> None:
        super().__init__()
        self.min_depth = min_depth
        self.add_state("sq_err", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Adds a batch of ``B × 1 × H × W`` predictions and targets (metres)."""
        valid = target > self.min_depth
        diff = (pred.float() - target.float())[valid]
        self.sq_err += diff.double().pow(2).sum()
        self.count += valid.sum()

    def compute(self) -> dict[str, torch.Tensor]:
        """Returns ``rmse``."""
        return {"rmse": (self.sq_err / self.count.clamp(min=1)).sqrt().float()}


class NormalsMetric(Metric):
    """Mean angular error (degrees) of surface normals over valid pixels.

    A pixel is valid where the ground-truth normal has non-zero length; predictions are
    L2-normalised before the angle is taken.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("sum_deg", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Adds a batch of ``B × 3 × H × W`` predictions and unit-vector targets."""
        pred, target = pred.float(), target.float()
        valid = target.abs().sum(dim=1) > 0  # zero vector = invalid
        dot = (pred * target).sum(dim=1)
        norms = ((pred * pred).sum(dim=1) * (target * target).sum(dim=1)).clamp(min=1e-24).sqrt()
        cos = (dot / norms).clamp(-1.0, 1.0)[valid]
        self.sum_deg += torch.rad2deg(torch.acos(cos)).double().sum()
        self.count += valid.sum()

    def compute(self) -> dict[str, torch.Tensor]:
        """Returns ``mean`` (degrees)."""
        mean = self.sum_deg / self.count.clamp(min=1)
        return {"mean": mean.float() if self.count > 0 else torch.tensor(math.nan)}
