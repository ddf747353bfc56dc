"""Initial weights of a run: their identity (a fingerprint kept in checkpoints) and loading them.

Merging methods assume the models were fine-tuned from the *same* initialisation θ0 (Ilharco et
al., "Editing Models with Task Arithmetic", ICLR 2023): task vectors τ_t = θ_t − θ0 are only
comparable then. The training callback :class:`~mtl.callbacks.InitFingerprint` (in
``configs/callbacks/default.yaml``) hashes every weight at the start of training with
:func:`state_fingerprint` and saves the hashes in the checkpoint, so ``merge.py`` can check
(:func:`stored_fingerprint`, :func:`first_mismatch`) that all checkpoints started from the same
θ0 and that the θ0 it merges against (rebuilt from the training config, or ``base_ckpt=``) is
that initialisation.

A run may start from another run's weights (the shared pretrained initialisation of merging):
the callback :class:`~mtl.callbacks.InitWeights` loads them with :func:`load_init_weights`, and
``merge.py`` finds its checkpoint in a run's config with :func:`init_weights_paths` to rebuild θ0.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mtl.checkpoint import read_checkpoint

#: the fingerprint callback's key in ``checkpoint["callbacks"]`` (Lightning uses the class name)
STATE_KEY = "InitFingerprint"


def tensor_digest(t: torch.Tensor) -> str:
    """A short sha256 of a tensor's shape, dtype and values (exact, platform-independent for CPU)."""
    t = t.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{tuple(t.shape)}|{t.dtype}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:20]


def state_fingerprint(state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """``key → digest`` of every tensor of a state dict."""
    return {k: tensor_digest(v) for k, v in state.items() if torch.is_tensor(v)}


def first_mismatch(a: Mapping[str, str], b: Mapping[str, str], keys: list[str]) -> str | None:
    """The first of ``keys`` whose digest differs (or is missing) between ``a`` and ``b``."""
    return next((k for k in keys if a.get(k) is None or a.get(k) != b.get(k)), None)


def stored_fingerprint(checkpoint: Mapping[str, Any]) -> dict[str, str] | None:
    """The fingerprint :class:`~mtl.callbacks.InitFingerprint` stored in a checkpoint, or ``None``."""
    for key, value in (checkpoint.get("callbacks") or {}).items():
        if str(key).startswith(STATE_KEY) and isinstance(value, Mapping) and value.get("fingerprint"):
            return dict(value["fingerprint"])
    merged = checkpoint.get("merge") or {}
    return dict(merged["init_fingerprint"]) if merged.get("init_fingerprint") else None


def load_init_weights(module: torch.nn.Module, path: str | Path) -> tuple[list[str], list[str]]:
    """Copies every tensor of ``path`` whose key and shape match ``module.state_dict()``.

    Args:
        module: the :class:`~mtl.module.MTLModule` (keys ``model.…``).
        path: a Lightning checkpoint of ``train.py`` or a plain state dict with the same keys.

    Returns:
        The keys loaded and the module's keys left at their initialisation.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: no key of the file fits the module.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"init_weights path '{path}' does not exist")
    ckpt = read_checkpoint(path, mmap=True, expected="a checkpoint of train.py or a state dict file")
    state = ckpt["state_dict"] if isinstance(ckpt.get("state_dict"), Mapping) else ckpt
    own = module.state_dict()
    fits = {k: v for k, v in state.items() if k in own and torch.is_tensor(v) and v.shape == own[k].shape}
    if not fits:
        raise ValueError(f"init_weights: no tensor of '{path}' matches the model's keys and shapes")
    module.load_state_dict(fits, strict=False)
    return sorted(fits), sorted(k for k in own if k not in fits)


def init_weights_paths(callbacks: Mapping | None) -> list[str]:
    """The ``path`` of every :class:`~mtl.callbacks.InitWeights` entry of a ``callbacks`` config node.

    Entries are recognised by their ``_target_``'s class name, so configs saved before the callback
    moved (``mtl.merging.init_weights.InitWeights``) still count.
    """
    return [
        str(c["path"])
        for c in (callbacks or {}).values()
        if isinstance(c, Mapping) and str(c.get("_target_", "")).endswith("InitWeights")
    ]
