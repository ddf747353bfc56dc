"""Loading and verifying the checkpoints to merge; the merged model's skeleton and key ownership.

Checkpoints are opened with ``torch.load(mmap=True)``: tensors stay in the file until a merge
reads them, so opening T checkpoints costs no memory and every method can read one parameter of
every model at a time (see :mod:`mtl.merging.base`).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from mtl.checkpoint import read_checkpoint
from mtl.initial_weights import stored_fingerprint

log = logging.getLogger(__name__)


@dataclass
class Run:
    """One checkpoint to merge.

    Attributes:
        path: the checkpoint file.
        cfg: the composed config it was trained with.
        tasks: its tasks (``cfg.data.tasks``).
        state: its ``state_dict`` (memory-mapped tensors, keys ``model.…``).
        fingerprint: digests of its initial weights (:mod:`mtl.initial_weights`), if stored.
    """

    path: Path
    cfg: DictConfig
    tasks: list[str]
    state: Mapping[str, torch.Tensor]
    fingerprint: dict[str, str] | None = field(default=None, repr=False)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint, memory-mapped (older formats load fully), with ``weights_only=True``: files from
    elsewhere (``base_ckpt``) cannot run code; see :func:`mtl.checkpoint.read_checkpoint` (its
    errors name the file: missing, truncated, not a checkpoint, other Python objects inside)."""
    return read_checkpoint(path, mmap=True, expected="a checkpoint of train.py or a state dict file")


def checkpoint_config(path: Path, checkpoint: Mapping[str, Any]) -> DictConfig:
    """The composed training config of a checkpoint.

    Looked up in order: ``checkpoint["config"]`` (merged checkpoints), a ``hyper_parameters``
    entry holding the config, then ``<run>/.hydra/config.yaml`` for ``<run>/checkpoints/x.ckpt``.
    """
    candidates = [checkpoint.get("config")]
    hp = checkpoint.get("hyper_parameters") or {}
    candidates += [hp, hp.get("cfg"), hp.get("config")] if isinstance(hp, Mapping) else []
    for c in candidates:
        if isinstance(c, Mapping) and "model" in c and "data" in c:
            return OmegaConf.create(dict(c))
    hydra_cfg = path.resolve().parent.parent / ".hydra" / "config.yaml"
    if hydra_cfg.is_file():
        return OmegaConf.load(hydra_cfg)
    raise FileNotFoundError(
        f"checkpoint '{path}' carries no config and '{hydra_cfg}' does not exist: merge.py needs the "
        "training config (keep the checkpoint inside its run folder <run>/checkpoints/)"
    )


def load_run(path: str | Path) -> Run:
    """Opens a checkpoint written by ``train.py`` (or ``merge.py``) with its config."""
    path = Path(path).expanduser()
    ckpt = load_checkpoint(path)
    if "state_dict" not in ckpt:
        raise ValueError(f"'{path}' is not a Lightning checkpoint of train.py: no 'state_dict' key")
    cfg = checkpoint_config(path, ckpt)
    return Run(path, cfg, list(cfg.data.tasks), ckpt["state_dict"], stored_fingerprint(ckpt))


def _first_diff(a: Any, b: Any, prefix: str) -> str | None:
    """Dotted path of the first difference between two plain containers."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            d = _first_diff(a.get(k, "<absent>"), b.get(k, "<absent>"), f"{prefix}.{k}")
            if d:
                return d
        return None
    return None if a == b else f"{prefix}: {a!r} vs {b!r}"


def _plain(cfg: DictConfig, key: str) -> Any:
    node = OmegaConf.select(cfg, key)
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def check_disjoint_tasks(runs: Sequence[Run]) -> None:
    """Raises ``ValueError`` naming both files when a task is in two checkpoints (or none is given);
    checked before the merged model (whose task list is the union) is built."""
    if len(runs) < 1:
        raise ValueError("ckpts: give at least one checkpoint")
    owner: dict[str, Path] = {}
    for r in runs:
        for t in r.tasks:
            if t in owner:
                raise ValueError(
                    f"task '{t}' is in two checkpoints: {owner[t]} and {r.path}; merging needs each task "
                    "from one checkpoint (give the checkpoints of disjoint task sets)"
                )
            owner[t] = r.path


def check_runs(runs: Sequence[Run], shared_keys: Sequence[str]) -> None:
    """Checks that the runs can be merged; raises ``ValueError`` naming what differs.

    * tasks: disjoint across runs;
    * architecture: every shared key (backbone and shared decoder) present with the same shape in
      every checkpoint (the first missing or mismatching key is named), and the same model config;
    * initialisation: the same stored initial-weight fingerprint on every shared key; checkpoints
      without one are compared by their backbone source (timm name, pretrained, checkpoint_path)
      and seed, with a warning.
    """
    check_disjoint_tasks(runs)
    ref = runs[0]
    for r in runs:
        for k in shared_keys:
            if k not in r.state:
                raise ValueError(f"architecture mismatch: '{k}' of {ref.path} is missing in {r.path}")
            if tuple(r.state[k].shape) != tuple(ref.state[k].shape):
                raise ValueError(
                    f"architecture mismatch at '{k}': shape {tuple(ref.state[k].shape)} in {ref.path} vs "
                    f"{tuple(r.state[k].shape)} in {r.path}"
                )
        extra = sorted(k for k in r.state if k.startswith("model.backbone.") and k not in ref.state)
        if extra:
            raise ValueError(f"architecture mismatch: '{extra[0]}' of {r.path} is not in {ref.path}")
        for key in ("model", "data.input_size"):
            diff = _first_diff(_plain(ref.cfg, key), _plain(r.cfg, key), key)
            if diff:
                raise ValueError(f"model configs differ between {ref.path} and {r.path}: {diff}")
    check_same_init(runs, shared_keys)


def backbone_source(cfg: DictConfig) -> dict[str, Any]:
    """Where the backbone's initial weights come from: timm name, pretrained flag, checkpoint file."""
    from mtl.initial_weights import init_weights_paths

    bb = cfg.model.get("backbone") or {}
    ckpt = bb.get("checkpoint_path")
    init = [str(Path(p).expanduser().resolve()) for p in init_weights_paths(cfg.get("callbacks"))]
    return {
        "name": bb.get("name"),
        "pretrained": bool(bb.get("pretrained")) or ckpt is not None or bool(init),
        "checkpoint_path": str(Path(ckpt).expanduser().resolve()) if ckpt else None,
        "init_weights": init,
    }


