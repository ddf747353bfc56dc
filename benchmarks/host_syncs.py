"""Host syncs per training step: how often the CPU waits for the device, per strategy and model.

Runs the real pipeline (``mtl.pipeline.train``: Hydra configs, Lightning ``Trainer`` with the
default callbacks, loggers and progress bar) on small synthetic scenes for ``--warmup + --steps``
steps and counts, with :class:`mtl.host_syncs.SyncsPerStep`, the host–device synchronisations of
every step after the warm-up (``.item()``, ``float(t)``, ``bool(t)``, ``.tolist()``, ``.cpu()``,
data-dependent shapes, blocking host→device copies; see :mod:`mtl.host_syncs`). The counted
operators dispatch on the CPU as well, so the numbers a CPU run prints are those of a GPU run.
``--steps`` should be a multiple of ``trainer.log_every_n_steps`` (10): the mean then includes the
logging steps in their true proportion.

    python benchmarks/host_syncs.py [--steps 20] [--only fixed,m3vit] [--sites]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from gpu_acceptance import compose_cfg  # benchmarks/ is on sys.path when run as a script

from mtl.host_syncs import SyncsPerStep
from mtl.pipeline import train

BATCH = 2
SMALL = [
    "data.dataset.resolution=[64,64]",
    f"data.batch_size={BATCH}",
    "data.num_workers=0",
    "module.log_images=false",
    "+trainer.limit_val_batches=0",
    "trainer.max_epochs=1",
    "extras.print_config=false",
    "+callbacks.host_syncs._target_=mtl.host_syncs.SyncsPerStep",
]
# name → (description, overrides): the plain strategies, a gradient aggregator, F-MTL and M³ViT
SETUPS: dict[str, tuple[str, list[str]]] = {
    "fixed": ("fixed loss weights (multi-head Swin)", ["experiment=synthetic_baseline", "strategy=fixed"]),
    "ew": ("equal weights (multi-head Swin)", ["experiment=synthetic_baseline", "strategy=ew"]),
    "upgrad": ("UPGrad gradient aggregation", ["experiment=synthetic_baseline", "strategy=upgrad"]),
    "fmtl": ("F-MTL (F-CAGrad)", ["experiment=synthetic_baseline", "strategy=fmtl"]),
    "m3vit": (
        "M³ViT (3 MoE layers, 4 tasks), fixed weights",
        ["experiment=synthetic_m3vit", "model.backbone.num_experts=8", "model.backbone.top_k=2"],
    ),
    "m3vit-bf16": (
        "the same M³ViT in bf16-mixed (grouped GEMM dispatch)",
        ["experiment=synthetic_m3vit", "model.backbone.num_experts=8", "model.backbone.top_k=2"]
        + ["trainer.precision=bf16-mixed"],
    ),
    "mtlora": ("MTLoRA Swin (per-task streams), fixed weights", ["experiment=synthetic_mtlora"]),
    "mtlora-ddp-bf16": (
        "the same MTLoRA, bf16-mixed, DDP (one gloo process)",
        [
            "experiment=synthetic_mtlora",
            "trainer.precision=bf16-mixed",
            "trainer=ddp_cpu",
            "trainer.devices=1",
        ],
    ),
}


def measure(overrides: list[str], *, steps: int, warmup: int) -> SyncsPerStep:
    """Trains ``warmup + steps`` steps with ``overrides``; the sync counting callback."""
    total = warmup + steps
    extra = [f"trainer.max_steps={total}", f"data.dataset.length={BATCH * total}"]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_cfg(SMALL + extra + overrides + [f"+callbacks.host_syncs.warmup={warmup}"], Path(tmp))
        quiet = contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO())
        with quiet[0], quiet[1], warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, objects = train(cfg)
    (counter,) = [cb for cb in objects["trainer"].callbacks if isinstance(cb, SyncsPerStep)]
    return counter


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="measured steps (a multiple of 10)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--only", default=",".join(SETUPS), help=f"comma-separated subset of {list(SETUPS)}")
    ap.add_argument("--sites", action="store_true", help="also print where the syncs come from")
    args = ap.parse_args()
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    rows = []
    for name in args.only.split(","):
        description, overrides = SETUPS[name]
        cb = measure(overrides, steps=args.steps, warmup=args.warmup)
        steps = cb.per_step[args.warmup :]
        rows.append((name, description, cb.mean(), min(steps), max(steps)))
        if args.sites:
            print(f"{name}: {dict(cb.counter.by_op)}", file=sys.stderr)
            for site, n in cb.counter.by_site.most_common():
                print(f"  {n / len(steps):6.2f}/step  {site}", file=sys.stderr)
    print(f"host syncs per training step ({args.steps} steps after {args.warmup} warm-up, batch {BATCH})")
    print("| setup | strategy / model | syncs per step (mean) | min | max |")
    print("|---|---|---|---|---|")
    for name, description, mean, lo, hi in rows:
        print(f"| {name} | {description} | {mean:.1f} | {lo} | {hi} |")


if __name__ == "__main__":
    main()
