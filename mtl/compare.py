"""Comparison tables from many evaluated runs: configurations as rows, each task's main metric, Δm.

    python -m mtl.compare logs/train/multiruns/2026-12-01_10-00-00             # a multirun's jobs
    python -m mtl.compare <run> <run> <sweep dir> --baseline synthetic_nyud_swin_mini_64px_5ep
    python -m mtl.compare <sweep dir> --baseline-row strategy=ew --per-task --plot --out tables/

Reads every run under the given folders: a training run with test metrics (``train.py test=true``:
``<run>/metrics.json``) or an evaluation (``eval.py``: ``<run>/results.json`` with
``results.provenance.json``). Runs whose configurations differ only in ``seed`` form one row with
the mean ± sample standard deviation over the seeds (``n``); each row is labelled with the
command-line overrides that tell it apart from the other rows (e.g. ``strategy=cagrad``), never
with a folder name or a timestamp. Writes ``compare.md``, ``compare.csv``, ``compare.tex`` and
``compare.json`` (``--plot``: ``compare_delta_m.png``, ``compare_tasks.png``) into ``--out``.

Columns: each task's column of the published tables (:attr:`mtl.tasks.Task.headline_metrics`, in
their units: ratios in percent), then Δm (:mod:`mtl.metrics.delta_m`, computed per run, then
averaged) against a baseline file (``--baseline``), a row of the table (``--baseline-row``) or, by
default, the single-task baseline the runs were trained with (their ``baselines=``); optional
per-task relative changes (``--per-task``), the mean rank over the task columns (MR) and the rank
by Δm; the best measured value of each column in bold. ``--published`` adds the papers' rows
(:mod:`mtl.metrics.published`), marked and never ranked; ``--cost`` the parameters and forward
GFLOPs of each row's model; runs that logged ``train/images_per_sec`` (the
:class:`~mtl.callbacks.Throughput` callback) give a per-step time relative to ``--time-ref``
(default: the row ``strategy=ew``).

Runs are never silently mixed: runs without the result files or the columns' metrics, runs of
another split, dataset, task set or metrics protocol, and two runs of one configuration with the
same seed are refused with a message that names them (``--skip-missing`` leaves runs without
results out, listing them under the table).

Reproducibility: every table carries the command, the machine, the runs' code version and this
code's; rows, columns and numbers depend on the run folders only (rows in the natural order of the
folders, fixed formatting), so running the command again on the same folders rewrites every file
byte for byte except the last line of ``compare.md`` and ``compare.tex``: the date the table was
generated. The per-step time column changes only when the runs are measured again.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from mtl.baselines import CONFIG_DIR as BASELINE_DIR
from mtl.baselines import METRICS_PROTOCOL
from mtl.baselines import _load_file as load_baseline_file
from mtl.metrics.delta_m import delta_m_terms
from mtl.metrics.published import HEADLINES
from mtl.report import LABELS, display
from mtl.tasks import Task, build_tasks, task_class

#: the output files' stem: ``<out>/compare.{md,csv,tex,json}``
STEM = "compare"
#: what a training run (``train.py``) and an evaluation (``eval.py``) leave
TRAIN_RESULTS, EVAL_RESULTS = "metrics.json", "results.json"
#: config keys (and everything under them) that do not make two runs different configurations: the
#: seed (runs differing only in it are one row), where the files go, logging, progress display, the
#: Δm baseline (a reference, not a setting of the model), resuming, timing; ``--ignore`` adds more
IGNORED = (
    "seed",
    "hydra",
    "paths",
    "logger",
    "extras",
    "task_name",
    "tags",
    "ckpt_path",
    "code",
    "metrics_protocol",
    "optimized_metric",
    "test",
    "baselines",
    "callbacks.progress",
    "callbacks.lr_monitor",
    "callbacks.throughput",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.default_root_dir",
    "data.num_workers",
    "data.pin_memory",
    "data.persistent_workers",
    "module.log_images",
    "eval.name",
    "eval.pictures",
    "eval.headline",
)
#: the metric a run logs when the Throughput callback times its training steps
THROUGHPUT = "train/images_per_sec"


class CompareError(ValueError):
    """The runs cannot be put in one table; the message names the runs and what to do."""


@dataclass
class Run:
    """One evaluated run.

    Attributes:
        folder: the run's folder (as found under the given paths).
        kind: ``train`` (``metrics.json`` of ``train.py test=true``) or ``eval`` (``results.json``).
        metrics: its flat metrics (``test/<task>/<metric>``, ``test/delta_m``, …).
        config: the configuration that identifies it (Hydra's composition ``.hydra/config.yaml``, with
            its interpolations, else the resolved ``config.yaml``), flattened to dotted keys, without
            :data:`IGNORED` keys.
        resolved: the resolved config (``config.yaml``, or ``results.config.yaml``).
        overrides: its command-line overrides (training's, then evaluation's).
        seed: its ``seed``.
        split, dataset, tasks, protocol: what its metrics were measured on (``protocol``: the metrics
            protocol the run recorded, ``None`` when it recorded none).
        dataset_target: the dataset class's import path.
        code: the code version the run recorded (``<commit>``, ``+`` for local changes).
        source: the training run whose model it measured (an evaluation: its checkpoint's run folder,
            ``None`` when the checkpoint is not in one).
    """

    folder: Path
    kind: str
    metrics: dict[str, float]
    config: dict[str, str]
    resolved: dict[str, Any]
    overrides: list[str]
    seed: Any
    split: str | None
    dataset: str | None
    dataset_target: str | None
    tasks: tuple[str, ...]
    protocol: int | None
    code: str | None
    source: Path | None = None


@dataclass
class Stat:
    """Mean and sample standard deviation (``None`` for one value) of a column over a row's runs."""

    mean: float
    std: float | None
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        """The statistics of ``values`` (at least one)."""
        vals = [float(v) for v in values]
        return cls(statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else None, len(vals))


@dataclass
class Column:
    """A task column: ``task/metric`` with its direction and decimals."""

    task: str
    metric: str
    higher: bool
    digits: int

    @property
    def key(self) -> str:
        return f"{self.task}/{self.metric}"

    @property
    def title(self) -> str:
        return f"{self.task} {LABELS.get(self.metric, self.metric)} {'↑' if self.higher else '↓'}"


