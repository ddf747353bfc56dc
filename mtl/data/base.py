"""The dataset contract (:class:`DenseDataset`) and the machinery of the on-disk datasets.

A dataset class declares, without being built, what the framework needs to know about it: its
key (the published headline rows are keyed by it), the tasks it provides, the classes of its
classification tasks and the boundary matching tolerance of its edge protocol. A new dataset is
one :class:`DenseDataset` subclass plus its ``data`` config (``dataset._target_``).

On-disk datasets (:class:`FolderDataset`) share split files, per-file decoding errors and
skipping: every reader raises :class:`BadSampleError` naming the sample id and the file when a file is
missing, unreadable or malformed; ``skip_bad_samples=True`` logs that error and serves the
next good sample instead, so one corrupt file does not end a 40k-iteration run. Encodings that
cannot be right (a binary map stored 0/1, depth out of range) are refused the same way, and
:func:`require_root` reports a missing root, naming ``data.dataset.root``, before anything is built.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

if TYPE_CHECKING:
    from mtl.data.cache import SampleCache

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


def read_split_file(path: Path) -> list[tuple[int, str]]:
    """Reads a split file: ``(line number, id)`` per non-blank line, line numbers from 1.

    Editors' habits are tolerated: a UTF-8 byte-order mark (``utf-8-sig``; a stray one at the
    start of a line too), Windows (CRLF) line ends and blanks around an id are stripped, and
    blank lines are skipped.

    Raises:
        FileNotFoundError: there is no such file.
        ValueError: it is not UTF-8 text or lists no ids.
    """
    if not path.is_file():
        raise FileNotFoundError(f"split file {path} not found: is the dataset root right?")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"split file {path} is not UTF-8 text ({err}); expected one sample id per line"
        ) from err
    lines = [(n, line.replace("\ufeff", "").strip()) for n, line in enumerate(text.splitlines(), start=1)]
    lines = [(n, sid) for n, sid in lines if sid]
    if not lines:
        raise ValueError(f"split file {path} lists no ids")
    return lines


def read_ids(path: Path) -> list[str]:
    """Reads a split file with one sample id per line (see :func:`read_split_file`)."""
    return [sid for _, sid in read_split_file(path)]


#: how to get the data, per dataset key (the datasets/<name>/README.md of the repository)
DATA_HOWTO = {
    "nyud": (
        "download NYUDv2.tar.gz (the Multi-Task-Transformer copy) and extract it: see datasets/nyud/README.md"
    ),
    "pascal_context": (
        "download PASCALContext.tar.gz (the Multi-Task-Transformer copy) and extract it: "
        "see datasets/pascal_context/README.md"
    ),
}


def resolve_dataset_class(dataset: str | type | functools.partial) -> type | None:
    """The class a dataset key (``nyud``), class, partial constructor or dotted path names, or ``None``."""
    if isinstance(dataset, functools.partial):  # a Hydra `_partial_: true` constructor
        dataset = dataset.func
    if isinstance(dataset, type):
        return dataset
    if "." in dataset:  # a Hydra _target_ such as "mtl.data.nyud.NYUDv2"
        import importlib

        module, _, name = dataset.rpartition(".")
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            return None
    from mtl.data.nyud import NYUDv2
    from mtl.data.pascal_context import PASCALContext
    from mtl.data.synthetic import SyntheticScenes

    return {cls.KEY: cls for cls in (NYUDv2, PASCALContext, SyntheticScenes)}.get(dataset)


def check_eval_split(dataset: str | type | functools.partial, split: str) -> str:
    """Checks ``eval.split`` against the dataset's splits, before anything is built.

    The validation split (``val``) also picks ``best.ckpt``; a number reported on it is a
    validation number. The synthetic renderer has an independent ``test`` split (its own scenes).
    NYUD-v2 and PASCAL-Context have only ``train`` and ``val`` in the field's usage: their
    published numbers (and this framework's headline rows) are on ``val``, so ``test`` is refused
    for them with a message that says so.

    Args:
        dataset: the dataset: its key (``nyud``, ``pascal_context``, ``synthetic``), its class, a
            partial constructor of it, or the dotted class path of ``data.dataset._target_``.
        split: the configured ``eval.split``.

    Returns:
        ``split``.

    Raises:
        ValueError: the dataset has no such split; the message names ``eval.split``, the dataset
            and the splits it has.
        TypeError: the dataset cannot be resolved to a :class:`DenseDataset` subclass.
    """
    cls = resolve_dataset_class(dataset)
    if cls is None or not issubclass(cls, DenseDataset):
        raise TypeError(
            f"data.dataset: cannot check eval.split={split!r}: {dataset!r} is not a "
            "mtl.data.base.DenseDataset subclass (nor the key or dotted path of one)"
        )
    if split in cls.SPLITS:
        return split
    valid = ", ".join(cls.SPLITS)
    note = f" {cls.SPLITS_NOTE}" if cls.SPLITS_NOTE else ""
    raise ValueError(
        f"eval.split={split!r}: {cls.__name__} ({cls.KEY}) has no such split; it has {valid}.{note} "
        f"Set eval.split to one of {valid}."
    )


def require_root(dataset: str | type, root: str | Path | None) -> Path | None:
    """Checks that an on-disk dataset's root folder exists, before anything expensive is built.

    Args:
        dataset: the dataset: its key (``nyud``, ``pascal_context``), its class, or the dotted
            class path of ``data.dataset._target_``.
        root: the configured ``data.dataset.root``.

    Returns:
        The root as a path; ``None`` when the dataset is not read from disk (synthetic scenes, an
        unknown class): nothing to check.

    Raises:
        FileNotFoundError: the root is unset or not a folder; the message names ``data.dataset.root``,
            the path and how to get the data.
    """
    cls = resolve_dataset_class(dataset)
    if cls is None or not issubclass(cls, FolderDataset):
        return None
    path = Path(root).expanduser() if root is not None else None
    if path is not None and path.is_dir():
        return path
    howto = DATA_HOWTO.get(cls.KEY, "see datasets/README.md")
    state = "is not set" if path is None else f"is {path}, which does not exist"
    if path is not None and path.exists():
        state = f"is {path}, which is not a folder"
    raise FileNotFoundError(
        f"data.dataset.root {state}: {cls.__name__} reads its files from there. Set paths.data_dir "
        f"(the folder holding the extracted dataset folder) or data.dataset.root to where the data is; "
        f"to get it, {howto}"
    )


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


def binary_01_problem(stored: np.ndarray) -> str | None:
    """What is wrong with a binary 0/255 map stored as 0/1, or ``None``.

    Such a map (maximum exactly 1) decodes to all zeros through ``value/255 > 0.5``: training
    would silently learn an empty target. Unambiguous: no boundary or saliency map of the real
    encodings has 1 as its largest value.
    """
    if stored.size and int(stored.max()) == 1:
        return (
            "binary map stored as 0/1, expected binary 0/255 (it would decode to all zeros); "
            "multiply it by 255"
        )
    return None


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
        SPLITS: the splits it serves (``eval.split`` picks one of them, :func:`check_eval_split`).
        SPLITS_NOTE: a sentence about its splits for the errors that refuse one (e.g. which split
            the field's published numbers are on).
    """

    KEY: ClassVar[str] = ""
    SPLITS: ClassVar[tuple[str, ...]] = ("train", "val")
    SPLITS_NOTE: ClassVar[str] = ""
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
        split: split name, one of :attr:`SPLITS` (``train`` or ``val`` for the field's datasets).
        tasks: subset of ``TASKS`` to load (default: all).
        transform: callable applied to the raw sample (see :mod:`mtl.data.transforms`).
        skip_bad_samples: log a bad sample and serve the next good one instead of raising.
        max_skips: how many consecutive bad samples to skip before giving up.
    """

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
        self.root = require_root(type(self), root)
        if split not in self.SPLITS:
            note = f" {self.SPLITS_NOTE}" if self.SPLITS_NOTE else ""
            raise ValueError(f"{name}: unknown split {split!r}; expected one of {self.SPLITS}.{note}")
        self.tasks = self.TASKS if tasks is None else tuple(tasks)
        unknown = [t for t in self.tasks if t not in self.TASKS]
        if unknown:
            raise ValueError(f"{name}: unknown task(s) {unknown}; available tasks: {list(self.TASKS)}")
        self.split = split
        self.split_path = self.split_file(split)
        lines = read_split_file(self.split_path)
        self.ids = [sid for _, sid in lines]
        self.id_lines = [n for n, _ in lines]  # line of each id in the split file, for error messages
        self.transform = transform
        self.skip_bad_samples = skip_bad_samples
        self.max_skips = max_skips
        self.skipped: list[str] = []
        self.sample_cache: SampleCache | None = None  # set by use_cache
        self.cache_views = False

    #: bump when :meth:`load` decodes differently: it invalidates the sample caches (:mod:`mtl.data.cache`)
    DECODE_VERSION: ClassVar[int] = 1

    def split_file(self, split: str) -> Path:
        """Path of the file listing the ids of ``split``."""
        raise NotImplementedError

    def decode_options(self) -> dict:
        """The constructor options that change what :meth:`load` returns (part of the cache fingerprint)."""
        return {}

    def use_cache(self, cache_dir: str | Path | None = None, *, views: bool = False) -> None:
        """Serves samples from the decoded-sample cache (:func:`mtl.data.cache.open_cache`), built if needed.

        Args:
            cache_dir: ``data.cache_dir``; default ``<root>/.mtl_cache``. When the default folder
                cannot be written (a shared, read-only dataset root), the samples are decoded from the
                files as without the cache, with one warning; a ``cache_dir`` set explicitly that cannot
                be written is an error.
            views: hand the transform read-only views of the cache and coded maps
                (:meth:`mtl.data.cache.SampleCache.read`); only for a transform that starts with
                :class:`~mtl.data.fast_augment.FastTrainAugment`.
        """
        from mtl.data.cache import open_cache

        self.cache_views = views
        try:
            self.sample_cache = open_cache(self, cache_dir)
        except PermissionError as err:
            if cache_dir is not None:
                raise
            log.warning("%s; decoding %s/%s from the files instead", err, type(self).__name__, self.split)
            self.sample_cache = None

    def load(self, sample_id: str) -> dict:
        """Reads and decodes one sample (raises :class:`BadSampleError`)."""
        raise NotImplementedError

    def files(self, sample_id: str) -> list[Path]:
        """The files :meth:`load` reads for ``sample_id`` with the current ``tasks``.

        Used by the preflight's whole-split check for missing files (:mod:`mtl.data.check`);
        the default, no list, skips that check.
        """
        return []

    def where(self, index: int) -> str:
        """Where the id at ``index`` is listed: ``<split file> line <n>``."""
        return f"{self.split_path} line {self.id_lines[index]}"

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        for attempt in range(self.max_skips + 1):
            position = (index + attempt) % len(self.ids)
            sample_id = self.ids[position]
            try:
                cache = self.sample_cache
                if cache is not None:
                    sample = cache.read(sample_id, views=self.cache_views)
                else:
                    sample = self.load(sample_id)
            except BadSampleError as bad:
                err = BadSampleError(
                    sample_id, bad.path, f"{bad.reason} (id listed in {self.where(position)})"
                )
                if not self.skip_bad_samples:
                    raise err from bad
                self.skipped.append(sample_id)
                log.warning("skipping bad sample (data.skip_bad_samples=true): %s", err)
                continue
            return self.transform(sample) if self.transform is not None else sample
        raise RuntimeError(
            f"{type(self).__name__}: {self.max_skips + 1} consecutive bad samples from index {index}; "
            "run `python -m mtl.data.check` on the dataset root"
        )
