"""A decoded-sample cache: every sample of an on-disk split decoded once, memory-mapped afterwards.

Decoding NYUD-v2's PNGs and ``.npy`` files, or PASCAL-Context's JPEGs, PNGs and ``.mat`` files
(with the thinning of the context edges), costs more than the whole training augmentation. The
cache stores each sample exactly as :meth:`~mtl.data.base.FolderDataset.load` returns it, in one
flat file (``data.bin``) per split that every process maps read-only; reading a sample is a copy
out of the page cache. Image and label maps keep their decoded dtype (uint8, int16, float32
depth); normals decoded from an 8-bit PNG are stored as their 8-bit codes (256 marking an invalid
pixel), the three of a pixel packed into one uint32, and decoded on read through a table made with
the loader's own arithmetic, a round trip checked bit for bit when the cache is built (maps that
would not survive it stay float32).

Layout, under ``cache_dir`` (default ``<dataset root>/.mtl_cache``)::

    <KEY>-<split>-<tasks hash>/manifest.json   fingerprint, index (offset, dtype, shape per array)
    <KEY>-<split>-<tasks hash>/data.bin        the arrays, 64-byte aligned
    <KEY>-<split>-<tasks hash>.lock            serialises builders

The manifest's fingerprint covers the split file and, for every id, the name, size and
modification time of each file the loader reads, the decode options
(:meth:`~mtl.data.base.FolderDataset.decode_options`), the dataset class and its
``DECODE_VERSION``, and this module's format version. A mismatch rebuilds the cache, with a log
line that says so. Builders take an exclusive lock (``fcntl.flock``), build into a temporary
folder and rename it into place, so concurrent processes (DataLoader workers, DDP ranks, two
jobs) never see a partial cache: the first builds, the others wait and then read.

Command line (builds the caches ahead of a run; a run builds missing ones at setup)::

    python -m mtl.data.cache --dataset nyud --root data/NYUDv2
    python -m mtl.data.cache --dataset pascal_context --root data/PASCALContext --splits train
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mtl.data.base import BadSampleError

if TYPE_CHECKING:
    from mtl.data.base import FolderDataset

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: normals packed in one uint32 per pixel
"""Format version of the cache; part of the fingerprint."""
ALIGN = 64
DEFAULT_SUBDIR = ".mtl_cache"


def default_cache_dir(root: Path) -> Path:
    """The cache folder used when ``data.cache_dir`` is unset: ``<dataset root>/.mtl_cache``."""
    return Path(root) / DEFAULT_SUBDIR


def _stat(path: Path, root: Path) -> list:
    try:
        st = path.stat()
    except FileNotFoundError:
        return [str(path.relative_to(root)), None, None]
    return [str(path.relative_to(root)), st.st_size, st.st_mtime_ns]


def fingerprint(dataset: FolderDataset) -> str:
    """SHA-256 of the split's files (names, sizes, mtimes) and of the decode options."""
    root = dataset.root
    record = {
        "version": CACHE_VERSION,
        "class": f"{type(dataset).__module__}.{type(dataset).__qualname__}",
        "decode_version": type(dataset).DECODE_VERSION,
        "split": dataset.split,
        "tasks": list(dataset.tasks),
        "options": dataset.decode_options(),
        "split_file": _stat(dataset.split_path, root),
        "files": [[sid, *(_stat(p, root) for p in dataset.files(sid))] for sid in dataset.ids],
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def slot_name(dataset: FolderDataset) -> str:
    """``<KEY>-<split>-<hash of the task list>``: one cache per dataset, split and task set."""
    tasks = hashlib.sha256(",".join(dataset.tasks).encode()).hexdigest()[:8]
    return f"{dataset.KEY}-{dataset.split}-{tasks}"


# ---- array codecs ----------------------------------------------------------------------------


NORMALS_BITS = 10
"""Bits per component of a packed normals code (``x | y << 10 | z << 20``, in a uint32)."""
NORMALS_INVALID = 256
"""The component code of an invalid pixel (vector 0)."""
NORMALS_FLIP = 257
"""Added to the x code of a horizontally flipped map: the second half of :data:`NORMALS_LUT` holds
the negated values (``-v``, as the flip negates x; an invalid pixel's x becomes ``-0.0`` as there)."""


def _normals_lut() -> np.ndarray:
    # the expression of mtl.data.base.decode_normals, so that the values agree to the last bit
    lut = np.zeros(NORMALS_INVALID + 1, dtype=np.float32)  # code 256: an invalid pixel (vector 0)
    lut[:256] = np.arange(256).astype(np.float32) * np.float32(2) / np.float32(255) - np.float32(1)
    return np.concatenate([lut, np.negative(lut)])


NORMALS_LUT = _normals_lut()
"""Component code → value: codes 0..256 as stored, 257..513 the same negated (:data:`NORMALS_FLIP`)."""
NORMALS_PAD_CODE = NORMALS_INVALID * (1 + (1 << NORMALS_BITS) + (1 << 2 * NORMALS_BITS))
"""The packed code of an invalid pixel (all three components 256), what padding fills."""


def decode_normals(packed: np.ndarray) -> np.ndarray:
    """Packed codes (..., uint32 or int32) → float32 normals (..., 3)."""
    mask = (1 << NORMALS_BITS) - 1
    out = np.empty((*packed.shape, 3), dtype=np.float32)
    for k in range(3):
        out[..., k] = NORMALS_LUT.take((packed >> (NORMALS_BITS * k)) & mask)
    return out


def _encode_normals_code(n: np.ndarray) -> np.ndarray | None:
    """The packed uint32 code of decoded 8-bit normals (stored values, 256 = invalid), or ``None`` if
    it would not round-trip bit for bit."""
    if n.dtype != np.float32 or n.ndim != 3 or n.shape[2] != 3:
        return None
    code = np.rint((n.astype(np.float64) + 1.0) * 127.5).clip(0, 255).astype(np.uint32)
    invalid = (n[..., 0] == 0) & (n[..., 1] == 0) & (n[..., 2] == 0)
    code[invalid] = NORMALS_INVALID
    packed = code[..., 0] | (code[..., 1] << NORMALS_BITS) | (code[..., 2] << 2 * NORMALS_BITS)
    if not np.array_equal(decode_normals(packed).view(np.uint32), n.view(np.uint32)):
        return None
    return packed


def _encode(key: str, value: np.ndarray) -> tuple[str, np.ndarray]:
    if key == "normals":
        code = _encode_normals_code(value)
        if code is not None:
            return "normals_packed", code
    return "raw", np.ascontiguousarray(value)


@dataclass(frozen=True)
class CodedMap:
    """Normals served as their packed 8-bit codes (:func:`decode_normals` of ``code`` is the map).

    :class:`~mtl.data.fast_augment.FastTrainAugment` gathers the crop window's codes (one 4-byte
    element per pixel: ~5× faster to gather than three 2-byte ones) and decodes only those, in the
    worker or, on the device path, on the accelerator (decoding is elementwise: the same bits).

    Attributes:
        code: (H, W) uint32 packed codes ``x | y << 10 | z << 20``; read-only when served from the
            cache; an x code of 257..513 is a flipped pixel's (:data:`NORMALS_FLIP`).
    """

    code: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.code.shape, 3)

    def decode(self) -> np.ndarray:
        """The decoded (H, W, 3) float32 map (a fresh array)."""
        return decode_normals(self.code)

    def flipped(self) -> CodedMap:
        """The codes of the map with x negated (a fresh array; the codes must be unflipped)."""
        return CodedMap(self.code + np.uint32(NORMALS_FLIP))


