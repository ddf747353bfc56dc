"""Δm: the average relative gain of a multi-task model over single-task baselines.

S. Vandenhende et al., "Multi-Task Learning for Dense Prediction Tasks: A Survey", TPAMI 2021
(after K.-K. Maninis et al., CVPR 2019):

    Δm = 100 / T · Σ_t (−1)^{l_t} (M_mt,t − M_st,t) / M_st,t

with ``l_t = 1`` when lower is better (RMSE, angle error). In this sign convention a positive
Δm (in percent) means the multi-task model is better on average; the gradient-balancing
papers that report "lower is better" Δm% use the opposite sign. One metric stands for each
task: the first of ``task.delta_m_metrics`` present in both the model's and the baseline's
results (edge: the exact ``odsf`` when both have it, else the approximate validation ``f``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def delta_m_terms(
    metrics: Mapping[str, float],
    baseline: Mapping[str, float],
    tasks: Mapping[str, Any],
    *,
    stage: str = "val",
) -> dict[str, float]:
    """Signed relative gain (percent) of each task.

    Args:
        metrics: the model's results, keys ``{stage}/{task}/{metric}``.
        baseline: single-task results, keys ``{task}/{metric}``.
        tasks: task name → task object (``delta_m_metrics``, ``metric_direction``).
        stage: the prefix of ``metrics`` to read.

    Raises:
        ValueError: a task without a usable metric in the model's or the baseline's results, or a
            zero baseline value.
    """
    terms: dict[str, float] = {}
    for t, task in tasks.items():
        key = next(
            (m for m in task.delta_m_metrics if f"{stage}/{t}/{m}" in metrics and f"{t}/{m}" in baseline),
            None,
        )
        if key is None:
            wanted = [f"{t}/{m}" for m in task.delta_m_metrics]
            have = sorted(k for k in baseline if k.startswith(f"{t}/"))
            raise ValueError(
                f"Δm: no metric of task '{t}' in both the results ({stage}/…) and the baseline; "
                f"wanted one of {wanted}, the baseline has {have}"
            )
        mt, st = float(metrics[f"{stage}/{t}/{key}"]), float(baseline[f"{t}/{key}"])
        if st == 0:
            raise ValueError(f"Δm: baseline value of '{t}/{key}' is 0; relative gains are undefined")
        sign = 1.0 if task.metric_direction(key) else -1.0
        terms[f"{t}/{key}"] = 100.0 * sign * (mt - st) / st
    return terms


def delta_m(
    metrics: Mapping[str, float],
    baseline: Mapping[str, float],
    tasks: Mapping[str, Any],
    *,
    stage: str = "val",
) -> float:
    """Δm in percent (positive: better than the single-task baselines); see :func:`delta_m_terms`."""
    terms = delta_m_terms(metrics, baseline, tasks, stage=stage)
    return sum(terms.values()) / len(terms)
