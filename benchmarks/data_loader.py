"""Real-data loader throughput: images/s per worker with the full train augmentation.

Writes NYUD-v2 (448×576) and PASCAL-Context (375×500, padded to 512×512) roots in the real
file formats to a temporary folder (the real datasets are not needed), then times, in one
process with one torch thread (= one DataLoader worker):

- decode only (reading and decoding every file of every task: the baseline),
- decode + the test transform (normalise + pad),
- decode + the full train transform (scale 0.5–2, crop with cat_max_ratio 0.75, flip,
  photometric distortion, normalise, pad): today's train row,
- cache: the decoded-sample cache (:mod:`mtl.data.cache`, built before timing) + the one-pass
  train transform (:class:`~mtl.data.fast_augment.FastTrainAugment`; the same samples bit for bit),
- cache + device photometric: as above, packed for the device
  (:class:`~mtl.data.transforms.PackForDevice`: the image as uint8 with its drawn photometric
  parameters, 8-bit maps as uint8, normals as packed codes; the distortion, normalisation and
  widening then run batched on the accelerator, not timed here),

and prints images/s, the cost of each pipeline relative to decoding and the throughput relative to
today's train row: medians over interleaved rounds (every pipeline once per round), the ratios taken
within each round. ``--loader B`` adds a second table: the three train pipelines through a real
``DataLoader`` (one worker process, batches of ``B``, the project's collation), images per second of
wall time in the consuming process and the bytes each sample ships to it (what the worker → main
process hand-over and the host → device copy carry). Usage::

    python benchmarks/data_loader.py --n 100 --repeats 3 [--loader 8]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader

from mtl.data.datamodule import collate
from mtl.data.fake import write_nyud, write_pascal
from mtl.data.nyud import NYUDv2
from mtl.data.pascal_context import PASCALContext
from mtl.data.transforms import build_transform

AUGMENT = {"scale": (0.5, 2.0), "cat_max_ratio": 0.75, "hflip": 0.5, "photometric": True}
TODAY = "train: full augmentation"


def rate(ds, n: int) -> float:
    """Images per CPU-second of this process over ``n`` samples (cycling through the dataset): one
    worker's throughput, steadier than wall time on a shared machine."""
    ds[0]  # warm-up: imports, caches
    start = time.process_time()
    for i in range(n):
        ds[i % len(ds)]
    return n / (time.process_time() - start)


def loader_rate(ds, n: int, batch: int) -> tuple[float, float]:
    """(images per wall-second, MB per sample) through a one-worker ``DataLoader`` over ``n`` samples
    after a first, untimed batch (the worker's start)."""
    order = [i % len(ds) for i in range(n + batch)]
    loader = DataLoader(ds, batch_size=batch, sampler=order, num_workers=1, collate_fn=collate)
    it = iter(loader)
    first = next(it)
    size = sum(v.nbytes for v in first.values() if isinstance(v, torch.Tensor)) / batch / 2**20
    start, seen = time.perf_counter(), 0
    for b in it:
        seen += len(b["meta"])
    return seen / (time.perf_counter() - start), size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=60, help="samples timed per pipeline and round")
    parser.add_argument("--ids", type=int, default=12, help="distinct samples written per dataset")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the table gives medians")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--loader", type=int, default=0, help="batch size of the DataLoader table (0: none)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)  # one worker = one core
    np.random.seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        nyud = write_nyud(Path(tmp) / "NYUDv2", n_train=args.ids, n_val=1)
        pascal = write_pascal(Path(tmp) / "PASCALContext", n_train=args.ids, n_val=1)
        loaders: dict[tuple[str, str], object] = {}
        for name, cls, root, size in (
            ("NYUD-v2 448×576", NYUDv2, nyud, (448, 576)),
            ("PASCAL-Context 512×512", PASCALContext, pascal, (512, 512)),
        ):
            train = {"train": True, "crop": size, "pad_to": size, **AUGMENT}
            pipelines = {
                "decode only (baseline)": (None, False),
                "test: normalise + pad": (build_transform(train=False, pad_to=size), False),
                TODAY: (build_transform(**train), False),
                "train: cache + one-pass augmentation": (build_transform(fast=True, **train), True),
                "train: cache + one-pass + device photometric": (
                    build_transform(fast=True, photometric_on_device=True, **train),
                    True,
                ),
            }
            for label, (tf, cached) in pipelines.items():
                ds = cls(root=root, split="train", transform=tf)
                if cached:  # as MTLDataModule with data.fast_augment: views of the mapped pages
                    ds.use_cache(Path(tmp) / "cache", views=True)
                loaders[name, label] = ds
        rates: dict[tuple[str, str], list[float]] = {key: [] for key in loaders}
        through: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for _ in range(args.repeats):  # interleaved: a slow spell of the machine hits every row alike
            for key, ds in loaders.items():
                rates[key].append(rate(ds, args.n))
        # apart: a worker process starting or stopping beside a CPU-time measurement would slow it
        for _ in range(args.repeats if args.loader else 0):
            for key, ds in loaders.items():
                if key[1].startswith("train"):
                    through.setdefault(key, []).append(loader_rate(ds, args.n, args.loader))
    print(
        f"one process, 1 torch / OpenCV thread, CPU time, {args.n} samples per row and round, "
        f"{args.repeats} interleaved rounds (medians), all tasks\n"
    )
    print("| dataset | pipeline | images/CPU-s per worker | time vs decode only | vs today's train |")
    print("|---|---|---|---|---|")
    for (name, label), r in rates.items():
        base = np.asarray(rates[name, "decode only (baseline)"])
        today = np.asarray(rates[name, TODAY])
        r = np.asarray(r)
        vs = f"{np.median(r / today):.2f}×" if label.startswith("train") else "–"
        print(f"| {name} | {label} | {np.median(r):.1f} | {np.median(base / r):.2f}× | {vs} |")
    if through:
        print(
            f"\nthrough a DataLoader: 1 worker process, batches of {args.loader}, wall time in the consuming "
            f"process, {args.n} samples per row and round (medians)\n"
        )
        print("| dataset | pipeline | images/s | vs today's train | MB shipped per sample |")
        print("|---|---|---|---|---|")
        for (name, label), values in through.items():
            r, size = np.asarray([v[0] for v in values]), values[0][1]
            today = np.asarray([v[0] for v in through[name, TODAY]])
            print(f"| {name} | {label} | {np.median(r):.1f} | {np.median(r / today):.2f}× | {size:.2f} |")


if __name__ == "__main__":
    main()
