"""Framework overhead: an ``MTLModule`` training step under Lightning versus a bare loop.

Both run the same model (same initial weights), the same batch, the same task losses and
weights, backward and AdamW step. Times are per step, medians over interleaved rounds so
that machine noise hits both alike; the ratio is what matters (target ≤ 1.05).

    python benchmarks/framework_overhead.py [--steps 30] [--rounds 3] [--resolution 128]
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import time

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from mtl.backbones import TimmBackbone
from mtl.decoders import MultiHeadDecoder
from mtl.model import MultiTaskNet
from mtl.module import MTLModule
from mtl.tasks import build_tasks

TASKS = ["semseg", "depth", "normals", "edge"]


class RepeatBatch(Dataset):
    """The same pre-collated batch, ``n`` times (batch_size=None loader)."""

    def __init__(self, batch: dict, n: int) -> None:
        self.batch, self.n = batch, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return self.batch


class StepTimer(L.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self._t = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.times.append(time.perf_counter() - self._t)


def make_batch(bs: int, res: int) -> dict:
    g = torch.Generator().manual_seed(0)
    n = torch.nn.functional.normalize(torch.randn(bs, 3, res, res, generator=g), dim=1)
    return {
        "image": torch.randn(bs, 3, res, res, generator=g),
        "semseg": torch.randint(0, 9, (bs, res, res), generator=g),
        "depth": torch.rand(bs, 1, res, res, generator=g) * 5,
        "normals": n,
        "edge": (torch.rand(bs, 1, res, res, generator=g) > 0.9).float(),
    }


def make_model(res: int) -> MultiTaskNet:
    bb = TimmBackbone(
        name="swin_tiny_patch4_window7_224",
        img_size=(res, res),
        embed_dim=48,
        depths=(2, 2, 2, 2),
        num_heads=(2, 4, 8, 16),
        window_size=4,
    )
    tasks = {"semseg": 9, "depth": 1, "normals": 3, "edge": 1}
    return MultiTaskNet(backbone=bb, decoder=functools.partial(MultiHeadDecoder, channels=64), tasks=tasks)


def bare_loop(model: MultiTaskNet, batch: dict, steps: int) -> list[float]:
    tasks = build_tasks(TASKS, num_classes={"semseg": 9})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        preds = model(batch["image"])
        loss = sum(task.default_weight * task.loss(preds[n], batch) for n, task in tasks.items())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return times


def lightning_loop(model: MultiTaskNet, batch: dict, steps: int) -> list[float]:
    tasks = build_tasks(TASKS, num_classes={"semseg": 9})
    module = MTLModule(
        model=model, tasks=tasks, optimizer=functools.partial(torch.optim.AdamW, lr=1e-4), log_images=False
    )
    timer = StepTimer()
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        limit_val_batches=0,
    )
    trainer.fit(module, train_dataloaders=DataLoader(RepeatBatch(batch, steps), batch_size=None))
    return timer.times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--resolution", type=int, default=128)
    args = ap.parse_args()
    torch.manual_seed(0)
    base = make_model(args.resolution)
    batch = make_batch(args.batch_size, args.resolution)
    warm = max(args.steps // 5, 2)
    bare, light = [], []
    for _ in range(args.rounds):
        bare += bare_loop(copy.deepcopy(base), batch, args.steps)[warm:]
        light += lightning_loop(copy.deepcopy(base), batch, args.steps)[warm:]
    b, m = statistics.median(bare), statistics.median(light)
    timed = args.steps - warm
    print(f"batch {args.batch_size} × {args.resolution}², {args.rounds} rounds × {timed} timed steps")
    print("| loop | median step (ms) | ratio to bare |")
    print("|---|---|---|")
    print(f"| bare PyTorch | {b * 1e3:.1f} | 1.000 |")
    print(f"| MTLModule + Lightning Trainer | {m * 1e3:.1f} | {m / b:.3f} |")


if __name__ == "__main__":
    main()
