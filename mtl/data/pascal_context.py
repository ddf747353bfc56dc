"""PASCAL-Context in the layout of the ATRC / Multi-Task-Transformer tarball.

Mottaghi et al., "The Role of Context for Object Detection and Semantic Segmentation in
the Wild", CVPR 2014 (context labels); Chen et al., "Detect What You Can", CVPR 2014
(PASCAL-Part); the multi-task split of Maninis et al. (ASTMT, CVPR 2019), used by MTI-Net,
ATRC, InvPT, TaskPrompter, TaskExpert and MTLoRA.

Layout (``root`` = ``PASCALContext/``)::

    JPEGImages/<id>.jpg                    RGB, variable size (≤ 500 px a side)
    semseg/VOC12/<id>.png                  read instead of pascal-context's where present (field's loader)
    semseg/pascal-context/<id>.png         21 classes incl. background (0), 255 = ignore
    human_parts/<id>.mat                   PASCAL-Part ``anno``; 6 parts + background
    sal_distill/<id>.png                   saliency, 1 channel, stored value/255 > 0.5 → salient (0/1 refused)
    normals_distill/<id>.png               2·v/255 − 1, valid on NYU-compatible context classes only
    pascal-context/trainval/<id>.mat       ``LabelMap`` (459 context classes): edges and normal validity
    ImageSets/Context/{train,val}.txt      4998 / 5105 ids
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import scipy.io

from mtl.data.base import BadSampleError, FolderDataset, binary_01_problem, decode_normals, read_png
from mtl.metrics.morphology import thin

SPLIT_SIZES = {"train": 4998, "val": 5105}
#: the 20 PASCAL VOC classes and background, label id = index
SEMSEG_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip
NUM_SEMSEG = len(SEMSEG_CLASSES)
PERSON_CLASS = SEMSEG_CLASSES.index("person")
#: the field's human-part grouping (:data:`PART_IDS`), label id = index
PART_CLASSES: tuple[str, ...] = (
    "background", "head", "torso", "upper arms", "lower arms", "upper legs", "lower legs",
)  # fmt: skip
PART_IDS = {
    **dict.fromkeys(("hair", "head", "lear", "lebrow", "leye", "mouth", "nose", "rear", "rebrow", "reye"), 1),
    **dict.fromkeys(("torso", "neck"), 2),
    **dict.fromkeys(("luarm", "ruarm"), 3),
    **dict.fromkeys(("llarm", "rlarm", "lhand", "rhand"), 4),
    **dict.fromkeys(("luleg", "ruleg"), 5),
    **dict.fromkeys(("llleg", "rlleg", "lfoot", "rfoot"), 6),
}
"""PASCAL-Part part name → the field's 6-part grouping (0 = background)."""


@cache
def normals_valid_classes() -> np.ndarray:
    """Boolean lookup over LabelMap ids: on which context classes distilled normals are valid."""
    text = resources.files("mtl.data").joinpath("pascal_context_normals_valid_classes.json").read_text()
    lut = np.zeros(512, dtype=bool)
    lut[np.asarray(json.loads(text)["ids"], dtype=np.int64)] = True
    return lut


def _loadmat(path: Path, sample_id: str) -> dict:
    try:
        return scipy.io.loadmat(path)
    except FileNotFoundError as err:
        raise BadSampleError(sample_id, path, "file is missing") from err
    except (OSError, ValueError, TypeError) as err:
        raise BadSampleError(sample_id, path, f"cannot read .mat ({err})") from err


def read_label_map(path: Path, sample_id: str) -> np.ndarray:
    """The 459-class context ``LabelMap`` of ``pascal-context/trainval/<id>.mat``."""
    mat = _loadmat(path, sample_id)
    if "LabelMap" not in mat:
        keys = sorted(k for k in mat if not k.startswith("__"))
        raise BadSampleError(sample_id, path, f"no 'LabelMap' variable (found {keys})")
    return np.asarray(mat["LabelMap"], dtype=np.int64)


