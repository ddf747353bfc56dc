"""Human-part segmentation (PASCAL-Context, 6 parts + background).

Cross-entropy ignoring 255 with weight 2, as in ATRC / InvPT / TaskExpert. Images without
a person carry an all-255 map and contribute nothing (loss and metric skip them).

Metric: the field's ``HumanPartsMeter`` (Multi-Task-Transformer,
``TaskPrompter/evaluation/eval_human_parts.py``): mIoU over all 7 classes (background
included), absent classes counting 0 (:class:`mtl.metrics.ConfusionMatrixMetric`). The meter
sees the ground truth after the field's ``AddIgnoreRegions`` transform, which turns a map whose
labels are all background or ignore (no part pixel) into all-ignore: such an image does not
count at all. :meth:`HumanParts.update_metric` applies the same rule per image.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

from mtl.tasks.registry import register_task
from mtl.tasks.semseg import SemSeg


@register_task
class HumanParts(SemSeg):
    """Human parts: same maths as semantic segmentation, different default weight."""

    name = "human_parts"
    default_weight = 2.0

    def update_metric(self, metric: Metric, pred: torch.Tensor, batch: dict) -> None:
        """Adds a batch, leaving out images without any part pixel (the field's ``AddIgnoreRegions``)."""
        target = batch[self.name]
        no_parts = ((target == 0) | (target == self.ignore_index)).flatten(1).all(dim=1)
        mask = no_parts.view(-1, *([1] * (target.dim() - 1)))  # on the device, no host read
        metric.update(pred, torch.where(mask, torch.full_like(target, self.ignore_index), target))