@dataclass
class Row:
    """One configuration (several seeds), or a published row.

    Attributes:
        label: the overrides that tell it apart (``strategy=cagrad``), or ``<model> (<backbone>, published)``.
        runs: its runs, in folder order (empty for a published row).
        values: column key → statistics, in the tables' units.
        delta_m: Δm (%) over the runs (``None``: no baseline).
        terms: per-task relative change (%) over the runs (``task/metric`` of the Δm term).
        step_time: seconds per training step (``None``: not every run timed its steps).
        published: a row of :mod:`mtl.metrics.published`.
        cost: ``params_m`` (millions) and ``gflops`` (forward, one image) of the row's model.
    """

    label: str
    runs: list[Run] = field(default_factory=list)
    values: dict[str, Stat] = field(default_factory=dict)
    delta_m: Stat | None = None
    terms: dict[str, Stat] = field(default_factory=dict)
    step_time: Stat | None = None
    published: bool = False
    cost: dict[str, float] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)
    mean_rank: float | None = None
    rank: int | None = None
    time_rel: float | None = None

    @property
    def seeds(self) -> list[Any]:
        return [r.seed for r in self.runs]


@dataclass
class Table:
    """A comparison: its rows, columns and everything printed with it."""

    rows: list[Row]
    columns: list[Column]
    term_keys: list[str]
    meta: dict[str, Any]
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def measured(self) -> list[Row]:
        return [r for r in self.rows if not r.published]


# ----------------------------------------------------------------------------------------------- runs


