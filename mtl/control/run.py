"""``eval.py ... control.budget=… control.preference=[…]`` and ``control.sweep=true``.

Before evaluating a slimmable checkpoint, :func:`apply_control` counts the cost of every width
configuration (a few counted parts, seconds) and refuses a budget below the cheapest before
anything else; then it measures (logging progress) or loads the performance table on the
validation split, and either picks the configuration for one (budget, preference) request — the
evaluation then runs that sub-network — or sweeps budgets × preferences and writes
``controllability.json``, ``controllability.md`` and ``controllability.png`` (see
:mod:`mtl.control.evaluate` for the score). Its last log line names the saved
``control_table.json``. :class:`Control` is the evaluation step that runs it in ``eval.py``.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mtl.backbones.slimmable_vit import SlimmableViT
from mtl.control.cost import CostModel, WidthConfig, apply_config
from mtl.control.evaluate import measure_table, plot_sweep, sweep, table_from_json, table_to_json
from mtl.control.search import search
from mtl.decoders.slimmable import SlimmableDecoder
from mtl.eval_steps import EvalContext, EvalStep

if TYPE_CHECKING:
    from mtl.data.datamodule import MTLDataModule
    from mtl.module import MTLModule

log = logging.getLogger(__name__)


def _preference(value, tasks: Sequence[str]) -> dict[str, float]:
    """``control.preference`` as task → weight, checked before anything is measured."""
    if isinstance(value, Mapping):
        if set(value) != set(tasks):
            raise ValueError(
                f"control.preference must name exactly the tasks {list(tasks)}, got {sorted(value)}"
            )
        pref = {t: float(value[t]) for t in tasks}
    else:
        values = list(value)
        if len(values) != len(tasks):
            raise ValueError(
                f"control.preference has {len(values)} values; expected one per task {list(tasks)}"
            )
        pref = dict(zip(tasks, map(float, values), strict=True))
    if any(p < 0 for p in pref.values()) or sum(pref.values()) <= 0:
        raise ValueError(
            f"control.preference weights must be >= 0 with a positive sum, got {pref} (one weight per task)"
        )
    return pref


def default_budgets(
    cost: CostModel, widths: Sequence[float], tasks: Sequence[str], n: int = 11
) -> list[float]:
    """``n`` budgets at evenly spaced quantiles of the costs of every width configuration.

    Evenly spaced GFLOPs would put almost every budget between encoder widths, where the
    decoders (a small part of the cost) all fit at full width and the preference cannot matter;
    quantiles of the configurations' costs put budgets inside each encoder width's band too.
    """
    costs = sorted(
        {cost(WidthConfig(e, dict(zip(tasks, d, strict=True))))[0]
         for e in widths for d in itertools.product(widths, repeat=len(tasks))}
    )  # fmt: skip
    return sorted({costs[round(k * (len(costs) - 1) / (n - 1))] for k in range(n)})


def default_preferences(tasks: Sequence[str]) -> list[dict[str, float]]:
    """Equal preference, then each task favoured at 0.5 / 0.7 / 0.9 with the rest shared equally."""
    prefs = [dict.fromkeys(tasks, 1.0 / len(tasks))]
    for t in tasks:
        for hi in (0.5, 0.7, 0.9):
            prefs.append({u: hi if u == t else (1 - hi) / (len(tasks) - 1) for u in tasks})
    return prefs


def apply_control(
    control: Mapping,
    module: MTLModule,
    datamodule: MTLDataModule,
    input_size: Sequence[int],
    output_dir: Path,
    *,
    write: bool = True,
) -> dict:
    """Runs the requested control step; returns what to report (empty when nothing was asked).

    Under DDP every rank runs it (each measures the table on the whole validation split, so all
    pick the same sub-network) and only the one with ``write`` writes files.

    Args:
        control: the ``control`` options of ``configs/eval.yaml`` (``budget``, ``preference``,
            ``sweep``, ``budgets``, ``table``).
        module: the module with a slimmable model (``model=slimmable``).
        datamodule: its data (the validation split measures the performance table).
        input_size: ``(H, W)`` for the cost model.
        output_dir: where the table and reports go.
        write: write the table and the reports (``False`` on every DDP rank but 0).
    """
    budget, sweep_on = control.get("budget"), bool(control.get("sweep"))
    if budget is None and not sweep_on:
        return {}
    if write:
        output_dir.mkdir(parents=True, exist_ok=True)
    model = module.model
    if not isinstance(model.backbone, SlimmableViT) or not isinstance(model.decoder, SlimmableDecoder):
        raise ValueError(
            "control.budget / control.sweep need a slimmable model (model=slimmable): got backbone "
            f"{type(model.backbone).__name__}, decoder {type(model.decoder).__name__}"
        )
    widths = list(model.backbone.widths)
    tasks = list(module.tasks)
    hib = {t: task.higher_is_better for t, task in module.tasks.items()}
    pref = _preference(control.get("preference") or dict.fromkeys(tasks, 1.0), tasks)
    # the cost of every configuration first (a few FLOP counts): a budget nothing fits is refused
    # before the performance table is measured (minutes on a real validation split)
    started = time.perf_counter()
    cost = CostModel(model, input_size)
    cheapest_config, cheapest = cost.cheapest()
    full = cost(WidthConfig(1.0, dict.fromkeys(tasks, 1.0)))[0]
    unit = f"GFLOPs per {cost.input_size[0]}×{cost.input_size[1]} image"
    log.info(
        "control: FLOPs of all %d width configurations from %d counted parts in %.1f s: %.4g (cheapest) "
        "to %.4g (full model) %s",
        len(cost.encoder_widths) * len(cost.decoder_widths) ** len(tasks),
        cost.counts,
        time.perf_counter() - started,
        cheapest,
        full,
        unit,
    )
    if budget is not None and float(budget) < cheapest:
        raise ValueError(
            f"control.budget={budget} is below the cheapest configuration of this model, {cheapest:.4g} "
            f"{unit} (encoder width {cheapest_config.encoder}, decoders {dict(cheapest_config.decoders)}); "
            f"the full model costs {full:.4g}. Give control.budget between {cheapest:.4g} and {full:.4g} "
            "(higher budgets all pick the full model)"
        )
    budgets = control.get("budgets")
    if sweep_on and budgets:
        below = [float(b) for b in budgets if float(b) < cheapest]
        if len(below) == len(budgets):
            raise ValueError(
                f"control.budgets={list(budgets)} are all below the cheapest configuration of this model, "
                f"{cheapest:.4g} {unit}; the full model costs {full:.4g}. Give budgets in that range, or "
                "control.budgets=null for 11 at the deciles of all configurations' costs"
            )
        if below:
            log.warning(
                "control.budgets %s are below the cheapest configuration (%.4g %s): skipped",
                below,
                cheapest,
                unit,
            )
    table_path = Path(control.get("table") or output_dir / "control_table.json")
    if table_path.is_file():
        table = table_from_json(table_path.read_text())
        log.info("control: performance table read from %s", table_path)
    else:
        datamodule.setup("validate")
        loader = datamodule.eval_dataloader(shard=False)
        log.info(
            "control: measuring the performance table on the validation split (%s batches; per batch %d "
            "encoder passes and %d decoder passes, one per (encoder, decoder) width pair)",
            len(loader),
            len(widths),
            len(widths) ** 2,
        )
        table = measure_table(module, loader, widths, progress_every_s=10.0 if write else None)
        if write:  # atomically: another rank may read it
            table_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = table_path.with_name(table_path.name + ".tmp")
            tmp.write_text(table_to_json(table))
            tmp.replace(table_path)
    report: dict = {"table": str(table_path)}
    if sweep_on:
        budgets = budgets or default_budgets(cost, widths, tasks)
        rows, score = sweep(
            table=table,
            cost=cost,
            widths=widths,
            budgets=budgets,
            preferences=default_preferences(tasks),
            higher_is_better=hib,
        )
        lines = [
            f"controllability (mean Spearman, preference vs score): **{score:.3f}**"
            if not math.isnan(score)
            else "controllability: undefined (at no budget did a task's score vary with its preference)",
            "",
            "| budget (GFLOPs) | preference | encoder | decoders | GFLOPs | scores |",
            "|---|---|---|---|---|---|",
        ]
        for r in rows:
            wanted = ", ".join(f"{t}={v:.2f}" for t, v in r["preference"].items())
            dec = ", ".join(f"{t}={v}" for t, v in r["decoders"].items())
            sc = ", ".join(f"{t}={v:.3f}" for t, v in r["scores"].items())
            lines.append(
                f"| {r['budget']:.4g} | {wanted} | {r['encoder']} | {dec} | {r['gflops']:.4g} | {sc} |"
            )
        if write:
            (output_dir / "controllability.json").write_text(
                json.dumps({"controllability": None if math.isnan(score) else score, "rows": rows}, indent=1)
            )
            (output_dir / "controllability.md").write_text("\n".join(lines) + "\n")
            plot_sweep(rows, output_dir / "controllability.png")
        report["controllability"] = score
        log.info("controllability %.3f over %d requests", score, len(rows))
        if write:
            log.info("control: sweep report in %s", output_dir / "controllability.md")
    if budget is not None:
        config, rep = search(
            budget=float(budget),
            preference=pref,
            widths=widths,
            table=table,
            cost=lambda c: cost(c)[0],
            higher_is_better=hib,
        )
        apply_config(model, config)
        report.update(
            {
                "encoder": config.encoder,
                "decoders": dict(config.decoders),
                "gflops": rep["cost"],
                "active_params": cost(config)[1],
                "predicted_scores": rep["scores"],
            }
        )
        log.info(
            "control: budget %.4g GFLOPs, preference %s → %s (%.4g GFLOPs)", budget, pref, config, rep["cost"]
        )
        if write:
            (output_dir / "control.json").write_text(json.dumps(report, indent=1))
    if write:
        log.info("control: performance table in %s (reuse it with control.table=%s)", table_path, table_path)
    return report


class Control(EvalStep):
    """Evaluation step: :func:`apply_control` before the test pass (``control.*`` of ``eval.yaml``).

    With a budget, the test pass evaluates the chosen sub-network; the report (empty when
    nothing was asked) is ``ctx.reports["control"]``.

    Args:
        budget: GFLOPs per image, or ``None``.
        preference: one weight per task (in ``data.tasks`` order) or task → weight; ``None``: equal.
        sweep: sweep budgets × preferences and write ``controllability.{json,md,png}``.
        budgets: the sweep's budgets (``None``: :func:`default_budgets`).
        table: a saved ``control_table.json`` to reuse (``None``: measured on the val split).
    """

    def __init__(
        self,
        *,
        budget: float | None = None,
        preference: Sequence[float] | Mapping[str, float] | None = None,
        sweep: bool = False,
        budgets: Sequence[float] | None = None,
        table: str | None = None,
    ) -> None:
        self.options = {"budget": budget, "preference": preference, "sweep": sweep, "budgets": budgets,
                        "table": table}  # fmt: skip

    def before_test(self, ctx: EvalContext) -> None:
        ctx.reports["control"] = apply_control(
            self.options, ctx.module, ctx.datamodule, ctx.input_size, ctx.output_dir, write=ctx.is_global_zero
        )
