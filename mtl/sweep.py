"""Multiruns (``python train.py -m ...``): a one-screen summary of the jobs, and the Optuna search space's
conditional part.

:class:`SweepSummary` is a Hydra callback (``hydra.callbacks.sweep_summary``). When a job ends it
writes ``<job>/job_status.json`` (completed or failed, and the error) and refreshes
``<sweep dir>/summary.md``; when the multirun ends it prints the summary: per job its overrides,
its objective (``optimized_metric`` from the job's ``metrics.json``, see :mod:`mtl.objective`) and
status, then the best job's folder. A sweep that stops at a failed job (Hydra's basic sweeper
stops at the first) still leaves ``summary.md`` up to that job.

:class:`CompareTable` is a Hydra callback (``hydra.callbacks.compare_table``): when the multirun
ends it writes the comparison table of its jobs (:mod:`mtl.compare`: configurations as rows, seeds
grouped into mean ± std, Δm) into ``<sweep dir>/compare.{md,csv,tex,json}`` and prints it.

:func:`fixed_strategy_weights` is the ``hydra.sweeper.custom_search_space`` of
``hparams_search=optuna``: loss weights are searched only in trials of ``strategy=fixed``, the one
strategy that uses them (``strategy.weights``).
"""

from __future__ import annotations

import json
import math
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from mtl.baselines import launcher_rank
from mtl.compare import CompareError, build_table, write_table
from mtl.objective import objective

#: written into each job folder when the job ends
STATUS_FILE = "job_status.json"
#: written into the sweep folder
SUMMARY_FILE = "summary.md"
#: the strategy (``configs/strategy/<name>.yaml``) whose loss weights a search may tune
WEIGHTED_STRATEGY = "fixed"


@dataclass
class JobResult:
    """What one job of a sweep left in its folder.

    Attributes:
        folder: the job's output folder (``cfg.paths.output_dir``).
        num: Hydra's job number (``hydra.job.num``).
        overrides: the job's command-line overrides (``.hydra/overrides.yaml``).
        status: ``ok``, ``failed`` (the job raised), ``no objective`` (``metrics.json`` lacks the
            optimized metric), ``no metrics`` (it ended without ``metrics.json``, e.g. without
            validation) or ``unfinished`` (killed, or still running).
        objective: the value of ``metric`` (``None`` unless ``ok``).
        metric: the objective's name (``optimized_metric``, or its default).
        error: why a job is not ``ok``.
    """

    folder: Path
    num: int | None
    overrides: list[str]
    status: str
    objective: float | None = None
    metric: str | None = None
    error: str | None = None


def _load_yaml(path: Path) -> Any:
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False) if path.is_file() else None


def read_job(folder: Path) -> JobResult:
    """The :class:`JobResult` of one job folder (``.hydra/``, ``metrics.json``, ``job_status.json``)."""
    folder = Path(folder)
    hydra_node = (_load_yaml(folder / ".hydra" / "hydra.yaml") or {}).get("hydra") or {}
    num = (hydra_node.get("job") or {}).get("num")
    overrides = [str(o) for o in _load_yaml(folder / ".hydra" / "overrides.yaml") or []]
    cfg = _load_yaml(folder / "config.yaml") or _load_yaml(folder / ".hydra" / "config.yaml") or {}
    wanted = cfg.get("optimized_metric")
    wanted = None if isinstance(wanted, str) and "${" in wanted else wanted
    status_file = folder / STATUS_FILE
    state = json.loads(status_file.read_text()) if status_file.is_file() else {}
    job = JobResult(
        folder=folder, num=num if isinstance(num, int) else None, overrides=overrides, status="ok"
    )
    if state.get("status") == "FAILED":
        job.status, job.error = "failed", state.get("error")
        return job
    metrics_file = folder / "metrics.json"
    if not metrics_file.is_file():
        job.status = "no metrics" if state else "unfinished"
        job.error = "no metrics.json" if state else "no metrics.json nor job_status.json (killed or running?)"
        return job
    metrics = json.loads(metrics_file.read_text())
    job.metric = wanted or ("val/delta_m" if "val/delta_m" in metrics else "val/score")
    try:
        value = objective(metrics, wanted)
    except KeyError as err:
        job.status, job.error = "no objective", str(err.args[0]).split(";")[0]
        return job
    if value is None or not math.isfinite(value):
        job.status, job.error = "no objective", f"{job.metric} = {value}"
        return job
    job.objective = value
    return job


