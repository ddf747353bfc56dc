"""The :class:`Task` contract: everything the framework knows about one dense task.

A task owns its number of output channels, its loss and default loss weight (the values
used by the multi-task dense-prediction literature, see the papers), a fresh metric and how
a batch updates it, the post-processing of raw network outputs, the headline metric(s) of the
published tables and Δm with their directions, the sweep score, the label-free objective of
AdaMerging and a picture of prediction versus ground truth. Nothing outside the task's own file
branches on a task name: a new task is one file (a :class:`Task` subclass, registered with
:func:`mtl.tasks.register_task` or named by ``task_options.<name>._target_``) plus its config.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
from torchmetrics import Metric

if TYPE_CHECKING:  # typing only: the tasks do not depend on the data package
    from mtl.data.base import DenseDataset


def palette(n: int = 256) -> np.ndarray:
    """A fixed, distinguishable colour for each label id (PASCAL VOC bit-interleaving)."""
    cmap = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    cmap[255] = (255, 255, 255)
    return cmap


# anchors of matplotlib's "viridis" (0, .25, .5, .75, 1), linearly interpolated
_VIRIDIS = np.array(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64
)


def colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] → ``… × 3`` uint8 colours of a perceptually ordered (viridis-like) map."""
    v = np.clip(np.nan_to_num(values, nan=0.0), 0.0, 1.0) * (len(_VIRIDIS) - 1)
    lo = np.minimum(v.astype(np.int64), len(_VIRIDIS) - 2)
    frac = (v - lo)[..., None]
    return ((1 - frac) * _VIRIDIS[lo] + frac * _VIRIDIS[lo + 1]).round().astype(np.uint8)


class Task(ABC):
    """One dense prediction task.

    Subclasses set the class attributes and implement :meth:`loss`, :meth:`metric`,
    :meth:`postprocess` and :meth:`to_rgb`; the other hooks have defaults.

    Attributes:
        name: the key of the task in batches, predictions and metric names.
        default_weight: loss weight used by the field.
        main_metric: key of the metric shown first and on the progress bar.
        higher_is_better: direction of ``main_metric``.
        out_channels: channels of the raw prediction.
        directions: every reported metric → ``True`` when higher is better (the ↑/↓ of the
            published tables and the sign in Δm); metrics not listed are diagnostics.
        delta_m_metrics: metrics that may stand for the task in Δm and in the published tables'
            column, in order of preference (the first one present is used).
        score_metrics: metrics that may stand for the task in the sweep score ``val/score``, in
            order of preference; each must be higher-is-better (see :mod:`mtl.objective`).
        score_factor: factor that brings ``score_metrics`` to [0, 1] (e.g. 0.01 for percent).
        report_digits: decimals of the task's values in ``results.md`` (after the ×100 of ratios).
        needs_num_classes: the constructor takes ``num_classes``, given by the dataset.
        label_free_needs_reference: :meth:`label_free_loss` compares with a reference
            prediction (the single-task model's) instead of using the prediction alone.
    """

    name: ClassVar[str] = ""
    default_weight: float = 1.0
    main_metric: ClassVar[str] = ""
    higher_is_better: ClassVar[bool] = True
    out_channels: int = 1
    directions: ClassVar[dict[str, bool]] = {}
    delta_m_metrics: ClassVar[tuple[str, ...]] = ()
    score_metrics: ClassVar[tuple[str, ...]] = ()
    score_factor: ClassVar[float] = 1.0
    report_digits: ClassVar[int] = 2
    needs_num_classes: ClassVar[bool] = False
    label_free_needs_reference: ClassVar[bool] = False

    @abstractmethod
    def loss(self, pred: torch.Tensor, batch: dict) -> torch.Tensor:
        """Scalar loss of a raw ``B × out_channels × H × W`` prediction."""

    @abstractmethod
    def metric(self) -> Metric:
        """A fresh metric; ``compute()`` returns a dict of named scalars."""

    def eval_metric(self, **options) -> Metric:
        """The metric of ``eval.py`` (default: :meth:`metric`); ``options`` come from its config."""
        return self.metric()

    @classmethod
    def eval_metric_defaults(cls, dataset: type[DenseDataset]) -> dict:
        """Defaults of :meth:`eval_metric`'s options for ``dataset`` and this machine (default:
        none); the evaluation config's values win over them unless they are ``None``."""
        return {}

    def update_metric(self, metric: Metric, pred: torch.Tensor, batch: dict) -> None:
        """Adds a batch's raw prediction to ``metric`` (default: against ``batch[name]``)."""
        metric.update(pred, batch[self.name])

    def metric_direction(self, key: str) -> bool | None:
        """``True``/``False`` if ``key`` is higher/lower-is-better, ``None`` for diagnostics."""
        if key in self.directions:
            return self.directions[key]
        if key.startswith("iou_"):
            return True
        return None

    @property
    def headline_metrics(self) -> tuple[str, ...]:
        """The published tables' column of the task, in order of preference (default: the Δm
        metrics, else the main metric)."""
        return self.delta_m_metrics or (self.main_metric,)

    def label_free_loss(self, pred: torch.Tensor, reference: torch.Tensor | None) -> torch.Tensor:
        """A label-free surrogate of the loss (AdaMerging), about [0, 1], lower is better.

        Args:
            pred: raw ``B × out_channels × H × W`` prediction.
            reference: the single-task model's raw prediction of the same images when
                :attr:`label_free_needs_reference`, else ``None``.

        Raises:
            NotImplementedError: the task defines none.
        """
        raise NotImplementedError(
            f"task '{self.name}' ({type(self).__name__}) defines no label-free objective "
            "(Task.label_free_loss), which AdaMerging needs"
        )

    @abstractmethod
    def postprocess(self, pred: torch.Tensor) -> torch.Tensor:
        """Raw prediction → what is evaluated (class ids, metres, unit vectors, probabilities)."""

    @abstractmethod
    def to_rgb(self, value: torch.Tensor) -> np.ndarray:
        """One post-processed sample or target (without batch dim) → ``H × W × 3`` uint8."""

    def target_for_display(self, batch: dict) -> torch.Tensor:
        """The ground truth of the first sample, in the post-processed encoding."""
        return batch[self.name][0]

    def visualise(self, pred: torch.Tensor, batch: dict) -> np.ndarray:
        """Ground truth (left) next to prediction (right) for the first sample of a batch.

        Returns:
            ``H × 2W × 3`` uint8 image.
        """
        gt = self.to_rgb(self.target_for_display(batch).detach().cpu())
        pr = self.to_rgb(self.postprocess(pred[:1].detach().float())[0].cpu())
        return np.concatenate([gt, pr], axis=1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(out_channels={self.out_channels})"
