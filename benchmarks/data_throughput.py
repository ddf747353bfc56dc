"""Synthetic scene throughput: images/s of ``SyntheticScenes`` in one process (= one worker).

Renders every task (image, semseg, human parts, saliency, normals, depth, edge) and runs
the default test transform (``ToTensor``), exactly what one DataLoader worker does.
Target: ≥ 200 images/s at 128×128.

    python benchmarks/data_throughput.py [--n 200] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch

from mtl.data.synthetic import SyntheticScenes
from mtl.data.transforms import build_transform


def throughput(resolution: tuple[int, int], n: int, transform: bool) -> float:
    ds = SyntheticScenes(
        split="train",
        length=n,
        resolution=resolution,
        transform=build_transform(train=False) if transform else None,
    )
    ds[0]  # warm-up
    t = time.perf_counter()
    for i in range(1, n):
        ds[i]
    return (n - 1) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="samples at 128×128 (448×576 uses n/10)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a DataLoader worker uses 1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print("| resolution | raw render (img/s) | render + ToTensor (img/s) |")
    print("|---|---|---|")
    for res, n in (((128, 128), args.n), ((448, 576), max(args.n // 10, 5))):
        raw = throughput(res, n, transform=False)
        full = throughput(res, n, transform=True)
        print(f"| {res[0]}×{res[1]} | {raw:.1f} | {full:.1f} |")


if __name__ == "__main__":
    main()