def read_sweep(sweep_dir: Path) -> list[JobResult]:
    """Every job folder under ``sweep_dir`` (those with ``.hydra/overrides.yaml``), by job number."""
    folders = sorted({p.parent.parent for p in Path(sweep_dir).rglob(".hydra/overrides.yaml")})
    jobs = [read_job(f) for f in folders]
    return sorted(jobs, key=lambda j: (j.num is None, j.num if j.num is not None else 0, str(j.folder)))


def best_job(jobs: list[JobResult], direction: str = "maximize") -> JobResult | None:
    """The ``ok`` job with the highest (``minimize``: lowest) objective."""
    done = [j for j in jobs if j.objective is not None]
    if not done:
        return None
    sign = -1.0 if direction.startswith("min") else 1.0
    return max(done, key=lambda j: sign * j.objective)  # type: ignore[operator]


def _short(override: str) -> str:
    """``key=value`` with a float value to 4 significant digits (Optuna's suggestions are long)."""
    key, sep, value = override.partition("=")
    try:
        number = float(value)
    except ValueError:
        return override
    if not sep or value.lstrip("-").isdigit():
        return override
    return f"{key}={number:.4g}"


def format_summary(
    sweep_dir: Path,
    jobs: list[JobResult],
    *,
    direction: str = "maximize",
    max_rows: int = 30,
    width: int = 80,
) -> str:
    """The summary of a sweep, as Markdown that reads as plain text.

    Overrides common to every job are listed once; each row shows the job's own ones (cut to
    ``width`` characters). Beyond ``max_rows`` jobs, the best ``max_rows`` and every failed job are
    listed.
    """
    metrics = sorted({j.metric for j in jobs if j.metric})
    metric = metrics[0] if len(metrics) == 1 else "objective"
    better = "lower" if direction.startswith("min") else "higher"
    counts: dict[str, int] = {}
    for j in jobs:
        counts[j.status] = counts.get(j.status, 0) + 1
    tally = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    lines = [
        f"# Sweep {sweep_dir}",
        "",
        f"{len(jobs)} jobs: {tally}; objective {metric} ({better} is better)",
    ]
    common = set.intersection(*(set(j.overrides) for j in jobs)) if jobs else set()
    if common:
        lines.append("common overrides: " + " ".join(o for o in jobs[0].overrides if o in common))
    best = best_job(jobs, direction)
    shown = jobs
    if len(jobs) > max_rows:
        sign = -1.0 if direction.startswith("min") else 1.0
        ranked = sorted((j for j in jobs if j.objective is not None), key=lambda j: -sign * j.objective)  # type: ignore[operator]
        keep = {id(j) for j in ranked[:max_rows]} | {id(j) for j in jobs if j.status == "failed"}
        shown = [j for j in jobs if id(j) in keep]
        lines.append(f"(the best {max_rows} and the failed of {len(jobs)} jobs)")
    lines += ["", f"| job | status | {metric} | overrides | folder |", "|---|---|---|---|---|"]
    for j in shown:
        own = " ".join(_short(o) for o in j.overrides if o not in common) or "—"
        if len(own) > width:
            own = own[: width - 1] + "…"
        value = "—" if j.objective is None else f"{j.objective:.4g}"
        if metric == "objective" and j.metric:
            value += f" ({j.metric})"
        status = j.status if j.error is None else f"{j.status}: {j.error}"[:60]
        mark = " **best**" if j is best else ""
        num = "?" if j.num is None else str(j.num)
        lines.append(f"| {num}{mark} | {status} | {value} | {own} | {j.folder.name} |")
    lines.append("")
    if best is None:
        lines.append("best: none (no job reported its objective)")
    else:
        lines.append(f"best: job {best.num} ({metric} {best.objective:.4g}): {best.folder}")
    return "\n".join(lines) + "\n"


