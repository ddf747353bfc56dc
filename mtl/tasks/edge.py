"""Boundary detection: binary edge map, balanced BCE with positive weight 0.95, weight 50.

Loss as in ATRC / InvPT / TaskExpert. Two metrics:

* training validation: the cheap approximate F-measure of :class:`mtl.metrics.ApproxEdgeF`
  (one threshold, a pixel tolerance by max-pooling), key ``f``;
* ``eval.py``: the exact odsF / oisF / AP of the SEISM protocol
  (:class:`mtl.metrics.SEISMEdgeF`, keys ``odsf``, ``oisf``, ``ap``), which the published
  tables report. The matching tolerance defaults to the dataset's
  (:attr:`mtl.data.base.DenseDataset.EDGE_MAX_DIST`), and PASCAL-Context's ground truth is
  its ``LabelMap`` (the batch's ``edge_labelmap``), as SEISM's.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
from torchmetrics import Metric

from mtl.metrics import ApproxEdgeF, SEISMEdgeF
from mtl.progress import Mode
from mtl.tasks.registry import register_task
from mtl.tasks.saliency import Saliency

if TYPE_CHECKING:
    from mtl.data.base import DenseDataset

#: batch key of the segment label map the SEISM ground-truth boundaries come from (PASCAL-Context)
LABEL_MAP_KEY = "edge_labelmap"


@register_task
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
    directions = {"f": True, "odsf": True, "oisf": True, "ap": True}
    delta_m_metrics = ("odsf", "f")
    score_metrics = ("odsf", "f")

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

    def eval_metric(
        self,
        *,
        exact: bool = True,
        max_dist: float = 0.011,
        workers: int = 0,
        start_method: str = "forkserver",
        progress: Mode = "auto",
        progress_interval: float = 20.0,
    ) -> Metric:
        """SEISM odsF / oisF / AP (``exact``), or the approximate F of training validation.

        Args:
            exact: use the SEISM protocol.
            max_dist: matching tolerance, fraction of the image diagonal (NYUD-v2 0.011,
                PASCAL-Context 0.0075).
            workers: worker processes for the per-image evaluation (0: in-process).
            start_method: multiprocessing start method of the workers.
            progress: progress of the exact evaluation: ``auto`` (a bar on a terminal, a log line every
                ``progress_interval`` seconds otherwise), ``always`` (log lines) or ``never``.
            progress_interval: seconds between two progress lines.
        """
        if not exact:
            return self.metric()
        return SEISMEdgeF(
            max_dist=max_dist,
            workers=workers,
            start_method=start_method,
            progress=progress,
            progress_interval=progress_interval,
        )

    @classmethod
    def eval_metric_defaults(cls, dataset: type[DenseDataset]) -> dict:
        """The dataset's matching tolerance; min(4, CPUs) worker processes."""
        return {"max_dist": dataset.EDGE_MAX_DIST, "workers": min(4, os.cpu_count() or 1)}

    def update_metric(self, metric: Metric, pred: torch.Tensor, batch: dict) -> None:
        """SEISM on PASCAL-Context: ground-truth boundaries from the batch's label map."""
        if LABEL_MAP_KEY in batch and isinstance(metric, SEISMEdgeF):
            metric.update(pred, batch[self.name], label_map=batch[LABEL_MAP_KEY])
        else:
            metric.update(pred, batch[self.name])
