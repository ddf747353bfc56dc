"""Plots of a comparison table (:mod:`mtl.compare`, ``--plot``): Δm per configuration with its seed
spread, and each task's relative change per configuration."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mtl.compare import Table


def plot_table(table: Table, out: Path) -> dict[str, Path]:
    """Writes ``compare_delta_m.png`` (Δm ± std per row, best first) and ``compare_tasks.png`` (per-task
    relative change ± std, grouped by row) into ``out``; returns their paths (none without Δm)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in table.measured if r.delta_m is not None]
    if not rows:
        print("no plot: the table has no Δm (give --baseline or --baseline-row)")
        return {}
    rows = sorted(rows, key=lambda r: -r.delta_m.mean)  # type: ignore[union-attr]
    labels = [r.label for r in rows]
    paths: dict[str, Path] = {}
    metadata = {"Software": None}  # no version stamp: the same runs give the same file

    fig, ax = plt.subplots(figsize=(7, 0.4 * len(rows) + 1.2))
    means = [r.delta_m.mean for r in rows]  # type: ignore[union-attr]
    stds = [r.delta_m.std or 0.0 for r in rows]  # type: ignore[union-attr]
    colors = ["tab:green" if m >= 0 else "tab:red" for m in means]
    ax.barh(range(len(rows)), means, xerr=stds, color=colors, capsize=3)
    ax.set_yticks(range(len(rows)), labels)
    ax.invert_yaxis()
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel("Δm (%) ↑  (mean ± std over seeds)")
    ax.set_title(f"Δm against {table.meta['baseline']}", fontsize=8)
    fig.tight_layout()
    paths["delta_m_png"] = Path(out) / "compare_delta_m.png"
    fig.savefig(paths["delta_m_png"], dpi=120, metadata=metadata)
    plt.close(fig)

    keys = table.term_keys
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(rows) * len(keys) / 2 + 2), 3.6))
    width = 0.8 / max(len(keys), 1)
    for i, key in enumerate(keys):
        xs = [j + (i - (len(keys) - 1) / 2) * width for j in range(len(rows))]
        vals = [r.terms[key].mean for r in rows]
        errs = [r.terms[key].std or 0.0 for r in rows]
        ax.bar(xs, vals, width=width, yerr=errs, capsize=2, label=key)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("relative change (%) ↑")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths["tasks_png"] = Path(out) / "compare_tasks.png"
    fig.savefig(paths["tasks_png"], dpi=120, metadata=metadata)
    plt.close(fig)
    return paths
