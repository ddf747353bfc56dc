"""Writes small NYUD-v2 / PASCAL-Context roots in the exact on-disk formats of the real tarballs.

Used by the tests and ``benchmarks/data_loader.py`` (the real datasets cannot be downloaded
here), and handy to try the real-data pipeline before a download finishes. The content is a
few random rectangles per image with consistent labels across tasks; the files — PNG, JPEG,
``.npy``, PASCAL-Part and context ``.mat`` — are byte-for-byte in the real encodings. Each root
also holds ``FAKE_ROOT.json`` (what wrote it, with which arguments), which the loaders ignore.

Command line::

    python -m mtl.data.fake nyud data/fake/NYUDv2 --train 8 --val 4
    python -m mtl.data.fake pascal_context data/fake/PASCALContext --size 375 500 --seed 1

It prints where it wrote and the ``train.py`` command that trains on the root. It refuses a
folder that is not empty unless it is a fake root written before (which it then replaces).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

from mtl.data.pascal_context import PERSON_CLASS, normals_valid_classes

PART_NAMES = {1: "head", 2: "torso", 3: "luarm", 4: "lhand", 5: "luleg", 6: "lfoot"}
"""One PASCAL-Part name per part id, to write part masks under real names."""
MARKER = "FAKE_ROOT.json"
"""The file that marks a root written here (random content, not the real dataset)."""


def _mark(root: Path, dataset: str, n_train: int, n_val: int, size: Sequence[int], seed: int) -> None:
    info = {
        "written_by": "mtl.data.fake",
        "note": "random content in the real file formats: not the real dataset",
        "dataset": dataset,
        "train": n_train,
        "val": n_val,
        "size": [int(v) for v in size],
        "seed": seed,
    }
    (root / MARKER).write_text(json.dumps(info, indent=2) + "\n")


def is_fake_root(root: str | Path) -> bool:
    """Whether ``root`` is a folder written by :func:`write_nyud` or :func:`write_pascal`."""
    return (Path(root) / MARKER).is_file()


def _rects(rng: np.random.Generator, h: int, w: int, n: int) -> list[tuple[int, int, int, int]]:
    out = []
    for _ in range(n):
        y0, x0 = int(rng.integers(0, h - 4)), int(rng.integers(0, w - 4))
        out.append((y0, x0, int(rng.integers(y0 + 3, h + 1)), int(rng.integers(x0 + 3, w + 1))))
    return out


def _encode_normals(n: np.ndarray) -> np.ndarray:
    return np.clip(np.rint((n + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _random_normals(rng: np.random.Generator, k: int) -> np.ndarray:
    v = rng.normal(size=(k, 3))
    v[:, 2] = np.abs(v[:, 2]) + 0.3  # facing the camera
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def write_nyud(root: str | Path, *, n_train: int = 3, n_val: int = 2, size=(448, 576), seed: int = 0) -> Path:
    """Writes an ``NYUDv2``-layout root and returns it.

    Args:
        root: folder to create (the ``NYUDv2`` folder itself).
        n_train: number of train ids.
        n_val: number of val ids.
        size: ``(H, W)`` of every image.
        seed: content seed.
    """
    root, rng = Path(root), np.random.default_rng(seed)
    for d in ("images", "segmentation", "depth", "normals", "edge", "gt_sets"):
        (root / d).mkdir(parents=True, exist_ok=True)
    _mark(root, "nyud", n_train, n_val, size, seed)
    h, w = size
    ids = {
        "train": [f"{i:06d}" for i in range(n_train)],
        "val": [f"{i:06d}" for i in range(n_train, n_train + n_val)],
    }
    for split, split_ids in ids.items():
        (root / "gt_sets" / f"{split}.txt").write_text("".join(f"{i}\n" for i in split_ids))
        for sid in split_ids:
            region = np.zeros((h, w), dtype=np.int64)
            for k, (y0, x0, y1, x1) in enumerate(_rects(rng, h, w, 4), start=1):
                region[y0:y1, x0:x1] = k
            classes = rng.integers(1, 41, size=5)  # stored 1..40; region 0 may be unlabelled
            classes[0] = 0 if rng.random() < 0.5 else classes[0]
            seg = classes[region].astype(np.uint8)
            normals = _random_normals(rng, 5)[region]
            depth = (1.0 + 0.5 * region + np.linspace(0, 1, w)[None, :]).astype(np.float32)
            depth[rng.random((h, w)) < 0.05] = 0.0  # missing
            image = (rng.integers(0, 256, size=(5, 3))[region] + rng.integers(-8, 9, size=(h, w, 3))).clip(
                0, 255
            )
            edge = np.zeros((h, w), dtype=np.uint8)
            edge[:, 1:][region[:, 1:] != region[:, :-1]] = 255
            edge[1:, :][region[1:, :] != region[:-1, :]] = 255
            nrm = _encode_normals(normals)  # every pixel a unit normal: the field's loader counts them all
            Image.fromarray(image.astype(np.uint8)).save(root / "images" / f"{sid}.png")
            Image.fromarray(seg).save(root / "segmentation" / f"{sid}.png")
            np.save(root / "depth" / f"{sid}.npy", depth)
            Image.fromarray(nrm).save(root / "normals" / f"{sid}.png")
            Image.fromarray(edge).save(root / "edge" / f"{sid}.png")
    return root


def parts_mat(objects: list[dict], imname: str = "image") -> dict:
    """The ``{'anno': ...}`` dict of a PASCAL-Part ``.mat`` for :func:`scipy.io.savemat`.

    Args:
        objects: dicts with ``class`` (name), ``class_ind`` (int), ``mask`` (H×W bool) and
            ``parts`` (list of ``(part_name, H×W bool mask)``, possibly empty).
        imname: the image name stored in the file.
    """
    obj_dt = [("class", "O"), ("class_ind", "O"), ("mask", "O"), ("parts", "O")]
    objs = np.zeros((1, len(objects)), dtype=obj_dt)
    for i, o in enumerate(objects):
        if o["parts"]:
            parts = np.zeros((1, len(o["parts"])), dtype=[("part_name", "O"), ("mask", "O")])
            for j, (name, mask) in enumerate(o["parts"]):
                parts[0, j] = (name, mask.astype(np.uint8))
        else:
            parts = np.zeros((0, 0))
        objs[0, i] = (
            o["class"],
            np.array([[o["class_ind"]]], dtype=np.uint8),
            o["mask"].astype(np.uint8),
            parts,
        )
    anno = np.zeros((1, 1), dtype=[("imname", "O"), ("objects", "O")])
    anno[0, 0] = (imname, objs)
    return {"anno": anno}


def write_pascal(
    root: str | Path, *, n_train: int = 3, n_val: int = 2, size=(375, 500), seed: int = 0
) -> Path:
    """Writes a ``PASCALContext``-layout root and returns it (arguments as :func:`write_nyud`).

    Even-numbered ids contain a person with parts; odd ones none (human_parts all 255).
    """
    root, rng = Path(root), np.random.default_rng(seed)
    dirs = ("JPEGImages", "semseg/pascal-context", "human_parts", "sal_distill", "normals_distill",
            "pascal-context/trainval", "ImageSets/Context")  # fmt: skip
    for d in dirs:
        (root / d).mkdir(parents=True, exist_ok=True)
    _mark(root, "pascal_context", n_train, n_val, size, seed)
    h, w = size
    valid_ids = np.flatnonzero(normals_valid_classes())
    n = n_train + n_val
    ids = {
        "train": [f"2008_{i:06d}" for i in range(n_train)],
        "val": [f"2008_{i:06d}" for i in range(n_train, n)],
    }
    for split, split_ids in ids.items():
        (root / "ImageSets" / "Context" / f"{split}.txt").write_text("".join(f"{i}\n" for i in split_ids))
        for k, sid in enumerate(split_ids):
            region = np.zeros((h, w), dtype=np.int64)
            for r, (y0, x0, y1, x1) in enumerate(_rects(rng, h, w, 3), start=1):
                region[y0:y1, x0:x1] = r
            context = np.array(
                [int(rng.choice(valid_ids)), 2, int(rng.choice(valid_ids)), 1]
            )  # 2, 1: not valid
            label_map = context[region].astype(np.uint16)
            seg = rng.integers(0, 21, size=4)[region].astype(np.uint8)
            image = (rng.integers(0, 256, size=(4, 3))[region] + rng.integers(-8, 9, size=(h, w, 3))).clip(
                0, 255
            )
            objects = [{"class": "chair", "class_ind": 9, "mask": region == 1, "parts": []}]
            if k % 2 == 0:  # a person whose 6 parts are horizontal bands of a rectangle
                band = max(1, (2 * h // 3) // 6)
                y0, x0, y1, x1 = h // 6, w // 3, h // 6 + 6 * band, w // 3 + max(2, w // 4)
                person = np.zeros((h, w), dtype=bool)
                person[y0:y1, x0:x1] = True
                parts = []
                for pid in range(1, 7):
                    m = np.zeros((h, w), dtype=bool)
                    m[y0 + (pid - 1) * band : y0 + pid * band, x0:x1] = True
                    parts.append((PART_NAMES[pid], m))
                objects.append({"class": "person", "class_ind": PERSON_CLASS, "mask": person, "parts": parts})
            sal = np.where(region == 3, 255, 0).astype(np.uint8)
            Image.fromarray(image.astype(np.uint8)).save(root / "JPEGImages" / f"{sid}.jpg", quality=95)
            Image.fromarray(seg).save(root / "semseg" / "pascal-context" / f"{sid}.png")
            scipy.io.savemat(root / "human_parts" / f"{sid}.mat", parts_mat(objects, sid))
            Image.fromarray(sal).save(root / "sal_distill" / f"{sid}.png")
            Image.fromarray(_encode_normals(_random_normals(rng, 4)[region])).save(
                root / "normals_distill" / f"{sid}.png"
            )
            scipy.io.savemat(root / "pascal-context" / "trainval" / f"{sid}.mat", {"LabelMap": label_map})
    return root


WRITERS = {"nyud": write_nyud, "pascal_context": write_pascal}
#: default image size (H, W) per dataset: NYUD-v2's fixed 448×576, a typical PASCAL image
DEFAULT_SIZES = {"nyud": (448, 576), "pascal_context": (375, 500)}
#: the dataset's ``data`` config and the (H, W) it pads every image to (``data.input_size``)
DATA_CONFIGS = {"nyud": ("nyud", (448, 576)), "pascal_context": ("pascal_context", (512, 512))}


def main(argv: list[str] | None = None) -> int:
    """``python -m mtl.data.fake DATASET ROOT``: writes a fake root; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m mtl.data.fake",
        description="Write a small NYUD-v2 or PASCAL-Context root in the exact on-disk format of the real "
        "tarball (random content), to try the real-data pipeline without the download.",
    )
    parser.add_argument("dataset", choices=sorted(WRITERS), help="which dataset's format")
    parser.add_argument("root", help="the dataset folder to write (e.g. data/fake/NYUDv2); new or empty")
    parser.add_argument("--train", type=int, default=8, metavar="N", help="train images (default 8)")
    parser.add_argument("--val", type=int, default=4, metavar="N", help="val images (default 4)")
    parser.add_argument(
        "--size", type=int, nargs=2, metavar=("H", "W"), default=None,
        help="image size (default: NYUD-v2 448 576, PASCAL-Context 375 500)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="content seed (default 0)")
    args = parser.parse_args(argv)
    h, w = args.size or DEFAULT_SIZES[args.dataset]
    if args.train < 1 or args.val < 1:
        parser.error(f"--train and --val must be >= 1 (got {args.train}, {args.val})")
    if min(h, w) < 8:
        parser.error(f"--size must be at least 8 8 (got {h} {w})")
    root = Path(args.root).expanduser().resolve()
    if root.exists() and not root.is_dir():
        print(f"error: {root} exists and is not a folder; give a new or empty folder", file=sys.stderr)
        return 2
    if root.is_dir() and any(root.iterdir()):
        if not is_fake_root(root):
            print(
                f"error: {root} is not empty and is not a fake root written by mtl.data.fake (no {MARKER}): "
                "refusing to write into it; give a new or empty folder",
                file=sys.stderr,
            )
            return 2
        shutil.rmtree(root)  # a previous fake root: replaced, so no file of the old one remains
    WRITERS[args.dataset](root, n_train=args.train, n_val=args.val, size=(h, w), seed=args.seed)
    config, (ph, pw) = DATA_CONFIGS[args.dataset]
    command = f"python train.py data={config} data.dataset.root={root}"
    # NYUD-v2 images have one size (448×576, else data.input_size's); PASCAL's are padded to 512×512
    fixed = args.dataset == "nyud"
    if (h, w) != (ph, pw) if fixed else (h > ph or w > pw):
        command += f" data.input_size=[{h},{w}]"
    print(f"wrote a fake {args.dataset} root (random content) at {root}: {args.train} train / {args.val} val "
          f"images of {h}×{w}")  # fmt: skip
    if not fixed or (h, w) == (ph, pw):  # the checker expects NYUD-v2's real image size
        print(f"check it:    python -m mtl.data.check {root} --dataset {args.dataset} --allow-partial")
    print(f"train on it: {command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
