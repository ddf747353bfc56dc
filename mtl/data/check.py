"""Verifies a NYUD-v2 or PASCAL-Context root before a long run.

    python -m mtl.data.check data/NYUDv2 --dataset nyud
    python -m mtl.data.check data/PASCALContext --dataset pascal_context --workers 8

Checks split counts (795 / 654; 4998 / 5105), that every file of every id is present and
decodes, image sizes (and recognises the 480×640 MTI-Net copy of NYUD-v2), label value
ranges, binary edge encodings, unit-length normals and the depth range. Prints a summary
and every bad file; exits 1 if anything is wrong (0 otherwise).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np

from mtl.data.base import BadSampleError, FolderDataset, read_png
from mtl.data.nyud import MTINET_SIZE, SIZE, WRONG_COPY, NYUDv2
from mtl.data.nyud import SPLIT_SIZES as NYUD_SIZES
from mtl.data.pascal_context import SPLIT_SIZES as PASCAL_SIZES
from mtl.data.pascal_context import PASCALContext

DATASETS: dict[str, tuple[type[FolderDataset], dict[str, int]]] = {
    NYUDv2.KEY: (NYUDv2, NYUD_SIZES),
    PASCALContext.KEY: (PASCALContext, PASCAL_SIZES),
}
MAX_DEPTH_M = 20.0
UNIT_TOLERANCE = 0.1  # 8-bit quantisation moves |n| by < 1 %


def check_sample(name: str, root: str, split: str, sid: str) -> tuple[dict, list[tuple[str, str]]]:
    """Checks every file of one id.

    Returns:
        ``(stats, problems)``: stats of the decoded maps, and ``(path, reason)`` per bad file.
    """
    cls = DATASETS[name][0]
    problems: dict[str, str] = {}
    stats: dict = {}
    ds = cls(root=root, split=split, tasks=())
    img_path = ds.path("image", sid)
    try:
        hw = read_png(img_path, sid, mode="RGB").shape[:2]
        stats["size"] = hw
        if name == "nyud" and hw == MTINET_SIZE:
            return stats, [(str(img_path), WRONG_COPY)]
        if name == "nyud" and hw != SIZE:
            problems[str(img_path)] = f"size {hw[0]}×{hw[1]}, expected {SIZE[0]}×{SIZE[1]}"
    except BadSampleError as err:
        return stats, [(str(err.path), err.reason)]
    for task in cls.TASKS:
        ds.tasks = (task,)
        try:
            value = ds.load(sid)[task]
        except BadSampleError as err:
            problems.setdefault(str(err.path), err.reason)
            continue
        path = str(ds.path(task, sid))
        if task == "depth":
            stats["depth_max"] = float(value.max())
            stats["depth_missing"] = float((value == 0).mean())
            if value.min() < 0 or value.max() > MAX_DEPTH_M:
                problems[path] = (
                    f"depth range [{value.min():.3g}, {value.max():.3g}] m, expected [0, {MAX_DEPTH_M}]"
                )
        elif task == "normals":
            norm = np.sqrt((value * value).sum(axis=2))
            valid = norm > 0
            stats["normals_invalid"] = float(1 - valid.mean())
            off = float((np.abs(norm[valid] - 1) > UNIT_TOLERANCE).mean()) if valid.any() else 0.0
            if off > 0.01:
                problems[path] = (
                    f"{off:.1%} of valid normals are not unit length (tolerance {UNIT_TOLERANCE})"
                )
        elif task == "edge" and name == "nyud":
            stored = read_png(Path(path), sid)
            values = set(np.unique(stored).tolist())
            if not values <= {0, 255}:
                problems[path] = f"edge png values {sorted(values)[:6]}, expected binary 0/255"
        elif task == "human_parts":
            stats["has_person"] = bool((value != 255).any())
    return stats, sorted(problems.items())


def check_root(
    root: str | Path, dataset: str, *, splits=("train", "val"), workers: int = 1, allow_partial: bool = False
) -> int:
    """Checks a dataset root, prints a report and returns the number of problems found."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(DATASETS)}")
    cls, expected = DATASETS[dataset]
    root = Path(root)
    n_problems = 0
    print(f"checking {cls.__name__} at {root}")
    for split in splits:
        try:
            ids = cls(root=root, split=split, tasks=()).ids
        except (FileNotFoundError, ValueError) as err:
            print(f"BAD {err}")
            n_problems += 1
            continue
        if len(ids) != expected[split]:
            level = "note" if allow_partial else "BAD"
            print(f"{level} {split}: {len(ids)} ids, expected {expected[split]} (the standard split)")
            n_problems += 0 if allow_partial else 1
        if len(set(ids)) != len(ids):
            dup = [i for i, c in Counter(ids).items() if c > 1]
            print(f"BAD {split}: duplicate ids {dup[:5]}")
            n_problems += 1
        fn = partial(check_sample, dataset, str(root), split)
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                results = list(pool.map(fn, ids, chunksize=16))
        else:
            results = [fn(i) for i in ids]
        bad = [(sid, p) for sid, (_, problems) in zip(ids, results, strict=True) for p in problems]
        for sid, (path, reason) in bad:
            print(f"BAD {path}: {reason} (sample {sid!r}, split {split})")
        n_problems += len(bad)
        _summary(split, ids, [s for s, _ in results], len({sid for sid, _ in bad}))
    print("OK: no problems found" if n_problems == 0 else f"FAILED: {n_problems} problem(s)")
    return n_problems


def _summary(split: str, ids: list[str], stats: list[dict], n_bad: int) -> None:
    sizes = Counter(s["size"] for s in stats if "size" in s)
    common = ", ".join(f"{h}×{w}: {n}" for (h, w), n in sizes.most_common(3))
    line = f"{split}: {len(ids)} ids, {len(ids) - n_bad} good, {n_bad} bad; sizes {common}"
    if any("depth_max" in s for s in stats):
        dmax = max(s.get("depth_max", 0.0) for s in stats)
        missing = np.mean([s["depth_missing"] for s in stats if "depth_missing" in s])
        line += f"; depth max {dmax:.2f} m, {missing:.1%} missing"
    if any("normals_invalid" in s for s in stats):
        invalid = np.mean([s["normals_invalid"] for s in stats if "normals_invalid" in s])
        line += f"; normals invalid {invalid:.1%}"
    if any("has_person" in s for s in stats):
        line += f"; {sum(s.get('has_person', False) for s in stats)} with person parts"
    print(line)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mtl.data.check", description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="the dataset folder (NYUDv2/ or PASCALContext/)")
    parser.add_argument("--dataset", required=True, choices=sorted(DATASETS))
    parser.add_argument("--splits", nargs="+", default=["train", "val"])
    parser.add_argument("--workers", type=int, default=1, help="parallel worker processes")
    parser.add_argument(
        "--allow-partial",
        action="store_true",
        help="a split count that differs from the standard one is a note",
    )
    args = parser.parse_args(argv)
    return 1 if check_root(args.root, args.dataset, splits=args.splits, workers=args.workers,
                           allow_partial=args.allow_partial) else 0  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
