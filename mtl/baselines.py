"""Single-task baselines for Δm: collected into the sweep folder, installed into configs/baselines/ by hand.

    python train.py -m experiment=synthetic_single_task task=semseg,depth,normals,edge
    # → logs/single_task/multiruns/<date>_<time>/baseline.yaml (written when the last job ends)
    python -m mtl.baselines install logs/single_task/multiruns/<date>_<time>
    # → configs/baselines/synthetic_nyud_swin_mini_128px_3ep.yaml, then baselines=<that name>
    python -m mtl.baselines collect <sweep dir>          # (re)write <sweep dir>/baseline.yaml

A multirun never writes into ``configs/baselines/``: the single-task experiments register
:class:`WriteBaseline` as a Hydra callback, which writes ``<sweep dir>/baseline.yaml`` and prints
it. ``install`` is the one way into ``configs/baselines/``: it refuses a baseline that lacks a task
of the dataset (naming the missing ones), records the recipe (dataset, resolution, dataset length,
epochs/steps, seeds, backbone, metric protocol, date, code version) in the file and in its name
(``<data>_<backbone>_<H>px_<N>ep``), and never replaces an existing or git-tracked file without
``--force``.

Every job folder of the sweep holds ``metrics.json`` (written by ``train``), ``config.yaml`` (the
resolved config, with the code version) and ``.hydra/{config,hydra}.yaml``. Each run must have
exactly one task; all runs must share the dataset, backbone and recipe. Per task, the test metrics
of the best checkpoint (``test=true``: the published protocols, exact odsF for edges) are used,
plus the final validation metrics that the test stage does not report (the approximate edge ``f``
that training-time Δm compares against).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "baselines"
#: the file a multirun's :class:`WriteBaseline` writes into its sweep folder
SWEEP_FILE = "baseline.yaml"
#: version of the metric definitions a baseline file was measured with: 1 = before the metrics
#: followed the field's evaluators exactly (issue 19: depth clamping, 8-bit truncated edge maps,
#: SEISM's precision rules, absent classes in mIoU, …); 2 = since. Δm across versions is not valid.
METRICS_PROTOCOL = 2
#: recipe keys that every run of one baseline must share
_SHARED = ("dataset", "dataset_target", "dataset_tasks", "resolution", "length", "max_epochs", "max_steps",
           "limit_train_batches", "backbone", "init")  # fmt: skip


@dataclass
class Collected:
    """The single-task runs of one sweep, merged.

    Attributes:
        stem: ``<data>_<backbone>`` from the runs' config choices.
        metrics: ``{task}/{metric}`` of every run.
        jobs: the job folders read.
        recipe: how the runs were trained (see :func:`recipe_name`).
    """

    stem: str
    metrics: dict[str, float]
    jobs: list[str]
    recipe: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The file name a baseline of these runs is installed under (``<stem><recipe suffix>``)."""
        return self.stem + recipe_suffix(self.recipe)


def _job_config(job: Path) -> dict:
    """The job's resolved config (``<job>/config.yaml``, written by ``train``), else Hydra's copy."""
    for path in (job / "config.yaml", job / ".hydra" / "config.yaml"):
        if path.is_file():
            return OmegaConf.to_container(OmegaConf.load(path), resolve=False)  # type: ignore[return-value]
    raise FileNotFoundError(f"{job}: no config.yaml nor .hydra/config.yaml (is it a Hydra job folder?)")


def _plain(value: Any) -> Any:
    """``value`` when it holds no unresolved interpolation (``${...}``), else ``None``."""
    return None if isinstance(value, str) and "${" in value else value


def _data_config_tasks(hydra_cfg: dict, data_choice: str) -> list[str] | None:
    """The ``tasks`` of ``data/<choice>.yaml`` in the run's config sources (the variant's task set)."""
    for source in (hydra_cfg.get("runtime") or {}).get("config_sources") or []:
        if source.get("schema") != "file":
            continue
        path = Path(str(source.get("path"))) / "data" / f"{data_choice}.yaml"
        if path.is_file():
            tasks = (yaml.safe_load(path.read_text()) or {}).get("tasks")
            if isinstance(tasks, list) and all(isinstance(t, str) and "${" not in t for t in tasks):
                return tasks
    return None


