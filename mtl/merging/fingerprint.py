"""Identity of a model's initial weights, stored in every training checkpoint.

Merging methods assume the models were fine-tuned from the *same* initialisation θ0 (Ilharco et
al., "Editing Models with Task Arithmetic", ICLR 2023): task vectors τ_t = θ_t − θ0 are only
comparable then. :class:`InitFingerprint` (a Lightning callback, in ``configs/callbacks/default.yaml``)
hashes every weight at the start of training and saves the hashes in the checkpoint, so
``merge.py`` can check that all checkpoints started from the same θ0 and that the θ0 it merges
against (rebuilt from the training config, or ``base_ckpt=``) is that initialisation.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch

#: the callback's key in ``checkpoint["callbacks"]`` (Lightning uses the class name)
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
    """The fingerprint :class:`InitFingerprint` stored in a checkpoint, or ``None``."""
    for key, value in (checkpoint.get("callbacks") or {}).items():
        if str(key).startswith(STATE_KEY) and isinstance(value, Mapping) and value.get("fingerprint"):
            return dict(value["fingerprint"])
    merged = checkpoint.get("merge") or {}
    return dict(merged["init_fingerprint"]) if merged.get("init_fingerprint") else None


class InitFingerprint(L.Callback):
    """Hashes the module's weights when fitting starts and keeps the hashes in every checkpoint.

    A resumed run restores the hashes of its first start (they describe θ0, not the weights at
    the resume point).
    """

    def __init__(self) -> None:
        super().__init__()
        self.fingerprint: dict[str, str] | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.fingerprint is None:
            self.fingerprint = state_fingerprint(pl_module.state_dict())

    def state_dict(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.fingerprint = state_dict.get("fingerprint")