def edges_from_label_map(label_map: np.ndarray) -> np.ndarray:
    """Boundary pixels: non-zero 3×3 Laplacian of the label map, thinned to one pixel.

    The Laplacian is OpenCV's (4-neighbour kernel, ``BORDER_REFLECT_101``) on the float label
    map, as the field's loaders compute it. The thinning is the reference loader's
    ``skimage.morphology.thin``: Guo & Hall's two sub-iterations repeated until a whole iteration
    changes nothing (the same as MATLAB's ``bwmorph(·, 'thin', Inf)``), computed by
    :func:`mtl.metrics.morphology.thin`. pyEdgeEval's ``binary_thin`` stops when a first
    sub-iteration changes nothing and leaves extra pixels (on about a third of irregular label maps).
    """
    lap = cv2.Laplacian(label_map.astype(np.float64), cv2.CV_64F)
    return thin(lap != 0).astype(np.uint8)


def read_human_parts(path: Path, sample_id: str, size: tuple[int, int]) -> np.ndarray:
    """The 7-class part map of a PASCAL-Part ``.mat``; all 255 when no person has parts.

    Pixels of every person instance that has part annotations take their part's id (later
    parts overwrite earlier ones where masks overlap); all other pixels are background (0).
    """
    mat = _loadmat(path, sample_id)
    try:
        objects = mat["anno"][0][0][1][0]
    except (KeyError, IndexError) as err:
        msg = "expected PASCAL-Part layout anno[0][0] = (imname, objects)"
        raise BadSampleError(sample_id, path, msg) from err
    target = np.zeros(size, dtype=np.uint8)
    has_parts = False
    for obj in objects:
        if int(np.asarray(obj[1]).ravel()[0]) != PERSON_CLASS or np.asarray(obj[3]).size == 0:
            continue
        has_parts = True
        for part in obj[3][0]:
            name = str(np.asarray(part[0]).ravel()[0])
            if name not in PART_IDS:
                msg = f"unknown part name {name!r}; expected one of {sorted(PART_IDS)}"
                raise BadSampleError(sample_id, path, msg)
            mask = np.asarray(part[1]).astype(bool)
            if mask.shape != size:
                msg = f"part mask size {mask.shape} differs from the image's {size}"
                raise BadSampleError(sample_id, path, msg)
            target[mask] = PART_IDS[name]
    return target if has_parts else np.full(size, 255, dtype=np.uint8)


