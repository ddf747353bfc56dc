"""The number a hyperparameter search optimises, and what it means.

``optimized_metric`` (configs/train.yaml) names a logged metric; when it is ``null`` the
objective is ``val/delta_m`` if a single-task baseline is configured (``baselines=...``) and
otherwise ``val/score``: the mean over tasks of one accuracy-type metric per task, each in
[0, 1] with 1 best, so tasks in different units count equally without a reference run:

=============  =====================================
semseg, parts  mIoU
saliency       maxF
edge           F (odsF when evaluated exactly)
depth          δ < 1.25 (fraction of valid pixels)
normals        fraction of pixels within 22.5°
=============  =====================================

Both defaults are higher-is-better (``hparams_search=optuna`` maximises).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

# task → (metric keys in order of preference, factor to [0, 1])
SCORE_METRICS: dict[str, tuple[tuple[str, ...], float]] = {
    "semseg": (("miou",), 1.0),
    "human_parts": (("miou",), 1.0),
    "saliency": (("maxf",), 1.0),
    "edge": (("odsf", "f"), 1.0),
    "depth": (("delta1",), 1.0),
    "normals": (("within_22_5",), 0.01),
}


def score(metrics: Mapping[str, float], tasks: Sequence[str], stage: str = "val") -> float:
    """``{stage}/score``: the mean normalised task metric (module docstring).

    Raises:
        KeyError: a task has none of its score metrics in ``metrics``.
    """
    values = []
    for t in tasks:
        keys, factor = SCORE_METRICS[t]
        found = [f"{stage}/{t}/{k}" for k in keys if f"{stage}/{t}/{k}" in metrics]
        if not found:
            raise KeyError(f"no {' or '.join(f'{stage}/{t}/{k}' for k in keys)} among the metrics")
        values.append(float(metrics[found[0]]) * factor)
    return sum(values) / len(values)


def objective(metrics: Mapping[str, float], optimized_metric: str | None) -> float | None:
    """The value of ``optimized_metric`` (``None``: ``val/delta_m`` if logged, else ``val/score``)."""
    if optimized_metric is None:
        optimized_metric = "val/delta_m" if "val/delta_m" in metrics else "val/score"
    if optimized_metric not in metrics:
        raise KeyError(
            f"optimized_metric '{optimized_metric}' was not logged; available: {sorted(metrics)[:40]}"
        )
    return float(metrics[optimized_metric])
