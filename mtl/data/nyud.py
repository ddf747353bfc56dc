"""NYUD-v2 in the layout of the ATRC / Multi-Task-Transformer tarball.

Silberman et al., "Indoor Segmentation and Support Inference from RGBD Images", ECCV 2012;
the multi-task split and encodings of Vandenhende et al. (MTI-Net, ECCV 2020) and
Brüggemann et al. (ATRC, ICCV 2021), used by InvPT, TaskPrompter and TaskExpert.

Layout (``root`` = ``NYUDv2/``)::

    images/<id>.png          RGB, 448×576
    segmentation/<id>.png    stored class + 1 (0 = unlabelled) → value − 1, 0 → 255 = ignore; 40 classes
    depth/<id>.npy           float metres, 0 = missing (negative or > 20 m, i.e. millimetres: refused)
    normals/<id>.png         2·v/255 − 1 at every pixel (as the field's loader; see ``ignore_black_normals``)
    edge/<id>.png            binary boundary map 0/255 (v/255; a map stored 0/1 is refused)
    gt_sets/{train,val}.txt  795 / 654 ids

The MTI-Net copy of the dataset stores 480×640 images; the field's 448×576 resolution
cannot hold them, so loading one raises an error that says which copy to use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mtl.data.base import (
    NYUD_EDGE_MAX_DIST,
    BadSampleError,
    FolderDataset,
    binary_01_problem,
    decode_normals,
    read_npy,
    read_png,
)

SIZE = (448, 576)
"""(H, W) of the field's NYUD-v2 images."""
MTINET_SIZE = (480, 640)
MAX_DEPTH_M = 20.0
"""Largest plausible depth in metres (the Kinect reads up to about 10 m): larger values are millimetres."""
SPLIT_SIZES = {"train": 795, "val": 654}
#: the 40 classes of Gupta et al. (CVPR 2013), label id = index
SEMSEG_CLASSES: tuple[str, ...] = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf",
    "picture", "counter", "blinds", "desk", "shelves", "curtain", "dresser", "pillow", "mirror",
    "floor mat", "clothes", "ceiling", "books", "refrigerator", "television", "paper", "towel",
    "shower curtain", "box", "whiteboard", "person", "night stand", "toilet", "sink", "lamp",
    "bathtub", "bag", "otherstructure", "otherfurniture", "otherprop",
)  # fmt: skip
NUM_SEMSEG = len(SEMSEG_CLASSES)

WRONG_COPY = (
    "this is the 480×640 MTI-Net copy of NYUD-v2, which does not fit the field's 448×576 "
    "resolution; download the ATRC / Multi-Task-Transformer NYUDv2 tarball (see datasets/nyud/README.md)"
)


def decode_semseg(stored: np.ndarray) -> np.ndarray:
    """Stored value − 1, so unlabelled (0) wraps to 255 = ignore (uint8 arithmetic)."""
    return (stored.astype(np.uint8) - np.uint8(1)).astype(np.uint8)


def decode_edge(stored: np.ndarray) -> np.ndarray:
    """``png/255`` of a binary map → {0, 1} uint8 (values above half are boundary)."""
    return (stored > 127).astype(np.uint8)


def depth_problem(depth: np.ndarray) -> str | None:
    """What is wrong with a depth map in metres (NaN/inf, negative, millimetres), or ``None``."""
    if not np.isfinite(depth).all():
        return "depth holds NaN or inf (expected metres, 0 = missing)"
    if depth.size == 0:
        return None
    lo, hi = float(depth.min()), float(depth.max())
    if lo >= 0 and hi <= MAX_DEPTH_M:
        return None
    what = "negative depth" if lo < 0 else "values this large are millimetres: divide by 1000"
    return f"depth range [{lo:.3g}, {hi:.3g}] m, expected [0, {MAX_DEPTH_M:g}] m with 0 = missing ({what})"