def _dataset_tasks(cfg: dict, hydra_cfg: dict, data_choice: str) -> list[str] | None:
    """Every task a complete baseline of this dataset holds.

    The task list of the data config the sweep chose (``configs/data/<choice>.yaml``: ``nyud`` and
    ``pascal_context`` list their dataset class's ``TASKS``; ``synthetic_nyud`` the NYUD-v2 set of
    the synthetic scenes, which can render more), kept within the dataset class's ``TASKS``; the
    class's ``TASKS`` alone when that file cannot be found. ``None``: neither is known.
    """
    from hydra.utils import get_class

    from mtl.data.datamodule import dataset_class

    target = _plain(((cfg.get("data") or {}).get("dataset") or {}).get("_target_"))
    provided = list(dataset_class(get_class(str(target))).TASKS) if target else None
    listed = _data_config_tasks(hydra_cfg, data_choice)
    if listed is None:
        return provided
    return [t for t in listed if provided is None or t in provided]


def _init(cfg: dict) -> str | None:
    """Where the run's backbone started: ``pretrained.source`` (``synthetic``: the cached
    ``python -m mtl.pretrain`` checkpoint); ``None`` for the default start (absent or ``none``)."""
    source = _plain((cfg.get("pretrained") or {}).get("source"))
    return None if source in (None, "none") else str(source)


def _run_info(job: Path) -> tuple[str, str, str, dict[str, float], dict[str, Any]]:
    cfg = _job_config(job)
    hydra_cfg = OmegaConf.to_container(OmegaConf.load(job / ".hydra" / "hydra.yaml").hydra, resolve=False)
    choices = hydra_cfg["runtime"]["choices"]
    tasks = list(cfg["data"]["tasks"])
    if len(tasks) != 1:
        raise ValueError(f"{job}: a single-task run has one task, this one has data.tasks={tasks}")
    metrics = json.loads((job / "metrics.json").read_text())
    data, backbone = str(choices["data"]), str(choices["model/backbone"])
    data_cfg, trainer = cfg.get("data") or {}, cfg.get("trainer") or {}
    dataset = data_cfg.get("dataset") or {}
    recipe = {
        "dataset": data,
        "dataset_target": _plain(dataset.get("_target_")),
        "dataset_tasks": _dataset_tasks(cfg, hydra_cfg, data),
        "resolution": _plain(data_cfg.get("input_size") or dataset.get("resolution")),
        "length": _plain(dataset.get("length")),  # None: the dataset's whole train split
        "max_epochs": _plain(trainer.get("max_epochs")),
        "max_steps": _plain(trainer.get("max_steps")),
        "limit_train_batches": _plain(trainer.get("limit_train_batches")),
        "backbone": backbone,
        "init": _init(cfg),
        "seed": _plain(cfg.get("seed")),
        "code": cfg.get("code"),
    }
    return tasks[0], data, backbone, metrics, recipe


def task_metrics(task: str, metrics: dict[str, float]) -> dict[str, float]:
    """``{task}/{metric}`` of one run: test metrics first, then validation-only ones (no losses)."""
    out: dict[str, float] = {}
    for stage in ("test", "val"):
        prefix = f"{stage}/{task}/"
        for k, v in sorted(metrics.items()):
            m = k[len(prefix) :]
            skip = m in ("loss", "nonfinite") or m.startswith("iou_")
            if k.startswith(prefix) and not skip and f"{task}/{m}" not in out:
                out[f"{task}/{m}"] = float(v)
    return out


