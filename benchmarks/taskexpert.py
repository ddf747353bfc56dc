"""TaskExpert versus the multi-head baseline on the same backbone, batch and resolution.

Prints parameter counts and forward FLOPs (exact, counted on the meta device, so ViT-L costs
nothing to count) for every requested backbone, then the measured forward+backward time and
peak memory of one training step (forward, the four NYUD losses' stand-in ``Σ mean(pred²)``,
backward) for ``--measure`` backbones, with the TaskExpert / baseline ratio. Times: both
models in one process, steps interleaved (A B A B …) so that a change of machine load hits
both alike; median per model. Peak memory: each variant in a fresh subprocess (warm-up + one
step) so that the peak is its own:

* CUDA: ``torch.cuda.max_memory_allocated`` during the timed steps (weights, gradients,
  activations: tensor memory only);
* CPU: the process's peak resident set size (``ru_maxrss``), i.e. the same plus the Python /
  torch runtime (~0.3–0.5 GiB) and allocator slack; not comparable with the CUDA figures.

    python benchmarks/taskexpert.py                      # ViT-S measured, ViT-S/B/L counted
    python benchmarks/taskexpert.py --measure vit_base --size 448 576 --batch 2 --device cuda
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from mtl.backbones import TimmBackbone
from mtl.decoders.multihead import MultiHeadDecoder
from mtl.decoders.taskexpert import TaskExpertDecoder
from mtl.model import MultiTaskNet

TASKS = {"semseg": 40, "depth": 1, "normals": 3, "edge": 1}  # NYUD-v2
BACKBONES = {
    "vit_small": ("vit_small_patch16_384", [2, 5, 8, 11]),
    "vit_base": ("vit_base_patch16_384", [2, 5, 8, 11]),
    "vit_large": ("vit_large_patch16_384", [5, 11, 17, 23]),
}


def build(backbone: str, decoder: str, size: tuple[int, int], channels: int) -> MultiTaskNet:
    """The model of ``configs/model/{taskexpert,multihead}.yaml`` on a ViT, without pretrained weights."""
    name, taps = BACKBONES[backbone]
    bb = TimmBackbone(name=name, img_size=size, out_indices=taps, pretrained=False)
    dec = (
        functools.partial(TaskExpertDecoder, channels=channels)
        if decoder == "taskexpert"
        else functools.partial(MultiHeadDecoder, channels=channels)
    )
    return MultiTaskNet(backbone=bb, decoder=dec, tasks=TASKS)


def count(backbone: str, decoder: str, size: tuple[int, int], batch: int, channels: int) -> dict:
    """Parameters (total, decoder+heads) and forward GFLOPs per image, on the meta device."""
    with torch.device("meta"):
        net = build(backbone, decoder, size, channels)
        x = torch.empty(batch, 3, *size)
        with FlopCounterMode(display=False) as fc:
            net(x)
    total = sum(p.numel() for p in net.parameters())
    head = total - sum(p.numel() for p in net.backbone.parameters())
    gflops = fc.get_total_flops() / 1e9 / batch
    return {"params_m": total / 1e6, "decoder_params_m": head / 1e6, "gflops": gflops}


def train_step(net: MultiTaskNet, x: torch.Tensor) -> float:
    """One forward + backward; returns its seconds."""
    t = time.perf_counter()
    net.zero_grad(set_to_none=True)
    out = net(x)
    sum(v.float().square().mean() for v in out.values()).backward()
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t


def times(backbone: str, size: tuple[int, int], batch: int, channels: int, steps: int, device: str) -> dict:
    """Median seconds per step of each decoder, steps interleaved in one process."""
    torch.manual_seed(0)
    nets = {d: build(backbone, d, size, channels).to(device).train() for d in ("multihead", "taskexpert")}
    x = torch.randn(batch, 3, *size, device=device)
    out: dict[str, list[float]] = {d: [] for d in nets}
    for net in nets.values():
        train_step(net, x)  # warm-up
    for _ in range(steps):
        for d, net in nets.items():
            out[d].append(train_step(net, x))
    return {d: statistics.median(v) for d, v in out.items()}


def peak_memory(
    backbone: str, decoder: str, size: tuple[int, int], batch: int, channels: int, device: str
) -> dict:
    """Peak memory (MiB) of a training step of one model, alone in this process."""
    torch.manual_seed(0)
    net = build(backbone, decoder, size, channels).to(device).train()
    x = torch.randn(batch, 3, *size, device=device)
    train_step(net, x)  # warm-up: allocator, kernels, gradient buffers
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    train_step(net, x)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"peak_mib": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", nargs="+", default=list(BACKBONES), choices=list(BACKBONES))
    ap.add_argument("--measure", nargs="*", default=["vit_small"], choices=list(BACKBONES))
    ap.add_argument("--size", nargs=2, type=int, default=[448, 576])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--channels", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)  # (backbone, decoder): one, as JSON
    args = ap.parse_args()
    size = tuple(args.size)
    if args.child:
        res = peak_memory(*args.child, size, args.batch, args.channels, args.device)
        print(json.dumps(res))
        return
    print(f"resolution {size[0]}×{size[1]}, batch {args.batch}, decoder width {args.channels}, NYUD tasks\n")
    print("| backbone | decoder | params (M) | decoder + heads (M) | forward GFLOPs / image |")
    print("|---|---|---|---|---|")
    for bb in args.count:
        for dec in ("multihead", "taskexpert"):
            c = count(bb, dec, size, args.batch, args.channels)
            print(f"| {bb} | {dec} | {c['params_m']:.1f} | {c['decoder_params_m']:.2f} | {c['gflops']:.1f} |")
    if not args.measure:
        return
    mem = "peak CUDA memory (MiB)" if args.device == "cuda" else "peak RSS (MiB)"
    print(f"\ndevice {args.device}, {args.steps} interleaved timed steps per model after 1 warm-up, median\n")
    print(f"| backbone | decoder | fwd+bwd s/step | {mem} | time ratio | memory ratio |")
    print("|---|---|---|---|---|---|")
    for bb in args.measure:
        res = {}
        for dec in ("multihead", "taskexpert"):
            cmd = [sys.executable, __file__, "--child", bb, dec, "--size", *map(str, size)]
            cmd += ["--batch", str(args.batch), "--channels", str(args.channels)]
            cmd += ["--device", args.device]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            res[dec] = json.loads(out.strip().splitlines()[-1])
        # timed after the memory children: Linux keeps ru_maxrss across fork + exec, so a child
        # started by a parent that already held both models would report the parent's peak
        secs = times(bb, size, args.batch, args.channels, args.steps, args.device)
        for dec in ("multihead", "taskexpert"):
            r, b = res[dec], res["multihead"]
            ratios = f"{secs[dec] / secs['multihead']:.2f} | {r['peak_mib'] / b['peak_mib']:.2f}"
            print(f"| {bb} | {dec} | {secs[dec]:.3f} | {r['peak_mib']:.0f} | {ratios} |")


if __name__ == "__main__":
    main()
