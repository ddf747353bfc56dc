"""Monocular depth estimation: L1 on valid pixels (depth > 0), RMSE.

Loss and weight 1 as in ATRC / InvPT / TaskExpert on NYUD-v2. The head predicts metres
directly (no activation), as those methods do; the metric (:class:`mtl.metrics.DepthMetric`)
treats a non-positive prediction as 1e-9 m in every term, as the field's evaluator does.
Label-free objective (AdaMerging): the relative L1 disagreement with the single-task model's
depth, Σ|d − d_st| / Σ|d_st|.
"""

from __future__ import annotations

from typing import ClassVar

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
    #: colour of pixels without ground truth (target depth <= 0)
    missing_rgb: ClassVar[tuple[int, int, int]] = (0, 0, 0)
    #: colour of predicted depths <= 0 m or NaN (the evaluator counts them as 1e-9 m)
    nonpositive_rgb: ClassVar[tuple[int, int, int]] = (255, 0, 255)

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

    def to_rgb(
        self,
        value: torch.Tensor,
        *,
        vrange: tuple[float, float] | None = None,
        invalid: tuple[int, int, int] | None = None,
    ) -> np.ndarray:
        """Depth ``1 × H × W`` (metres) → viridis colours, near dark, far yellow.

        Args:
            value: one depth map (target or prediction).
            vrange: ``(near, far)`` metres at the ends of the colour map; values beyond clip to the
                ends. Default ``(0, max_display)``.
            invalid: colour of values <= 0 or NaN; default :attr:`missing_rgb` (a target's missing
                pixels). Predictions get :attr:`nonpositive_rgb` (see :meth:`visualise`).
        """
        near, far = vrange if vrange is not None else (0.0, self.max_display)
        d = value[0].float().numpy()
        rgb = colormap((d - near) / max(far - near, 1e-6))
        rgb[~(d > 0)] = self.missing_rgb if invalid is None else invalid
        return rgb

    def display_range(self, *values: torch.Tensor) -> tuple[float, float]:
        """``(near, far)`` metres shared by the pictures of one sample's depth maps (target and
        prediction, so that their colours compare): the 1st and 99th percentiles of their positive,
        finite values together; ``(0, max_display)`` when there are none."""
        pos = [v.detach().float().reshape(-1).cpu() for v in values]
        d = torch.cat([v[(v > 0) & v.isfinite()] for v in pos])
        if d.numel() == 0:
            return 0.0, float(self.max_display)
        near, far = (
            float(q) for q in torch.quantile(d[:: max(1, d.numel() // 1_000_000)], torch.tensor([0.01, 0.99]))
        )
        return near, max(far, near + 1e-3)

    def visualise(self, pred: torch.Tensor, batch: dict) -> np.ndarray:
        """Ground truth (left) next to prediction (right) in one colour range (:meth:`display_range`);
        missing ground truth :attr:`missing_rgb`, predictions <= 0 m :attr:`nonpositive_rgb`.

        Returns:
            ``H × 2W × 3`` uint8 image.
        """
        gt = self.target_for_display(batch).detach().cpu()
        pr = self.postprocess(pred[:1].detach().float())[0].cpu()
        vrange = self.display_range(gt, pr)
        return np.concatenate(
            [self.to_rgb(gt, vrange=vrange), self.to_rgb(pr, vrange=vrange, invalid=self.nonpositive_rgb)],
            axis=1,
        )
