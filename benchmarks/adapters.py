"""MTLoRA versus full fine-tuning of the same Swin: step time, trainable parameters.

Builds ``experiment=synthetic_mtlora`` and ``synthetic_pascal_baseline`` (the same small
Swin: ``swin_mini``'s sizes), then times one training
step (forward, the 5 task losses, backward, AdamW step) on the same batch, alternating the two
models for several rounds, and prints medians and the ratio. Usage::

    python benchmarks/adapters.py --rounds 5 --size 128
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import compose_cfg  # noqa: E402

from mtl.params import parameter_counts  # noqa: E402
from mtl.pipeline import build_datamodule, build_module  # noqa: E402


def build(experiment: str, size: int, extra: list[str]):
    cfg = compose_cfg([f"experiment={experiment}", f"data.dataset.resolution=[{size},{size}]", *extra],
                      Path(tempfile.mkdtemp()))  # fmt: skip
    dm = build_datamodule(cfg)
    module = build_module(cfg, dm)
    opt = torch.optim.AdamW([p for p in module.model.parameters() if p.requires_grad], lr=1e-4)
    return dm, module, opt


def step(module, opt, batch) -> None:
    preds = module.model(batch["image"])
    loss = sum(module.tasks[t].default_weight * module.tasks[t].loss(preds[t], batch) for t in module.tasks)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = {
        "multi-head, full fine-tuning": build("synthetic_pascal_baseline", args.size, []),
        "MTLoRA (r=16, task rank 4)": build("synthetic_mtlora", args.size, []),
    }
    dm = models["MTLoRA (r=16, task rank 4)"][0]
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    times: dict[str, list[float]] = {k: [] for k in models}
    for _, module, opt in models.values():
        module.model.train()
        step(module, opt, batch)  # warm-up
    for _ in range(args.rounds):
        for name, (_, module, opt) in models.items():
            start = time.perf_counter()
            step(module, opt, batch)
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["multi-head, full fine-tuning"])
    n = batch["image"].shape[0]
    print(f"batch {n} at {args.size}², 5 tasks, {args.threads} thread(s), {args.rounds} rounds\n")
    print("| model | trainable / total params (M) | ms / step (median) | ratio |")
    print("|---|---|---|---|")
    for name, (_, module, _) in models.items():
        c = parameter_counts(module.model)["all"]
        med = statistics.median(times[name])
        params = f"{c['trainable'] / 1e6:.2f} / {c['total'] / 1e6:.2f}"
        print(f"| {name} | {params} | {med * 1e3:.0f} | {med / base:.2f} |")


if __name__ == "__main__":
    main()
