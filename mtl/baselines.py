"""Writes ``configs/baselines/<dataset>_<backbone>.yaml`` from a multirun of single-task runs.

    python train.py -m experiment=synthetic_single_task task=semseg,depth,normals,edge
    python -m mtl.baselines logs/single_task/multiruns/<date>_<time>      # (again, by hand)

The single-task experiments register :class:`WriteBaseline` as a Hydra callback, so the
multirun writes the file by itself when its last job ends; the command line does the same
for any finished sweep folder.

Every job folder of the sweep holds ``metrics.json`` (written by ``train``) and
``.hydra/{config,hydra}.yaml``. Each run must have exactly one task; all runs must share the
dataset and backbone, which name the file. Per task, the test metrics of the best checkpoint
(``test=true``: the published protocols, exact odsF for edges) are used, plus the final
validation metrics that the test stage does not report (the approximate edge ``f`` that
training-time Δm compares against).
"""

from __future__ import annotations

import argparse
import json
import os
from datetime import datetime, timezone
from pathlib import Path

from omegaconf import OmegaConf

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "baselines"
#: version of the metric definitions a baseline file was measured with: 1 = before the metrics
#: followed the field's evaluators exactly (issue 19: depth clamping, 8-bit truncated edge maps,
#: SEISM's precision rules, absent classes in mIoU, …); 2 = since. Δm across versions is not valid.
METRICS_PROTOCOL = 2


def _run_info(job: Path) -> tuple[str, str, str, dict[str, float]]:
    cfg = OmegaConf.load(job / ".hydra" / "config.yaml")
    choices = OmegaConf.load(job / ".hydra" / "hydra.yaml").hydra.runtime.choices
    tasks = list(cfg.data.tasks)
    if len(tasks) != 1:
        raise ValueError(f"{job}: a single-task run has one task, this one has data.tasks={tasks}")
    metrics = json.loads((job / "metrics.json").read_text())
    return tasks[0], str(choices["data"]), str(choices["model/backbone"]), metrics


def task_metrics(task: str, metrics: dict[str, float]) -> dict[str, float]:
    """``{task}/{metric}`` of one run: test metrics first, then validation-only ones (no losses)."""
    out: dict[str, float] = {}
    for stage in ("test", "val"):
        prefix = f"{stage}/{task}/"
        for k, v in sorted(metrics.items()):
            m = k[len(prefix) :]
            if k.startswith(prefix) and m != "loss" and not m.startswith("iou_") and f"{task}/{m}" not in out:
                out[f"{task}/{m}"] = float(v)
    return out


def collect(sweep_dir: Path) -> tuple[str, dict[str, float], list[str]]:
    """Reads every job of ``sweep_dir`` → (file name stem, metrics, job folders)."""
    jobs = sorted(p.parent for p in Path(sweep_dir).glob("*/metrics.json"))
    if not jobs:
        raise FileNotFoundError(
            f"no <job>/metrics.json under '{sweep_dir}' (is it the hydra.sweep.dir of a multirun?)"
        )
    merged: dict[str, float] = {}
    names, seen = set(), {}
    for job in jobs:
        task, data, backbone, metrics = _run_info(job)
        if task in seen:
            raise ValueError(f"task '{task}' appears twice: {seen[task]} and {job}")
        seen[task] = job
        names.add(f"{data}_{backbone}")
        merged.update(task_metrics(task, metrics))
    if len(names) != 1:
        raise ValueError(f"the runs mix datasets/backbones {sorted(names)}; one baseline file per pair")
    return names.pop(), merged, [str(j) for j in jobs]


def write_baseline(sweep_dir: Path, out_dir: Path = CONFIG_DIR, name: str | None = None) -> Path:
    """Writes ``<out_dir>/<name>.yaml`` (``# @package baselines``) and returns its path."""
    stem, metrics, jobs = collect(sweep_dir)
    path = Path(out_dir) / f"{name or stem}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# @package baselines",
        f"# Single-task reference metrics written by `python -m mtl.baselines {sweep_dir}` on {when}",
        "# from the runs: " + ", ".join(Path(j).name for j in jobs),
        f"name: {name or stem}",
        f"protocol: {METRICS_PROTOCOL}  # metric definitions (mtl.baselines.METRICS_PROTOCOL)",
        "metrics:",
    ]
    lines += [f"  {k}: {v:.6g}" for k, v in sorted(metrics.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


def launcher_rank() -> int:
    """The global rank its launcher gave this process (``RANK``: torchrun, ``SLURM_PROCID``: srun; else 0)."""
    for key in ("RANK", "SLURM_PROCID"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


class WriteBaseline:
    """Hydra callback (``hydra.callbacks``): writes the baseline file when a multirun ends.

    Duck-typed (Hydra calls the ``on_*`` hooks by name), so this module does not import Hydra.

    Args:
        out_dir: folder of the baseline files (default ``configs/baselines``).
        name: file name (default ``<data>_<backbone>``).
    """

    def __init__(self, *, out_dir: str | None = None, name: str | None = None) -> None:
        self.out_dir = Path(out_dir) if out_dir else CONFIG_DIR
        self.name = name

    def on_multirun_end(self, config, **kwargs) -> None:
        if launcher_rank() != 0:  # a multirun started on every rank (torchrun, srun): rank 0 writes
            return
        path = write_baseline(Path(config.hydra.sweep.dir), self.out_dir, self.name)
        print(f"single-task baseline written to {path}")

    def __getattr__(self, hook: str):
        if hook.startswith("on_"):  # every other Hydra hook: nothing to do
            return lambda *args, **kwargs: None
        raise AttributeError(hook)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="the hydra.sweep.dir of the single-task multirun")
    parser.add_argument("--out", type=Path, default=CONFIG_DIR, help="folder of the baseline files")
    parser.add_argument("--name", default=None, help="file name (default: <data>_<backbone>)")
    args = parser.parse_args(argv)
    print(write_baseline(args.sweep_dir, args.out, args.name))


if __name__ == "__main__":
    main()
