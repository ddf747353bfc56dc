"""TaskExpert's ablations (issue 25) on a CPU: every row × 3 seeds, then one comparison table.

    python benchmarks/ablations.py taskexpert                         # from scratch (Swin-mini, 32 px)
    python benchmarks/ablations.py taskexpert --regime pretrained     # from the synthetic-pretrained backbone
    python benchmarks/ablations.py taskexpert --dry-run               # print the commands, run nothing
    python benchmarks/ablations.py taskexpert --table-only            # the table again from the finished runs
    python benchmarks/ablations.py taskexpert --params                # parameters of every row, no training
    python benchmarks/ablations.py taskexpert --time                  # CPU time of a training step per row
    python benchmarks/ablations.py taskexpert --regime pretrained --backbone vit_mini \
        --rows multihead,default,no_memory,gate_memory,fusion_layers  # the check on a single-scale ViT

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

``--backbone vit_mini`` runs the rows on the single-scale ViT-Ti with 4×4 patches (the paper's
backbone family; ``configs/model/backbone/vit_mini.yaml``) instead of the Swin-mini pyramid, into
``logs/ablations/vit_mini-<regime>/`` with its own baselines; ``--rows`` picks some rows by name.
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
#: the backbones the rows run on (``model/backbone=<name>``); the first is the default
BACKBONES = ("swin_mini", "vit_mini")
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


def default_baselines(regime: str, backbone: str = BACKBONES[0]) -> str:
    """The single-task baselines of a regime and backbone, as ``mtl.baselines install`` names them
    (``synthetic_nyud_<backbone>_32px_8ep``, ``+ _synthetic_pretrained`` from the pretrained start)."""
    name = baseline_name(backbone)
    return f"{name}_synthetic_pretrained" if regime == "pretrained" else name


def regime_folder(regime: str, backbone: str = BACKBONES[0]) -> Path:
    """``logs/ablations/<regime>`` (Swin-mini) or ``logs/ablations/<backbone>-<regime>``."""
    return OUT / (regime if backbone == BACKBONES[0] else f"{backbone}-{regime}")


def commands(
    regime: str, baselines: str, rows: tuple[Row, ...] = ROWS, backbone: str = BACKBONES[0]
) -> list[list[str]]:
    """Every command of a regime: for ``pretrained``, the pretraining (reused when cached) and the
    single-task baselines from it (unless installed); then one multirun per row (``seed=0,1,2``)
    into ``regime_folder(regime, backbone)/<row>``."""
    train = [sys.executable, "train.py", "-m"]
    extra = [*REGIMES[regime], *([] if backbone == BACKBONES[0] else [f"model/backbone={backbone}"])]
    steps: list[list[str]] = []
    if regime == "pretrained":
        recipe = yaml.safe_load((ROOT / "configs" / "recipe" / f"{RECIPE}.yaml").read_text())
        size = recipe["data"]["dataset"]["resolution"][0]
        steps.append([sys.executable, "-m", "mtl.pretrain", f"backbone={backbone}", f"resolution={size}"])
    if not (CONFIG_DIR / f"{baselines}.yaml").is_file():
        sweep = regime_folder(regime, backbone) / "baselines"
        steps += [
            [*train, "experiment=synthetic_single_task", f"recipe={RECIPE}", f"task={TASKS}", *extra,
             f"hydra.sweep.dir={sweep}"],
            [sys.executable, "-m", "mtl.baselines", "install", str(sweep)],
        ]  # fmt: skip
    return steps + [
        [*train, *row.overrides, *extra, f"seed={SEEDS}", f"baselines={baselines}", *THROUGHPUT,
         f"hydra.sweep.dir={row_folder(regime, row, backbone)}"]
        for row in rows
    ]  # fmt: skip


def row_folder(regime: str, row: Row, backbone: str = BACKBONES[0]) -> Path:
    """Where a row's runs go: ``logs/ablations/<regime>/<row>`` (see :func:`regime_folder`)."""
    return regime_folder(regime, backbone) / row.name


