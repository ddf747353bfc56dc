"""Lightning callbacks of the framework (a peer of :mod:`mtl.module`, the only Lightning layer)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch

from mtl.contracts import ModelOutput
from mtl.initial_weights import load_init_weights, state_fingerprint
from mtl.visualise import save_pictures

log = logging.getLogger(__name__)


class GateMapWriter(L.Callback):
    """Saves per-pixel gate maps of a gated decoder (TaskExpert) for the first test samples.

    Each evaluation batch's :class:`~mtl.contracts.ModelOutput` (the step's ``outputs``) carries
    the decoder's maps; :meth:`~mtl.model.MultiTaskNet.picture_maps` draws them and this writes
    ``<dirpath>/gates_<task>_<i>.png`` for the first ``n`` samples (``eval.py ... callbacks=gate_maps``).
    Models without gate maps are skipped silently.

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

    def _write(self, trainer, pl_module, outputs: ModelOutput, batch: dict) -> None:
        if self._seen >= self.n or not trainer.is_global_zero or trainer.sanity_checking:
            return
        size = tuple(batch["image"].shape[-2:])
        for i in range(min(batch["image"].shape[0], self.n - self._seen)):
            with torch.no_grad():
                maps = pl_module.model.picture_maps(outputs.maps, i, size=size)
            if not maps:
                return
            named = {f"{name}_{self._seen:03d}": img for name, img in maps.items()}
            self.written += save_pictures(named, self.dirpath)
            self._seen += 1

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if "test" in self.stages:
            self._write(trainer, pl_module, outputs, batch)

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if "val" in self.stages:
            self._write(trainer, pl_module, outputs, batch)


class InitFingerprint(L.Callback):
    """Hashes the module's weights when fitting starts and keeps the hashes in every checkpoint.

    ``merge.py`` checks with them that checkpoints share their initialisation θ0
    (:mod:`mtl.initial_weights`). A resumed run restores the hashes of its first start (they
    describe θ0, not the weights at the resume point).
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


class InitWeights(L.Callback):
    """Loads matching weights from another run's checkpoint before fitting starts.

    Task arithmetic (Ilharco et al., ICLR 2023) and its successors merge models *fine-tuned from
    one pretrained model*. ``model.backbone.checkpoint_path`` shares the backbone only; this shares
    every weight whose name and shape match (backbone, the decoder's shared part, and any task
    branch or head of the same name), e.g. from a multi-task checkpoint::

        python train.py experiment=synthetic_single_task task=depth \\
            +callbacks.init_weights._target_=mtl.callbacks.InitWeights \\
            +callbacks.init_weights.path=logs/pretrain/checkpoints/last.ckpt

    The weights are loaded in ``setup`` (before :class:`InitFingerprint` hashes θ0 at fit start);
    a resumed run then restores its own checkpoint over them.

    Args:
        path: the checkpoint (see :func:`~mtl.initial_weights.load_init_weights`).
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


class SimulatedCrash(RuntimeError):
    """Raised by :class:`CrashAt`."""


class CrashAt(L.Callback):
    """Kills the run right before optimiser step ``step`` runs, as a crash would.

    For checking that a training setup resumes exactly (the tests use it; so can a user before
    launching a week-long job): ``+callbacks.crash._target_=mtl.callbacks.CrashAt
    +callbacks.crash.step=100``, then rerun with ``ckpt_path=last``.
    """

    def __init__(self, *, step: int) -> None:
        super().__init__()
        self.step = int(step)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            raise SimulatedCrash(f"simulated crash at step {trainer.global_step} (mtl.callbacks.CrashAt)")


class PeriodicCheckpoint(L.Callback):
    """Writes ``<dirpath>/last.ckpt`` every ``every_n_steps`` optimiser steps (atomically).

    The model checkpoint callback saves at validation ends; this bounds the work a crash can
    lose in between (``ckpt_path=last`` resumes exactly, mid-epoch included). Lightning's own
    ``every_n_train_steps`` defers saving to the next validation under manual optimisation
    when a monitored metric is missing, so the framework does not rely on it.

    Args:
        dirpath: checkpoint folder.
        every_n_steps: save period in optimiser steps (0 disables).
    """

    def __init__(self, *, dirpath: str, every_n_steps: int = 500) -> None:
        super().__init__()
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0, got {every_n_steps}")
        self.dirpath = Path(dirpath)
        self.every_n_steps = int(every_n_steps)
        self._saved_at = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step and step % self.every_n_steps == 0 and step != self._saved_at:
            trainer.save_checkpoint(self.dirpath / "last.ckpt")
            self._saved_at = step


class Throughput(L.Callback):
    """Training throughput over all ranks, excluding the first ``warmup`` steps.

    Logs ``train/images_per_sec`` (batch size × world size / step time) and, at the end of
    training, writes ``<output_dir>/throughput.json`` on rank 0 (used by
    ``benchmarks/ddp_scaling.py``).

    Args:
        output_dir: where ``throughput.json`` goes (``None``: not written).
        warmup: steps left out of the average (compilation, allocator warm-up, worker start).
    """

    def __init__(self, *, output_dir: str | None = None, warmup: int = 2) -> None:
        super().__init__()
        self.output_dir = Path(output_dir) if output_dir else None
        self.warmup = int(warmup)
        self._t0: float | None = None
        self._images = 0
        self._steps = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import time

        self._steps += 1
        if self._steps == self.warmup:
            self._t0, self._images = time.perf_counter(), 0
        elif self._t0 is not None:
            self._images += batch["image"].shape[0] * trainer.world_size
            rate = self._images / max(time.perf_counter() - self._t0, 1e-9)
            # a host tensor: a float would become a device tensor (a blocking host-to-device copy)
            pl_module.log("train/images_per_sec", torch.tensor(rate), rank_zero_only=True)

    def on_train_end(self, trainer, pl_module) -> None:
        import json
        import time

        if self.output_dir is None or not trainer.is_global_zero or self._t0 is None:
            return
        seconds = time.perf_counter() - self._t0
        report = {
            "world_size": trainer.world_size,
            "images": self._images,
            "seconds": seconds,
            "images_per_sec": self._images / max(seconds, 1e-9),
            "steps_timed": self._steps - self.warmup,
        }
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / "throughput.json").write_text(json.dumps(report, indent=2))
