"""Pixel-wise regression metrics for depth and surface normals, pooled over the split.

Conventions follow the NYUD-v2 literature (D. Eigen, R. Fergus, "Predicting Depth, Surface
Normals and Semantic Labels with a Common Multi-Scale Convolutional Architecture", ICCV 2015;
S. Vandenhende et al., "Multi-Task Learning for Dense Prediction Tasks: A Survey", TPAMI
2021): every error is summed over every valid pixel of the split and divided by the number
of valid pixels, never averaged per image. All states are sums, so DDP pools them exactly.

Depth, as the field's evaluator computes it (Multi-Task-Transformer,
``TaskPrompter/utils/utils.py`` ``get_output`` and ``TaskPrompter/evaluation/eval_depth.py``
``DepthMeter``, after ASTMT): valid pixels are ``min_depth < g < max_depth`` (0 and 80 m there);
every prediction is first clamped to ≥ 0 and then every value ≤ 0 is replaced by 1e-9, so a
non-positive prediction counts as 1e-9 m in **every** term, RMSE and abs-rel included (the
project computed those on the raw prediction before). Then ``rmse`` = √mean((p − g)²),
``abs_rel`` = mean(|p − g| / g), ``sq_rel`` = mean((p − g)² / g), ``log_rmse`` =
√mean((ln p − ln g)²), and, beyond the field's meter, ``delta1..3`` = the fraction of pixels
with max(p/g, g/p) < 1.25, 1.25², 1.25³ (Eigen et al.), on the same clamped prediction.

Normals (the field's ``NormalsMeter``, Multi-Task-Transformer ``code/evaluation/eval_normals.py``,
after ASTMT): a ground-truth pixel is invalid when any of its channels holds the ignore value
255 (the field's data pipeline writes 255 into all three channels of zero-length normals) or
when its vector has zero length (this project's encoding of the same pixels); prediction and
ground truth are L2-normalised and the angle is 2·atan2(‖p̂ − ĝ‖, ‖p̂ + ĝ‖) in degrees (the
field's formula, equal to acos(p̂·ĝ) without its loss of precision near 0° and 180°); ``mean``,
``rmse``, ``median`` and the percentages ``within_11_25``, ``within_22_5``, ``within_30``
(strictly below). The median needs every error; it is read off a 0.001° histogram of the
errors (a sum state, 180 000 bins): the middle order statistics (the mean of the two middle
ones for an even count, as ``numpy.median``) are bin centres, so the median is exact to
0.0005°.
"""

from __future__ import annotations

import math

import torch
from torchmetrics import Metric

_DEPTH_SUMS = ("sq_err", "abs_rel", "sq_rel", "sq_log", "delta1", "delta2", "delta3")