def parameter_counts(
    rows: tuple[Row, ...] = ROWS, backbone: str = BACKBONES[0]
) -> list[tuple[str, float, float]]:
    """(row, decoder + heads parameters in millions, all parameters in millions) of every row's model,
    composed from the real configs and built without weights."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from mtl.pipeline import build_datamodule
    from mtl.tasks import build_tasks

    out = []
    with initialize_config_dir(str(ROOT / "configs"), version_base=None):
        for row in rows:
            cfg = compose("train", [*row.overrides, f"model/backbone={backbone}"])
            dm = build_datamodule(cfg)
            tasks = build_tasks(list(cfg.data.tasks), num_classes=dm.num_classes)
            net = instantiate(cfg.model, tasks={t: k.out_channels for t, k in tasks.items()}, _convert_="all")
            total = sum(p.numel() for p in net.parameters())
            trunk = sum(p.numel() for p in net.backbone.parameters())
            out.append((row.name, (total - trunk) / 1e6, total / 1e6))
    return out


def step_times(
    rows: tuple[Row, ...] = ROWS, backbone: str = BACKBONES[0], steps: int = 21, warmup: int = 3
) -> list[tuple[str, float]]:
    """(row, median CPU-seconds of one training step) of every row, one torch thread: the forward,
    the task losses (and the model's auxiliary loss), their sum's backward and an AdamW step on one
    batch of the recipe's training data, the same for every row (EW weights, as the rows train).
    Steadier than the runs' wall-time throughput on a shared machine."""
    import statistics
    import time

    import torch
    from hydra import compose, initialize_config_dir

    from mtl.pipeline import build_datamodule, build_module

    torch.set_num_threads(1)
    out = []
    with initialize_config_dir(str(ROOT / "configs"), version_base=None):
        for row in rows:
            cfg = compose("train", [*row.overrides, f"model/backbone={backbone}", "data.num_workers=0"])
            torch.manual_seed(0)
            dm = build_datamodule(cfg)
            dm.setup("fit")
            module = build_module(cfg, dm)
            batch = next(iter(dm.train_dataloader()))
            batch = dm.on_after_batch_transfer(batch, 0)
            opt = torch.optim.AdamW(module.parameters(), lr=1e-4)
            times = []
            for i in range(warmup + steps):
                start = time.process_time()
                opt.zero_grad(set_to_none=True)
                result = module.model.run(batch["image"])
                losses = module.task_losses(result, batch)
                total = sum(losses.values()) + (result.aux_loss if result.aux_loss is not None else 0)
                total.backward()
                opt.step()
                if i >= warmup:
                    times.append(time.process_time() - start)
            out.append((row.name, statistics.median(times)))
    return out


def make_table(regime: str, command: str, rows: tuple[Row, ...] = ROWS, backbone: str = BACKBONES[0]) -> Path:
    """Writes the comparison table of ``regime_folder(regime, backbone)`` and returns its Markdown file."""
    folders = [row_folder(regime, row, backbone) for row in rows]
    time_ref = MULTIHEAD if any(row.overrides == (MULTIHEAD,) for row in rows) else None
    result = build_table(folders, command=command, per_task=True, cost=True, time_ref=time_ref)
    return write_table(result, regime_folder(regime, backbone), plot=True)["md"]


def select_rows(names: str | None) -> tuple[Row, ...]:
    """The rows named in a comma-separated list (all rows for ``None``), in the table's order."""
    if names is None:
        return ROWS
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = sorted(set(wanted) - {row.name for row in ROWS})
    if unknown or not wanted:
        raise SystemExit(f"--rows {names!r}: unknown rows {unknown}; the rows are {[r.name for r in ROWS]}")
    return tuple(row for row in ROWS if row.name in wanted)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=["taskexpert"])
    parser.add_argument("--regime", choices=sorted(REGIMES), default="scratch")
    parser.add_argument(
        "--backbone", choices=BACKBONES, default=BACKBONES[0], help="model/backbone of every run"
    )
    parser.add_argument("--rows", help="comma-separated row names (default: all)")
    parser.add_argument(
        "--baselines",
        help="single-task baselines for Δm (configs/baselines/; default: the regime's, made when missing)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--table-only", action="store_true", help="only the table, from the finished runs")
    parser.add_argument("--params", action="store_true", help="parameter counts of every row, no training")
    parser.add_argument("--force", action="store_true", help="train into existing row folders")
    parser.add_argument(
        "--time",
        action="store_true",
        help="CPU time of one training step of every row (1 thread), no training",
    )
    args = parser.parse_args(argv)
    rows = select_rows(args.rows)
    if args.params:
        print("| row | decoder + heads (M) | all (M) |\n|---|---|---|")
        for name, decoder, total in parameter_counts(rows, args.backbone):
            print(f"| {name} | {decoder:.3f} | {total:.3f} |")
        return 0
    if args.time:
        times = step_times(rows, args.backbone)
        ref = dict(times).get("multihead", times[0][1])
        print("| row | CPU ms / step (1 thread) | × multihead |\n|---|---:|---:|")
        for name, seconds in times:
            print(f"| {name} | {seconds * 1e3:.1f} | {seconds / ref:.2f}× |")
        return 0
    words = ["python", "benchmarks/ablations.py", args.model, "--regime", args.regime]
    if args.backbone != BACKBONES[0]:
        words += ["--backbone", args.backbone]
    if args.rows is not None:
        words += ["--rows", ",".join(row.name for row in rows)]
    command = shlex.join(words)
    baselines = args.baselines or default_baselines(args.regime, args.backbone)
    steps = [] if args.table_only else commands(args.regime, baselines, rows, args.backbone)
    done = [
        str(f) for f in (row_folder(args.regime, row, args.backbone) for row in rows) if f.exists() and steps
    ]
    if done and not args.force and not args.dry_run:
        print(f"{len(done)} row folders exist (first: {done[0]}): --table-only rebuilds the table from them, "
              "--force trains into them again")  # fmt: skip
        return 2
    run_steps(steps, args.dry_run)
    if args.dry_run:
        print(
            f"# {len(rows)} rows × {len(SEEDS.split(','))} seeds = {len(rows) * len(SEEDS.split(','))} runs"
        )
        return 0
    return print_table(lambda: make_table(args.regime, command, rows, args.backbone))


if __name__ == "__main__":
    sys.exit(main())