class PASCALContext(FolderDataset):
    """PASCAL-Context with semseg, human_parts, saliency, normals and edge.

    PASCAL-Context has no test split in the field's usage (PASCAL VOC's test annotations are not
    public): the published numbers (ASTMT, MTI-Net, ATRC, InvPT, TaskExpert, MTLoRA) and this
    framework's headline rows are on the 5105-image ``val`` split, which is also the one that
    picks ``best.ckpt`` (``eval.split=test`` is refused).

    Args:
        root: the ``PASCALContext`` folder.
        split: ``train`` (4998 images) or ``val`` (5105 images).
        tasks: subset of :attr:`TASKS` (default: all).
        transform: joint transform of the raw sample.
        skip_bad_samples: log and skip unreadable samples instead of raising.
        ignore_black_normals: mark stored (0, 0, 0) and mid-grey normals invalid
            (:func:`~mtl.data.base.decode_normals`); off by default, as the field's loader.
    """

    KEY = "pascal_context"
    TASKS = ("semseg", "human_parts", "saliency", "normals", "edge")
    CLASS_NAMES = {"semseg": SEMSEG_CLASSES, "human_parts": PART_CLASSES}
    NUM_CLASSES = {"semseg": NUM_SEMSEG, "human_parts": len(set(PART_IDS.values())) + 1}
    EDGE_MAX_DIST = 0.0075
    SPLITS = ("train", "val")
    SPLITS_NOTE = (
        "PASCAL-Context has no test split in the field's usage (ImageSets/Context/ holds train.txt and "
        "val.txt): the published numbers (ASTMT, MTI-Net, ATRC, InvPT, TaskExpert, MTLoRA) and the "
        "headline rows are on its 5105-image val split."
    )

    def __init__(self, *, ignore_black_normals: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ignore_black_normals = ignore_black_normals

    def decode_options(self) -> dict:
        return {"ignore_black_normals": self.ignore_black_normals}

    def split_file(self, split: str) -> Path:
        return self.root / "ImageSets" / "Context" / f"{split}.txt"

    def path(self, kind: str, sample_id: str) -> Path:
        """Path of one file: ``kind`` is ``image``, a task name or ``context`` (the LabelMap).

        Semantic segmentation reads ``semseg/VOC12/<id>.png`` when that file exists and
        ``semseg/pascal-context/<id>.png`` otherwise, as the field's loader
        (``_get_semseg_fname``) does.
        """
        if kind == "semseg":
            voc = self.root / "semseg" / "VOC12" / f"{sample_id}.png"
            if voc.is_file():
                return voc
        rel = {
            "image": ("JPEGImages", ".jpg"),
            "semseg": ("semseg/pascal-context", ".png"),
            "human_parts": ("human_parts", ".mat"),
            "saliency": ("sal_distill", ".png"),
            "normals": ("normals_distill", ".png"),
            "context": ("pascal-context/trainval", ".mat"),
            "edge": ("pascal-context/trainval", ".mat"),
        }[kind]
        return self.root / rel[0] / f"{sample_id}{rel[1]}"

    def files(self, sample_id: str) -> list[Path]:
        kinds = ["image", *(t for t in self.tasks if t != "edge")]
        if "edge" in self.tasks or "normals" in self.tasks:
            kinds.append("context")
        return [self.path(kind, sample_id) for kind in kinds]

    def load(self, sample_id: str) -> dict:
        image = read_png(self.path("image", sample_id), sample_id, mode="RGB")
        hw = image.shape[:2]
        sample: dict = {"image": image}
        label_map = None
        if "edge" in self.tasks or "normals" in self.tasks:
            p = self.path("context", sample_id)
            label_map = read_label_map(p, sample_id)
            if label_map.shape != hw:
                msg = f"LabelMap size {label_map.shape} differs from the image's {hw}"
                raise BadSampleError(sample_id, p, msg)
        for task in self.tasks:
            p = self.path(task, sample_id)
            if task == "semseg":
                arr = read_png(p, sample_id)
                bad = (arr >= NUM_SEMSEG) & (arr != 255)
                if arr.ndim != 2 or bad.any():
                    raise BadSampleError(
                        sample_id,
                        p,
                        f"expected a single-channel map of 0..20 or 255, got "
                        f"shape {arr.shape}, values up to {int(arr.max())}",
                    )
                arr = arr.astype(np.uint8)
            elif task == "human_parts":
                arr = read_human_parts(p, sample_id, hw)
            elif task == "saliency":
                stored = read_png(p, sample_id)  # the stored values, as the reference reads them
                if stored.ndim != 2:
                    msg = f"expected a single-channel png, got shape {stored.shape}"
                    raise BadSampleError(sample_id, p, msg)
                problem = binary_01_problem(stored)
                if problem is not None:
                    raise BadSampleError(sample_id, p, problem)
                arr = (stored > 127.5).astype(np.uint8)  # value/255 > 0.5
            elif task == "normals":
                stored = read_png(p, sample_id, mode="RGB")
                arr = decode_normals(stored, ignore_black=self.ignore_black_normals)
                valid = normals_valid_classes()[np.clip(label_map, 0, 511)]
                arr[~valid] = 0.0
            else:  # edge
                arr = edges_from_label_map(label_map)
            if arr.shape[:2] != hw:
                raise BadSampleError(sample_id, p, f"size {arr.shape[:2]} differs from the image's {hw}")
            sample[task] = arr
        if "edge" in self.tasks and self.split != "train":
            # SEISM's ground truth for PASCAL-Context is seg2bmap of the LabelMap itself (eval.py)
            sample["edge_labelmap"] = label_map.astype(np.int16)
        sample["meta"] = {"id": sample_id, "size": hw}
        return sample
