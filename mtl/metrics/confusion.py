"""Segmentation metrics from a confusion matrix accumulated over the whole split.

mIoU as reported by the multi-task dense-prediction literature (e.g. Vandenhende et al.,
"Multi-Task Learning for Dense Prediction Tasks: A Survey", TPAMI 2021) and computed by its
evaluators (Multi-Task-Transformer, ``TaskPrompter/evaluation/eval_semseg.py`` and
``eval_human_parts.py``, after ATRC / ASTMT): one confusion matrix summed over every valid pixel
of every image (and, under DDP, every rank), then IoU_c = TP_c / max(TP_c + FP_c + FN_c, 1e-8)
for **every** class, averaged over all ``C`` classes. A class absent from both the predictions
and the ground truth of the evaluated images therefore counts as IoU 0, exactly as there: on a
full split every class is present and this is the usual mIoU; on a subset or a short validation
it is lower. The mean over the classes that do occur (union > 0) is reported beside it as
``miou_present``; it is not the number of the published tables.
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
        if gt.numel() and bool(((gt < 0) | (gt >= self.num_classes)).any()):  # one host read per batch
            bad = gt[(gt < 0) | (gt >= self.num_classes)]
            raise ValueError(
                f"ground-truth label {int(bad[0])} outside [0, {self.num_classes}) "
                f"(ignore_index={self.ignore_index})"
            )
        idx = gt * self.num_classes + pr
        self.confmat += torch.bincount(idx, minlength=self.num_classes**2).view_as(self.confmat)

    def compute(self) -> dict[str, torch.Tensor]:
        """Returns ``miou`` (all classes, the field's), ``miou_present`` (classes with a non-empty
        union only), ``pixel_acc`` and ``iou_<c>`` for every class."""
        cm = self.confmat.double()
        tp = cm.diag()
        union = cm.sum(0) + cm.sum(1) - tp  # TP + FP + FN
        present = union > 0
        iou = tp / union.clamp(min=1e-8)  # 0 where the union is empty
        out = {
            "miou": iou.mean(),
            # the mean over the classes that occur, 0 when none does; on the device, no host read
            "miou_present": iou.sum() / present.sum().clamp(min=1),
            "pixel_acc": tp.sum() / cm.sum().clamp(min=1),
        }
        out.update({f"iou_{c}": iou[c] for c in range(self.num_classes)})
        return {k: v.float() for k, v in out.items()}
