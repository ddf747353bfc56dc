"""Binary dense metrics: saliency maxF and a cheap approximate boundary F-measure.

Saliency maxF follows the protocol of the multi-task literature (ATRC / InvPT): precision
and recall pooled over the whole split at thresholds 0.05, 0.10, …, 0.95, then
F_β = (1 + β²)·P·R / (β²·P + R) with β² = 0.3, maximised over thresholds. Probabilities are
taken as ``sigmoid(logit)`` once (no second squeeze, see the papers). Saliency mIoU follows
the ASTMT / ATRC meter (K.-K. Maninis et al., "Attentive Single-Tasking of Multiple Tasks",
CVPR 2019): per image, the Jaccard index of ``prob > t`` with the ground truth at 15
thresholds ``linspace(0.2, 0.9, 15)`` (1 when both are empty), averaged over images, best
threshold. The per-threshold sums and the image count are sum states.

:class:`ApproxEdgeF` is the cheap validation-time boundary score: predictions binarised at
one threshold, a prediction pixel counts as correct if a ground-truth boundary lies within
``radius`` pixels (Chebyshev distance, via max-pooling) and vice versa for recall. It is
not the SEISM odsF that ``eval.py`` will compute, but it tracks it well enough to monitor
training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import Metric


def _f_measure(p: torch.Tensor, r: torch.Tensor, beta2: float) -> torch.Tensor:
    return (1 + beta2) * p * r / (beta2 * p + r).clamp(min=1e-12)


class SaliencyMaxF(Metric):
    """maxF (β² = 0.3) of a binary map pooled over the split.

    Args:
        thresholds: probability thresholds (default 0.05 … 0.95 step 0.05).
        beta2: β² of the F-measure.
        ignore_index: target value to ignore.
    """

    full_state_update = False

    def __init__(
        self,
        thresholds: list[float] | None = None,
        beta2: float = 0.3,
        ignore_index: int = 255,
    ) -> None:
        super().__init__()
        thr = thresholds or [round(0.05 * i, 2) for i in range(1, 20)]
        self.register_buffer("thresholds", torch.tensor(thr, dtype=torch.float32), persistent=False)
        self.beta2 = beta2
        self.ignore_index = ignore_index
        n = len(thr)
        for name in ("tp", "pred_pos", "gt_pos"):
            self.add_state(name, default=torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
        iou_thr = torch.linspace(0.2, 0.9, 15, dtype=torch.float64).float()
        self.register_buffer("iou_thresholds", iou_thr, persistent=False)
        self.add_state("iou_sum", default=torch.zeros(15, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n_images", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """Adds ``B × 1 × H × W`` logits and binary targets."""
        valid = target != self.ignore_index
        prob = torch.sigmoid(logits.float())[valid]
        gt = target[valid] > 0.5
        above = prob[None, :] > self.thresholds.to(prob.device)[:, None]  # (T, N)
        self.tp += (above & gt[None]).sum(dim=1).double()
        self.pred_pos += above.sum(dim=1).double()
        self.gt_pos += gt.sum().double()
        self._update_iou(torch.sigmoid(logits.float()).reshape(target.shape[0], -1), target)

    def _update_iou(self, prob: torch.Tensor, target: torch.Tensor) -> None:
        target = target.reshape(prob.shape)
        valid = target != self.ignore_index
        gt = (target > 0.5) & valid
        above = (prob[:, None, :] > self.iou_thresholds.to(prob.device)[None, :, None]) & valid[:, None]
        inter = (above & gt[:, None]).sum(-1).double()  # (B, T)
        union = (above | gt[:, None]).sum(-1).double()
        iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
        self.iou_sum += iou.sum(0)
        self.n_images += prob.shape[0]

    def compute(self) -> dict[str, torch.Tensor]:
        """Returns ``maxf`` and ``miou``."""
        p = self.tp / self.pred_pos.clamp(min=1)
        r = self.tp / self.gt_pos.clamp(min=1)
        miou = (self.iou_sum / self.n_images.clamp(min=1)).max()
        return {"maxf": _f_measure(p, r, self.beta2).max().float(), "miou": miou.float()}


class ApproxEdgeF(Metric):
    """Approximate boundary F-measure at a fixed threshold with a pixel tolerance.

    Args:
        threshold: probability above which a pixel is a predicted boundary.
        radius: matching tolerance in pixels.
        ignore_index: target value to ignore.
    """

    full_state_update = False

    def __init__(self, threshold: float = 0.5, radius: int = 2, ignore_index: int = 255) -> None:
        super().__init__()
        self.threshold = threshold
        self.radius = radius
        self.ignore_index = ignore_index
        for name in ("pred_hit", "pred_pos", "gt_hit", "gt_pos"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def _dilate(self, x: torch.Tensor) -> torch.Tensor:
        k = 2 * self.radius + 1
        return F.max_pool2d(x.float(), kernel_size=k, stride=1, padding=self.radius) > 0.5

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """Adds ``B × 1 × H × W`` logits and binary targets."""
        valid = target != self.ignore_index
        pred = (torch.sigmoid(logits.float()) > self.threshold) & valid
        gt = (target > 0.5) & valid
        self.pred_hit += (pred & self._dilate(gt)).sum().double()
        self.pred_pos += pred.sum().double()
        self.gt_hit += (gt & self._dilate(pred)).sum().double()
        self.gt_pos += gt.sum().double()

    def compute(self) -> dict[str, torch.Tensor]:
        """Returns ``f`` (the approximate boundary F-measure, β = 1)."""
        p = self.pred_hit / self.pred_pos.clamp(min=1)
        r = self.gt_hit / self.gt_pos.clamp(min=1)
        return {"f": _f_measure(p, r, 1.0).float()}
