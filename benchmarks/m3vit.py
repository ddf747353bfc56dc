"""M³ViT inference cost: single-task vs all-task vs the dense ViT of the same size.

Builds the models of ``experiment=nyud_m3vit`` (NYUD-v2's 4 tasks, 448×576, ViT-S/16 with 16
experts of hidden 384, top-4, MoE in every other block, multi-head decoder; random weights, nothing
downloaded) and the dense ViT-S/16 multi-task baseline with the same decoder, and prints per
configuration: GFLOPs of one image (``torch.utils.flop_counter``), the median forward latency
(batch 1, measured round-robin so that load changes hit every row alike), and ratios to the dense
ViT running all tasks in one pass. The ``dense dispatch`` rows run every expert on every token and
mask (same outputs): the gap to the sparse rows is what the token dispatch saves. Usage::

    python benchmarks/m3vit.py [--size 448 576] [--reps 5] [--vit vit_small_patch16_384] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from mtl.backbones.m3vit import M3ViT
from mtl.backbones.timm_backbone import TimmBackbone
from mtl.decoders.multihead import MultiHeadDecoder
from mtl.model import MultiTaskNet

TASKS = {"semseg": 40, "depth": 1, "normals": 3, "edge": 1}
TAPS = [2, 5, 8, 11]


def decoder(**kw) -> MultiHeadDecoder:
    return MultiHeadDecoder(channels=256, **kw)


@torch.no_grad()
def gflops(model: MultiTaskNet, x: torch.Tensor, tasks: list[str]) -> float:
    with FlopCounterMode(display=False) as counter:
        model(x, task_subset=tasks)
    return counter.get_total_flops() / 1e9


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def latencies(rows: list[dict], x: torch.Tensor, reps: int, device: str) -> None:
    for r in rows:  # warm-up
        r["model"](x, task_subset=r["tasks"])
    times: list[list[float]] = [[] for _ in rows]
    for _ in range(reps):
        for r, ts in zip(rows, times, strict=True):
            sync(device)
            t = time.perf_counter()
            r["model"](x, task_subset=r["tasks"])
            sync(device)
            ts.append(time.perf_counter() - t)
    for r, ts in zip(rows, times, strict=True):
        r["latency"] = statistics.median(ts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, nargs=2, default=(448, 576))
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--vit", default="vit_small_patch16_384")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    common = dict(name=args.vit, img_size=args.size, out_indices=TAPS)
    dense = MultiTaskNet(backbone=TimmBackbone(**common), decoder=decoder, tasks=TASKS)
    moe = {
        mode: MultiTaskNet(
            backbone=M3ViT(**common, tasks=list(TASKS), dispatch=mode), decoder=decoder, tasks=TASKS
        )
        for mode in ("sparse", "dense")
    }
    everything = list(TASKS)
    rows = [
        {"name": "dense ViT (multi-task baseline)", "model": dense, "tasks": everything},
        {"name": "dense ViT, one task's head", "model": dense, "tasks": ["depth"]},
        {"name": "M³ViT, all tasks", "model": moe["sparse"], "tasks": everything},
        {"name": "M³ViT, 2 tasks", "model": moe["sparse"], "tasks": ["semseg", "depth"]},
        {"name": "M³ViT, single task", "model": moe["sparse"], "tasks": ["depth"]},
        {"name": "M³ViT, single task, dense dispatch", "model": moe["dense"], "tasks": ["depth"]},
    ]
    for m in (dense, *moe.values()):
        m.eval().to(args.device)
    x = torch.randn(1, 3, *args.size, device=args.device)
    for r in rows:
        r["gflops"] = gflops(r["model"], x, r["tasks"])
    latencies(rows, x, args.reps, args.device)
    base = rows[0]
    n_params = {id(m): sum(p.numel() for p in m.parameters()) / 1e6 for m in (dense, moe["sparse"])}
    print(
        f"{args.vit}, 16 experts (hidden = embed dim), top-4, MoE in every other block, multi-head decoder; "
        f"{args.size[0]}×{args.size[1]}, batch 1, {args.device}, {torch.get_num_threads()} threads, "
        f"median of {args.reps}\n"
    )
    print("| model | tasks run | params (M) | GFLOPs | latency (ms) | FLOPs / dense | latency / dense |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        params = n_params.get(id(r["model"]), n_params[id(moe["sparse"])])
        print(
            f"| {r['name']} | {','.join(r['tasks'])} | {params:.1f} | {r['gflops']:.1f} | "
            f"{r['latency'] * 1e3:.0f} | {r['gflops'] / base['gflops']:.2f} | "
            f"{r['latency'] / base['latency']:.2f} |"
        )


if __name__ == "__main__":
    main()
