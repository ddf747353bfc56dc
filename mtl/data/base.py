"""The dataset contract (:class:`DenseDataset`) and the machinery of the on-disk datasets.

A dataset class declares, without being built, what the framework needs to know about it: its
key (the published headline rows are keyed by it), the tasks it provides, the classes of its
classification tasks and the boundary matching tolerance of its edge protocol. A new dataset is
one :class:`DenseDataset` subclass plus its ``data`` config (``dataset._target_``).

On-disk datasets (:class:`FolderDataset`) share split files, per-file decoding errors and
skipping: every reader raises :class:`BadSampleError` naming the sample id and the file when a file is
missing, unreadable or malformed; ``skip_bad_samples=True`` logs that error and serves the
next good sample instead, so one corrupt file does not end a 40k-iteration run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

log = logging.getLogger(__name__)


class BadSampleError(RuntimeError):
    """A sample whose file is missing, unreadable or malformed.

    Args:
        sample_id: the dataset id of the sample.
        path: the offending file.
        reason: what is wrong and, where useful, what was expected.
    """

    def __init__(self, sample_id: str, path: Path | str, reason: str) -> None:
        self.sample_id, self.path, self.reason = sample_id, Path(path), reason
        super().__init__(f"sample {sample_id!r}: {path}: {reason}")


def read_ids(path: Path) -> list[str]:
    """Reads a split file with one sample id per line (blank lines ignored)."""
    if not path.is_file():
        raise FileNotFoundError(f"split file {path} not found: is the dataset root right?")
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise ValueError(f"split file {path} lists no ids")
    return ids


def read_png(path: Path, sample_id: str, mode: str | None = None) -> np.ndarray:
    """Decodes a PNG/JPEG into a numpy array, optionally converting its PIL mode."""
    try:
        with Image.open(path) as im:
            im = im.convert(mode) if mode is not None and im.mode != mode else im
            return np.asarray(im).copy()
    except FileNotFoundError as err:
        raise BadSampleError(sample_id, path, "file is missing") from err
    except OSError as err:  # PIL's UnidentifiedImageError and truncated files are OSErrors
        raise BadSampleError(sample_id, path, f"cannot decode image ({err})") from err


def read_npy(path: Path, sample_id: str) -> np.ndarray:
    """Loads a ``.npy`` array (no pickles)."""
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError as err:
        raise BadSampleError(sample_id, path, "file is missing") from err
    except (OSError, ValueError) as err:
        raise BadSampleError(sample_id, path, f"cannot read .npy ({err})") from err


def decode_normals(stored: np.ndarray, ignore_black: bool = False) -> np.ndarray:
    """Decodes an 8-bit normals PNG: ``2·v/255 − 1``, every pixel, as the field's loaders do.

    The Multi-Task-Transformer loaders decode every pixel and only ignore normals of zero
    length, which no 8-bit triple decodes to (255 is odd): a stored (0, 0, 0) becomes the
    valid target (−1, −1, −1). Valid vectors are kept as decoded (not re-normalised).

    Args:
        stored: ``H × W × 3`` uint8 PNG values.
        ignore_black: also mark as invalid (vector 0) a stored zero triple and a triple that
            decodes to a near-zero vector (mid-grey, ``|n| < 0.5``), neither of which can be a
            unit normal; for copies of the data that store missing normals that way. Off by
            default: the field's numbers count those pixels.
    """
    if stored.ndim != 3 or stored.shape[2] != 3:
        raise ValueError(f"normals must be an RGB image (H, W, 3), got shape {stored.shape}")
    # (2·v) / 255 − 1 in float32, in the reference's order of operations (identical bits)
    n = stored.astype(np.float32) * np.float32(2) / np.float32(255) - np.float32(1)
    if ignore_black:
        invalid = (stored.astype(np.int32).sum(axis=2) == 0) | ((n * n).sum(axis=2) < 0.25)
        n[invalid] = 0.0
    return n


#: NYUD-v2's boundary matching tolerance (fraction of the image diagonal), the default one
NYUD_EDGE_MAX_DIST = 0.011


class DenseDataset(Dataset):
    """Base of every dataset of the framework: what it is, declared on the class.

    Constructors accept ``split``, ``tasks`` and ``transform`` keywords (see
    :class:`mtl.data.datamodule.MTLDataModule`) and return raw sample dicts with ``image``,
    ``meta`` and the requested tasks' targets.

    Attributes:
        KEY: the dataset's identity (``nyud``, ``pascal_context``, ``synthetic``): the key of
            its published headline rows (:mod:`mtl.metrics.published`) and of its results.
        TASKS: the tasks it can provide.
        CLASS_NAMES: classification task → its class names, index = label id.
        NUM_CLASSES: classification task → number of classes (``len`` of ``CLASS_NAMES``).
        EDGE_MAX_DIST: boundary matching tolerance of its edge protocol, fraction of the image
            diagonal (NYUD-v2 0.011, PASCAL-Context 0.0075); default NYUD-v2's.
    """

    KEY: ClassVar[str] = ""
    TASKS: ClassVar[tuple[str, ...]] = ()
    CLASS_NAMES: ClassVar[dict[str, tuple[str, ...]]] = {}
    NUM_CLASSES: ClassVar[dict[str, int]] = {}
    EDGE_MAX_DIST: ClassVar[float] = NYUD_EDGE_MAX_DIST

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        names = cls.CLASS_NAMES
        wrong = {t: n for t, n in cls.NUM_CLASSES.items() if t in names and len(names[t]) != n}
        if wrong:
            raise ValueError(
                f"{cls.__qualname__}: NUM_CLASSES {wrong} disagree with the lengths of CLASS_NAMES"
            )


class FolderDataset(DenseDataset):
    """Base of the on-disk datasets: ids of a split, error wrapping, optional skipping.

    Subclasses set the :class:`DenseDataset` attributes and implement :meth:`split_file` and
    :meth:`load` (``id -> raw sample dict`` with ``image``, the requested tasks and ``meta``).

    Args:
        root: the dataset folder (e.g. ``data/NYUDv2``).
        split: split name (``train`` or ``val``).
        tasks: subset of ``TASKS`` to load (default: all).
        transform: callable applied to the raw sample (see :mod:`mtl.data.transforms`).
        skip_bad_samples: log a bad sample and serve the next good one instead of raising.
        max_skips: how many consecutive bad samples to skip before giving up.
    """

    SPLITS: tuple[str, ...] = ("train", "val")

    def __init__(
        self,
        *,
        root: str | Path,
        split: str = "train",
        tasks: Sequence[str] | None = None,
        transform: Callable[[dict], dict] | None = None,
        skip_bad_samples: bool = False,
        max_skips: int = 100,
    ) -> None:
        name = type(self).__name__
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"{name}: dataset root {self.root} does not exist; set paths.data_dir (or "
                f"data.dataset.root) to the folder holding the extracted tarball"
            )
        if split not in self.SPLITS:
            raise ValueError(f"{name}: unknown split {split!r}; expected one of {self.SPLITS}")
        self.tasks = self.TASKS if tasks is None else tuple(tasks)
        unknown = [t for t in self.tasks if t not in self.TASKS]
        if unknown:
            raise ValueError(f"{name}: unknown task(s) {unknown}; available tasks: {list(self.TASKS)}")
        self.split = split
        self.ids = read_ids(self.split_file(split))
        self.transform = transform
        self.skip_bad_samples = skip_bad_samples
        self.max_skips = max_skips
        self.skipped: list[str] = []

    def split_file(self, split: str) -> Path:
        """Path of the file listing the ids of ``split``."""
        raise NotImplementedError

    def load(self, sample_id: str) -> dict:
        """Reads and decodes one sample (raises :class:`BadSampleError`)."""
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        for attempt in range(self.max_skips + 1):
            sample_id = self.ids[(index + attempt) % len(self.ids)]
            try:
                sample = self.load(sample_id)
            except BadSampleError as err:
                if not self.skip_bad_samples:
                    raise
                self.skipped.append(sample_id)
                log.warning("skipping bad sample (data.skip_bad_samples=true): %s", err)
                continue
            return self.transform(sample) if self.transform is not None else sample
        raise RuntimeError(
            f"{type(self).__name__}: {self.max_skips + 1} consecutive bad samples from index {index}; "
            "run `python -m mtl.data.check` on the dataset root"
        )
