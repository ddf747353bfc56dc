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

The pretrained regime adds ``pretrained=synthetic`` (the synthetic-pretrained Swin-mini at the
recipe's 32 px, made first by ``python -m mtl.pretrain`` unless cached) to every row, and to its own
single-task baselines (``<scratch baselines>_synthetic_pretrained``, trained and installed first
unless ``configs/baselines/`` has them).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from tables import RECIPE, TASKS, baseline_name, print_table, run_steps  # noqa: E402

from mtl.baselines import CONFIG_DIR  # noqa: E402
from mtl.compare import build_table, write_table  # noqa: E402

OUT = ROOT / "logs" / "ablations"
SEEDS = "0,1,2"
DEFAULT = "experiment=table_arch_taskexpert"
MULTIHEAD = "experiment=table_arch_multihead"
#: extra overrides of each regime
REGIMES = {"scratch": [], "pretrained": ["pretrained=synthetic"]}
#: the single-task baselines of each regime (``mtl.baselines install`` names the pretrained ones so)
BASELINES = {"scratch": baseline_name(), "pretrained": f"{baseline_name()}_synthetic_pretrained"}
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
    """Every command of a regime: for ``pretrained``, the pretraining (reused when cached) and the
    single-task baselines from it (unless installed); then one multirun per row (``seed=0,1,2``)
    into ``logs/ablations/<regime>/<row>``."""
    train = [sys.executable, "train.py", "-m"]
    steps: list[list[str]] = []
    if regime == "pretrained":
        recipe = yaml.safe_load((ROOT / "configs" / "recipe" / f"{RECIPE}.yaml").read_text())
        size = recipe["data"]["dataset"]["resolution"][0]
        steps.append([sys.executable, "-m", "mtl.pretrain", "backbone=swin_mini", f"resolution={size}"])
    if not (CONFIG_DIR / f"{baselines}.yaml").is_file():
        sweep = OUT / regime / "baselines"
        steps += [
            [*train, "experiment=synthetic_single_task", f"recipe={RECIPE}", f"task={TASKS}",
             *REGIMES[regime], f"hydra.sweep.dir={sweep}"],
            [sys.executable, "-m", "mtl.baselines", "install", str(sweep)],
        ]  # fmt: skip
    return steps + [
        [*train, *row.overrides, *REGIMES[regime], f"seed={SEEDS}", f"baselines={baselines}", *THROUGHPUT,
         f"hydra.sweep.dir={row_folder(regime, row)}"]
        for row in rows
    ]  # fmt: skip


def row_folder(regime: str, row: Row) -> Path:
    """Where a row's runs go: ``logs/ablations/<regime>/<row>``."""
    return OUT / regime / row.name


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
    folders = [row_folder(regime, row) for row in ROWS]
    result = build_table(folders, command=command, per_task=True, cost=True, time_ref=MULTIHEAD)
    return write_table(result, OUT / regime, plot=True)["md"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=["taskexpert"])
    parser.add_argument("--regime", choices=sorted(REGIMES), default="scratch")
    parser.add_argument(
        "--baselines",
        help="single-task baselines for Δm (configs/baselines/; default: the regime's, made when missing)",
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
    steps = [] if args.table_only else commands(args.regime, args.baselines or BASELINES[args.regime])
    done = [str(f) for f in (row_folder(args.regime, row) for row in ROWS) if f.exists() and steps]
    if done and not args.force and not args.dry_run:
        print(f"{len(done)} row folders exist (first: {done[0]}): --table-only rebuilds the table from them, "
              "--force trains into them again")  # fmt: skip
        return 2
    run_steps(steps, args.dry_run)
    if args.dry_run:
        print(
            f"# {len(ROWS)} rows × {len(SEEDS.split(','))} seeds = {len(ROWS) * len(SEEDS.split(','))} runs"
        )
        return 0
    return print_table(lambda: make_table(args.regime, command))


if __name__ == "__main__":
    sys.exit(main())
