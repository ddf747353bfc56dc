"""Trivial reference predictors: what a model that learned nothing scores.

"Predict the training-set mean depth everywhere" and "predict the most frequent class
everywhere" give the floor that a trained model must clear visibly; the default synthetic
experiment is checked against them (README, ``tests/test_default_experiment.py``).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from mtl.metrics.confusion import ConfusionMatrixMetric
from mtl.metrics.pixelwise import DepthMetric


def _samples(dataset, limit: int | None) -> Iterable[dict]:
    n = len(dataset) if limit is None else min(limit, len(dataset))
    return (dataset[i] for i in range(n))


def trivial_baselines(train_set, val_set, *, num_classes: int | None = None, limit: int | None = 200) -> dict:
    """Scores of constant predictors fitted on ``train_set`` and evaluated on ``val_set``.

    Args:
        train_set: dataset of raw samples (numpy, as returned without a transform).
        val_set: dataset of raw samples.
        num_classes: classes of ``semseg`` (needed for the majority-class mIoU).
        limit: number of samples of each set to use (``None``: all).

    Returns:
        ``depth_rmse_mean`` (RMSE of predicting the mean training depth) and
        ``semseg_miou_majority`` (mIoU of predicting the most frequent class), for the
        tasks the samples carry.
    """
    depth_sum, depth_n, counts = 0.0, 0, None
    for s in _samples(train_set, limit):
        if "depth" in s:
            d = s["depth"][s["depth"] > 0]
            depth_sum += float(d.sum(dtype=np.float64))
            depth_n += d.size
        if "semseg" in s and num_classes:
            lab = s["semseg"][s["semseg"] != 255]
            c = np.bincount(lab.ravel(), minlength=num_classes)
            counts = c if counts is None else counts + c
    out: dict[str, float] = {}
    depth_metric, seg_metric = DepthMetric(), ConfusionMatrixMetric(num_classes) if num_classes else None
    mean_depth = depth_sum / max(depth_n, 1)
    majority = int(np.argmax(counts)) if counts is not None else 0
    for s in _samples(val_set, limit):
        if "depth" in s and depth_n:
            gt = torch.from_numpy(s["depth"])[None, None]
            depth_metric.update(torch.full_like(gt, mean_depth), gt)
        if seg_metric is not None and counts is not None and "semseg" in s:
            gt = torch.from_numpy(s["semseg"].astype(np.int64))[None]
            seg_metric.update(torch.full_like(gt, majority), gt)
    if depth_n:
        out["depth_rmse_mean"] = float(depth_metric.compute()["rmse"])
    if seg_metric is not None and counts is not None:
        out["semseg_miou_majority"] = float(seg_metric.compute()["miou"])
    return out
