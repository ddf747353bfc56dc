"""TaskExpert's ablations (issue 25) on a CPU: every row × 3 seeds, then one comparison table.

    python benchmarks/ablations.py taskexpert                         # from scratch (Swin-mini, 32 px)
    python benchmarks/ablations.py taskexpert --regime pretrained     # from the synthetic-pretrained backbone
    python benchmarks/ablations.py taskexpert --dry-run               # print the commands, run nothing
    python benchmarks/ablations.py taskexpert --table-only            # the table again from the finished runs
    python benchmarks/ablations.py taskexpert --params                # parameters of every row, no training

Each row changes one factor of the default (``experiment=table_arch_taskexpert``: 8 experts + the
memory, 64 channels, per-pixel gates on the feature, ``add`` memory update, no intermediate
supervision), with the comparison tables' recipe (``recipe=table_cpu``: 32 px scenes, 8 epochs,
tested after the last one) and the Throughput callback. Every row is one ordinary Hydra multirun
over ``seed=0,1,2`` into ``logs/ablations/<regime>/<row>/``, printed before it runs; the table
(:mod:`mtl.compare`: per-task columns, Δm against the single-task baselines, parameters, GFLOPs,
time per step relative to the multi-head row) goes to ``logs/ablations/<regime>/compare.*``.

The pretrained regime adds ``pretrained=synthetic`` (the synthetic-pretrained Swin-mini) to every
row; give its single-task baselines with ``--baselines`` once they are installed.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mtl.compare import CompareError, build_table, write_table  # noqa: E402

OUT = ROOT / "logs" / "ablations"
SEEDS = "0,1,2"
BASELINES = "synthetic_nyud_swin_mini_32px_8ep"
DEFAULT = "experiment=table_arch_taskexpert"
MULTIHEAD = "experiment=table_arch_multihead"
#: extra overrides of each regime
REGIMES = {"scratch": [], "pretrained": ["pretrained=synthetic"]}
THROUGHPUT = ["+callbacks.throughput._target_=mtl.callbacks.Throughput", "+callbacks.throughput.warmup=5"]


@dataclass(frozen=True)
class Row:
    """One ablation row: its folder name, its overrides and the question it answers."""

    name: str
    overrides: tuple[str, ...]
    question: str


#: the rows, one factor at a time from the default; the first is the time-per-step reference
ROWS = (
    Row("multihead", (MULTIHEAD,), "multi-head baseline, same decoder width (64)"),
    Row("default", (DEFAULT,), "TaskExpert as the paper describes it"),
    Row("no_memory", (DEFAULT, "model.decoder.use_memory=false"), "does the memory help?"),
    Row("memory_ema", (DEFAULT, "model.decoder.memory_update=ema"), "memory update rule"),
    Row("memory_replace", (DEFAULT, "model.decoder.memory_update=replace"), "memory update rule"),
    Row("experts_2", (DEFAULT, "model.decoder.num_experts=2"), "more experts help up to a point?"),
    Row("experts_16", (DEFAULT, "model.decoder.num_experts=16"), "more experts help up to a point?"),
    Row("gate_memory", (DEFAULT, "model.decoder.gate_input=feature_memory"), "gate input"),
    Row("gate_image", (DEFAULT, "model.decoder.gate_mode=image"), "per-pixel vs per-image gates"),
    Row("gate_static", (DEFAULT, "model.decoder.gate_mode=static"), "dynamic vs static mixture"),
    Row("width_32", (DEFAULT, "model.decoder.channels=32"), "decoder width"),
    Row("multihead_116", (MULTIHEAD, "model.decoder.channels=116"), "multi-head at TaskExpert's parameters"),
    Row(
        "experts_lowrank",
        (
            DEFAULT,
            "model.decoder.expert_activation=none",
            "model.decoder.expert_hidden=16",
            "model.decoder.expert_kernel=3",
        ),
        "MLoRE's low-rank experts (rank 16, 3 × 3)",
    ),
    Row("intermediate", (DEFAULT, "model.decoder.intermediate_supervision=true"), "intermediate supervision"),
    Row("fusion_layers", (DEFAULT, "model.decoder.fusion=layer_softmax"), "MLoRE's final decoding"),
)


def commands(regime: str, baselines: str, rows: tuple[Row, ...] = ROWS) -> list[list[str]]:
    """One multirun per row (``seed=0,1,2``) into ``logs/ablations/<regime>/<row>``."""
    base = [sys.executable, "train.py", "-m"]
    return [
        [*base, *row.overrides, *REGIMES[regime], f"seed={SEEDS}", f"baselines={baselines}", *THROUGHPUT,
         f"hydra.sweep.dir={OUT / regime / row.name}"]
        for row in rows
    ]  # fmt: skip


def parameter_counts(rows: tuple[Row, ...] = ROWS) -> list[tuple[str, float, float]]:
    """(row, decoder + heads parameters in millions, all parameters in millions) of every row's model,
    composed from the real configs and built without weights."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from mtl.pipeline import build_datamodule
    from mtl.tasks import build_tasks

    out = []
    with initialize_config_dir(str(ROOT / "configs"), version_base=None):
        for row in rows:
            cfg = compose("train", list(row.overrides))
            dm = build_datamodule(cfg)
            tasks = build_tasks(list(cfg.data.tasks), num_classes=dm.num_classes)
            net = instantiate(cfg.model, tasks={t: k.out_channels for t, k in tasks.items()}, _convert_="all")
            total = sum(p.numel() for p in net.parameters())
            backbone = sum(p.numel() for p in net.backbone.parameters())
            out.append((row.name, (total - backbone) / 1e6, total / 1e6))
    return out