def _merge_recipes(recipes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One recipe for all runs (job → recipe); seeds and code versions are listed when they differ."""
    first_job, first = next(iter(recipes.items()))
    for job, recipe in recipes.items():
        differ = [k for k in _SHARED if recipe.get(k) != first.get(k)]
        if differ:
            detail = ", ".join(f"{k}: {first.get(k)!r} vs {recipe.get(k)!r}" for k in differ)
            raise ValueError(
                f"the runs {first_job} and {job} were trained differently ({detail}); a baseline holds runs "
                "of one recipe: collect each recipe's runs from its own sweep"
            )
    merged = {k: first.get(k) for k in _SHARED}
    merged["seeds"] = sorted({r["seed"] for r in recipes.values() if r.get("seed") is not None})
    codes = [r["code"] for r in recipes.values() if r.get("code")]
    merged["code"] = codes[0] if codes and all(c == codes[0] for c in codes) else (codes or None)
    return merged


def collect(sweep_dir: Path | Sequence[Path]) -> Collected:
    """Reads every job of ``sweep_dir`` (``<job>/metrics.json``; several sweep folders: all their jobs)
    into one baseline."""
    dirs = [Path(sweep_dir)] if isinstance(sweep_dir, str | os.PathLike) else [Path(d) for d in sweep_dir]
    jobs = sorted(p.parent for d in dirs for p in d.glob("*/metrics.json"))
    if not jobs:
        raise FileNotFoundError(
            f"no <job>/metrics.json under '{sweep_dir}' (is it the hydra.sweep.dir of a multirun?)"
        )
    merged: dict[str, float] = {}
    names: set[str] = set()
    seen: dict[str, Path] = {}
    recipes: dict[str, dict[str, Any]] = {}
    for job in jobs:
        task, data, backbone, metrics, recipe = _run_info(job)
        if task in seen:
            raise ValueError(f"task '{task}' appears twice: {seen[task]} and {job}")
        seen[task] = job
        names.add(f"{data}_{backbone}")
        merged.update(task_metrics(task, metrics))
        recipes[str(job)] = recipe
    if len(names) != 1:
        raise ValueError(f"the runs mix datasets/backbones {sorted(names)}; one baseline file per pair")
    recipe = _merge_recipes(recipes)
    recipe["tasks"] = sorted(seen)
    recipe["date"] = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    recipe["runs"] = [str(j) for j in jobs]
    return Collected(names.pop(), merged, [str(j) for j in jobs], recipe)


def recipe_suffix(recipe: dict[str, Any]) -> str:
    """``_<H>px_<N>ep`` (or ``_<H>x<W>px``, ``_<N>it`` for a step budget, ``_limit<L>`` for capped
    epochs, ``_synthetic_pretrained`` for runs started from ``pretrained=synthetic``) from a recipe;
    parts that are unknown are left out."""
    parts = []
    res = recipe.get("resolution")
    if isinstance(res, list | tuple) and len(res) == 2:
        parts.append(f"{res[0]}px" if res[0] == res[1] else f"{res[0]}x{res[1]}px")
    epochs, steps = recipe.get("max_epochs"), recipe.get("max_steps")
    if isinstance(epochs, int) and epochs > 0:
        parts.append(f"{epochs}ep")
    if isinstance(steps, int) and steps > 0:
        parts.append(f"{steps}it")
    limit = recipe.get("limit_train_batches")
    if limit is not None and limit != 1:
        parts.append(f"limit{limit}")
    if recipe.get("init"):  # another starting point is another baseline: pretrained=synthetic
        parts.append(f"{recipe['init']}_pretrained")
    return "".join(f"_{p}" for p in parts)


def missing_tasks(recipe: dict[str, Any], metrics: dict[str, float]) -> list[str]:
    """The dataset's tasks (``recipe['dataset_tasks']``) without a metric in ``metrics``."""
    return [t for t in recipe.get("dataset_tasks") or [] if not any(k.startswith(f"{t}/") for k in metrics)]


def render(baseline: Collected, name: str, *, source: str) -> str:
    """The text of a baseline file (``# @package baselines``: name, protocol, recipe, metrics)."""
    recipe = {**baseline.recipe, "metrics_protocol": METRICS_PROTOCOL}
    missing = missing_tasks(recipe, baseline.metrics)
    head = [
        "# @package baselines",
        f"# Single-task reference metrics collected by {source}",
        "# from the runs: " + ", ".join(Path(j).name for j in baseline.jobs),
    ]
    if missing:
        head.append(f"# INCOMPLETE: no runs of {', '.join(missing)} (`install` refuses it)")
    body = {
        "name": name,
        "protocol": METRICS_PROTOCOL,
        "recipe": recipe,
        "metrics": {k: float(f"{v:.6g}") for k, v in sorted(baseline.metrics.items())},
    }
    return "\n".join(head) + "\n" + yaml.safe_dump(body, sort_keys=False, allow_unicode=True)


def git_tracked(path: Path) -> bool:
    """Whether ``path`` is tracked by git (``git ls-files``); ``False`` outside a checkout or without git."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--", path.name],
            cwd=path.parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and bool(out.stdout.strip())


def _refuse_overwrite(path: Path, force: bool) -> None:
    if force:
        return
    if git_tracked(path):
        raise FileExistsError(
            f"{path} is tracked by git (a shipped baseline): not replaced. Install under another name "
            "(--name), or pass --force to replace it deliberately and commit the change"
        )
    if path.exists():
        raise FileExistsError(
            f"{path} exists: not replaced. Install under another name (--name) or pass --force"
        )


def write_baseline(
    sweep_dir: Path, out_dir: Path | None = None, name: str | None = None, *, force: bool = False
) -> Path:
    """Collects ``sweep_dir`` into a baseline file and returns its path.

    Args:
        sweep_dir: the ``hydra.sweep.dir`` of the single-task multirun.
        out_dir: ``None``: ``<sweep_dir>/baseline.yaml`` (replaced freely: it is the sweep's own);
            a folder: ``<out_dir>/<name>.yaml``, never replacing an existing or git-tracked file
            unless ``force``.
        name: the baseline's name (default: ``<data>_<backbone><recipe suffix>``).
        force: replace an existing file in ``out_dir``.
    """
    baseline = collect(sweep_dir)
    name = name or baseline.name
    if out_dir is None:
        path = Path(sweep_dir) / SWEEP_FILE
    else:
        path = Path(out_dir) / f"{name}.yaml"
        _refuse_overwrite(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(baseline, name, source=f"`python -m mtl.baselines collect {sweep_dir}`"))
    return path


def _load_file(path: Path) -> Collected:
    """A baseline file written by :func:`write_baseline` (it carries its recipe)."""
    node = yaml.safe_load(path.read_text()) or {}
    recipe, metrics = node.get("recipe"), node.get("metrics")
    if not isinstance(recipe, dict) or not isinstance(metrics, dict):
        raise ValueError(
            f"{path} has no recipe: and metrics: (written before recipes were recorded?); install from the "
            "sweep folder instead: python -m mtl.baselines install <sweep dir>"
        )
    protocol = node.get("protocol", 1)
    if protocol != METRICS_PROTOCOL:
        raise ValueError(
            f"{path} was measured with metric protocol {protocol}, this code computes protocol "
            f"{METRICS_PROTOCOL} (mtl.baselines.METRICS_PROTOCOL): re-measure it"
        )
    recipe = {k: v for k, v in recipe.items() if k != "metrics_protocol"}
    stem = f"{recipe.get('dataset')}_{recipe.get('backbone')}"
    return Collected(stem, {k: float(v) for k, v in metrics.items()}, list(recipe.get("runs") or []), recipe)


def install(
    source: Path | Sequence[Path], out_dir: Path = CONFIG_DIR, name: str | None = None, *, force: bool = False
) -> Path:
    """Installs a baseline into ``configs/baselines/`` (the explicit step after a single-task sweep).

    Args:
        source: a sweep folder (its jobs are collected; several folders: all their jobs, e.g. the
            tasks a first sweep lacked run later with the same recipe) or a baseline file written by
            the sweep (``<sweep dir>/baseline.yaml``).
        out_dir: the baselines config folder.
        name: the file's name; the recipe suffix (``_128px_3ep``) is appended unless it ends with
            it already. Default: ``<data>_<backbone>`` + the suffix.
        force: replace an existing or git-tracked file.

    Raises:
        ValueError: a task of the dataset has no run (named), the dataset's task set is unknown, or
            the file was measured with another metric protocol.
        FileExistsError: the target exists or is tracked by git, and not ``force``.
    """
    sources = [Path(source)] if isinstance(source, str | os.PathLike) else [Path(s) for s in source]
    if len(sources) == 1 and sources[0].is_file():
        baseline = _load_file(sources[0])
    elif all(s.is_dir() for s in sources):
        baseline = collect(sources)
    else:
        raise FileNotFoundError(f"{[str(s) for s in sources]}: expected sweep folders or one baseline file")
    source = " ".join(str(s) for s in sources)
    recipe = baseline.recipe
    if not recipe.get("dataset_tasks"):
        raise ValueError(
            f"{source}: the dataset's task set is unknown (no data.dataset._target_ nor configs/data/"
            f"{recipe.get('dataset')}.yaml found), so completeness cannot be checked"
        )
    missing = missing_tasks(recipe, baseline.metrics)
    if missing:
        have = sorted({k.split("/")[0] for k in baseline.metrics})
        raise ValueError(
            f"{source}: incomplete baseline for {recipe.get('dataset')}: no runs of task(s) {missing} "
            f"(it has {have}; the dataset has {list(recipe['dataset_tasks'])}). Run them with the same "
            f"recipe (python train.py -m experiment=<single-task experiment> task={','.join(missing)}), "
            "then install from both sweep folders: python -m mtl.baselines install <sweep 1> <sweep 2>"
        )
    suffix = recipe_suffix(recipe)
    name = name or baseline.stem
    if not name.endswith(suffix):
        name += suffix
    path = Path(out_dir) / f"{name}.yaml"
    _refuse_overwrite(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(baseline, name, source=f"`python -m mtl.baselines install {source}`"))
    return path


def launcher_rank() -> int:
    """The global rank its launcher gave this process (``RANK``: torchrun, ``SLURM_PROCID``: srun; else 0)."""
    for key in ("RANK", "SLURM_PROCID"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


class WriteBaseline:
    """Hydra callback (``hydra.callbacks``): collects the baseline into the sweep folder when a multirun ends.

    Writes ``<sweep dir>/baseline.yaml`` and prints it with the ``install`` command; it never
    writes into ``configs/baselines/`` by itself. Duck-typed (Hydra calls the ``on_*`` hooks by
    name), so this module does not import Hydra.

    Args:
        out_dir: another folder for the file (``<out_dir>/<name>.yaml``); an existing or
            git-tracked file there is not replaced: the file then goes to the sweep folder.
        name: the baseline's name (default ``<data>_<backbone><recipe suffix>``).
    """

    def __init__(self, *, out_dir: str | None = None, name: str | None = None) -> None:
        self.out_dir = Path(out_dir) if out_dir else None
        self.name = name

    def on_multirun_end(self, config, **kwargs) -> None:
        if launcher_rank() != 0:  # a multirun started on every rank (torchrun, srun): rank 0 writes
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            path = write_baseline(sweep_dir, self.out_dir, self.name)
        except FileExistsError as err:
            print(f"baseline: {err}; writing it into the sweep folder instead")
            path = write_baseline(sweep_dir, None, self.name)
        text = path.read_text()
        print(f"single-task baseline written to {path}:\n{text}")
        node = yaml.safe_load(text)
        missing = missing_tasks(node["recipe"], node["metrics"])
        if missing:
            print(f"it lacks task(s) {missing} of the dataset: run them before installing it")
        else:
            print(f"use it for Δm: python -m mtl.baselines install {path}  (into configs/baselines/)")

    def __getattr__(self, hook: str):
        if hook.startswith("on_"):  # every other Hydra hook: nothing to do
            return lambda *args, **kwargs: None
        raise AttributeError(hook)


def main(argv: list[str] | None = None) -> None:
    """``python -m mtl.baselines {collect,install} ...`` (a bare sweep folder means ``collect``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    col = sub.add_parser("collect", help="write <sweep dir>/baseline.yaml from a finished single-task sweep")
    col.add_argument("sweep_dir", type=Path, help="the hydra.sweep.dir of the single-task multirun")
    col.add_argument(
        "--out", type=Path, default=None, help="another folder for the file (default: the sweep's)"
    )
    col.add_argument("--name", default=None, help="the baseline's name (default: <data>_<backbone>_<recipe>)")
    ins = sub.add_parser(
        "install", help="check a baseline is complete and install it into configs/baselines/"
    )
    ins.add_argument(
        "source", type=Path, nargs="+", help="single-task sweep folder(s), or one sweep's baseline.yaml"
    )
    ins.add_argument(
        "--out", type=Path, default=CONFIG_DIR, help="the baselines folder (default: configs/baselines)"
    )
    ins.add_argument("--name", default=None, help="file name; the recipe suffix (_128px_3ep) is appended")
    ins.add_argument("--force", action="store_true", help="replace an existing or git-tracked file")
    args_list = list(argv) if argv is not None else None
    if args_list is None:
        import sys

        args_list = sys.argv[1:]
    if args_list and args_list[0] not in ("collect", "install", "-h", "--help"):
        args_list = ["collect", *args_list]  # the former command line: python -m mtl.baselines <sweep dir>
    args = parser.parse_args(args_list)
    try:
        if args.command == "collect":
            path = write_baseline(args.sweep_dir, args.out, args.name)
        else:
            path = install(args.source, args.out, args.name, force=args.force)
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        parser.exit(2, f"error: {err}\n")
    print(path)
    if args.command == "install":
        print(f"use it with: baselines={path.stem}")


if __name__ == "__main__":
    main()
