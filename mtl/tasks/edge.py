"""Boundary detection: binary edge map, balanced BCE with positive weight 0.95, weight 50.

Loss as in ATRC / InvPT / TaskExpert. The validation metric here is the cheap approximate
F-measure of :class:`mtl.metrics.ApproxEdgeF`; the SEISM odsF is computed by ``eval.py``.
"""

from __future__ import annotations

from torchmetrics import Metric

from mtl.metrics import ApproxEdgeF
from mtl.tasks.saliency import Saliency


class Edge(Saliency):
    """Edge detection.

    Args:
        pos_weight: weight of positive pixels in the balanced BCE (0.95 in the field).
        weight: loss weight override.
        threshold: probability threshold of the approximate validation F.
        radius: pixel tolerance of the approximate validation F.
    """

    name = "edge"
    default_weight = 50.0
    main_metric = "f"
    higher_is_better = True

    def __init__(
        self,
        *,
        pos_weight: float | None = 0.95,
        weight: float | None = None,
        threshold: float = 0.5,
        radius: int = 2,
    ) -> None:
        super().__init__(pos_weight=pos_weight, weight=weight)
        self.threshold = threshold
        self.radius = radius

    def metric(self) -> Metric:
        return ApproxEdgeF(threshold=self.threshold, radius=self.radius)