def make_table(regime: str, command: str) -> Path:
    """Writes the comparison table of ``logs/ablations/<regime>/`` and returns its Markdown file."""
    folders = [OUT / regime / row.name for row in ROWS]
    result = build_table(folders, command=command, per_task=True, cost=True, time_ref=MULTIHEAD)
    return write_table(result, OUT / regime, plot=True)["md"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=["taskexpert"])
    parser.add_argument("--regime", choices=sorted(REGIMES), default="scratch")
    parser.add_argument(
        "--baselines", default=BASELINES, help="single-task baselines for Δm (configs/baselines/)"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--table-only", action="store_true", help="only the table, from the finished runs")
    parser.add_argument("--params", action="store_true", help="parameter counts of every row, no training")
    parser.add_argument("--force", action="store_true", help="train into existing row folders")
    args = parser.parse_args(argv)
    if args.params:
        print("| row | decoder + heads (M) | all (M) |\n|---|---|---|")
        for name, decoder, total in parameter_counts():
            print(f"| {name} | {decoder:.3f} | {total:.3f} |")
        return 0
    command = shlex.join(["python", "benchmarks/ablations.py", args.model, "--regime", args.regime])
    steps = [] if args.table_only else commands(args.regime, args.baselines)
    done = [s[-1].split("=", 1)[1] for s in steps if Path(s[-1].split("=", 1)[1]).exists()]
    if done and not args.force and not args.dry_run:
        print(f"{len(done)} row folders exist (first: {done[0]}): --table-only rebuilds the table from them, "
              "--force trains into them again")  # fmt: skip
        return 2
    for step in steps:
        print("$ " + shlex.join(step), flush=True)
        if not args.dry_run:
            subprocess.run(step, cwd=ROOT, check=True)
    if args.dry_run:
        print(
            f"# {len(steps)} rows × {len(SEEDS.split(','))} seeds = {len(steps) * len(SEEDS.split(','))} runs"
        )
        return 0
    try:
        path = make_table(args.regime, command)
    except CompareError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(path.read_text())
    print(f"written: {path} (.csv, .tex, .json, PNGs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