def check_same_init(runs: Sequence[Run], shared_keys: Sequence[str]) -> None:
    """Same initialisation: stored fingerprints, else backbone source and seed (with a warning)."""
    ref = runs[0]
    with_fp = [r for r in runs if r.fingerprint]
    for r in with_fp[1:]:
        bad = next((k for k in shared_keys if r.fingerprint.get(k) != with_fp[0].fingerprint.get(k)), None)
        if bad:
            raise ValueError(
                f"different initialisation: initial '{bad}' of {r.path} differs from {with_fp[0].path} "
                "(merging needs models fine-tuned from the same pretrained weights)"
            )
    if len(with_fp) == len(runs):
        return
    for r in runs[1:]:
        a, b = backbone_source(ref.cfg), backbone_source(r.cfg)
        if a != b or ref.cfg.get("seed") != r.cfg.get("seed"):
            raise ValueError(
                f"different initialisation: {ref.path} starts from {a} (seed {ref.cfg.get('seed')}), "
                f"{r.path} from {b} (seed {r.cfg.get('seed')})"
            )
    warnings.warn(
        "some checkpoints store no initial-weight fingerprint (trained without the InitFingerprint "
        "callback): same initialisation checked on the backbone source and seed only",
        stacklevel=2,
    )


def key_owners(module: torch.nn.Module) -> tuple[list[str], dict[str, str]]:
    """Splits an :class:`~mtl.module.MTLModule`'s ``model.*`` state keys into shared and per-task.

    Returns:
        The shared keys (backbone, shared decoder: what is merged) and ``key → task`` for the
        task-specific ones (the task's decoder branch, head and backbone adapters). A buffer
        belongs to whoever owns its module's parameters.
    """
    model = module.model
    names = {id(p): f"model.{n}" for n, p in model.named_parameters()}
    owner: dict[str, str] = {}
    prefixes: dict[str, str] = {}
    for t in model.tasks:
        for p in model.task_parameters(t):
            owner[names[id(p)]] = t
            prefixes[names[id(p)].rsplit(".", 1)[0]] = t
    shared = []
    for k in module.state_dict():
        if not k.startswith("model.") or k in owner:
            continue
        if k.rsplit(".", 1)[0] in prefixes:
            owner[k] = prefixes[k.rsplit(".", 1)[0]]
        else:
            shared.append(k)
    return shared, owner


def normalise_base_state(
    state: Mapping[str, torch.Tensor], targets: Sequence[str]
) -> dict[str, torch.Tensor]:
    """Keys of a ``base_ckpt`` state dict mapped onto the module's ``model.…`` keys.

    Accepts a Lightning checkpoint's ``state_dict`` (``model.…``), a model state dict
    (``backbone.…``) or a timm backbone file (the format of ``model.backbone.checkpoint_path``).
    """
    targets = set(targets)
    for prefix in ("", "model.", "model.backbone.model."):
        out = {prefix + k: v for k, v in state.items() if torch.is_tensor(v) and prefix + k in targets}
        if out:
            return out
    sample = list(state)[:3]
    raise ValueError(f"base_ckpt: none of its keys (e.g. {sample}) names a weight of the model")
