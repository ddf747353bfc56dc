"""Verifies a NYUD-v2 or PASCAL-Context root before a long run, and the training preflight.

    python -m mtl.data.check data/NYUDv2 --dataset nyud
    python -m mtl.data.check data/PASCALContext --dataset pascal_context --workers 8

Checks split counts (795 / 654; 4998 / 5105), duplicate ids (with their lines in the split
file), that every file of every id is present and decodes, image sizes (and recognises the
480×640 MTI-Net copy of NYUD-v2), that every map has its image's size, label value ranges,
binary maps stored 0/255 (a 0/1 edge or saliency map decodes to all zeros), unit-length
normals, depth in metres (negative or above :data:`MAX_DEPTH_M` is refused: millimetres) and
the share of invalid pixels of each task (:data:`INVALID_SHARE_MAX`). Prints a summary and
every bad file; exits 1 if anything is wrong (0 otherwise).

:func:`preflight` runs the same checks when a training or evaluation run sets up its data
(:class:`mtl.data.datamodule.MTLDataModule`): the id-level ones on the whole split (duplicate ids,
missing files, the sizes in every image and map header) and the decoding ones on
:data:`PREFLIGHT_SAMPLES` ids spread over the split, so that a wrongly encoded copy of the data
stops the run before its first step instead of training on empty targets.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections import Counter, defaultdict
from collections.abc import Collection, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path

import numpy as np
from PIL import Image

from mtl.data.base import BadSampleError, FolderDataset, read_png, require_root
from mtl.data.nyud import MAX_DEPTH_M, MTINET_SIZE, SIZE, WRONG_COPY, NYUDv2
from mtl.data.nyud import SPLIT_SIZES as NYUD_SIZES
from mtl.data.pascal_context import SPLIT_SIZES as PASCAL_SIZES
from mtl.data.pascal_context import PASCALContext

__all__ = [
    "INVALID_SHARE_MAX",
    "MAX_DEPTH_M",
    "PREFLIGHT_SAMPLES",
    "Problem",
    "check_ids",
    "check_root",
    "check_sample",
    "preflight",
    "sample_indices",
    "require_root",
    "split_problems",
]

DATASETS: dict[str, tuple[type[FolderDataset], dict[str, int]]] = {
    NYUDv2.KEY: (NYUDv2, NYUD_SIZES),
    PASCALContext.KEY: (PASCALContext, PASCAL_SIZES),
}
UNIT_TOLERANCE = 0.1  # 8-bit quantisation moves |n| by < 1 %
OFF_UNIT_MAX = 0.01  # share of valid normals allowed off unit length in one file

INVALID_SHARE_MAX: dict[tuple[str, str], float] = {
    # NYUD-v2: the labelled set is annotated, in-painted and dense. Unlabelled pixels are about a fifth
    # of the real maps; missing depth and (with ignore_black_normals) black normals about none.
    ("nyud", "semseg"): 0.9,
    ("nyud", "depth"): 0.5,
    ("nyud", "normals"): 0.5,
    # PASCAL-Context: 255 only on VOC12 object outlines (a few %). Distilled normals count only on the
    # 170 NYU-compatible context classes (person, wall, floor, table, dog, …): a large share of the
    # pixels, and some images have none, so only a split with almost no valid normal is wrong.
    ("pascal_context", "semseg"): 0.9,
    ("pascal_context", "normals"): 0.98,
}
"""Largest mean share of invalid pixels of a task over a split (the checker) or over the preflight's
sample: ignore label 255 for semseg, missing depth (0), zero normal vectors. Above it the copy is
wrongly encoded (e.g. all-black normals read with ``ignore_black_normals``, all-zero depth). On
NYUD-v2 a single file whose map is entirely invalid is wrong too (every real image has labels,
depth and normals); on PASCAL-Context it is not (an image without NYU-compatible classes has no
valid normal)."""
WHOLE_FILE_INVALID = frozenset({("nyud", "semseg"), ("nyud", "depth"), ("nyud", "normals")})
PREFLIGHT_SAMPLES = 16
"""Ids per split whose files the training preflight decodes and checks (about a second on the real
NYUD-v2, two on PASCAL-Context); the id-level checks cover the whole split."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset root.

    Attributes:
        path: the offending file (or split file, or folder for a split-wide finding).
        reason: what is wrong and what was expected.
        sample_id: the sample, when the problem is one sample's.
        where: where that id is listed (``<split file> line <n>``).
        skippable: the loader raises :class:`~mtl.data.base.BadSampleError` for it, so
            ``data.skip_bad_samples=true`` skips the sample instead of training on it.
    """

    path: str
    reason: str
    sample_id: str | None = None
    where: str | None = None
    skippable: bool = False

    def __str__(self) -> str:
        at = f" (sample {self.sample_id!r}, {self.where})" if self.sample_id is not None else ""
        return f"{self.path}: {self.reason}{at}"


def _invalid_share(task: str, value: np.ndarray) -> float | None:
    if task == "semseg":
        return float((value == 255).mean())
    if task == "depth":
        return float((value == 0).mean())
    if task == "normals":
        return float(((value * value).sum(axis=2) == 0).mean())
    return None


def check_sample(
    ds: FolderDataset, sample_id: str, *, sizes: Collection[tuple[int, int]] | None = None
) -> tuple[dict, list[Problem]]:
    """Checks every file of one id for the tasks of ``ds``.

    Args:
        ds: the dataset (its options, e.g. ``ignore_black_normals``, apply; it is not modified).
        sample_id: the id.
        sizes: the accepted NYUD-v2 image sizes (default: the field's 448×576 only).

    Returns:
        ``(stats, problems)``: stats of the decoded maps, and the bad files.
    """
    name = ds.KEY
    sizes = {SIZE} if sizes is None else set(sizes)
    problems: dict[str, Problem] = {}
    stats: dict = {}
    probe = copy.copy(ds)  # loads one task at a time without touching the caller's task list
    img_path = ds.path("image", sample_id)
    try:
        hw = read_png(img_path, sample_id, mode="RGB").shape[:2]
    except BadSampleError as err:
        return stats, [Problem(str(err.path), err.reason, sample_id, skippable=True)]
    stats["size"] = hw
    if name == NYUDv2.KEY and hw == MTINET_SIZE:
        return stats, [Problem(str(img_path), WRONG_COPY, sample_id, skippable=True)]
    if name == NYUDv2.KEY and hw not in sizes:
        expected = " or ".join(f"{h}×{w}" for h, w in sorted(sizes))
        problems[str(img_path)] = Problem(
            str(img_path), f"size {hw[0]}×{hw[1]}, expected {expected}", sample_id
        )
    for task in ds.tasks:
        probe.tasks = (task,)
        try:
            value = probe.load(sample_id)[task]
        except BadSampleError as err:
            problems.setdefault(str(err.path), Problem(str(err.path), err.reason, sample_id, skippable=True))
            continue
        path = str(ds.path(task, sample_id))
        share = _invalid_share(task, value)
        if share is not None:
            stats[f"{task}_invalid"] = share
            if share == 1.0 and (name, task) in WHOLE_FILE_INVALID:
                problems[path] = Problem(
                    path, f"every {task} pixel is invalid (ignored or missing)", sample_id
                )
        if task == "depth":
            stats["depth_max"] = float(value.max())
        elif task == "normals":
            norm = np.sqrt((value * value).sum(axis=2))
            valid = norm > 0
            off = float((np.abs(norm[valid] - 1) > UNIT_TOLERANCE).mean()) if valid.any() else 0.0
            if off > OFF_UNIT_MAX:
                reason = f"{off:.1%} of valid normals are not unit length (tolerance {UNIT_TOLERANCE})"
                problems.setdefault(path, Problem(path, reason, sample_id))
        elif task == "edge" and name == NYUDv2.KEY:
            values = set(np.unique(read_png(Path(path), sample_id)).tolist())
            if not values <= {0, 255}:
                reason = f"edge png values {sorted(values)[:6]}, expected binary 0/255"
                problems.setdefault(path, Problem(path, reason, sample_id))
        elif task == "human_parts":
            stats["has_person"] = bool((value != 255).any())
    return stats, list(problems.values())


def split_problems(ds: FolderDataset, ids: Sequence[str], stats: Sequence[dict]) -> list[Problem]:
    """The split-wide findings over the checked ids: tasks with too many invalid pixels.

    Args:
        ds: the dataset.
        ids: the checked ids.
        stats: their stats from :func:`check_sample`, in the same order.
    """
    out = []
    for task in ds.tasks:
        limit = INVALID_SHARE_MAX.get((ds.KEY, task))
        shares = [
            (s[f"{task}_invalid"], sid) for sid, s in zip(ids, stats, strict=True) if f"{task}_invalid" in s
        ]
        if limit is None or not shares:
            continue
        mean = float(np.mean([v for v, _ in shares]))
        if mean > limit:
            worst = ", ".join(str(ds.path(task, sid)) for _, sid in sorted(shares, reverse=True)[:3])
            folder = str(ds.path(task, shares[0][1]).parent)
            hint = " (all-black normals PNGs?)" if task == "normals" else ""
            out.append(
                Problem(
                    folder,
                    f"{task}: {mean:.1%} of the pixels of {len(shares)} checked file(s) are invalid, "
                    f"expected at most {limit:.0%} for {ds.KEY}{hint}; e.g. {worst}",
                )
            )
    return out


def _header_size(path: Path) -> tuple[int, int] | None:
    """``(H, W)`` from an image or ``.npy`` header without decoding; ``None`` when unreadable."""
    try:
        if path.suffix == ".npy":
            shape = np.load(path, mmap_mode="r", allow_pickle=False).shape
            return (int(shape[0]), int(shape[1])) if len(shape) >= 2 else None
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except (OSError, ValueError):
        return None


def check_ids(ds: FolderDataset, *, sizes: Collection[tuple[int, int]] | None = None) -> list[Problem]:
    """The whole split's id-level checks: duplicate ids, missing files and header sizes.

    Reads no pixel: every file of every id (:meth:`~mtl.data.base.FolderDataset.files`) is
    looked up, and the sizes in the image and map headers are compared (``.mat`` files are not
    opened).

    Args:
        ds: the dataset (its tasks decide which files).
        sizes: accepted image sizes (NYUD-v2); ``None``: any size.
    """
    out = []
    lines: dict[str, list[int]] = defaultdict(list)
    for sid, line in zip(ds.ids, ds.id_lines, strict=True):
        lines[sid].append(line)
    for sid, at in lines.items():
        if len(at) > 1:
            shown = ", ".join(map(str, at))
            reason = f"id {sid!r} is listed {len(at)} times (lines {shown}); expected each id once"
            out.append(Problem(str(ds.split_path), reason))
    for index, sid in enumerate(ds.ids):
        if lines[sid][0] != ds.id_lines[index]:
            continue  # a duplicate: checked once
        files = ds.files(sid)
        missing = [p for p in files if not p.is_file()]
        if missing and len(missing) == len(files) > 1:  # nothing of this id: one line, not one per file
            reason = f"file is missing, as are the other {len(files) - 1} files of this id: is the id right?"
            out.append(Problem(str(missing[0]), reason, sid, ds.where(index), skippable=True))
            continue
        for p in missing:
            out.append(Problem(str(p), "file is missing", sid, ds.where(index), skippable=True))
        if missing or not files:
            continue
        hw = _header_size(files[0])
        if hw is None:
            continue  # undecodable: found when it is loaded
        if sizes is not None and hw not in sizes:
            expected = " or ".join(f"{h}×{w}" for h, w in sorted(sizes))
            reason = WRONG_COPY if hw == MTINET_SIZE else f"size {hw[0]}×{hw[1]}, expected {expected}"
            out.append(Problem(str(files[0]), reason, sid, ds.where(index), skippable=hw == MTINET_SIZE))
        for p in files[1:]:
            if p.suffix == ".mat":
                continue
            map_hw = _header_size(p)
            if map_hw is not None and map_hw != hw:
                reason = f"size {map_hw} differs from the image's {hw}"
                out.append(Problem(str(p), reason, sid, ds.where(index), skippable=True))
    return out


def sample_indices(ids: Sequence[str], n: int) -> list[int]:
    """``n`` indices spread evenly over ``ids`` (all of them when there are fewer)."""
    if len(ids) <= n:
        return list(range(len(ids)))
    return sorted({(i * len(ids)) // n for i in range(n)})


def preflight(
    ds: FolderDataset,
    *,
    samples: int = PREFLIGHT_SAMPLES,
    input_size: Sequence[int] | None = None,
) -> list[Problem]:
    """The checks of a training run's data setup: cheap on the whole split, decoding on a sample.

    The decoding checks know the encodings of NYUD-v2 and PASCAL-Context; another
    :class:`~mtl.data.base.FolderDataset` gets the id-level ones (duplicates, and missing files and
    sizes through its :meth:`~mtl.data.base.FolderDataset.files`).

    Args:
        ds: the dataset as training builds it (its split, tasks and options).
        samples: how many ids, spread over the split, are decoded and checked.
        input_size: the ``(H, W)`` the network sees; NYUD-v2 images of that size are accepted
            besides the field's 448×576 (a deliberately resized copy).

    Returns:
        Every problem found (empty: nothing wrong).
    """
    sizes = None
    if ds.KEY == NYUDv2.KEY:
        sizes = {SIZE} | ({(int(input_size[0]), int(input_size[1]))} if input_size is not None else set())
    problems = check_ids(ds, sizes=sizes)
    if ds.KEY not in (NYUDv2.KEY, PASCALContext.KEY):
        return problems  # a user's dataset: the id-level checks only (the encodings are the field's)
    known = {p.path for p in problems}
    picked = sample_indices(ds.ids, samples)
    stats = []
    for index in picked:
        s, found = check_sample(ds, ds.ids[index], sizes=sizes)
        stats.append(s)
        for p in found:
            if p.path not in known:
                known.add(p.path)
                problems.append(Problem(p.path, p.reason, p.sample_id, ds.where(index), p.skippable))
    problems += split_problems(ds, [ds.ids[i] for i in picked], stats)
    return problems


@lru_cache(maxsize=8)
def _dataset(name: str, root: str, split: str) -> FolderDataset:
    cls = DATASETS[name][0]
    return cls(root=root, split=split)


def _check_index(name: str, root: str, split: str, index: int) -> tuple[dict, list[Problem]]:
    ds = _dataset(name, root, split)
    stats, problems = check_sample(ds, ds.ids[index])
    where = ds.where(index)
    return stats, [Problem(p.path, p.reason, p.sample_id, where, p.skippable) for p in problems]


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
            ds = cls(root=root, split=split)
        except (FileNotFoundError, ValueError) as err:
            print(f"BAD {err}")
            n_problems += 1
            continue
        ids = ds.ids
        if len(ids) != expected[split]:
            level = "note" if allow_partial else "BAD"
            print(f"{level} {split}: {len(ids)} ids, expected {expected[split]} (the standard split)")
            n_problems += 0 if allow_partial else 1
        for problem in check_ids(ds):
            if problem.sample_id is None:  # duplicates; missing files are found below with their reason
                print(f"BAD {problem}")
                n_problems += 1
        fn = partial(_check_index, dataset, str(root), split)
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                results = list(pool.map(fn, range(len(ids)), chunksize=16))
        else:
            results = [fn(i) for i in range(len(ids))]
        bad = [p for _, problems in results for p in problems]
        for problem in bad:
            print(f"BAD {problem}")
        stats = [s for s, _ in results]
        wide = split_problems(ds, ids, stats)
        for problem in wide:
            print(f"BAD {split}: {problem}")
        n_problems += len(bad) + len(wide)
        _summary(split, ids, stats, len({p.sample_id for p in bad}))
    print("OK: no problems found" if n_problems == 0 else f"FAILED: {n_problems} problem(s)")
    return n_problems


def _summary(split: str, ids: list[str], stats: list[dict], n_bad: int) -> None:
    sizes = Counter(s["size"] for s in stats if "size" in s)
    common = ", ".join(f"{h}×{w}: {n}" for (h, w), n in sizes.most_common(3))
    line = f"{split}: {len(ids)} ids, {len(ids) - n_bad} good, {n_bad} bad; sizes {common}"
    if any("depth_max" in s for s in stats):
        dmax = max(s.get("depth_max", 0.0) for s in stats)
        missing = np.mean([s["depth_invalid"] for s in stats if "depth_invalid" in s])
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
