"""FLOPs, active parameters and measured latency of every width configuration.

Builds the slimmable model of ``experiment=nyud_slimmable`` (ViT-B/16, NYUD-v2's 4 tasks,
448×576; weights random, nothing downloaded) and, for each encoder width × (uniform) decoder
width, prints GFLOPs (``torch.utils.flop_counter``, one image), active parameters and the
median forward latency of one image, with ratios to the full model. Usage::

    python benchmarks/slimmable.py [--size 448 576] [--reps 3] [--backbone vit_base_patch16_384]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mtl.backbones.slimmable_vit import SlimmableViT
from mtl.control.cost import CostModel, WidthConfig, apply_config
from mtl.decoders.slimmable import SlimmableDecoder
from mtl.model import MultiTaskNet

TASKS = {"semseg": 40, "depth": 1, "normals": 3, "edge": 1}
WIDTHS = (0.25, 0.5, 0.75, 1.0)


@torch.no_grad()
def latency(model, x, reps: int) -> float:
    model(x)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, nargs=2, default=(448, 576))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--backbone", default="vit_base_patch16_384")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = MultiTaskNet(
        backbone=SlimmableViT(
            name=args.backbone, img_size=args.size, out_indices=[2, 5, 8, 11], widths=WIDTHS
        ),
        decoder=lambda **kw: SlimmableDecoder(channels=256, widths=WIDTHS, **kw),
        tasks=TASKS,
    ).eval()
    cost = CostModel(model, args.size)
    x = torch.randn(1, 3, *args.size)
    rows = []
    for e in WIDTHS:
        for d in WIDTHS:
            config = WidthConfig(e, dict.fromkeys(TASKS, d))
            gflops, params = cost(config)
            apply_config(model, config)
            rows.append((e, d, gflops, params, latency(model, x, args.reps)))
    full = rows[-1]
    print(
        f"{args.backbone}, {len(TASKS)} tasks, {args.size[0]}×{args.size[1]}, batch 1, "
        f"{torch.get_num_threads()} threads, median of {args.reps}\n"
    )
    print(
        "| encoder | decoders | GFLOPs | active params (M) | latency (ms) | FLOPs / full | latency / full |"
    )
    print("|---|---|---|---|---|---|---|")
    for e, d, g, p, t in rows:
        print(
            f"| {e} | {d} | {g:.1f} | {p / 1e6:.1f} | {t * 1e3:.0f} | {g / full[2]:.2f} | {t / full[4]:.2f} |"
        )


if __name__ == "__main__":
    main()
