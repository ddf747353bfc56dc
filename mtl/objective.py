"""The number a hyperparameter search optimises, and what it means.

``optimized_metric`` (configs/train.yaml) names a logged metric; when it is ``null`` the
objective is ``val/delta_m`` if a single-task baseline is configured (``baselines=...``) and
otherwise ``val/score``: the mean over tasks of one accuracy-type metric per task, each in
[0, 1] with 1 best, so tasks in different units count equally without a reference run. Each
task declares its own (:attr:`mtl.tasks.Task.score_metrics`, in order of preference, and
:attr:`~mtl.tasks.Task.score_factor`); the built-in tasks use

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

from collections.abc import Mapping

from mtl.tasks.base import Task


def score(metrics: Mapping[str, float], tasks: Mapping[str, Task], stage: str = "val") -> float:
    """``{stage}/score``: the mean normalised task metric (module docstring).

    Args:
        metrics: logged metrics ``{stage}/{task}/{metric}``.
        tasks: task name → task (its ``score_metrics`` and ``score_factor``).
        stage: the metrics' stage prefix.

    Raises:
        KeyError: a task has none of its score metrics in ``metrics`` (or declares none).
    """
    values = []
    for t, task in tasks.items():
        keys = [f"{stage}/{t}/{k}" for k in task.score_metrics]
        found = [k for k in keys if k in metrics]
        if not found:
            wanted = " or ".join(keys) or f"a metric (task '{t}' declares no score_metrics)"
            raise KeyError(f"no {wanted} among the metrics")
        values.append(float(metrics[found[0]]) * task.score_factor)
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
