"""The :class:`Task` contract: what the framework needs to know about one dense task.

A task owns its number of output channels, its loss and default loss weight (the values
used by the multi-task dense-prediction literature, see REFERENCE.md), a fresh metric, the
post-processing of raw network outputs, and a picture of prediction versus ground truth.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch
from torchmetrics import Metric


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
    :meth:`postprocess` and :meth:`_to_rgb`.

    Attributes:
        name: the key of the task in batches, predictions and metric names.
        default_weight: loss weight used by the field.
        main_metric: key of the metric used for Δm and model selection.
        higher_is_better: direction of ``main_metric``.
        out_channels: channels of the raw prediction.
        directions: every reported metric → ``True`` when higher is better (the ↑/↓ of the
            published tables and the sign in Δm); metrics not listed are diagnostics.
        delta_m_metrics: metrics that may stand for the task in Δm, in order of preference
            (the first one present in both the model's and the baseline's results is used).
    """

    name: str = ""
    default_weight: float = 1.0
    main_metric: str = ""
    higher_is_better: bool = True
    out_channels: int = 1
    directions: dict[str, bool] = {}
    delta_m_metrics: tuple[str, ...] = ()

    @abstractmethod
    def loss(self, pred: torch.Tensor, batch: dict) -> torch.Tensor:
        """Scalar loss of a raw ``B × out_channels × H × W`` prediction."""

    @abstractmethod
    def metric(self) -> Metric:
        """A fresh metric; ``compute()`` returns a dict of named scalars."""

    def eval_metric(self, **options) -> Metric:
        """The metric of ``eval.py`` (default: :meth:`metric`); ``options`` come from its config."""
        return self.metric()

    def metric_direction(self, key: str) -> bool | None:
        """``True``/``False`` if ``key`` is higher/lower-is-better, ``None`` for diagnostics."""
        if key in self.directions:
            return self.directions[key]
        if key.startswith("iou_"):
            return True
        return None

    @abstractmethod
    def postprocess(self, pred: torch.Tensor) -> torch.Tensor:
        """Raw prediction → what is evaluated (class ids, metres, unit vectors, probabilities)."""

    @abstractmethod
    def _to_rgb(self, value: torch.Tensor) -> np.ndarray:
        """One post-processed sample or target (without batch dim) → ``H × W × 3`` uint8."""

    def target_for_display(self, batch: dict) -> torch.Tensor:
        """The ground truth of the first sample, in the post-processed encoding."""
        return batch[self.name][0]

    def visualise(self, pred: torch.Tensor, batch: dict) -> np.ndarray:
        """Ground truth (left) next to prediction (right) for the first sample of a batch.

        Returns:
            ``H × 2W × 3`` uint8 image.
        """
        gt = self._to_rgb(self.target_for_display(batch).detach().cpu())
        pr = self._to_rgb(self.postprocess(pred[:1].detach().float())[0].cpu())
        return np.concatenate([gt, pr], axis=1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(out_channels={self.out_channels})"