def write_summary(sweep_dir: Path, *, direction: str = "maximize") -> tuple[Path, str]:
    """Writes ``<sweep_dir>/summary.md`` and returns (its path, its text)."""
    sweep_dir = Path(sweep_dir)
    text = format_summary(sweep_dir, read_sweep(sweep_dir), direction=direction)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    path = sweep_dir / SUMMARY_FILE
    path.write_text(text)
    return path, text


def _direction(config: DictConfig) -> str:
    """The sweeper's ``direction`` (Optuna), else ``maximize`` (``optimized_metric`` is higher-is-better)."""
    direction = OmegaConf.select(config, "hydra.sweeper.direction", default=None)
    if isinstance(direction, str):
        return direction
    if direction:  # a multi-objective study: its first objective
        return str(list(direction)[0])
    return "maximize"


class SweepSummary(Callback):
    """Hydra callback: each job's status into its folder, the sweep's summary into ``summary.md`` and
    onto the console (module docstring). Only rank 0 of a multirun started on every rank writes."""

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if launcher_rank() != 0:
            return
        folder = Path(str(config.hydra.runtime.output_dir))
        failed = job_return.status == JobStatus.FAILED
        # a failed job's return value is its exception (the public property re-raises it)
        value = job_return._return_value
        state = {
            "status": job_return.status.name,
            "error": f"{type(value).__name__}: {value}".splitlines()[0][:500] if failed else None,
            "return_value": value if isinstance(value, int | float) and not failed else None,
            "overrides": list(job_return.overrides or []),
        }
        folder.mkdir(parents=True, exist_ok=True)
        (folder / STATUS_FILE).write_text(json.dumps(state, indent=2))
        if OmegaConf.select(config, "hydra.mode", default=None) != RunMode.MULTIRUN:
            return
        # the job folder is <sweep dir>/<subdir>: the sweep folder this job really wrote into
        depth = len(Path(str(config.hydra.sweep.subdir)).parts) or 1
        sweep_dir = folder.parents[depth - 1]
        path, _ = write_summary(sweep_dir, direction=_direction(config))
        if failed:
            print(f"job {folder} failed ({str(state['error'])[:200]}); the sweep so far: {path}")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if launcher_rank() != 0:
            return
        path, text = write_summary(Path(str(config.hydra.sweep.dir)), direction=_direction(config))
        print(f"\n{text}(written to {path})")


def sweep_command(config: DictConfig) -> str:
    """The command line of a multirun (``python train.py -m <overrides>``), from its Hydra config: the
    job overrides, then the ``hydra.*`` ones given (``hydra.sweep.dir``, ``hydra.sweeper.params.*``)."""
    name = OmegaConf.select(config, "hydra.job.name", default=None) or "train"
    overrides = [str(o) for o in OmegaConf.select(config, "hydra.overrides.task", default=None) or []]
    hydra = [str(o) for o in OmegaConf.select(config, "hydra.overrides.hydra", default=None) or []]
    overrides += [o for o in hydra if not o.startswith("hydra.mode=")]
    return shlex.join(["python", f"{name}.py", "-m", *overrides])


