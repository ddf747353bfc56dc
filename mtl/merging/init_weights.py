"""Start training from another run's weights: the shared pretrained initialisation of merging.

Task arithmetic (Ilharco et al., ICLR 2023) and its successors merge models *fine-tuned from one
pretrained model*. ``model.backbone.checkpoint_path`` shares the backbone only; the
:class:`InitWeights` callback shares every weight whose name and shape match (backbone, the
decoder's shared part, and any task branch or head of the same name), e.g. from a multi-task
checkpoint::

    python train.py experiment=synthetic_single_task task=depth \\
        +callbacks.init_weights._target_=mtl.merging.init_weights.InitWeights \\
        +callbacks.init_weights.path=logs/pretrain/checkpoints/last.ckpt

The weights are loaded in ``setup`` (before :class:`~mtl.merging.fingerprint.InitFingerprint`
hashes θ0 at fit start); a resumed run then restores its own checkpoint over them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import lightning as L
import torch

log = logging.getLogger(__name__)


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
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    state = ckpt["state_dict"] if isinstance(ckpt.get("state_dict"), Mapping) else ckpt
    own = module.state_dict()
    fits = {k: v for k, v in state.items() if k in own and torch.is_tensor(v) and v.shape == own[k].shape}
    if not fits:
        raise ValueError(f"init_weights: no tensor of '{path}' matches the model's keys and shapes")
    module.load_state_dict(fits, strict=False)
    return sorted(fits), sorted(k for k in own if k not in fits)


class InitWeights(L.Callback):
    """Loads matching weights from a checkpoint before fitting starts.

    Args:
        path: the checkpoint (see :func:`load_init_weights`).
    """

    def __init__(self, *, path: str) -> None:
        super().__init__()
        self.path = str(path)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        loaded, kept = load_init_weights(pl_module, self.path)
        log.info("init_weights: %d tensors from %s; %d left at their initialisation (e.g. %s)",
                 len(loaded), self.path, len(kept), kept[:3])  # fmt: skip


def init_weights_paths(callbacks: Mapping | None) -> list[str]:
    """The ``path`` of every :class:`InitWeights` entry of a ``callbacks`` config node."""
    return [
        str(c["path"])
        for c in (callbacks or {}).values()
        if isinstance(c, Mapping) and str(c.get("_target_", "")).endswith("InitWeights")
    ]