def _decode(codec: str, arr: np.ndarray, views: bool) -> np.ndarray | CodedMap:
    if codec == "normals_packed":
        return CodedMap(arr) if views else decode_normals(arr)
    return arr if views else arr.copy()


# ---- reading -----------------------------------------------------------------------------------


class SampleCache:
    """Read access to one built cache folder (opened lazily in each process).

    Args:
        folder: the cache folder (holding ``manifest.json`` and ``data.bin``).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        manifest = json.loads((self.folder / "manifest.json").read_text())
        self.fingerprint: str = manifest["fingerprint"]
        self.index: dict[str, dict] = {s["id"]: s for s in manifest["samples"]}
        self._data: np.memmap | None = None

    def __getstate__(self) -> dict:  # workers re-open the map: never pickle its pages
        return {**self.__dict__, "_data": None}

    def _map(self) -> np.memmap:
        if self._data is None:
            path = self.folder / "data.bin"
            self._data = (
                np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else np.zeros(0, np.uint8)
            )
        return self._data

    def read(self, sample_id: str, *, views: bool = False) -> dict:
        """The sample as :meth:`FolderDataset.load` returns it (fresh, writable arrays).

        Args:
            sample_id: the id.
            views: serve read-only views of the mapped file instead of copies, and coded maps as
                :class:`CodedMap` (for :class:`~mtl.data.fast_augment.FastTrainAugment`, which only
                reads its inputs and gathers what it keeps).

        Raises:
            BadSampleError: the sample could not be decoded when the cache was built (the
                loader's error, recorded then).
            KeyError: the id is not in the cache.
        """
        entry = self.index[sample_id]
        if "error" in entry:
            path, reason = entry["error"]
            raise BadSampleError(sample_id, path, reason)
        data = self._map()
        sample: dict[str, Any] = {}
        for key, (codec, dtype, shape, offset) in entry["arrays"].items():
            dt = np.dtype(dtype)
            count = int(np.prod(shape)) * dt.itemsize
            view = np.frombuffer(data, dtype=dt, count=count // dt.itemsize, offset=offset).reshape(shape)
            sample[key] = _decode(codec, view, views)
        sample["meta"] = {k: tuple(v) if isinstance(v, list) else v for k, v in entry["meta"].items()}
        return sample


# ---- building ----------------------------------------------------------------------------------


def _jsonable_meta(meta: dict) -> dict:
    out = {}
    for k, v in meta.items():
        if isinstance(v, tuple):
            v = [int(x) if isinstance(x, np.integer) else x for x in v]
        out[k] = v
    return out


def _write(dataset: FolderDataset, folder: Path, fp: str) -> None:
    """Decodes every sample of ``dataset`` into ``folder`` (data.bin, then manifest.json)."""
    samples, offset, start = [], 0, time.perf_counter()
    with open(folder / "data.bin", "wb") as f:
        for i, sid in enumerate(dataset.ids):
            try:
                raw = dataset.load(sid)
            except BadSampleError as bad:
                samples.append({"id": sid, "error": [str(bad.path), bad.reason]})
                continue
            arrays = {}
            for key, value in raw.items():
                if key == "meta":
                    continue
                codec, arr = _encode(key, np.asarray(value))
                pad = -offset % ALIGN
                f.write(b"\0" * pad)
                offset += pad
                arrays[key] = [codec, arr.dtype.str, list(arr.shape), offset]
                f.write(arr.tobytes())
                offset += arr.nbytes
            samples.append({"id": sid, "arrays": arrays, "meta": _jsonable_meta(raw.get("meta", {}))})
            if (i + 1) % 500 == 0:
                log.info("cache %s: %d / %d samples", folder.name, i + 1, len(dataset.ids))
        f.flush()
        os.fsync(f.fileno())
    manifest = {
        "version": CACHE_VERSION,
        "fingerprint": fp,
        "dataset": type(dataset).__qualname__,
        "root": str(dataset.root),
        "split": dataset.split,
        "tasks": list(dataset.tasks),
        "options": dataset.decode_options(),
        "bytes": offset,
        "build_seconds": round(time.perf_counter() - start, 1),
        "samples": samples,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _valid(folder: Path, fp: str) -> bool:
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return manifest.get("fingerprint") == fp and manifest.get("version") == CACHE_VERSION


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def open_cache(
    dataset: FolderDataset, cache_dir: str | Path | None = None, *, build: bool = True
) -> SampleCache:
    """The cache of ``dataset``'s split, built (or rebuilt when stale) if needed.

    Args:
        dataset: an on-disk dataset (its root, split, tasks and decode options).
        cache_dir: where caches live (``data.cache_dir``); default ``<root>/.mtl_cache``.
        build: build a missing or stale cache (else raise).

    Raises:
        PermissionError: ``cache_dir`` cannot be written; the message names ``data.cache_dir``.
        FileNotFoundError: no valid cache and ``build`` is false.
    """
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir(dataset.root)
    folder = base / slot_name(dataset)
    fp = fingerprint(dataset)
    if _valid(folder, fp):
        return SampleCache(folder)
    if not build:
        raise FileNotFoundError(f"no valid sample cache at {folder}: run `python -m mtl.data.cache`")
    try:
        base.mkdir(parents=True, exist_ok=True)
        lock = base / f"{folder.name}.lock"
        lock.touch()
    except OSError as err:
        raise PermissionError(
            f"data.cache_dir: cannot write the sample cache under {base} ({err}); set data.cache_dir to a "
            "writable folder (e.g. on local disk) or data.cache=false"
        ) from err
    with _lock(lock):
        if _valid(folder, fp):  # another process built it while we waited
            return SampleCache(folder)
        if folder.exists():
            log.info(
                "sample cache %s is stale (files or decode options changed since it was built): rebuilding",
                folder,
            )
        else:
            log.info(
                "building the sample cache of %s %s (%d samples) at %s",
                type(dataset).__name__, dataset.split, len(dataset.ids), folder,
            )  # fmt: skip
        tmp = base / f".{folder.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            _write(dataset, tmp, fp)
            if folder.exists():
                stale = base / f".{folder.name}.stale-{os.getpid()}"
                folder.rename(stale)  # readers that mapped it keep their (unlinked) pages
                shutil.rmtree(stale, ignore_errors=True)
            tmp.rename(folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return SampleCache(folder)


def main(argv: list[str] | None = None) -> None:
    """``python -m mtl.data.cache``: builds (or checks) the sample caches of a dataset root."""
    from mtl.data.base import FolderDataset, resolve_dataset_class

    parser = argparse.ArgumentParser(description="Builds the decoded-sample cache of an on-disk dataset.")
    parser.add_argument("--dataset", required=True, help="nyud or pascal_context (or a dotted class path)")
    parser.add_argument("--root", required=True, help="the dataset folder (data.dataset.root)")
    parser.add_argument("--splits", nargs="+", default=["train", "val"])
    parser.add_argument("--tasks", nargs="+", default=None, help="default: all the dataset's tasks")
    parser.add_argument("--cache-dir", default=None, help="data.cache_dir (default: <root>/.mtl_cache)")
    parser.add_argument("--ignore-black-normals", action="store_true", help="the loaders' decode option")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cls = resolve_dataset_class(args.dataset)
    if cls is None or not issubclass(cls, FolderDataset):
        parser.error(f"--dataset {args.dataset!r} is not an on-disk dataset (nyud, pascal_context)")
    for split in args.splits:
        ds = cls(
            root=args.root, split=split, tasks=args.tasks, ignore_black_normals=args.ignore_black_normals
        )
        start = time.perf_counter()
        cache = open_cache(ds, args.cache_dir)
        size = (cache.folder / "data.bin").stat().st_size
        took = time.perf_counter() - start
        print(f"{split}: {cache.folder} ({len(ds)} samples, {size / 2**30:.2f} GiB, {took:.1f} s)")


if __name__ == "__main__":
    main()
