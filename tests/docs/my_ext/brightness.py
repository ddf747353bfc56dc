"""A new task: per-pixel brightness (grey level in [0, 1]) regression."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics import Metric

from mtl.tasks import Task
from mtl.tasks.base import colormap


class BrightnessMetric(Metric):
    """Mean absolute error and the share of pixels within 0.1, pooled over the split."""

    def __init__(self) -> None:
        super().__init__()
        # sum states: under DDP the ranks' pixels are pooled, never averaged per rank
        self.add_state("err", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("hit", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        err = (torch.sigmoid(pred.float()) - target).abs()
        self.err += err.sum().double()
        self.hit += (err < 0.1).sum().double()
        self.n += err.numel()

    def compute(self) -> dict[str, torch.Tensor]:
        n = self.n.clamp(min=1)
        return {"mae": self.err / n, "within_0_1": self.hit / n}


class Brightness(Task):
    """Brightness of every pixel, predicted as one logit (sigmoid → [0, 1])."""

    name = "brightness"  # the key of its targets in batches and of its metrics
    default_weight = 1.0
    main_metric = "mae"
    higher_is_better = False
    out_channels = 1
    directions = {"mae": False, "within_0_1": True}  # ↑/↓ in the tables, the sign in Δm
    delta_m_metrics = ("mae",)
    score_metrics = ("within_0_1",)  # the sweep objective val/score (higher is better, in [0, 1])
    report_digits = 3

    def __init__(self, *, weight: float | None = None) -> None:
        if weight is not None:
            self.default_weight = float(weight)

    def loss(self, pred: torch.Tensor, batch: dict) -> torch.Tensor:
        return F.l1_loss(torch.sigmoid(pred.float()), batch[self.name].float())

    def metric(self) -> Metric:
        return BrightnessMetric()

    def postprocess(self, pred: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(pred)

    def to_rgb(self, value: torch.Tensor) -> np.ndarray:
        return colormap(value.reshape(value.shape[-2:]).numpy())
