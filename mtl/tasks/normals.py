"""Surface normal estimation: L1 between the L2-normalised prediction and the unit target.

Loss and weight 10 as in ATRC / InvPT / TaskExpert, computed as the Multi-Task-Transformer code
does (``losses/loss_functions.py``, ``L1Loss(normalize=True)``): the prediction is divided by
``max(‖n‖, 1e-12)`` (``F.normalize``), the L1 distance is summed over the 3 components and averaged
over the valid *pixels*. Invalid pixels are those whose ground truth is the zero vector (this
project's encoding) or holds 255 (the field's: ``AddIgnoreRegions`` writes 255 into every
component of an invalid normal). Metric: mean angular error in degrees over the same valid
pixels (:class:`mtl.metrics.NormalsMetric`, the field's ``NormalsMeter``). Label-free objective
(AdaMerging): 1 − cos(n, n_st), the mean angular disagreement with the single-task model.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics import Metric

from mtl.metrics import NormalsMetric
from mtl.tasks.base import Task
from mtl.tasks.losses import masked_l1
from mtl.tasks.registry import register_task

#: the field's encoding of an invalid ground-truth normal (every component 255)
IGNORE_VALUE = 255.0


def unit(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """L2-normalises over the channel dimension (faster on CPU than ``F.normalize`` for NCHW)."""
    return x * torch.rsqrt((x * x).sum(dim=1, keepdim=True).clamp(min=eps))


@register_task
class Normals(Task):
    """Surface normals (camera frame, unit vectors).

    Args:
        weight: loss weight override.
    """

    name = "normals"
    default_weight = 10.0
    main_metric = "mean"
    higher_is_better = False
    directions = {
        "mean": False,
        "median": False,
        "rmse": False,
        "within_11_25": True,
        "within_22_5": True,
        "within_30": True,
    }
    delta_m_metrics = ("mean",)
    score_metrics = ("within_22_5",)
    score_factor = 0.01  # percent of pixels → fraction
    label_free_needs_reference = True
    out_channels = 3

    def __init__(self, *, weight: float | None = None) -> None:
        if weight is not None:
            self.default_weight = float(weight)

    def loss(self, pred: torch.Tensor, batch: dict) -> torch.Tensor:
        target = batch[self.name]
        # invalid: the zero vector (this project's encoding) or 255 in a component (the field's)
        valid = (target != 0).any(dim=1, keepdim=True) & (target != IGNORE_VALUE).all(dim=1, keepdim=True)
        # eps on the squared norm: 1e-24 = F.normalize's 1e-12 on the norm, as the reference
        return masked_l1(unit(pred.float(), eps=1e-24), target, valid)

    def metric(self) -> Metric:
        return NormalsMetric()

    def label_free_loss(self, pred: torch.Tensor, reference: torch.Tensor | None) -> torch.Tensor:
        if reference is None:
            raise ValueError(f"task '{self.name}' needs the single-task model's predictions")
        return 1.0 - F.cosine_similarity(pred.float(), reference, dim=1, eps=1e-6).mean()

    def postprocess(self, pred: torch.Tensor) -> torch.Tensor:
        return unit(pred)

    def to_rgb(self, value: torch.Tensor) -> np.ndarray:
        v = value.permute(1, 2, 0).numpy()
        return ((v + 1) * 127.5).clip(0, 255).astype(np.uint8)
