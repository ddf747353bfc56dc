"""Lightning callbacks of the framework (a peer of :mod:`mtl.module`, the only Lightning layer)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from mtl.visualise import save_pictures


class GateMapWriter(L.Callback):
    """Saves per-pixel gate maps of a gated decoder (TaskExpert) for the first test samples.

    After each test batch the model's :meth:`~mtl.model.MultiTaskNet.visual_maps` holds that
    batch's gates; this writes ``<dirpath>/gates_<task>_<i>.png`` for the first ``n`` samples
    (``eval.py ... callbacks=gate_maps``). Models without gate maps are skipped silently.

    Args:
        dirpath: output folder.
        n: number of samples.
        stages: ``"test"`` (eval.py) and/or ``"val"`` (the last validation epoch of training).
    """

    def __init__(self, *, dirpath: str, n: int = 4, stages: tuple[str, ...] = ("test",)) -> None:
        super().__init__()
        self.dirpath = Path(dirpath)
        self.n = int(n)
        self.stages = tuple(stages)
        self.written: list[Path] = []
        self._seen = 0

    def _reset(self) -> None:
        self._seen = 0

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._reset()

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._reset()

    def _write(self, trainer, pl_module, batch: dict) -> None:
        if self._seen >= self.n or not trainer.is_global_zero or trainer.sanity_checking:
            return
        size = tuple(batch["image"].shape[-2:])
        for i in range(min(batch["image"].shape[0], self.n - self._seen)):
            with torch.no_grad():
                maps = pl_module.model.visual_maps(i, size=size)
            if not maps:
                return
            named = {f"{name}_{self._seen:03d}": img for name, img in maps.items()}
            self.written += save_pictures(named, self.dirpath)
            self._seen += 1

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if "test" in self.stages:
            self._write(trainer, pl_module, batch)

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if "val" in self.stages:
            self._write(trainer, pl_module, batch)
