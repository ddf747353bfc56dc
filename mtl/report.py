"""Result files of ``eval.py``: ``results.json``, ``results.csv`` and ``results.md``.

``results.md`` is laid out like the tables of the multi-task dense-prediction papers (InvPT,
TaskPrompter, TaskExpert): one row per model, one column per task metric with ↑/↓, then Δm.
Ratios (mIoU, maxF, odsF, …) are shown in percent as those tables do; depth in metres,
angles in degrees. Each task gives its column (:attr:`mtl.tasks.Task.headline_metrics`), the
arrows (:meth:`~mtl.tasks.Task.metric_direction`) and its decimals
(:attr:`~mtl.tasks.Task.report_digits`). Optional headline rows (the papers,
:mod:`mtl.metrics.published`), keyed by the dataset's key, put the published numbers next to
the evaluated checkpoint. A second table lists every metric.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mtl.metrics.published import HEADLINES
from mtl.tasks.base import Task

#: metrics shown ×100 in tables (fractions in results.json / .csv)
PERCENT = {"miou", "miou_present", "pixel_acc", "maxf", "maxf_prob", "odsf", "oisf", "ap", "f"}
LABELS = {
    "miou": "mIoU",
    "maxf": "maxF",
    "mean": "mErr",
    "rmse": "RMSE",
    "odsf": "odsF",
    "oisf": "oisF",
    "ap": "AP",
    "f": "F≈",
    "abs_rel": "absRel",
    "sq_rel": "sqRel",
    "miou_present": "mIoU (present)",
    "maxf_prob": "maxF (prob.)",
    "log_rmse": "logRMSE",
    "median": "median",
    "pixel_acc": "pixAcc",
}


def display(metric: str, value: float) -> float:
    """A metric value in the unit of the published tables."""
    return 100.0 * value if metric in PERCENT or metric.startswith("iou_") else value


def _arrow(task: Task, metric: str) -> str:
    d = task.metric_direction(metric)
    return "" if d is None else (" ↑" if d else " ↓")


def main_columns(
    tasks: Mapping[str, Task], metrics: Mapping[str, float], stage: str
) -> list[tuple[str, str]]:
    """``(task, metric)`` of the published columns present in ``metrics``."""
    cols = []
    for t, task in tasks.items():
        for m in task.headline_metrics:
            if f"{stage}/{t}/{m}" in metrics:
                cols.append((t, m))
                break
    return cols


def _fmt(task: Task, metric: str, value: float | None) -> str:
    if value is None:
        return "—"
    return f"{display(metric, value):.{task.report_digits}f}"


def published_table(
    metrics: Mapping[str, float],
    tasks: Mapping[str, Task],
    *,
    stage: str = "test",
    name: str = "this model",
    dataset: str | None = None,
    headline: bool = True,
) -> str:
    """The Markdown table in the layout of the papers (see the module docstring)."""
    cols = main_columns(tasks, metrics, stage)
    dm = metrics.get(f"{stage}/delta_m")
    head = ["model"] + [f"{t} {LABELS.get(m, m)}{_arrow(tasks[t], m)}" for t, m in cols] + ["Δm (%) ↑"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = HEADLINES.get(dataset, []) if headline else []
    for row in rows:
        vals = []
        for t, m in cols:
            v = row["values"].get(f"{t}/{m}")
            note = row.get("notes", {}).get(f"{t}/{m}", "")
            vals.append("—" if v is None else f"{v:.{tasks[t].report_digits}f}{note}")
        lines.append(f"| {row['model']} ({row['backbone']}, published) | " + " | ".join(vals) + " | — |")
    vals = [_fmt(tasks[t], m, metrics.get(f"{stage}/{t}/{m}")) for t, m in cols]
    lines.append(f"| **{name}** | " + " | ".join(vals) + f" | {'—' if dm is None else f'{dm:+.2f}'} |")
    return "\n".join(lines)


def all_metrics_table(metrics: Mapping[str, float], tasks: Mapping[str, Task], stage: str = "test") -> str:
    """Every directional metric of every task (per-class IoU in results.csv / .json only)."""
    lines = ["| task | metric | value |", "|---|---|---|"]
    for t, task in tasks.items():
        prefix = f"{stage}/{t}/"
        for k in sorted(k for k in metrics if k.startswith(prefix)):
            m = k[len(prefix) :]
            if m == "loss" or m.startswith("iou_"):
                continue
            unit = " (%)" if m in PERCENT else ""
            lines.append(f"| {t} | {LABELS.get(m, m)}{unit}{_arrow(task, m)} | {_fmt(task, m, metrics[k])} |")
    return "\n".join(lines)


def write_results(
    output_dir: Path,
    metrics: Mapping[str, float],
    tasks: Mapping[str, Task],
    *,
    stage: str = "test",
    name: str = "this model",
    dataset: str | None = None,
    headline: bool = True,
    stem: str = "results",
    provenance: Mapping[str, Any] | None = None,
) -> str:
    """Writes ``<stem>.json`` (all metrics), ``<stem>.csv`` (one row: model + every metric, raw
    units) and ``<stem>.md`` (published layout + all metrics); returns the Markdown.

    ``provenance`` (checkpoint, split, dataset, code version, …) goes to ``<stem>.provenance.json``
    and heads the Markdown; ``<stem>.json`` stays the flat metric → value map.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / f"{stem}.json").write_text(json.dumps(dict(metrics), indent=2))
    if provenance is not None:
        (output_dir / f"{stem}.provenance.json").write_text(
            json.dumps(dict(provenance), indent=2, default=str)
        )
    keys = sorted(metrics)
    with open(output_dir / f"{stem}.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", *keys])
        writer.writerow([name, *(f"{metrics[k]:.6g}" for k in keys)])
    md = (
        published_table(metrics, tasks, stage=stage, name=name, dataset=dataset, headline=headline)
        + "\n\nAll metrics:\n\n"
        + all_metrics_table(metrics, tasks, stage)
    )
    if provenance is not None and "split" in provenance:
        md += f"\n\nSplit: `{provenance['split']}` · checkpoint: `{provenance.get('checkpoint', '?')}`"
    (output_dir / f"{stem}.md").write_text(md + "\n")
    return md
