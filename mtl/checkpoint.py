"""Atomic checkpoint writing (a crash during a save never corrupts the last good checkpoint), the
one checkpoint reader of the project (:func:`read_checkpoint`: ``weights_only`` loading, errors that
name the file and say what is wrong with it), and the random states of every rank: saved in each
checkpoint, restored on resume (also on another number of ranks or GPUs, with a warning), and a
stream of its own for every DDP rank."""

from __future__ import annotations

import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

#: the first bytes of a ``torch.save`` file (a zip archive since PyTorch 1.6)
_ZIP_MAGIC = b"PK\x03\x04"


class CheckpointReadError(ValueError):
    """A checkpoint file that cannot be read: truncated, not a PyTorch checkpoint, or holding Python
    objects that ``weights_only`` loading refuses. The message names the file and what to do."""


def _other_checkpoints(path: Path) -> str:
    others = sorted(
        (p for p in path.parent.glob("*.ckpt") if p.name != path.name and p.is_file()),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    if not others:
        return (
            f"resume from another checkpoint of the run (ckpt_path=<run>/checkpoints/best.ckpt) or an "
            f"earlier copy of {path.name}"
        )
    names = ", ".join(p.name for p in others[:4])
    return f"other checkpoints in {path.parent}: {names}; resume from one, e.g. ckpt_path={others[0]}"


def read_checkpoint(
    path: str | os.PathLike,
    *,
    mmap: bool = True,
    weights_only: bool = True,
    map_location: str | torch.device | Callable | None = "cpu",
    expected: str = "a checkpoint written by train.py or merge.py",
) -> dict[str, Any]:
    """Every checkpoint load of the project goes through here (eval, merge, resume, ``InitWeights``).

    Loads with ``torch.load(weights_only=True)``: only tensors and plain Python types (dict, list,
    str, numbers) are unpickled, so a downloaded file cannot run code. The checkpoints ``train.py``
    and ``merge.py`` write hold nothing else (random states are saved as tensors and numbers, the
    run's config as plain containers, no ``hyper_parameters`` objects) and always load this way.
    Files holding other Python objects (e.g. a Lightning checkpoint of another project whose
    ``hyper_parameters`` are an OmegaConf ``DictConfig``) are refused with a
    :class:`CheckpointReadError` naming the object; ``weights_only=False`` loads them, for files
    from a trusted source only (``eval.py ckpt_trusted=true``).

    Args:
        path: the file.
        mmap: memory-map the tensors (they stay in the file until read; zip-format files only,
            older formats load fully).
        weights_only: ``False`` unpickles arbitrary objects (trusted files only).
        map_location: as ``torch.load``.
        expected: what the file should be, for the error messages.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        CheckpointReadError: the file is truncated or corrupt, is not a PyTorch checkpoint, holds
            objects ``weights_only`` refuses, or does not hold a dict.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist (expected {expected})")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4)
    is_zip = head == _ZIP_MAGIC
    if is_zip and not zipfile.is_zipfile(path):
        raise CheckpointReadError(
            f"checkpoint '{path}' is truncated or corrupt ({size} bytes, a zip archive without its end): it "
            "was cut short while being written (a process killed during the save by a version without "
            f"atomic saves, a full disk) or copied partially. {_other_checkpoints(path)}"
        )
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=weights_only, mmap=mmap and is_zip)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        if found is None:  # not a pickle of objects: garbage, another format
            raise _not_a_checkpoint(path, size, head, expected, err) from err
        raise CheckpointReadError(
            f"checkpoint '{path}' holds Python objects besides tensors and plain types (e.g. "
            f"{found.group(1)}); they are "
            "loaded only with weights_only=False, which runs code from the file: do that only for a file "
            "from a trusted source (eval.py: ckpt_trusted=true). Checkpoints of train.py and merge.py "
            "never need it"
        ) from err
    except (RuntimeError, EOFError, KeyError, ValueError, OSError, zipfile.BadZipFile) as err:
        if is_zip:
            raise CheckpointReadError(
                f"checkpoint '{path}' is corrupt ({size} bytes; torch: {str(err).splitlines()[0][:200]}). "
                f"{_other_checkpoints(path)}"
            ) from err
        raise _not_a_checkpoint(path, size, head, expected, err) from err
    if not isinstance(ckpt, dict):
        raise CheckpointReadError(
            f"'{path}' holds a {type(ckpt).__name__}, expected {expected} (a dict with a 'state_dict')"
        )
    return ckpt


def _not_a_checkpoint(
    path: Path, size: int, head: bytes, expected: str, err: Exception
) -> CheckpointReadError:
    kind = "an empty file" if size == 0 else f"{size} bytes starting with {head!r}"
    return CheckpointReadError(
        f"'{path}' is not a PyTorch checkpoint ({kind}; torch: {type(err).__name__}: "
        f"{str(err).splitlines()[0][:120] if str(err) else '-'}): expected {expected} (a torch.save file, "
        "e.g. <run>/checkpoints/last.ckpt or best.ckpt)"
    )


def checkpoint_step(path: str | os.PathLike) -> int:
    """The ``global_step`` of a checkpoint (a memory-mapped read: cheap for any size); 0 if absent.

    Also checks the file before anything is built (:func:`read_checkpoint`'s errors).
    """
    return int(read_checkpoint(path, mmap=True).get("global_step", 0))


class NonFiniteCheckpointError(RuntimeError):
    """A checkpoint whose weights or optimiser state hold NaN/inf: it is not written (it could not be
    resumed), and the file it would have replaced is kept."""


def nonfinite_entries(checkpoint: dict[str, Any]) -> list[str]:
    """Names of the floating-point tensors of ``state_dict`` and of the optimiser states that hold
    NaN or inf (one host read per device: checkpoints are rare, this is not a per-step cost)."""
    named: list[tuple[str, torch.Tensor]] = [
        (f"state_dict.{k}", t) for k, t in checkpoint.get("state_dict", {}).items() if torch.is_tensor(t)
    ]
    for i, opt in enumerate(checkpoint.get("optimizer_states", []) or []):
        for pid, state in (opt.get("state", {}) if isinstance(opt, dict) else {}).items():
            named += [(f"optimizer_states.{i}.{pid}.{k}", t) for k, t in state.items() if torch.is_tensor(t)]
    named = [(n, t) for n, t in named if t.is_floating_point() and t.numel()]
    by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for n, t in named:
        by_device.setdefault(t.device, []).append((n, t))
    bad: list[str] = []
    for group in by_device.values():
        finite = torch.stack([torch.isfinite(t).all() for _, t in group]).tolist()
        bad += [n for (n, _), ok in zip(group, finite, strict=True) if not ok]
    return bad


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes to ``<path>.tmp``, flushes it to disk, then renames it over ``<path>``.

    ``os.replace`` is atomic on POSIX file systems, so readers see either the previous
    complete file or the new complete file. A checkpoint with non-finite weights or optimiser
    state is refused (:class:`NonFiniteCheckpointError`): it never replaces a good file.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None
    ) -> None:
        bad = nonfinite_entries(checkpoint)
        if bad:
            kept = f"the previous {path} is kept" if Path(path).is_file() else f"{path} is not written"
            raise NonFiniteCheckpointError(
                f"checkpoint not saved: {len(bad)} tensor(s) hold NaN/inf, e.g. {bad[:4]}; {kept}. The "
                "weights diverged (too high a learning rate? try a lower optimizer.lr, module.grad_clip, "
                "or trainer.precision=32)"
            )
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def load_checkpoint(
        self,
        path: str | os.PathLike,
        map_location: Callable | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """Lightning's resume and ``trainer.test(ckpt_path=…)`` read through :func:`read_checkpoint`
        (``weights_only`` unless the caller passes ``False``; the tensors are loaded, not mapped)."""
        return read_checkpoint(
            path, mmap=False, weights_only=weights_only is not False, map_location=map_location
        )


# ------------------------------------------------------------------------------ RNG states
def rng_state() -> dict[str, Any]:
    """This process's torch (CPU and CUDA), NumPy and Python random states, as tensors and numbers.

    Plain types only, so that checkpoints still load with ``torch.load(weights_only=True)``.
    """
    import random

    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {
            "version": int(version),
            "state": torch.tensor(py_state, dtype=torch.int64),
            "gauss": py_gauss,
        },
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores what :func:`rng_state` captured.

    CUDA generators are restored for the devices both the saving and this process see: a
    checkpoint written where more (or fewer) GPUs were visible restores the first ones and
    warns; one written without CUDA leaves the CUDA generators as they are.
    """
    import random

    import numpy as np

    torch.set_rng_state(state["torch"].cpu())
    cuda = list(state["cuda"])
    if cuda and torch.cuda.is_available():
        n = torch.cuda.device_count()
        if len(cuda) != n:
            warnings.warn(
                f"the checkpoint holds the CUDA random states of {len(cuda)} device(s), this process sees "
                f"{n}: the states of devices 0-{min(len(cuda), n) - 1} are restored, the random stream of "
                "the resumed run differs from an uninterrupted one",
                stacklevel=2,
            )
        for i, cuda_state in enumerate(cuda[:n]):
            torch.cuda.set_rng_state(cuda_state.cpu(), device=i)
    npst = state["numpy"]
    keys = npst["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, npst["pos"], npst["has_gauss"], npst["gauss"]))
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))


def _dist_rank_world() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def seed_rank_rng(rank: int, seed: int | None = None) -> None:
    """Gives DDP rank ``rank`` a random stream of its own (dropout, stochastic depth, router noise).

    Every rank starts from the run's seed, so without this all ranks draw the same dropout masks
    and M³ViT gate noise. Rank 0 keeps its stream (a one-process run is unchanged); rank ``r > 0``
    reseeds torch (CPU and every CUDA device), NumPy and Python from ``SeedSequence([seed, r])``:
    different per rank, reproducible, and unrelated to the streams of runs with other seeds.
    Data order and augmentation do not use these generators (:mod:`mtl.data.resumable` seeds
    them from the data seed, the epoch and the sample).

    Args:
        rank: the global rank.
        seed: the run's seed (default: ``torch.initial_seed()``, which ``seed_everything`` sets).
    """
    import random

    import numpy as np

    if rank == 0:
        return
    base = torch.initial_seed() if seed is None else int(seed)
    words = np.random.SeedSequence([base, int(rank)]).generate_state(4, dtype=np.uint32)
    torch.manual_seed(int(words[0]) << 32 | int(words[1]))  # CPU and every CUDA device
    np.random.seed(words)
    random.seed(int(words[2]) << 32 | int(words[3]))


def gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's :func:`rng_state` (one entry without ``torch.distributed``)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return [rng_state()]
    states: list = [None] * dist.get_world_size()
    dist.all_gather_object(states, rng_state())
    return states


def restore_rank_rng_state(
    states: list[dict[str, Any]], *, rank: int | None = None, world_size: int | None = None
) -> None:
    """Restores this rank's entry of :func:`gather_rng_states`.

    A run resumed on another number of ranks than it was saved with restores what applies and
    warns: rank ``r`` continues the saved stream of rank ``r`` if the checkpoint has one, and the
    ranks beyond get their own fresh stream (:func:`seed_rank_rng`), never a copy of another
    rank's.

    Args:
        states: the checkpoint's ``rng_states`` (one per saving rank).
        rank, world_size: this process's (default: from ``torch.distributed``, else 0 and 1).
    """
    dist_rank, dist_world = _dist_rank_world()
    rank = dist_rank if rank is None else int(rank)
    world_size = dist_world if world_size is None else int(world_size)
    if len(states) != world_size and rank == 0:
        warnings.warn(
            f"the checkpoint holds the random states of {len(states)} rank(s), this run has {world_size}: "
            f"ranks 0-{min(len(states), world_size) - 1} continue their saved streams"
            + (f", ranks {len(states)}-{world_size - 1} start fresh ones" if world_size > len(states) else "")
            + "; the resumed run is not a replay of an uninterrupted one",
            stacklevel=2,
        )
    if rank < len(states):
        set_rng_state(states[rank])
    else:
        seed_rank_rng(rank)
