"""Data-parallel scaling through the public entry point: 1 process versus N DDP processes.

Each configuration runs ``python train.py`` with the same per-process batch and the
``Throughput`` callback, which times the training steps after a warm-up over all ranks
(images / s = batch × world size / step time). On a CPU machine each process gets
``--threads`` torch threads (default 1), so N processes use N cores; on GPUs pass
``--trainer ddp`` and the GPU counts. The table gives the speed-up over one process and the
scaling efficiency (speed-up / processes).

    python benchmarks/ddp_scaling.py                        # CPU: 1 vs 2 processes (gloo)
    python benchmarks/ddp_scaling.py --trainer ddp --devices 1 2 4 8 --extra trainer.precision=bf16-mixed
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(devices: int, args: argparse.Namespace, log_dir: Path) -> dict:
    trainer = "cpu" if devices == 1 and args.trainer == "ddp_cpu" else args.trainer
    overrides = [
        f"experiment={args.experiment}",
        f"trainer={trainer}",
        f"trainer.devices={devices}",
        f"trainer.max_steps={args.steps}",
        "trainer.max_epochs=-1",
        "+trainer.limit_val_batches=0",
        "logger=none",
        "module.log_images=false",
        "extras.print_config=false",
        f"data.batch_size={args.batch_size}",
        f"data.dataset.resolution=[{args.resolution},{args.resolution}]",
        "+callbacks.throughput._target_=mtl.callbacks.Throughput",
        f"+callbacks.throughput.warmup={args.warmup}",
        "+callbacks.throughput.output_dir=${paths.output_dir}",
        f"paths.log_dir={log_dir}",
        *args.extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "WANDB_MODE": "offline"}
    proc = subprocess.run(
        [sys.executable, "train.py", *overrides], cwd=ROOT, env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"train.py failed for devices={devices}:\n{proc.stderr[-3000:]}")
    (report,) = list(log_dir.glob("train/runs/*/throughput.json"))
    return json.loads(report.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="synthetic_taskexpert")
    parser.add_argument("--trainer", default="ddp_cpu", help="ddp_cpu (gloo) or ddp (GPUs)")
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8, help="per process")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--extra", nargs="*", default=[], help="more overrides")
    args = parser.parse_args()
    rows = []
    for n in args.devices:
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(run(n, args, Path(tmp)))
    base = rows[0]["images_per_sec"] / args.devices[0]
    print(f"{args.experiment}, batch {args.batch_size}/process, {args.resolution} px, {args.steps} steps")
    print("| processes | images/s | speed-up | efficiency |")
    print("|---|---|---|---|")
    for n, r in zip(args.devices, rows, strict=True):
        speed = r["images_per_sec"] / base
        print(f"| {n} | {r['images_per_sec']:.1f} | {speed:.2f}× | {speed / n:.0%} |")


if __name__ == "__main__":
    main()
