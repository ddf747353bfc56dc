"""Binary dense metrics: saliency maxF and a cheap approximate boundary F-measure.

Saliency maxF (key ``maxf``) is the field's ``SaliencyMeter`` (Multi-Task-Transformer,
``TaskPrompter/evaluation/eval_sal.py`` with ``threshold_step=0.05``, ``beta_squared=0.3`` from
``evaluate_utils.py``; the same meter in ATRC and InvPT), which every published table since
ATRC reports:

* the network's foreground probability ``p`` is written as ``255·p`` (``get_output``), the meter
  divides it by 255 and then applies a **second** sigmoid: it thresholds ``q = sigmoid(p)``,
  which lies in [0.5, 0.731], so only the thresholds 0.55, 0.60, 0.65, 0.70 (and "everything")
  separate pixels — in terms of ``p``: 0.2007, 0.4055, 0.6190, 0.8473;
* thresholds ``torch.arange(0.05, 1, 0.05)`` in float32 (19 values; the 12th is 0.59999996, not
  float32(0.6)); a pixel is positive when ``q >= t`` (**at or above**), compared in float32;
* TP, predicted positives and actual positives summed over the split per threshold;
  P = TP / predicted, R = TP / actual, F = (1 + β²)·P·R / (β²·P + R) with β² = 0.3, a 0/0 F
  counted as 0; maxF = the largest F.

``maxf_prob`` is offered beside it: the same meter on the probability itself (one sigmoid),
whose 19 thresholds all act; it is not the published number. Saliency mIoU (key ``miou``)
follows the ASTMT / MTI-Net ``eval_sal`` (K.-K. Maninis et al., "Attentive Single-Tasking of
Multiple Tasks", CVPR 2019): per image, the Jaccard index of ``prob > t`` (strictly above) with
the ground truth at 15 thresholds ``linspace(0.2, 0.9, 15)`` (1 when both are empty), averaged
over images, best threshold; there the probability is read back from an 8-bit PNG, here it is
used unquantised. The per-threshold sums and the image count are sum states.

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


def field_saliency_thresholds(step: float = 0.05) -> torch.Tensor:
    """The field meter's thresholds: ``torch.arange(step, 1, step)`` in float32."""
    return torch.arange(step, 1, step, dtype=torch.float32)


class SaliencyMaxF(Metric):
    """maxF (β² = 0.3) of a binary map pooled over the split, as the field's meter computes it.

    Args:
        thresholds: probability thresholds (default: the field's 19, 0.05 … 0.95).
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
        thr = field_saliency_thresholds() if thresholds is None else torch.tensor(thresholds)
        self.register_buffer("thresholds", thr.float(), persistent=False)
        self.beta2 = beta2
        self.ignore_index = ignore_index
        n = len(thr)
        for name in ("tp", "pred_pos", "tp_prob", "pred_pos_prob"):
            self.add_state(name, default=torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("gt_pos", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        iou_thr = torch.linspace(0.2, 0.9, 15, dtype=torch.float64).float()
        self.register_buffer("iou_thresholds", iou_thr, persistent=False)
        self.add_state("iou_sum", default=torch.zeros(15, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n_images", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    @staticmethod
    def field_scores(logits: torch.Tensor) -> torch.Tensor:
        """What the field's meter thresholds: ``sigmoid((255·sigmoid(x)) / 255)``, in float32."""
        written = torch.sigmoid(logits.float()) * 255.0  # get_output: the probability × 255
        return torch.sigmoid(written / 255.0)  # the meter: ÷ 255, then "squash logits" again

    def _count(self, scores: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        above = scores[None, :] >= self.thresholds.to(scores.device)[:, None]  # (T, N), at or above
        return (above & gt[None]).sum(dim=1).double(), above.sum(dim=1).double()

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """Adds ``B × 1 × H × W`` logits and binary targets."""
        valid = target != self.ignore_index
        gt = target[valid] > 0.5
        tp, pred_pos = self._count(self.field_scores(logits)[valid], gt)
        self.tp += tp
        self.pred_pos += pred_pos
        tp, pred_pos = self._count(torch.sigmoid(logits.float())[valid], gt)
        self.tp_prob += tp
        self.pred_pos_prob += pred_pos
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

    def _maxf(self, tp: torch.Tensor, pred_pos: torch.Tensor) -> torch.Tensor:
        p = tp / pred_pos
        r = tp / self.gt_pos
        f = (1 + self.beta2) * p * r / (self.beta2 * p + r)
        return torch.nan_to_num(f, nan=0.0).max()  # the field: a 0/0 F counts as 0

    def compute(self) -> dict[str, torch.Tensor]:
        """Returns ``maxf`` (the field's), ``maxf_prob`` (one sigmoid) and ``miou``."""
        miou = (self.iou_sum / self.n_images.clamp(min=1)).max()
        return {
            "maxf": self._maxf(self.tp, self.pred_pos).float(),
            "maxf_prob": self._maxf(self.tp_prob, self.pred_pos_prob).float(),
            "miou": miou.float(),
        }


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