class CompareTable(Callback):
    """Hydra callback: the comparison table of a multirun's jobs when it ends (module docstring).

    Every job must have test metrics (``test=true``) or be an evaluation; jobs without results (a
    failed job) are left out and listed under the table (``skip_missing``). A sweep whose jobs cannot
    be compared (e.g. single-task runs of different tasks) gets a one-line note instead of a table.
    Only rank 0 of a multirun started on every rank writes.

    Args:
        baseline: a baseline file, or its name in ``configs/baselines/`` (default: the jobs' own
            ``baselines=``, else no Δm).
        baseline_row: the row Δm is measured against instead (e.g. ``strategy=ew``).
        per_task: per-task relative change columns.
        published: the papers' rows for the dataset.
        cost: parameters and GFLOPs of each row's model.
        plot: ``compare_delta_m.png`` and ``compare_tasks.png``.
        time_ref: the row per-step times are relative to (default ``strategy=ew``).
        skip_missing: leave jobs without results out instead of writing no table.
        ignore: config keys that do not tell rows apart, besides :data:`mtl.compare.IGNORED`.
    """

    def __init__(
        self,
        *,
        baseline: str | None = None,
        baseline_row: str | None = None,
        per_task: bool = False,
        published: bool = False,
        cost: bool = False,
        plot: bool = False,
        time_ref: str | None = None,
        skip_missing: bool = True,
        ignore: list[str] | None = None,
    ) -> None:
        self.options = {
            "baseline": baseline,
            "baseline_row": baseline_row,
            "per_task": per_task,
            "published": published,
            "cost": cost,
            "time_ref": time_ref,
            "skip_missing": skip_missing,
            "ignore": list(ignore or []),
        }
        self.plot = plot

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if launcher_rank() != 0:
            return
        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            table = build_table([sweep_dir], command=sweep_command(config), **self.options)
        except CompareError as err:
            print(f"\nno comparison table for {sweep_dir}: {err}")
            return
        paths = write_table(table, sweep_dir, plot=self.plot)
        print(f"\n{paths['md'].read_text()}(written to {paths['md']}, .csv, .tex, .json; from the folder: "
              f"{self.cli(sweep_dir)})")  # fmt: skip

    def cli(self, sweep_dir: Path) -> str:
        """The ``python -m mtl.compare`` command that makes this table from the sweep folder."""
        args = ["python", "-m", "mtl.compare", str(sweep_dir)]
        for key in ("baseline", "baseline_row", "time_ref"):
            if self.options[key]:
                args += [f"--{key.replace('_', '-')}", str(self.options[key])]
        for key in ("per_task", "published", "cost", "skip_missing"):
            if self.options[key]:
                args.append(f"--{key.replace('_', '-')}")
        if self.plot:
            args.append("--plot")
        if self.options["ignore"]:
            args += ["--ignore", *self.options["ignore"]]
        return shlex.join(args)


def fixed_strategy_weights(cfg: DictConfig, trial: Any) -> None:
    """``hydra.sweeper.custom_search_space``: loss weights only in trials of ``strategy=fixed``.

    The trial's strategy is its sampled ``strategy`` parameter, else a fixed one (a command-line
    ``strategy=...``), else the config's choice. For ``fixed``, each task of ``data.tasks`` with a
    range in ``cfg.sweep_loss_weights`` (``{task: [low, high]}``, log-uniform) gets a parameter
    ``++strategy.weights.<task>`` (the tasks left out keep the field's default weight, the reference
    the ranges are relative to). Other strategies learn or ignore the weights, so they get none.

    Args:
        cfg: the sweep's composed config.
        trial: the Optuna trial being configured.
    """
    strategy = trial.params.get("strategy", trial.user_attrs.get("strategy"))
    if strategy is None:
        strategy = OmegaConf.select(cfg, "hydra.runtime.choices.strategy", default=None)
    if strategy != WEIGHTED_STRATEGY:
        return
    ranges = OmegaConf.to_container(cfg.get("sweep_loss_weights") or {}, resolve=True)
    tasks = list(OmegaConf.select(cfg, "data.tasks", default=[]) or [])
    unknown = sorted(set(ranges) - set(tasks))
    if unknown and not set(ranges) & set(tasks):
        raise ValueError(
            f"sweep_loss_weights names tasks {unknown}, none of data.tasks={tasks}: set sweep_loss_weights "
            "(configs/hparams_search/optuna.yaml) for this task set"
        )
    for task in tasks:
        if task not in ranges:
            continue
        low, high = (float(v) for v in ranges[task])
        trial.suggest_float(f"++strategy.weights.{task}", low, high, log=True)