class NYUDv2(FolderDataset):
    """NYUD-v2 with semseg, depth, normals and edge.

    NYUD-v2 has no test split in the field's usage: the published numbers (MTI-Net, ATRC, InvPT,
    TaskPrompter, TaskExpert) and this framework's headline rows are on the 654-image ``val``
    split, which is also the one that picks ``best.ckpt`` (``eval.split=test`` is refused).

    Args:
        root: the ``NYUDv2`` folder.
        split: ``train`` (795 images) or ``val`` (654 images).
        tasks: subset of :attr:`TASKS` (default: all).
        transform: joint transform of the raw sample.
        skip_bad_samples: log and skip unreadable samples instead of raising.
        ignore_black_normals: mark stored (0, 0, 0) and mid-grey normals invalid
            (:func:`~mtl.data.base.decode_normals`); off by default, as the field's loader.
    """

    KEY = "nyud"
    TASKS = ("semseg", "depth", "normals", "edge")
    CLASS_NAMES = {"semseg": SEMSEG_CLASSES}
    NUM_CLASSES = {"semseg": NUM_SEMSEG}
    EDGE_MAX_DIST = NYUD_EDGE_MAX_DIST
    SPLITS = ("train", "val")
    SPLITS_NOTE = (
        "NYUD-v2 has no test split in the field's usage (gt_sets/ holds train.txt and val.txt): the "
        "published numbers (MTI-Net, ATRC, InvPT, TaskExpert) and the headline rows are on its 654-image "
        "val split."
    )

    def __init__(self, *, ignore_black_normals: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ignore_black_normals = ignore_black_normals

    def decode_options(self) -> dict:
        return {"ignore_black_normals": self.ignore_black_normals}

    def split_file(self, split: str) -> Path:
        return self.root / "gt_sets" / f"{split}.txt"

    def path(self, kind: str, sample_id: str) -> Path:
        """Path of one file: ``kind`` is ``image`` or a task name."""
        folder, ext = {
            "image": ("images", ".png"),
            "semseg": ("segmentation", ".png"),
            "depth": ("depth", ".npy"),
            "normals": ("normals", ".png"),
            "edge": ("edge", ".png"),
        }[kind]
        return self.root / folder / f"{sample_id}{ext}"

    def files(self, sample_id: str) -> list[Path]:
        return [self.path(kind, sample_id) for kind in ("image", *self.tasks)]

    def load(self, sample_id: str) -> dict:
        p = self.path("image", sample_id)
        image = read_png(p, sample_id, mode="RGB")
        hw = image.shape[:2]
        if hw == MTINET_SIZE:
            raise BadSampleError(sample_id, p, WRONG_COPY)
        sample: dict = {"image": image}
        for task in self.tasks:
            p = self.path(task, sample_id)
            if task == "depth":
                arr = read_npy(p, sample_id).astype(np.float32)
                if arr.ndim == 3 and arr.shape[-1] == 1:
                    arr = arr[..., 0]
                problem = depth_problem(arr)
                if problem is not None:
                    raise BadSampleError(sample_id, p, problem)
            else:
                stored = read_png(p, sample_id)
                if task == "normals":
                    if stored.ndim != 3 or stored.shape[2] != 3:
                        raise BadSampleError(sample_id, p, f"expected an RGB png, got shape {stored.shape}")
                    arr = decode_normals(stored, ignore_black=self.ignore_black_normals)
                else:
                    if stored.ndim != 2:
                        msg = f"expected a single-channel png, got {stored.shape}"
                        raise BadSampleError(sample_id, p, msg)
                    problem = binary_01_problem(stored) if task == "edge" else None
                    if problem is not None:
                        raise BadSampleError(sample_id, p, problem)
                    arr = decode_semseg(stored) if task == "semseg" else decode_edge(stored)
                    if task == "semseg" and int(stored.max()) > NUM_SEMSEG:
                        raise BadSampleError(
                            sample_id, p, f"stored label {int(stored.max())} > {NUM_SEMSEG} (expected 0..40)"
                        )
            if arr.shape[:2] != hw:
                raise BadSampleError(sample_id, p, f"size {arr.shape[:2]} differs from the image's {hw}")
            sample[task] = arr
        sample["meta"] = {"id": sample_id, "size": hw}
        return sample
