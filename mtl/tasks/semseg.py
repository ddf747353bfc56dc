"""Semantic segmentation: per-pixel classification, cross-entropy, mIoU.

Loss and weight as in the multi-task dense-prediction literature (ATRC, InvPT, TaskExpert):
cross-entropy ignoring label 255, weight 1. Label-free objective (AdaMerging): the softmax
entropy divided by log K.
"""

from __future__ import annotations

import numpy as np
import torch
from torchmetrics import Metric

from mtl.metrics import ConfusionMatrixMetric
from mtl.tasks.base import Task, palette
from mtl.tasks.losses import masked_cross_entropy, normalised_entropy
from mtl.tasks.registry import register_task


@register_task
class SemSeg(Task):
    """Semantic segmentation.

    Args:
        num_classes: number of classes (the dataset says how many).
        ignore_index: label value without supervision.
        weight: loss weight override (``None``: the field's default).
    """

    name = "semseg"
    default_weight = 1.0
    main_metric = "miou"
    higher_is_better = True
    directions = {"miou": True, "miou_present": True, "pixel_acc": True}
    delta_m_metrics = ("miou",)
    score_metrics = ("miou",)
    needs_num_classes = True

    def __init__(self, *, num_classes: int, ignore_index: int = 255, weight: float | None = None) -> None:
        if num_classes < 2:
            raise ValueError(f"{self.name}: num_classes must be >= 2, got {num_classes}")
        self.num_classes = num_classes
        self.out_channels = num_classes
        self.ignore_index = ignore_index
        if weight is not None:
            self.default_weight = float(weight)

    def loss(self, pred: torch.Tensor, batch: dict) -> torch.Tensor:
        return masked_cross_entropy(pred, batch[self.name], self.ignore_index)

    def metric(self) -> Metric:
        return ConfusionMatrixMetric(self.num_classes, self.ignore_index)

    def label_free_loss(self, pred: torch.Tensor, reference: torch.Tensor | None) -> torch.Tensor:
        return normalised_entropy(pred)

    def postprocess(self, pred: torch.Tensor) -> torch.Tensor:
        return pred.argmax(dim=1)

    def to_rgb(self, value: torch.Tensor) -> np.ndarray:
        return palette()[value.numpy().astype(np.uint8)]
