"""The two comparison tables of docs/compare.md, one command each, on a CPU.

    python benchmarks/tables.py strategies       # table 1: 15 optimisation strategies × 3 seeds
    python benchmarks/tables.py architectures    # table 2: 5 architectures × 3 seeds, params and GFLOPs
    python benchmarks/tables.py baselines        # only the single-task baselines both tables use
    python benchmarks/tables.py strategies --dry-run     # print the commands, run nothing
    python benchmarks/tables.py strategies --table-only  # the table again from the finished runs

Every step is an ordinary command of the framework, printed before it runs:

1. the single-task baselines with the tables' recipe (``recipe=table_cpu``), one run per task, unless
   ``configs/baselines/<name>.yaml`` exists: ``python train.py -m experiment=synthetic_single_task
   recipe=table_cpu task=semseg,depth,normals,edge``, then ``python -m mtl.baselines install``;
2. the table's multirun into ``logs/tables/<table>/`` (a fixed folder, so that the table's command
   line is the same each time): ``experiment=table_strategies`` (its sweep of strategies and seeds)
   or ``experiment=table_arch_*`` × ``seed=0,1,2``, every job tested (``test=true``) and timed (the
   Throughput callback);
3. the table (:mod:`mtl.compare`) into ``logs/tables/<table>/compare.{md,csv,tex,json}`` and PNGs,
   headed by this script's command line: running it again regenerates the files byte for byte except
   the time-per-step column and the date line (same machine, same code).

A table folder that exists is not trained into again without ``--force`` (``--table-only`` rebuilds
the table from it).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mtl.baselines import CONFIG_DIR, recipe_suffix  # noqa: E402
from mtl.compare import CompareError, build_table, write_table  # noqa: E402

OUT = ROOT / "logs" / "tables"
RECIPE = "table_cpu"
TASKS = "semseg,depth,normals,edge"
#: table 2's rows, in this order (the first is the time/step reference)
ARCHITECTURES = (
    "table_arch_multihead",
    "table_arch_taskexpert",
    "table_arch_taskexpert_nomem",
    "table_arch_m3vit",
    "table_arch_mtlora",
)
SEEDS = "0,1,2"


def baseline_name(backbone: str = "swin_mini") -> str:
    """``synthetic_nyud_<backbone>`` + the suffix of the recipe (``_32px_8ep``), as ``install`` names it."""
    recipe = yaml.safe_load((ROOT / "configs" / "recipe" / f"{RECIPE}.yaml").read_text())
    suffix = recipe_suffix(
        {
            "resolution": recipe["data"]["dataset"]["resolution"],
            "max_epochs": recipe["trainer"]["max_epochs"],
            "max_steps": recipe["trainer"].get("max_steps"),
        }
    )
    return f"synthetic_nyud_{backbone}{suffix}"


def commands(table: str) -> list[list[str]]:
    """The training and installing commands of ``table`` (baselines, strategies or architectures)."""
    name = baseline_name()
    train = [sys.executable, "train.py", "-m"]
    steps: list[list[str]] = []
    if not (CONFIG_DIR / f"{name}.yaml").is_file():
        sweep = OUT / "baselines"
        steps += [
            [*train, "experiment=synthetic_single_task", f"recipe={RECIPE}", f"task={TASKS}",
             f"hydra.sweep.dir={sweep}"],
            [sys.executable, "-m", "mtl.baselines", "install", str(sweep)],
        ]  # fmt: skip
    if table == "strategies":
        steps.append(
            [*train, "experiment=table_strategies", f"baselines={name}", f"hydra.sweep.dir={OUT / table}"]
        )
    elif table == "architectures":
        steps.append(
            [*train, f"experiment={','.join(ARCHITECTURES)}", f"seed={SEEDS}", f"baselines={name}",
             "+callbacks.throughput._target_=mtl.callbacks.Throughput", "+callbacks.throughput.warmup=5",
             f"hydra.sweep.dir={OUT / table}"]
        )  # fmt: skip
    return steps


def make_table(table: str, command: str) -> Path:
    """Writes the comparison table of ``logs/tables/<table>/`` and returns its Markdown file."""
    options = {"per_task": True}
    if table == "architectures":
        options.update(cost=True, time_ref=f"experiment={ARCHITECTURES[0]}")
    result = build_table([OUT / table], command=command, **options)
    return write_table(result, OUT / table, plot=True)["md"]


def run_steps(steps: list[list[str]], dry_run: bool) -> None:
    """Prints every command (``$ ...``) and, unless ``dry_run``, runs it from the repository root."""
    for step in steps:
        print("$ " + shlex.join(step), flush=True)
        if not dry_run:
            subprocess.run(step, cwd=ROOT, check=True)


def print_table(make: Callable[[], Path]) -> int:
    """Builds a table with ``make`` and prints it; 2 with the comparison tool's message when it cannot."""
    try:
        path = make()
    except CompareError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(path.read_text())
    print(f"written: {path} (.csv, .tex, .json, PNGs)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("table", choices=["strategies", "architectures", "baselines"])
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--table-only", action="store_true", help="only the table, from the finished runs")
    parser.add_argument("--force", action="store_true", help="train into an existing table folder")
    args = parser.parse_args(argv)
    command = shlex.join(["python", "benchmarks/tables.py", args.table])
    steps = [] if args.table_only else commands(args.table)
    if args.table == "baselines" and not steps:
        print(f"configs/baselines/{baseline_name()}.yaml exists: nothing to do")
    folder = OUT / args.table
    if steps and args.table != "baselines" and folder.exists() and not args.force and not args.dry_run:
        print(f"{folder} exists: --table-only rebuilds the table from it, --force trains into it again")
        return 2
    run_steps(steps, args.dry_run)
    if args.table == "baselines" or args.dry_run:
        return 0
    return print_table(lambda: make_table(args.table, command))


if __name__ == "__main__":
    sys.exit(main())
