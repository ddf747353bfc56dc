"""Exact boundary evaluation (SEISM odsF / oisF / AP) time versus the number of worker processes.

NYUD-v2-sized images (448×576, maxDist 0.011, 101 thresholds). Ground truth: the edge maps of
synthetic scenes (``--scenes`` distinct ones, cycled); predictions: the boundary blurred
(σ = 1.5 px) plus smooth low-amplitude clutter, so that low thresholds keep many weak
responses after NMS, as a trained network's maps do. Every configuration evaluates the same
images through :class:`mtl.metrics.SEISMEdgeF`; the scores must agree exactly (the matcher is
re-seeded per call), and the table gives the time, the speed-up over one process and the
projected time for the 654 NYUD-v2 validation images.

First (``--compare N`` images, 0 to skip) the per-image matchers side by side, in one process
and one thread: CPU seconds per image (``time.process_time``) of ``matcher="csa"``
(``correspond_pixels`` at every distinct threshold, the former default) and of
``matcher="certified"`` (the default), their ratio, a check that the ``101 × 4`` count tables
are identical, and the projected wall time of NYUD-v2 val (654 images) and PASCAL-Context val
(5,105 images) on 16 and 64 cores (CPU-s per image × images / cores, at this image size).

    python benchmarks/edge_eval.py [--compare 3] [--n 654] [--procs 1 2] [--scenes 8]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from mtl.data.synthetic import SyntheticScenes
from mtl.metrics import SEISMEdgeF
from mtl.metrics.edge_eval import to_8bit
from mtl.metrics.seism import evaluate_pair

NYUD_VAL = 654
PASCAL_VAL = 5105


def make_pairs(n_scenes: int, size: tuple[int, int], seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    """``(logits, target)`` pairs, each ``1 × 1 × H × W``."""
    ds = SyntheticScenes(split="val", resolution=size, length=n_scenes, tasks=["edge"], seed=seed)
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(n_scenes):
        edge = ds[i]["edge"].astype(np.float64)
        soft = np.clip(gaussian_filter(edge, 1.5) * 4.0, 0, 1)
        clutter = gaussian_filter(rng.random(edge.shape), 3.0)
        clutter = 0.15 * (clutter - clutter.min()) / (np.ptp(clutter) + 1e-12)
        prob = np.clip(0.9 * soft + clutter, 1e-4, 1 - 1e-4)
        logits = torch.from_numpy(np.log(prob / (1 - prob))).float()[None, None]
        pairs.append((logits, torch.from_numpy(edge).float()[None, None]))
    return pairs


def run(pairs, n: int, workers: int) -> tuple[float, dict[str, float]]:
    metric = SEISMEdgeF(max_dist=0.011, workers=workers)
    t = time.perf_counter()
    for i in range(n):
        metric.update(*pairs[i % len(pairs)])
    scores = {k: float(v) for k, v in metric.compute().items()}
    return time.perf_counter() - t, scores


def compare_matchers(pairs, n: int, max_dist: float = 0.011) -> None:
    """CPU seconds per image of the CSA and the certified matcher on the same images (one thread)."""
    secs = {"csa": 0.0, "certified": 0.0}
    for i in range(n):
        logits, target = pairs[i % len(pairs)]
        u8 = to_8bit(logits[0, 0]).numpy()
        label = (target[0, 0].numpy() > 0.5).astype(np.uint8)
        tables = {}
        for matcher in secs:
            t = time.process_time()
            tables[matcher] = evaluate_pair(u8, label, max_dist, matcher=matcher)
            secs[matcher] += time.process_time() - t
        if not (tables["csa"] == tables["certified"]).all():
            raise SystemExit(f"image {i}: the certified matcher's counts differ from CSA's")
    old, new = secs["csa"] / n, secs["certified"] / n
    print(f"matchers, {n} images of {pairs[0][0].shape[-2]}×{pairs[0][0].shape[-1]}, one process, one thread")
    print("count tables (cntR, sumR, cntP, sumP × 101 thresholds): identical on every image\n")
    print("| matcher | CPU-s / image | ratio | NYUD 16 cores (min) | NYUD 64 | PASCAL 16 | PASCAL 64 |")
    print("|---|---|---|---|---|---|---|")
    for name, per in (("csa (before)", old), ("certified (now)", new)):
        proj = [per * imgs / cores / 60 for imgs in (NYUD_VAL, PASCAL_VAL) for cores in (16, 64)]
        cells = " | ".join(f"{v:.1f}" for v in proj)
        print(f"| {name} | {per:.2f} | {per / old:.2f}× | {cells} |")
    print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=NYUD_VAL, help="images to evaluate")
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="worker process counts")
    ap.add_argument("--scenes", type=int, default=8, help="distinct synthetic scenes (cycled)")
    ap.add_argument("--size", type=int, nargs=2, default=[448, 576], help="H W")
    ap.add_argument("--compare", type=int, default=3, help="images for the matcher comparison (0: skip)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    pairs = make_pairs(args.scenes, tuple(args.size))
    if args.compare:
        compare_matchers(pairs, args.compare)
    if not args.n or not args.procs:
        return
    rows, ref = [], None
    for p in args.procs:
        secs, scores = run(pairs, args.n, p)
        if ref is None:
            ref = (secs, scores)
        if scores != ref[1]:
            raise SystemExit(f"scores differ with {p} processes: {scores} vs {ref[1]}")
        rows.append((p, secs))
    print(f"exact SEISM edge evaluation, {args.n} images of {args.size[0]}×{args.size[1]}, 101 thresholds")
    s = ref[1]
    print(f"odsF {s['odsf']:.4f}  oisF {s['oisf']:.4f}  AP {s['ap']:.4f} (identical in every row)\n")
    print("| processes | time (s) | s / image | speed-up vs 1st row | projected, 654 images (min) |")
    print("|---|---|---|---|---|")
    for p, secs in rows:
        per = secs / args.n
        print(f"| {p} | {secs:.1f} | {per:.2f} | {ref[0] / secs:.2f}× | {per * NYUD_VAL / 60:.1f} |")


if __name__ == "__main__":
    main()
