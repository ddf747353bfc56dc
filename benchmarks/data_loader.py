"""Real-data loader throughput: images/s per worker with the full train augmentation.

Writes NYUD-v2 (448×576) and PASCAL-Context (375×500, padded to 512×512) roots in the real
file formats to a temporary folder (the real datasets are not needed), then times, in one
process with one torch thread (= one DataLoader worker):

- decode only (reading and decoding every file of every task: the baseline),
- decode + the test transform (normalise + pad),
- decode + the full train transform (scale 0.5–2, crop with cat_max_ratio 0.75, flip,
  photometric distortion, normalise, pad),

and prints images/s and the cost of each pipeline relative to decoding. Usage::

    python benchmarks/data_loader.py --n 60
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from mtl.data.fake import write_nyud, write_pascal
from mtl.data.nyud import NYUDv2
from mtl.data.pascal_context import PASCALContext
from mtl.data.transforms import build_transform

AUGMENT = {"scale": (0.5, 2.0), "cat_max_ratio": 0.75, "hflip": 0.5, "photometric": True}


def rate(ds, n: int) -> float:
    """Images per second over ``n`` samples (cycling through the dataset)."""
    ds[0]  # warm-up: imports, caches
    start = time.perf_counter()
    for i in range(n):
        ds[i % len(ds)]
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=60, help="samples timed per pipeline")
    parser.add_argument("--ids", type=int, default=12, help="distinct samples written per dataset")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)  # one worker = one core
    np.random.seed(args.seed)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        nyud = write_nyud(Path(tmp) / "NYUDv2", n_train=args.ids, n_val=1)
        pascal = write_pascal(Path(tmp) / "PASCALContext", n_train=args.ids, n_val=1)
        for name, cls, root, size in (
            ("NYUD-v2 448×576", NYUDv2, nyud, (448, 576)),
            ("PASCAL-Context 512×512", PASCALContext, pascal, (512, 512)),
        ):
            pipelines = {
                "decode only (baseline)": None,
                "test: normalise + pad": build_transform(train=False, pad_to=size),
                "train: full augmentation": build_transform(train=True, crop=size, pad_to=size, **AUGMENT),
            }
            base = None
            for label, tf in pipelines.items():
                r = rate(cls(root=root, split="train", transform=tf), args.n)
                base = base or r
                rows.append((name, label, r, base / r))
    print(f"one process, 1 torch / OpenCV thread, {args.n} samples per row, all tasks of each dataset\n")
    print("| dataset | pipeline | images/s per worker | time vs decode only |")
    print("|---|---|---|---|")
    for name, label, r, ratio in rows:
        print(f"| {name} | {label} | {r:.1f} | {ratio:.2f}× |")


if __name__ == "__main__":
    main()
