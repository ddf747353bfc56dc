"""Measuring a slimmable model: the performance table, the controllability sweep and its score.

Aich et al., "Efficient Controllable Multi-Task Architectures", ICCV 2023 report how well a
(budget, preference) request controls the model; their exact measure is not in what we
hold, so ours is defined here and in the README:

**Controllability** — for every budget ``B`` of a sweep and every task ``t``, the Spearman
rank correlation, over the swept preference vectors ``p``, between ``p_t`` and the task's
score (its metric relative to the full model, direction-corrected; see
:mod:`mtl.control.search`) under the configuration chosen for ``(B, p)``; the score is the
mean of these correlations over budgets and tasks (pairs where either side is constant are
skipped). It lies in [-1, 1]; 1 means that asking more of a task never gives it less.
The sweep also records, per request, the chosen configuration's cost (never above ``B``).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from mtl.control.cost import CostModel, WidthConfig, apply_config
from mtl.control.search import search


@torch.no_grad()
def measure_table(module, loader, widths: Sequence[float]) -> dict[str, dict[tuple[float, float], float]]:
    """Main metric of every task at every (encoder width, decoder width) pair on ``loader``.

    One pass per pair with all decoders at the same width: a task's prediction depends only on
    the encoder and its own decoder, so these ``|W|²`` passes cover every configuration.
    """
    module.eval()
    tasks = module.tasks
    device = next(module.model.parameters()).device  # batches and metric states go where the model is
    table: dict[str, dict[tuple[float, float], float]] = {t: {} for t in tasks}
    for e, d in itertools.product(widths, widths):
        apply_config(module.model, WidthConfig(e, dict.fromkeys(tasks, d)))
        metrics = {t: task.metric().to(device) for t, task in tasks.items()}
        for batch in loader:
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            preds = module.model(batch["image"])
            for t, task in tasks.items():
                task.update_metric(metrics[t], preds[t], batch)
        for t, task in tasks.items():
            table[t][(float(e), float(d))] = float(metrics[t].compute()[task.main_metric])
    apply_config(module.model, WidthConfig(1.0, dict.fromkeys(tasks, 1.0)))
    return table


def table_to_json(table: Mapping) -> str:
    return json.dumps(
        {t: {f"{e},{d}": v for (e, d), v in rows.items()} for t, rows in table.items()}, indent=1
    )


def table_from_json(text: str) -> dict[str, dict[tuple[float, float], float]]:
    raw = json.loads(text)
    return {t: {tuple(float(x) for x in k.split(",")): v for k, v in rows.items()} for t, rows in raw.items()}


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman rank correlation (average ranks for ties); ``None`` if either side is constant."""
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    va, vb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    if va == 0 or vb == 0:
        return None
    return sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True)) / (va * vb) ** 0.5


def _ranks(v: Sequence[float]) -> list[float]:
    order = sorted(range(len(v)), key=lambda i: v[i])
    ranks = [0.0] * len(v)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def sweep(
    *,
    table: Mapping,
    cost: CostModel,
    widths: Sequence[float],
    budgets: Sequence[float],
    preferences: Sequence[Mapping[str, float]],
    higher_is_better: Mapping[str, bool],
) -> tuple[list[dict], float]:
    """Runs the search for every (budget, preference); returns the rows and the controllability."""
    rows = []
    for b in budgets:
        for p in preferences:
            try:
                config, rep = search(
                    budget=b,
                    preference=p,
                    widths=widths,
                    table=table,
                    cost=lambda c: cost(c)[0],
                    higher_is_better=higher_is_better,
                )
            except ValueError:
                continue  # budget below the cheapest configuration
            rows.append(
                {
                    "budget": b,
                    "preference": dict(p),
                    "encoder": config.encoder,
                    "decoders": dict(config.decoders),
                    "gflops": rep["cost"],
                    "scores": rep["scores"],
                }
            )
    corrs = []
    for b in budgets:
        sel = [r for r in rows if r["budget"] == b]
        for t in table:
            c = (
                spearman([r["preference"][t] for r in sel], [r["scores"][t] for r in sel])
                if len(sel) > 1
                else None
            )
            if c is not None:
                corrs.append(c)
    return rows, (sum(corrs) / len(corrs) if corrs else float("nan"))


def plot_sweep(rows: list[dict], path: Path) -> None:
    """Per-task score versus budget (equal preference) and versus the task's own preference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(rows[0]["scores"]) if rows else []
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for t in tasks:
        eq = sorted((r["gflops"], r["scores"][t]) for r in rows if len(set(r["preference"].values())) == 1)
        if eq:
            a1.plot(*zip(*eq, strict=True), marker="o", label=t)
        pts = sorted((r["preference"][t], r["scores"][t]) for r in rows)
        a2.scatter(*zip(*pts, strict=True), label=t, s=12)
    a1.set(
        xlabel="GFLOPs of the chosen configuration", ylabel="score vs full model", title="equal preference"
    )
    a2.set(xlabel="preference of the task", ylabel="score vs full model", title="all budgets")
    a1.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