class DepthMetric(Metric):
    """Depth RMSE, abs-rel, sq-rel, log-RMSE and δ accuracies over valid pixels (the field's rules).

    Args:
        min_depth: ground-truth values at or below this are missing.
        max_depth: ground-truth values at or above this are out of range (80 m in the field's
            evaluator, inherited from its Cityscapes setting; no NYUD-v2 depth reaches it).
        min_pred: the value a non-positive prediction takes (1e-9 in the field's evaluator).
    """

    full_state_update = False

    def __init__(self, min_depth: float = 0.0, max_depth: float = 80.0, min_pred: float = 1e-9) -> None:
        super().__init__()
        if not max_depth > min_depth:
            raise ValueError(f"max_depth ({max_depth}) must exceed min_depth ({min_depth})")
        self.min_depth = min_depth
        self.max_depth = max_depth
        self.min_pred = min_pred
        for name in _DEPTH_SUMS:
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Adds a batch of ``B × 1 × H × W`` raw predictions and targets (metres)."""
        if pred.shape != target.shape:
            raise ValueError(f"depth prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ")
        valid = (target > self.min_depth) & (target < self.max_depth)
        g = target.double()[valid]
        p = pred.double()[valid]
        # clamp to ≥ 0, then ≤ 0 → 1e-9; a NaN stays NaN as in the field's (torch.clamp keeps it)
        p = torch.where(p <= 0, torch.full_like(p, self.min_pred), p)
        err = p - g
        ratio = torch.maximum(p / g, g / p)
        self.sq_err += err.pow(2).sum()
        self.abs_rel += (err.abs() / g).sum()
        self.sq_rel += (err.pow(2) / g).sum()
        self.sq_log += (p.log() - g.log()).pow(2).sum()
        for k in (1, 2, 3):
            setattr(self, f"delta{k}", getattr(self, f"delta{k}") + (ratio < 1.25**k).sum())
        self.count += valid.sum()

    def compute(self) -> dict[str, torch.Tensor]:
        """Returns ``rmse``, ``abs_rel``, ``sq_rel``, ``log_rmse``, ``delta1``, ``delta2``, ``delta3``."""
        n = self.count.clamp(min=1).double()
        out = {
            "rmse": (self.sq_err / n).sqrt(),
            "abs_rel": self.abs_rel / n,
            "sq_rel": self.sq_rel / n,
            "log_rmse": (self.sq_log / n).sqrt(),
        }
        out.update({f"delta{k}": getattr(self, f"delta{k}") / n for k in (1, 2, 3)})
        return {k: v.float() for k, v in out.items()}


class NormalsMetric(Metric):
    """Angular error statistics (degrees) of surface normals over valid pixels.

    Args:
        bin_deg: width of the histogram bins used for the median.
        ignore_index: a ground-truth channel value that marks the pixel invalid (the field's 255).
    """

    full_state_update = False

    def __init__(self, bin_deg: float = 0.001, ignore_index: float | None = 255) -> None:
        super().__init__()
        self.bin_deg = bin_deg
        self.ignore_index = ignore_index
        self.n_bins = int(math.ceil(180.0 / bin_deg))
        for name in ("sum_deg", "sum_sq"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        for name in ("count", "within_11_25", "within_22_5", "within_30", "nonfinite"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("hist", default=torch.zeros(self.n_bins, dtype=torch.long), dist_reduce_fx="sum")

    @staticmethod
    def angles(pred: torch.Tensor, target: torch.Tensor, ignore_index: float | None = 255) -> torch.Tensor:
        """Angular errors (degrees, float64) of the valid pixels of ``B × 3 × H × W`` maps.

        Invalid: a ground-truth channel equal to ``ignore_index`` (any channel, as the field's
        meter), or a zero-length ground-truth vector.
        """
        pred, target = pred.double(), target.double()
        valid = (target * target).sum(dim=1) > 0  # zero vector = invalid
        if ignore_index is not None:
            valid &= (target != ignore_index).all(dim=1)
        p = pred * torch.rsqrt((pred * pred).sum(dim=1, keepdim=True)).nan_to_num(0.0, 0.0, 0.0)
        g = target * torch.rsqrt((target * target).sum(dim=1, keepdim=True)).nan_to_num(0.0, 0.0, 0.0)
        diff = (p - g).pow(2).sum(dim=1).sqrt()
        summ = (p + g).pow(2).sum(dim=1).sqrt()
        return torch.rad2deg(2 * torch.atan2(diff, summ))[valid]

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Adds a batch of ``B × 3 × H × W`` predictions and unit-vector targets."""
        if pred.shape != target.shape or pred.dim() != 4 or pred.shape[1] != 3:
            raise ValueError(
                f"normals prediction {tuple(pred.shape)} and target {tuple(target.shape)} "
                "must both be B × 3 × H × W"
            )
        deg = self.angles(pred, target, self.ignore_index)
        self.sum_deg += deg.sum()
        self.sum_sq += deg.pow(2).sum()
        self.count += deg.numel()
        self.within_11_25 += (deg < 11.25).sum()
        self.within_22_5 += (deg < 22.5).sum()
        self.within_30 += (deg < 30.0).sum()
        # a NaN angle (NaN/inf prediction) has no bin: it makes the mean and RMSE NaN, counts as not
        # within any threshold (as NaN < t in the field's numpy meter) and the median NaN
        finite = torch.isfinite(deg)
        self.nonfinite += (~finite).sum()
        idx = (torch.where(finite, deg, torch.zeros_like(deg)) / self.bin_deg).long()
        # integer adds: exact, and no host read (bincount reads the maximum on CUDA)
        self.hist.index_add_(0, idx.clamp(max=self.n_bins - 1), finite.long())

    def _median(self) -> torch.Tensor:
        """The median error: the middle order statistic(s) as bin centres, on the states' device.

        Odd ``n``: the ``(n + 1) / 2``-th smallest twice; even ``n``: the ``n / 2``-th and the next
        (1-based), averaged as ``numpy.median``; no value is read on the host.
        """
        n = self.count
        ks = torch.stack([(n + 1) // 2, n // 2 + 1])  # the two middle ranks (1-based)
        bins = torch.searchsorted(self.hist.cumsum(0), ks)
        centres = (bins.double() + 0.5) * self.bin_deg
        median = 0.5 * (centres[0] + centres[1])
        return torch.where(self.nonfinite > 0, torch.full_like(median, math.nan), median)  # numpy's median

    def compute(self) -> dict[str, torch.Tensor]:
        """Returns ``mean``, ``median``, ``rmse`` (degrees) and ``within_*`` (percent); NaN for all
        of them when no pixel was valid. Every value lies on the states' device."""
        n = self.count.double()
        out = {
            "mean": self.sum_deg / n,
            "median": self._median(),
            "rmse": (self.sum_sq / n).sqrt(),
            "within_11_25": 100.0 * self.within_11_25 / n,
            "within_22_5": 100.0 * self.within_22_5 / n,
            "within_30": 100.0 * self.within_30 / n,
        }
        empty = self.count == 0
        return {k: torch.where(empty, torch.full_like(v, math.nan), v).float() for k, v in out.items()}
