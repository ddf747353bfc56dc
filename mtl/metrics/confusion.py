"""Segmentation metrics from a confusion matrix accumulated over the whole split.

mIoU as reported by the multi-task dense-prediction literature (e.g. Vandenhende et al.,
"Multi-Task Learning for Dense Prediction Tasks: A Survey", TPAMI 2021): one confusion
matrix summed over every valid pixel of every image (and, under DDP, every rank), then
IoU_c = TP_c / (TP_c + FP_c + FN_c), averaged over classes.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric


class ConfusionMatrixMetric(Metric):
    """Accumulates a ``C × C`` confusion matrix (rows: ground truth, columns: prediction).

    Args:
        num_classes: number of classes ``C``.
        ignore_index: label value excluded from the statistics.
    """

    full_state_update = False

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.add_state(
            "confmat",
            default=torch.zeros(num_classes, num_classes, dtype=torch.long),
            dist_reduce_fx="sum",
        )

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Adds a batch.

        Args:
            pred: ``B × C × H × W`` logits or ``B × H × W`` class ids.
            target: ``B × H × W`` integer labels.
        """
        if pred.dim() == target.dim() + 1:
            pred = pred.argmax(dim=1)
        valid = target != self.ignore_index
        gt, pr = target[valid].long(), pred[valid].long()
        if gt.numel() and (int(gt.max()) >= self.num_classes or int(gt.min()) < 0):
            raise ValueError(
                f"ground-truth label {int(gt.max())} outside [0, {self.num_classes}) "
                f"(ignore_index={self.ignore_index})"
            )
        idx = gt * self.num_classes + pr
        self.confmat += torch.bincount(idx, minlength=self.num_classes**2).view_as(self.confmat)

    def compute(self) -> dict[str, torch.Tensor]:
        """Returns ``miou``, ``pixel_acc`` and ``iou_<c>`` for every class."""
        cm = self.confmat.double()
        tp = cm.diag()
        union = cm.sum(0) + cm.sum(1) - tp
        present = union > 0
        iou = torch.where(present, tp / union.clamp(min=1), torch.zeros_like(tp))
        out = {
            "miou": iou[present].mean() if present.any() else iou.new_tensor(0.0),
            "pixel_acc": tp.sum() / cm.sum().clamp(min=1),
        }
        out.update({f"iou_{c}": iou[c] for c in range(self.num_classes)})
        return {k: v.float() for k, v in out.items()}
