"""Monocular depth estimation: L1 on valid pixels (depth > 0), RMSE.

Loss and weight 1 as in ATRC / InvPT / TaskExpert on NYUD-v2. The head predicts metres
directly (no activation), as those methods do; the metric (:class:`mtl.metrics.DepthMetric`)
treats a non-positive prediction as 1e-9 m in every term, as the field's evaluator does.
Label-free objective (AdaMerging): the relative L1 disagreement with the single-task model's
depth, Σ|d − d_st| / Σ|d_st|.
"""

from __future__ import annotations

import numpy as np
import torch
from torchmetrics import Metric

from mtl.metrics import DepthMetric
from mtl.tasks.base import Task, colormap
from mtl.tasks.losses import masked_l1
from mtl.tasks.registry import register_task


@register_task
class Depth(Task):
    """Depth in metres.

    Args:
        weight: loss weight override.
        max_display: depth (metres) at the top of the pictures' colour map.
    """

    name = "depth"
    default_weight = 1.0
    main_metric = "rmse"
    higher_is_better = False
    directions = {
        "rmse": False,
        "abs_rel": False,
        "sq_rel": False,
        "log_rmse": False,
        "delta1": True,
        "delta2": True,
        "delta3": True,
    }
    delta_m_metrics = ("rmse",)
    score_metrics = ("delta1",)
    report_digits = 4  # metres and δ fractions
    label_free_needs_reference = True
    out_channels = 1

    def __init__(self, *, weight: float | None = None, max_display: float = 10.0) -> None:
        if weight is not None:
            self.default_weight = float(weight)
        self.max_display = max_display

    def loss(self, pred: torch.Tensor, batch: dict) -> torch.Tensor:
        target = batch[self.name]
        return masked_l1(pred, target, target > 0)

    def metric(self) -> Metric:
        return DepthMetric()

    def label_free_loss(self, pred: torch.Tensor, reference: torch.Tensor | None) -> torch.Tensor:
        if reference is None:
            raise ValueError(f"task '{self.name}' needs the single-task model's predictions")
        return (pred.float() - reference).abs().sum() / reference.abs().sum().clamp_min(1e-6)

    def postprocess(self, pred: torch.Tensor) -> torch.Tensor:
        return pred

    def to_rgb(self, value: torch.Tensor) -> np.ndarray:
        d = value[0].numpy()
        rgb = colormap(d / self.max_display)
        rgb[d <= 0] = 0  # missing depth: black
        return rgb
