"""Saliency estimation: binary foreground map, class-balanced BCE, maxF.

Weight 5 and the balanced binary cross-entropy (positive weight = fraction of negatives in
the batch) as in ATRC / InvPT / TaskExpert; maxF with β² = 0.3 as the field's meter computes
it (:class:`mtl.metrics.SaliencyMaxF`: a second sigmoid, thresholds at or above; ``maxf_prob``
beside it, on the probability itself). Label-free objective
(AdaMerging): the binary entropy of the foreground probability divided by log 2.
"""

from __future__ import annotations

import numpy as np
import torch
from torchmetrics import Metric

from mtl.metrics import SaliencyMaxF
from mtl.tasks.base import Task
from mtl.tasks.losses import balanced_bce, binary_entropy
from mtl.tasks.registry import register_task


@register_task
class Saliency(Task):
    """Saliency.

    Args:
        pos_weight: positive weight of the balanced BCE (``None``: batch balancing).
        weight: loss weight override.
    """

    name = "saliency"
    default_weight = 5.0
    main_metric = "maxf"
    higher_is_better = True
    directions = {"maxf": True, "maxf_prob": True, "miou": True}
    delta_m_metrics = ("maxf",)
    score_metrics = ("maxf",)
    out_channels = 1

    def __init__(self, *, pos_weight: float | None = None, weight: float | None = None) -> None:
        self.pos_weight = pos_weight
        if weight is not None:
            self.default_weight = float(weight)

    def loss(self, pred: torch.Tensor, batch: dict) -> torch.Tensor:
        return balanced_bce(pred, batch[self.name], self.pos_weight)

    def metric(self) -> Metric:
        return SaliencyMaxF()

    def label_free_loss(self, pred: torch.Tensor, reference: torch.Tensor | None) -> torch.Tensor:
        return binary_entropy(pred)

    def postprocess(self, pred: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(pred)

    def to_rgb(self, value: torch.Tensor) -> np.ndarray:
        v = value[0].clamp(0, 1).numpy() if value.dim() == 3 else value.numpy()
        v = np.where(v > 1, 0, v)  # ignore (255) shown black
        return np.repeat((v * 255).astype(np.uint8)[..., None], 3, axis=-1)