def _natural(path: Path) -> tuple:
    """Sort key: ``2`` before ``10`` in folder names (Hydra's job numbers)."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", str(path)))


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def _is_run(folder: Path) -> bool:
    return any((folder / f).is_file() for f in (TRAIN_RESULTS, EVAL_RESULTS, ".hydra/overrides.yaml"))


def find_runs(paths: Sequence[Path]) -> list[Path]:
    """The run folders of ``paths``: a run folder itself, else every run folder under it (a folder with
    ``metrics.json``, ``results.json`` or ``.hydra/overrides.yaml``), in natural order.

    Raises:
        CompareError: a path does not exist or holds no run.
    """
    found: list[Path] = []
    for path in paths:
        path = Path(path)
        if path.is_file() and path.name in (TRAIN_RESULTS, EVAL_RESULTS):
            path = path.parent
        if not path.is_dir():
            raise CompareError(f"'{path}' is not a folder: give run folders or multirun (sweep) folders")
        if _is_run(path):
            found.append(path)
            continue
        under = {
            p.parent.parent if p.parent.name == ".hydra" else p.parent
            for pattern in (TRAIN_RESULTS, EVAL_RESULTS, ".hydra/overrides.yaml")
            for p in path.rglob(pattern)
        }
        if not under:
            raise CompareError(
                f"'{path}' holds no run (no metrics.json, results.json nor .hydra/overrides.yaml under it)"
            )
        found += sorted(under, key=_natural)
    unique = list(dict.fromkeys(found))
    return unique


def flatten(node: Any, prefix: str = "") -> dict[str, str]:
    """Dotted keys → JSON of the leaves (lists are leaves)."""
    if isinstance(node, Mapping):
        out: dict[str, str] = {}
        for k, v in node.items():
            out.update(flatten(v, f"{prefix}{k}."))
        if not node and prefix:
            out[prefix[:-1]] = "{}"
        return out
    return {prefix[:-1]: json.dumps(node, sort_keys=True, default=str)}


def ignored(key: str, extra: Sequence[str] = ()) -> bool:
    """Whether config key ``key`` (dotted; a group override's ``model/backbone`` too) is ignored."""
    key = key.replace("/", ".")
    return any(key == p or key.startswith(p + ".") for p in (*IGNORED, *extra))


#: flattened keys whose value means "the option is off", so that a run composed before the option's
#: config group existed (the key absent) is the same configuration as a run with the group at that value
ABSENT_EQUIVALENT = {"pretrained.source": json.dumps("none")}


def _identity(config: Mapping[str, Any], folder: Path, extra: Sequence[str]) -> dict[str, str]:
    """The flattened config without ignored keys, without values naming the run's own folder, and
    without keys at their :data:`ABSENT_EQUIVALENT` value."""
    own = str(folder.resolve())
    return {
        k: v
        for k, v in sorted(flatten(config).items())
        if not ignored(k, extra) and own not in v and ABSENT_EQUIVALENT.get(k) != v
    }


def _code(code: Any) -> str | None:
    if not isinstance(code, Mapping):
        return None
    if "commit" in code:
        return str(code["commit"])[:12] + ("+" if code.get("dirty") else "")
    return str(code.get("version")) if code.get("version") else None


def _dataset_key(target: str | None) -> str | None:
    """The dataset class's ``KEY`` (``nyud``, ``synthetic``, …), else the import path itself."""
    if not target:
        return None
    from hydra.utils import get_class

    from mtl.data.datamodule import dataset_class

    try:
        return dataset_class(get_class(target)).KEY
    except (ImportError, TypeError, ValueError, AttributeError):
        return target


def _split_overrides(overrides: Sequence[str]) -> list[str]:
    return [str(o) for o in overrides if not str(o).lstrip("+").startswith("ckpt_path=")]


def _missing_reason(folder: Path) -> str:
    status = folder / "job_status.json"
    if status.is_file():
        state = json.loads(status.read_text())
        if state.get("status") == "FAILED":
            return f"the job failed ({state.get('error')})"
    return "no metrics.json (train.py) nor results.json (eval.py): unfinished, failed or killed"


def load_run(folder: Path, *, stage: str = "test", ignore: Sequence[str] = ()) -> Run:
    """Reads one run folder (see :class:`Run`).

    Raises:
        CompareError: it has no result file, or no ``<stage>/`` metrics.
    """
    folder = Path(folder)
    if (folder / EVAL_RESULTS).is_file():
        metrics = json.loads((folder / EVAL_RESULTS).read_text())
        prov = _yaml(folder / "results.provenance.json") or {}
        used = _yaml(folder / "results.config.yaml") or {}
        ckpt = Path(str(prov.get("checkpoint", "")))
        # the training run that wrote the checkpoint (<run>/checkpoints/x.ckpt), when it is still there
        train_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None
        train_dir = train_dir if train_dir is not None and train_dir.is_dir() else None
        composed = resolved = None
        if train_dir is not None:
            composed = _yaml(train_dir / ".hydra" / "config.yaml")
            resolved = _yaml(train_dir / "config.yaml")
        resolved = resolved or used
        identity = dict(composed or resolved)
        if used.get("eval") is not None:
            identity["eval"] = used["eval"]  # the evaluation's options decide its metrics too
        if train_dir is None:  # a merged or foreign checkpoint: the file is the configuration
            identity["checkpoint"] = str(ckpt)
        train_overrides = (
            [str(o) for o in _yaml(train_dir / ".hydra" / "overrides.yaml") or []] if train_dir else []
        )
        overrides = train_overrides + _split_overrides(prov.get("overrides") or [])
        train_metrics = (
            json.loads((train_dir / TRAIN_RESULTS).read_text())
            if train_dir is not None and (train_dir / TRAIN_RESULTS).is_file()
            else {}
        )
        if THROUGHPUT in train_metrics:
            metrics = {**metrics, THROUGHPUT: train_metrics[THROUGHPUT]}
        data = resolved.get("data") or {}
        target = ((used.get("data") or data).get("dataset") or {}).get("_target_")
        return Run(
            folder=folder,
            kind="eval",
            metrics={k: float(v) for k, v in metrics.items() if isinstance(v, int | float)},
            config=_identity(identity, folder, ignore),
            resolved=resolved,
            overrides=overrides,
            seed=resolved.get("seed"),
            split=prov.get("split"),
            dataset=prov.get("dataset") or _dataset_key(target),
            dataset_target=target,
            tasks=tuple(prov.get("tasks") or (used.get("data") or data).get("tasks") or ()),
            protocol=prov.get("metrics_protocol"),
            code=_code(prov.get("code")),
            source=train_dir.resolve() if train_dir is not None else None,
        )
    if not (folder / TRAIN_RESULTS).is_file():
        raise CompareError(f"{folder}: {_missing_reason(folder)}")
    metrics = json.loads((folder / TRAIN_RESULTS).read_text())
    if not any(k.startswith(f"{stage}/") for k in metrics):
        hint = "train with test=true, or evaluate its checkpoint with eval.py" if stage == "test" else ""
        raise CompareError(f"{folder}: metrics.json has no {stage}/ metrics ({hint})")
    composed = _yaml(folder / ".hydra" / "config.yaml")
    resolved = _yaml(folder / "config.yaml") or composed or {}
    data = resolved.get("data") or {}
    target = (data.get("dataset") or {}).get("_target_")
    return Run(
        folder=folder,
        kind="train",
        metrics={k: float(v) for k, v in metrics.items() if isinstance(v, int | float)},
        config=_identity(composed or resolved, folder, ignore),
        resolved=resolved,
        overrides=[str(o) for o in _yaml(folder / ".hydra" / "overrides.yaml") or []],
        seed=resolved.get("seed"),
        # train.py's test pass evaluates the validation split (the split that picked best.ckpt)
        split=str(data.get("eval_split") or "val") if stage == "test" else "val",
        dataset=_dataset_key(target),
        dataset_target=target,
        tasks=tuple(data.get("tasks") or ()),
        protocol=resolved.get("metrics_protocol"),
        code=_code(resolved.get("code")),
        source=folder.resolve(),
    )


def _names(runs: Sequence[Run], limit: int = 6) -> str:
    names = [str(r.folder) for r in runs]
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_comparable(runs: Sequence[Run]) -> None:
    """Refuses runs measured on another split, dataset or task set, or with another metrics protocol.

    Raises:
        CompareError: naming the runs of each value.
    """
    for attr, what in (
        ("split", "evaluation split"),
        ("dataset", "dataset"),
        ("tasks", "task set"),
        ("protocol", "metrics protocol (mtl.baselines.METRICS_PROTOCOL; None: not recorded)"),
    ):
        groups: dict[str, list[Run]] = {}
        for run in runs:
            value = getattr(run, attr)
            groups.setdefault(", ".join(value) if isinstance(value, tuple) else str(value), []).append(run)
        if len(groups) > 1:
            detail = "; ".join(f"{value!r}: {_names(rs)}" for value, rs in groups.items())
            raise CompareError(
                f"the runs differ in {what}, their metrics are not comparable: {detail}. Compare runs of "
                "one split, dataset, task set and metrics protocol (re-evaluate the others with eval.py)"
            )


# --------------------------------------------------------------------------------------------- labels


def _tokens(run: Run, extra: Sequence[str]) -> list[str]:
    """The run's overrides that name a setting (not ignored, not the seed)."""
    out = []
    for o in run.overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        if not ignored(key, extra):
            out.append(o)
    return list(dict.fromkeys(out))


def _short_value(value: str, width: int = 40) -> str:
    """A config value for a label, cut to ``width`` characters (a path keeps its end)."""
    value = value.strip('"')
    if len(value) <= width:
        return value
    return "…" + value[-(width - 1) :] if "/" in value else value[: width - 1] + "…"


def label_rows(groups: list[list[Run]], extra: Sequence[str]) -> tuple[list[str], list[str]]:
    """Row labels (the overrides that tell the rows apart) and the overrides common to all rows.

    Falls back on the config keys whose values differ between rows when the overrides do not tell
    them apart (runs of different sweeps, or configs edited between runs).
    """
    tokens = [_tokens(g[0], extra) for g in groups]
    common = [t for t in tokens[0] if all(t in ts for ts in tokens[1:])] if tokens else []
    if len(groups) == 1:
        choices = [t for t in tokens[0] if "." not in t.split("=", 1)[0]]
        return [" ".join(choices) or "all runs"], common
    labels = [" ".join(t for t in ts if t not in common) for ts in tokens]
    if all(labels) and len(set(labels)) == len(labels):
        return labels, common
    keys = sorted({k for g in groups for k in g[0].config})
    differ = [k for k in keys if len({g[0].config.get(k) for g in groups}) > 1]
    labels = [
        " ".join(f"{k}={_short_value(g[0].config.get(k, 'null'))}" for k in differ) or "?" for g in groups
    ]
    return labels, common


def group_runs(runs: Sequence[Run]) -> list[list[Run]]:
    """Runs of one configuration (equal :attr:`Run.config`) together, in first-appearance order.

    Raises:
        CompareError: two runs of one configuration with the same seed, or two measurements of one
            training run (its test metrics and an evaluation of its checkpoint): the same run twice.
    """
    sources: dict[Path, Run] = {}
    for run in runs:
        if run.source is None:
            continue
        if run.source in sources:
            raise CompareError(
                f"{sources[run.source].folder} and {run.folder} both measure the training run {run.source} "
                "(its test metrics and an evaluation of its checkpoint, or two evaluations): give one of them"
            )
        sources[run.source] = run
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(json.dumps(run.config, sort_keys=True), []).append(run)
    for group in groups.values():
        seen: dict[str, Run] = {}
        for run in group:
            key = json.dumps(run.seed, default=str)
            if key in seen:
                raise CompareError(
                    f"{seen[key].folder} and {run.folder} are the same configuration with the same seed "
                    f"({run.seed}): the same run twice (e.g. a training's test metrics and an evaluation of "
                    "its checkpoint)? Give one of them"
                )
            seen[key] = run
    return list(groups.values())


# ------------------------------------------------------------------------------------------ the table


def task_objects(run: Run) -> dict[str, Task]:
    """The run's task objects (directions, Δm metrics, decimals), built from its resolved config."""
    options = {k: dict(v or {}) for k, v in (run.resolved.get("task_options") or {}).items()}
    options = {k: v for k, v in options.items() if k in run.tasks}
    num_classes = {}
    if run.dataset_target:
        from hydra.utils import get_class

        from mtl.data.datamodule import dataset_class

        try:
            num_classes = dict(dataset_class(get_class(run.dataset_target)).NUM_CLASSES)
        except (ImportError, TypeError, ValueError, AttributeError):
            num_classes = {}
    for t in run.tasks:
        if task_class(t, options.get(t)).needs_num_classes:
            num_classes.setdefault(t, 2)
    return build_tasks(list(run.tasks), num_classes=num_classes, options=options)


def choose_columns(
    runs: Sequence[Run], tasks: Mapping[str, Task], stage: str, metrics: Sequence[str] | None
) -> list[Column]:
    """Each task's published column (the first of its headline metrics that a run has), or ``metrics``.

    Raises:
        CompareError: a run lacks a column's metric (naming the runs), or a ``metrics`` entry names an
            unknown task or a metric without a direction.
    """
    cols: list[Column] = []
    if metrics:
        for key in metrics:
            t, _, m = key.partition("/")
            if t not in tasks or not m:
                raise CompareError(f"--metrics {key}: expected <task>/<metric> with a task of {list(tasks)}")
            direction = tasks[t].metric_direction(m)
            if direction is None:
                raise CompareError(f"--metrics {key}: '{m}' is not a directional metric of task '{t}'")
            cols.append(Column(t, m, direction, tasks[t].report_digits))
    else:
        for t, task in tasks.items():
            m = next(
                (m for m in task.headline_metrics if any(f"{stage}/{t}/{m}" in r.metrics for r in runs)), None
            )
            if m is None:
                raise CompareError(
                    f"no run has a metric of task '{t}' (wanted one of "
                    f"{[f'{stage}/{t}/{m}' for m in task.headline_metrics]}): {_names(runs)}"
                )
            cols.append(Column(t, m, bool(task.metric_direction(m)), task.report_digits))
    for col in cols:
        lacking = [r for r in runs if f"{stage}/{col.key}" not in r.metrics]
        if lacking:
            raise CompareError(
                f"{len(lacking)} run(s) lack {stage}/{col.key}, which others have: {_names(lacking)}. "
                "Re-evaluate them with the same protocol (e.g. eval.py with exact edge evaluation) or choose "
                "the columns with --metrics"
            )
    return cols


def resolve_baseline(spec: str) -> Path:
    """A baseline file: a path, else ``configs/baselines/<spec>.yaml``."""
    path = Path(spec)
    if path.is_file():
        return path
    named = BASELINE_DIR / f"{spec}.yaml"
    if named.is_file():
        return named
    have = sorted(p.stem for p in BASELINE_DIR.glob("*.yaml"))
    raise CompareError(f"--baseline {spec}: no such file, nor configs/baselines/{spec}.yaml (there: {have})")


def file_baseline(spec: str, runs: Sequence[Run]) -> tuple[dict[str, float], str]:
    """The metrics of a baseline file (:mod:`mtl.baselines`) and its description.

    Raises:
        CompareError: the file was measured with another metrics protocol or on another dataset.
    """
    path = resolve_baseline(spec)
    try:
        collected = load_baseline_file(path)
    except ValueError as err:
        raise CompareError(f"--baseline {path}: {err}") from err
    target = collected.recipe.get("dataset_target")
    other = [r for r in runs if target and r.dataset_target and r.dataset_target != target]
    if other:
        raise CompareError(
            f"--baseline {path} was measured on {target}, these runs on another dataset: {_names(other)}"
        )
    name = yaml.safe_load(path.read_text()).get("name", path.stem)
    return collected.metrics, f"baseline file {path} ({name}, metrics protocol {METRICS_PROTOCOL})"


def config_baseline(runs: Sequence[Run]) -> tuple[dict[str, float] | None, str | None]:
    """The single-task baseline the runs were trained with (``baselines=``), when they share one.

    Raises:
        CompareError: the runs were trained with different baselines, or one of another protocol.
    """
    nodes = {json.dumps(r.resolved.get("baselines"), sort_keys=True): r for r in runs}
    if len(nodes) > 1:
        detail = "; ".join(
            f"{(r.resolved.get('baselines') or {}).get('name')}: {r.folder}" for r in nodes.values()
        )
        raise CompareError(
            f"the runs were trained with different Δm baselines ({detail}): pass --baseline FILE to compare "
            "all of them against one"
        )
    node = next(iter(nodes.values())).resolved.get("baselines") or {}
    if not node.get("metrics"):
        return None, None
    protocol = node.get("protocol", 1)
    if protocol != METRICS_PROTOCOL:
        raise CompareError(
            f"the runs' baseline '{node.get('name')}' was measured with metrics protocol {protocol}, this "
            f"code computes protocol {METRICS_PROTOCOL}: re-measure it (python train.py -m "
            "experiment=synthetic_single_task task=...) and pass --baseline <its file>"
        )
    return {k: float(v) for k, v in node["metrics"].items()}, f"the runs' baselines={node.get('name')}"


def _row_mean_metrics(row: Row, stage: str) -> dict[str, float]:
    """``{task}/{metric}`` means over the row's runs (for ``--baseline-row``)."""
    keys = set.intersection(*(set(r.metrics) for r in row.runs))
    prefix = f"{stage}/"
    return {
        k[len(prefix) :]: statistics.fmean(r.metrics[k] for r in row.runs)
        for k in sorted(keys)
        if k.startswith(prefix) and k.count("/") == 2
    }


def find_row(rows: Sequence[Row], label: str, option: str) -> Row:
    """The row labelled ``label``, or the one row whose label holds it as an override."""
    exact = [r for r in rows if r.label == label]
    if exact:
        return exact[0]
    holding = [r for r in rows if label in r.label.split()]
    if len(holding) == 1:
        return holding[0]
    raise CompareError(f"{option} {label}: no such row (rows: {[r.label for r in rows]})")


def _rank(values: Sequence[float | None], higher: bool) -> list[int | None]:
    """Competition ranks (1 = best; ties share the better rank)."""
    sign = -1.0 if higher else 1.0
    keyed = [None if v is None else sign * v for v in values]
    return [None if k is None else 1 + sum(1 for o in keyed if o is not None and o < k) for k in keyed]


def model_cost(run: Run) -> dict[str, float]:
    """Parameters (millions) and forward GFLOPs of one image at the input size, all tasks, of the run's
    model (built from its resolved config without pretrained weights; FLOPs counted on the meta device,
    else on the CPU)."""
    import copy

    import torch
    from hydra.utils import instantiate
    from torch.utils.flop_counter import FlopCounterMode

    tasks = task_objects(run)
    model_cfg = copy.deepcopy(run.resolved.get("model") or {})
    backbone = model_cfg.get("backbone") or {}
    for key in ("pretrained", "checkpoint_path"):
        if backbone.get(key):
            backbone[key] = False if key == "pretrained" else None
    size = list((run.resolved.get("data") or {}).get("input_size") or [224, 224])
    outputs = {t: task.out_channels for t, task in tasks.items()}

    def count(device: str) -> dict[str, float]:
        with torch.device(device):
            net = instantiate(model_cfg, tasks=outputs, _convert_="all").eval()
            x = torch.zeros(1, 3, *size)
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                net(x)
        params = sum(p.numel() for p in net.parameters())
        return {"params_m": params / 1e6, "gflops": counter.get_total_flops() / 1e9}

    try:
        return count("meta")
    except Exception:  # data-dependent routing (MoE top-k) is not traceable on meta tensors
        return count("cpu")


def build_table(
    paths: Sequence[Path],
    *,
    stage: str = "test",
    baseline: str | None = None,
    baseline_row: str | None = None,
    metrics: Sequence[str] | None = None,
    per_task: bool = False,
    published: bool = False,
    cost: bool = False,
    time_ref: str | None = None,
    skip_missing: bool = False,
    ignore: Sequence[str] = (),
    command: str | None = None,
) -> Table:
    """Reads the runs under ``paths`` and assembles the comparison (see the module docstring).

    Args:
        paths: run folders and multirun (sweep) folders.
        stage: the metrics' prefix: ``test`` (``train.py test=true``, ``eval.py``) or ``val``.
        baseline: a baseline file (or a name in ``configs/baselines/``) for Δm.
        baseline_row: the label of the row Δm is measured against (instead of a file).
        metrics: the columns (``task/metric``) instead of each task's published one.
        per_task: per-task relative change (%) columns.
        published: the papers' rows for the runs' dataset.
        cost: parameters and GFLOPs of each row's model.
        time_ref: the row per-step times are relative to (default: ``strategy=ew``, else the first row).
        skip_missing: leave runs without results out (listed in the table's notes) instead of refusing.
        ignore: config keys that do not make two runs different configurations, besides :data:`IGNORED`.
        command: the command printed with the table (default: this process's command line).

    Raises:
        CompareError: runs that cannot be compared (see the module docstring), naming them.
    """
    if baseline and baseline_row:
        raise CompareError("give --baseline or --baseline-row, not both")
    folders = find_runs(paths)
    runs, missing = [], []
    for folder in folders:
        try:
            runs.append(load_run(folder, stage=stage, ignore=ignore))
        except CompareError as err:
            missing.append(str(err))
    if missing and not skip_missing:
        raise CompareError(
            f"{len(missing)} of {len(folders)} runs have no {stage} results:\n  "
            + "\n  ".join(missing)
            + "\n(--skip-missing leaves them out of the table, listed under it)"
        )
    if not runs:
        raise CompareError("no run with results under " + ", ".join(str(p) for p in paths))
    check_comparable(runs)
    tasks = task_objects(runs[0])
    columns = choose_columns(runs, tasks, stage, metrics)
    groups = group_runs(runs)
    labels, common = label_rows(groups, ignore)
    rows = [Row(label=lab, runs=g) for lab, g in zip(labels, groups, strict=True)]
    for row in rows:
        for col in columns:
            row.values[col.key] = Stat.of(
                [display(col.metric, r.metrics[f"{stage}/{col.key}"]) for r in row.runs]
            )

    # Δm
    base: dict[str, float] | None
    if baseline:
        base, base_text = file_baseline(baseline, runs)
    elif baseline_row:
        ref = find_row(rows, baseline_row, "--baseline-row")
        base, base_text = (
            _row_mean_metrics(ref, stage),
            f"the row `{ref.label}` (mean over its {len(ref.runs)} runs)",
        )
    else:
        base, base_text = config_baseline(runs)
    term_keys: list[str] = []
    if base is not None:
        per_run: dict[int, dict[str, float]] = {}
        failed = []
        for run in runs:
            try:
                per_run[id(run)] = delta_m_terms(run.metrics, base, tasks, stage=stage)
            except ValueError as err:
                failed.append(f"{run.folder}: {err}")
        if failed:
            raise CompareError(f"Δm cannot be computed for {len(failed)} run(s):\n  " + "\n  ".join(failed))
        kinds: dict[tuple[str, ...], list[Run]] = {}
        for run in runs:
            kinds.setdefault(tuple(per_run[id(run)]), []).append(run)
        if len(kinds) > 1:
            detail = "; ".join(f"{list(k)}: {_names(rs)}" for k, rs in kinds.items())
            raise CompareError(f"the runs' Δm would use different metrics ({detail}): not comparable")
        term_keys = list(next(iter(kinds)))
        for row in rows:
            terms = [per_run[id(r)] for r in row.runs]
            row.delta_m = Stat.of([sum(t.values()) / len(t) for t in terms])
            row.terms = {k: Stat.of([t[k] for t in terms]) for k in term_keys}

    # per-step time (the Throughput callback's images/s, per-process batch size)
    def step_time(run: Run) -> float | None:
        rate = run.metrics.get(THROUGHPUT)
        batch = (run.resolved.get("data") or {}).get("batch_size")
        return float(batch) / rate if rate and isinstance(batch, int | float) and rate > 0 else None

    timed = all(step_time(r) is not None for r in runs)
    time_label = None
    if timed:
        for row in rows:
            row.step_time = Stat.of([step_time(r) for r in row.runs])  # type: ignore[misc]
        if time_ref:
            ref_row = find_row(rows, time_ref, "--time-ref")
        else:
            ew = [r for r in rows if "strategy=ew" in r.label.split()]
            ref_row = ew[0] if ew else rows[0]
        time_label = ref_row.label
        # best of n, as timeit reports: the fastest run of a row is the one least disturbed by other load
        # on the machine (the seeds run the same steps; the metrics do not depend on the timing)
        fastest = {id(row): min(t for r in row.runs if (t := step_time(r)) is not None) for row in rows}
        for row in rows:
            row.time_rel = fastest[id(row)] / fastest[id(ref_row)]

    if cost:
        for row in rows:
            row.cost = model_cost(row.runs[0])

    # ranks: per task column, mean rank over them, overall by Δm (else the mean rank)
    digits = {c.key: c.digits for c in columns}
    for col in columns:
        ranks = _rank([round(r.values[col.key].mean, digits[col.key]) for r in rows], col.higher)
        for row, rank in zip(rows, ranks, strict=True):
            row.ranks[col.key] = rank  # type: ignore[assignment]
    for row in rows:
        row.mean_rank = statistics.fmean(row.ranks.values())
    if base is not None:
        overall = _rank([round(r.delta_m.mean, 2) for r in rows], True)  # type: ignore[union-attr]
    else:
        overall = _rank([round(r.mean_rank, 2) for r in rows], False)  # type: ignore[arg-type]
    for row, rank in zip(rows, overall, strict=True):
        row.rank = rank

    notes: list[str] = []
    if published:
        dataset = runs[0].dataset
        pub = HEADLINES.get(str(dataset), [])
        if not pub:
            notes.append(
                f"No published numbers for dataset '{dataset}' (mtl.metrics.published has "
                f"{', '.join(sorted(HEADLINES))})."
            )
        for entry in pub:
            row = Row(label=f"{entry['model']} ({entry['backbone']}, published)", published=True)
            for col in columns:
                value = entry["values"].get(col.key)
                if value is not None:
                    row.values[col.key] = Stat(float(value), None, 1)
            rows.insert(len([r for r in rows if r.published]), row)
    if missing:
        notes.append("Left out (no results): " + "; ".join(missing))

    codes = sorted({r.code or "not recorded" for r in runs})
    from mtl.loggers import code_version

    meta = {
        "command": command or shlex.join(["python", "-m", "mtl.compare", *sys.argv[1:]]),
        "machine": machine(),
        "code_runs": codes,
        "code_table": _code(code_version()) or "unknown",
        "runs": len(runs),
        "stage": stage,
        "split": runs[0].split,
        "dataset": runs[0].dataset,
        "tasks": list(runs[0].tasks),
        "protocol": runs[0].protocol,
        "baseline": base_text,
        "common": common,
        "time_ref": time_label,
        "per_task": per_task,
        "cost": cost,
    }
    return Table(rows=rows, columns=columns, term_keys=term_keys, meta=meta, skipped=missing, notes=notes)


def machine() -> str:
    """Platform, CPU count, torch version and GPU of this machine."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (
        f"{platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"torch {torch.__version__}, GPU: {gpu}"
    )


# -------------------------------------------------------------------------------------------- formats


def _fmt(stat: Stat | None, digits: int, *, sign: bool = False, latex: bool = False) -> str:
    if stat is None:
        return "—" if not latex else "--"
    spec = f"{'+' if sign else ''}.{digits}f"
    text = format(stat.mean, spec)
    if stat.std is not None:
        pm = r" \pm " if latex else " ± "
        text += pm + format(stat.std, f".{digits}f")
    return text


def _best(table: Table, value: Any, higher: bool) -> set[int]:
    """ids of the measured rows whose (rounded) value of a column is the best."""
    vals = [(id(r), value(r)) for r in table.measured]
    vals = [(i, v) for i, v in vals if v is not None]
    if not vals:
        return set()
    best = max(v for _, v in vals) if higher else min(v for _, v in vals)
    return {i for i, v in vals if v == best}


@dataclass
class _Cell:
    text: str
    bold: bool = False


def _cells(table: Table) -> tuple[list[str], list[list[_Cell]]]:
    """The header and the rows of cells (format-neutral: ``±`` and ``—``)."""
    has_dm = any(r.delta_m is not None for r in table.rows)
    per_task = table.meta["per_task"] and table.term_keys
    timed = table.meta["time_ref"] is not None
    head = ["rank", "configuration", "n", *[c.title for c in table.columns]]
    if has_dm:
        head.append("Δm (%) ↑")
    if per_task:
        head += [f"Δ{k.split('/')[0]} (%) ↑" for k in table.term_keys]
    head.append("MR ↓")
    if table.meta["cost"]:
        head += ["params (M)", "GFLOPs"]
    if timed:
        head.append(f"time/step (× {table.meta['time_ref']})")
    best: dict[str, set[int]] = {}
    for col in table.columns:
        best[col.key] = _best(
            table,
            lambda r, c=col: round(r.values[c.key].mean, c.digits) if c.key in r.values else None,
            col.higher,
        )
    best["dm"] = _best(table, lambda r: None if r.delta_m is None else round(r.delta_m.mean, 2), True)
    for k in table.term_keys:
        best[f"Δ{k}"] = _best(table, lambda r, k=k: round(r.terms[k].mean, 2) if k in r.terms else None, True)
    best["mr"] = _best(table, lambda r: None if r.mean_rank is None else round(r.mean_rank, 2), False)
    rows = []
    for row in table.rows:
        mine = id(row)
        cells = [
            _Cell("—" if row.rank is None else str(row.rank)),
            _Cell(row.label),
            _Cell("—" if row.published else str(len(row.runs))),
        ]
        for col in table.columns:
            cells.append(_Cell(_fmt(row.values.get(col.key), col.digits), mine in best[col.key]))
        if has_dm:
            cells.append(_Cell(_fmt(row.delta_m, 2, sign=True), mine in best["dm"]))
        if per_task:
            cells += [
                _Cell(_fmt(row.terms.get(k), 2, sign=True), mine in best[f"Δ{k}"]) for k in table.term_keys
            ]
        cells.append(_Cell("—" if row.mean_rank is None else f"{row.mean_rank:.2f}", mine in best["mr"]))
        if table.meta["cost"]:
            cells.append(_Cell(f"{row.cost['params_m']:.3g}" if row.cost else "—"))
            cells.append(_Cell(f"{row.cost['gflops']:.3g}" if row.cost else "—"))
        if timed:
            cells.append(_Cell("—" if row.time_rel is None else f"{row.time_rel:.2f}"))
        rows.append(cells)
    return head, rows


def _header_lines(table: Table) -> list[str]:
    m = table.meta
    n_rows = len(table.measured)
    protocol = (
        f"metrics protocol {m['protocol']}"
        if m["protocol"] is not None
        else f"metrics protocol not recorded by the runs (this code: {METRICS_PROTOCOL})"
    )
    lines = [
        f"command: `{m['command']}`",
        f"runs: {m['runs']} in {n_rows} configuration{'s' if n_rows != 1 else ''}; dataset {m['dataset']}, "
        f"tasks {', '.join(m['tasks'])}; {m['stage']} metrics on the {m['split']} split; {protocol}",
        "Δm: "
        + (
            f"against {m['baseline']}"
            if m["baseline"]
            else "none (no baseline: --baseline or --baseline-row)"
        ),
    ]
    if m["common"]:
        lines.append("common overrides: `" + " ".join(m["common"]) + "`")
    lines += [
        f"code: runs {', '.join(m['code_runs'])}; table {m['code_table']} ('+': local changes)",
        f"machine: {m['machine']}",
    ]
    return lines


def _legend(table: Table) -> str:
    parts = [
        "Mean ± sample standard deviation over the n seeds of each configuration (n = 1: the value); "
        "ratios in percent, depth in metres, angles in degrees; ↑/↓: higher/lower is better; bold: the best "
        "measured value of the column."
    ]
    if table.meta["baseline"]:
        parts.append(
            "Δm: mean relative gain over the baseline across tasks (positive: better), per run, then "
            "averaged; rank: by Δm."
        )
    else:
        parts.append("rank: by MR.")
    parts.append("MR: mean rank over the task columns.")
    if table.meta["cost"]:
        parts.append("params, GFLOPs: the model of the row's first run (forward of one image, all tasks).")
    if table.meta["time_ref"] is not None:
        parts.append(
            f"time/step: training step time relative to `{table.meta['time_ref']}` (train/images_per_sec of "
            "the Throughput callback; the fastest run of each row, best of n as timeit reports): the only "
            "column that changes when the runs are measured again."
        )
    if any(r.published for r in table.rows):
        parts.append("published: the papers' numbers (mtl.metrics.published; † not yet checked), not ranked.")
    spread = _spread_note(table)
    if spread:
        parts.append(spread)
    return " ".join(parts)


def _spread_note(table: Table) -> str | None:
    """Whether the best Δm exceeds the seed spread of the others."""
    rows = [r for r in table.measured if r.delta_m is not None]
    if len(rows) < 2 or any(r.delta_m.std is None for r in rows):  # type: ignore[union-attr]
        return None
    best = max(rows, key=lambda r: r.delta_m.mean)  # type: ignore[union-attr]
    lo = best.delta_m.mean - best.delta_m.std  # type: ignore[union-attr,operator]
    close = [r.label for r in rows if r is not best and r.delta_m.mean + r.delta_m.std >= lo]  # type: ignore[union-attr,operator]
    if not close:
        return f"Seed spread: the best Δm (`{best.label}`) exceeds every other row's by more than one std."
    return (
        f"Seed spread: within one std of the best Δm (`{best.label}`): "
        + ", ".join(f"`{c}`" for c in close)
        + " — their order is not resolved by these seeds."
    )


def generated_line() -> str:
    """The only line that changes when a table is regenerated from the same runs."""
    return "generated " + datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def to_markdown(table: Table) -> str:
    """The table as Markdown: header lines, the table, its legend and notes, then the date."""
    head, rows = _cells(table)
    lines = [f"# Comparison ({len(table.measured)} configurations)", ""]
    lines += [f"- {line}" for line in _header_lines(table)]
    lines += [
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" if i == 1 else "---:" for i in range(len(head))) + "|",
    ]
    for cells in rows:
        lines.append("| " + " | ".join(f"**{c.text}**" if c.bold else c.text for c in cells) + " |")
    lines += ["", _legend(table)]
    lines += [f"\n{note}" for note in table.notes]
    lines += ["", generated_line()]
    return "\n".join(lines) + "\n"


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
        "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}  # fmt: skip


def tex_escape(text: str) -> str:
    """``text`` with LaTeX's special characters escaped, arrows and Greek as math."""
    out = "".join(_TEX.get(ch, ch) for ch in text)
    for plain, math_ in (("↑", r"$\uparrow$"), ("↓", r"$\downarrow$"), ("Δ", r"$\Delta$"), ("×", r"$\times$"),
                         ("—", "--"), ("†", r"$^\dagger$"), ("…", r"\ldots{}")):  # fmt: skip
        out = out.replace(plain, math_)
    return out


def to_latex(table: Table) -> str:
    """The table as a LaTeX ``tabular`` (booktabs); command, machine and code as comments."""
    head, rows = _cells(table)
    lines = [f"% {line.replace('`', '')}" for line in _header_lines(table)]
    lines += [
        r"% needs \usepackage{booktabs}",
        r"\begin{tabular}{rl" + "r" * (len(head) - 2) + "}",
        r"\toprule",
        " & ".join(tex_escape(h) for h in head) + r" \\",
        r"\midrule",
    ]
    for cells in rows:
        texts = []
        for i, c in enumerate(cells):
            if i == 1:
                text = tex_escape(c.text)
            else:
                text = c.text.replace("—", "--")
                if "±" in text or text.startswith(("+", "-")) and text != "--":
                    text = "$" + text.replace(" ± ", r" \pm ") + "$"
            texts.append(r"\textbf{" + text + "}" if c.bold else text)
        lines.append(" & ".join(texts) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", f"% {generated_line()}"]
    return "\n".join(lines) + "\n"


def to_csv(table: Table) -> str:
    """The table's numbers (means, standard deviations, ranks), one row per configuration; no date."""
    import csv
    import io

    header = ["rank", "configuration", "published", "n", "seeds"]
    for col in table.columns:
        header += [col.key, f"{col.key} std"]
    if table.term_keys:
        header += ["delta_m", "delta_m std"]
        for k in table.term_keys:
            header += [f"delta {k}", f"delta {k} std"]
    header.append("mean_rank")
    if table.meta["cost"]:
        header += ["params_m", "gflops"]
    if table.meta["time_ref"] is not None:
        header += ["step_s", "time_rel"]
    header.append("runs")

    def num(v: float | None) -> str:
        return "" if v is None else f"{v:.6g}"

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in table.rows:
        out: list[str] = [
            "" if row.rank is None else str(row.rank),
            row.label,
            str(row.published).lower(),
            "" if row.published else str(len(row.runs)),
            " ".join(str(s) for s in row.seeds),
        ]
        for col in table.columns:
            stat = row.values.get(col.key)
            out += [num(stat.mean if stat else None), num(stat.std if stat else None)]
        if table.term_keys:
            out += [
                num(row.delta_m.mean if row.delta_m else None),
                num(row.delta_m.std if row.delta_m else None),
            ]
            for k in table.term_keys:
                stat = row.terms.get(k)
                out += [num(stat.mean if stat else None), num(stat.std if stat else None)]
        out.append(num(row.mean_rank))
        if table.meta["cost"]:
            out += [num(row.cost.get("params_m")), num(row.cost.get("gflops"))]
        if table.meta["time_ref"] is not None:
            out += [num(row.step_time.mean if row.step_time else None), num(row.time_rel)]
        out.append(" ".join(str(r.folder) for r in row.runs))
        writer.writerow(out)
    return buf.getvalue()


def to_json(table: Table) -> str:
    """Everything of the table (no date), for scripts and the plots."""

    def stat(s: Stat | None) -> dict | None:
        return None if s is None else {"mean": s.mean, "std": s.std, "n": s.n}

    rows = [
        {
            "label": r.label,
            "published": r.published,
            "rank": r.rank,
            "seeds": r.seeds,
            "runs": [str(x.folder) for x in r.runs],
            "values": {k: stat(v) for k, v in r.values.items()},
            "delta_m": stat(r.delta_m),
            "terms": {k: stat(v) for k, v in r.terms.items()},
            "mean_rank": r.mean_rank,
            "step_time": stat(r.step_time),
            "time_rel": r.time_rel,
            "cost": r.cost,
        }
        for r in table.rows
    ]
    columns = [
        {"key": c.key, "title": c.title, "higher": c.higher, "digits": c.digits} for c in table.columns
    ]
    body = {"meta": table.meta, "columns": columns, "term_keys": table.term_keys, "rows": rows,
            "skipped": table.skipped, "notes": table.notes}  # fmt: skip
    return json.dumps(body, indent=2, ensure_ascii=False, default=str) + "\n"


def write_table(table: Table, out: Path, *, plot: bool = False) -> dict[str, Path]:
    """Writes ``compare.{md,csv,tex,json}`` (and the PNGs with ``plot``) into ``out``; returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for ext, text in (("md", to_markdown(table)), ("csv", to_csv(table)), ("tex", to_latex(table)),
                      ("json", to_json(table))):  # fmt: skip
        path = out / f"{STEM}.{ext}"
        path.write_text(text)
        paths[ext] = path
    if plot:
        from mtl.compare_plot import plot_table

        paths.update(plot_table(table, out))
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mtl.compare`` (module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m mtl.compare", description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("paths", type=Path, nargs="+", help="run folders and multirun (sweep) folders")
    parser.add_argument("--baseline", help="a baseline file, or its name in configs/baselines/, for Δm")
    parser.add_argument(
        "--baseline-row", help="the label of the row Δm is measured against (e.g. strategy=ew)"
    )
    parser.add_argument(
        "--metrics", nargs="+", help="columns task/metric instead of each task's published one"
    )
    parser.add_argument("--per-task", action="store_true", help="per-task relative change (%%) columns")
    parser.add_argument("--published", action="store_true", help="the papers' rows (mtl.metrics.published)")
    parser.add_argument(
        "--cost", action="store_true", help="parameters and forward GFLOPs of each row's model"
    )
    parser.add_argument("--time-ref", help="the row step times are relative to (default: strategy=ew)")
    parser.add_argument(
        "--stage", default="test", choices=["test", "val"], help="metrics prefix (default test)"
    )
    parser.add_argument("--out", type=Path, help="output folder (default: the one folder given, else .)")
    parser.add_argument("--plot", action="store_true", help="compare_delta_m.png and compare_tasks.png")
    parser.add_argument("--skip-missing", action="store_true", help="leave runs without results out")
    parser.add_argument("--ignore", nargs="+", default=[], help="config keys that do not tell rows apart")
    args = parser.parse_args(list(argv) if argv is not None else None)
    command = shlex.join(["python", "-m", "mtl.compare", *(argv if argv is not None else sys.argv[1:])])
    try:
        table = build_table(
            args.paths,
            stage=args.stage,
            baseline=args.baseline,
            baseline_row=args.baseline_row,
            metrics=args.metrics,
            per_task=args.per_task,
            published=args.published,
            cost=args.cost,
            time_ref=args.time_ref,
            skip_missing=args.skip_missing,
            ignore=args.ignore,
            command=command,
        )
    except CompareError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = args.out or (args.paths[0] if len(args.paths) == 1 and args.paths[0].is_dir() else Path("."))
    paths = write_table(table, out, plot=args.plot)
    print(paths["md"].read_text())
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
