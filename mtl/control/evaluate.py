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
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mtl.control.cost import CostModel, WidthConfig, apply_config
from mtl.control.search import search

if TYPE_CHECKING:
    from mtl.module import MTLModule

log = logging.getLogger(__name__)


@torch.no_grad()
def measure_table(
    module: MTLModule,
    loader: Iterable[dict],
    widths: Sequence[float],
    *,
    progress_every_s: float | None = 10.0,
) -> dict[str, dict[tuple[float, float], float]]:
    """Main metric of every task at every (encoder width, decoder width) pair on ``loader``.

    A task's prediction depends only on the encoder and its own decoder, so the ``|W|²`` pairs,
    all decoders at one width, cover every configuration. One pass over ``loader``: per batch the
    encoder runs once per encoder width and, on its features, the decoders once per decoder
    width (the encoder forward is shared by every pair with that encoder width). The numbers are
    those of one full forward per pair and per batch.

    Args:
        module: the module with a slimmable model.
        loader: the batches (the validation split).
        widths: the encoder and decoder widths.
        progress_every_s: log a progress line (batch i/N, elapsed, ETA) at most this often, and
            after the last batch; ``None``: silent.
    """
    module.eval()
    model, tasks = module.model, module.tasks
    device = next(model.parameters()).device  # batches and metric states go where the model is
    pairs = list(itertools.product(widths, widths))
    metrics = {pair: {t: task.metric().to(device) for t, task in tasks.items()} for pair in pairs}
    try:
        total: int | None = len(loader)  # type: ignore[arg-type]
    except TypeError:  # an iterable without a length: no ETA
        total = None
    start = last = time.perf_counter()
    for i, batch in enumerate(loader, 1):
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        size = tuple(batch["image"].shape[-2:])
        for e in widths:
            model.backbone.set_width(e)
            rep, feats = model.encode_features(batch["image"])
            for d in widths:
                model.decoder.set_widths(dict.fromkeys(tasks, d))
                preds = model.decode(rep, size=size, tasks=list(tasks), features=feats).preds
                for t, task in tasks.items():
                    task.update_metric(metrics[(e, d)][t], preds[t], batch)
        now = time.perf_counter()
        if progress_every_s is not None and (now - last >= progress_every_s or i == total):
            last = now
            eta = f", ETA {(now - start) / i * (total - i):.0f} s" if total else ""
            log.info(
                "control table: batch %d/%s measured at all %d (encoder, decoder) width pairs, "
                "%.0f s elapsed%s",
                i,
                total if total else "?",
                len(pairs),
                now - start,
                eta,
            )
    table: dict[str, dict[tuple[float, float], float]] = {t: {} for t in tasks}
    for (e, d), per_task in metrics.items():
        for t, task in tasks.items():
            table[t][(float(e), float(d))] = float(per_task[t].compute()[task.main_metric])
    apply_config(model, WidthConfig(1.0, dict.fromkeys(tasks, 1.0)))
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
