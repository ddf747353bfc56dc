"""Lightning callbacks of the framework (a peer of :mod:`mtl.module`, the only Lightning layer)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn

from mtl.contracts import ModelOutput
from mtl.initial_weights import load_init_weights, pretrained_source, state_fingerprint
from mtl.pretrain import missing_pretrained_message
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
    """Loads matching weights from another run's checkpoint, or a pretrained backbone, before fitting starts.

    Task arithmetic (Ilharco et al., ICLR 2023) and its successors merge models *fine-tuned from
    one pretrained model*. ``model.backbone.checkpoint_path`` shares the backbone only; this shares
    every weight whose name and shape match (backbone, the decoder's shared part, and any task
    branch or head of the same name), e.g. from a multi-task checkpoint::

        python train.py experiment=synthetic_single_task task=depth \\
            +callbacks.init_weights._target_=mtl.callbacks.InitWeights \\
            +callbacks.init_weights.path=logs/pretrain/checkpoints/last.ckpt

    With ``pretrained`` instead (what ``pretrained=synthetic`` configures, configs/pretrained/), it
    loads the cached ``python -m mtl.pretrain`` checkpoint of the model's backbone and that recipe
    (:func:`~mtl.initial_weights.pretrained_source`), after checking its recipe, fingerprint and
    shapes; a missing one is an error that prints the command that makes it.

    The weights are loaded in ``setup`` (before :class:`InitFingerprint` hashes θ0 at fit start);
    a resumed run then restores its own checkpoint over them.

    Args:
        path: the checkpoint (see :func:`~mtl.initial_weights.load_init_weights`).
        pretrained: ``{backbone: <model.backbone config>, recipe: <pretraining recipe>, cache_dir}``.
    """

    def __init__(self, *, path: str | None = None, pretrained: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        if (path is None) == (pretrained is None):
            raise ValueError(
                "InitWeights: give either path=<checkpoint> or pretrained=<spec> "
                "(configs/pretrained/synthetic.yaml)"
            )
        self.path = None if path is None else str(path)
        self.pretrained = pretrained

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        expected = None
        path = self.path
        if self.pretrained is not None:
            source, expected = pretrained_source(self.pretrained)
            if not source.is_file():
                raise FileNotFoundError(missing_pretrained_message(source, expected))
            path = str(source)
        loaded, kept = load_init_weights(pl_module, path, expected=expected)
        log.info("init_weights: %d tensors from %s; %d left at their initialisation (e.g. %s)",
                 len(loaded), path, len(kept), kept[:3])  # fmt: skip


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


class PeriodicCheckpoint(Checkpoint):
    """The one writer of ``<dirpath>/last.ckpt``: always the run's latest state, written atomically.

    Written every ``every_n_steps`` optimiser steps (a crash loses at most that many), after every
    validation of the fit, at every training epoch's end that no validation followed, and when
    training ends; ``ckpt_path=last`` resumes from it exactly (mid-epoch included). Lightning's
    ``ModelCheckpoint`` keeps ``best.ckpt`` only (``save_last: false``): two writers of
    ``last.ckpt`` made Lightning switch to ``last-v1.ckpt`` and leave ``last.ckpt`` stale, so a
    ``ModelCheckpoint`` with ``save_last`` in the same folder is refused.

    As a :class:`~lightning.pytorch.callbacks.Checkpoint`, Lightning runs it after the other
    callbacks, and :func:`mtl.pipeline.build_trainer` puts it after ``ModelCheckpoint``, so the file
    holds the best-model bookkeeping of the validation it follows. Lightning's own
    ``every_n_train_steps`` defers saving to the next validation under manual optimisation when a
    monitored metric is missing, so the framework does not rely on it.

    Args:
        dirpath: checkpoint folder.
        every_n_steps: save period in optimiser steps (0: no periodic saves; the saves at
            validation, epoch and training ends still happen).
    """

    FILENAME = "last.ckpt"

    def __init__(self, *, dirpath: str, every_n_steps: int = 500) -> None:
        super().__init__()
        if every_n_steps < 0:
            raise ValueError(f"callbacks.periodic_checkpoint.every_n_steps must be >= 0, got {every_n_steps}")
        self.dirpath = Path(dirpath)
        self.every_n_steps = int(every_n_steps)
        self._saved_at = -1  # the step of the latest save
        self._saved_after_validation = False  # … and whether it followed a validation

    @property
    def path(self) -> Path:
        """``<dirpath>/last.ckpt``."""
        return self.dirpath / self.FILENAME

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.save_last and Path(cb.dirpath or "") == self.dirpath:
                raise ValueError(
                    f"two writers of {self.path}: ModelCheckpoint has save_last={cb.save_last!r} and "
                    "mtl.callbacks.PeriodicCheckpoint writes it too (Lightning then moves to last-v1.ckpt "
                    "and last.ckpt goes stale); set callbacks.model_checkpoint.save_last=false"
                )

    def _active(self, trainer: L.Trainer) -> bool:
        return (
            trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking and not trainer.fast_dev_run
        )

    def save(self, trainer: L.Trainer, *, after_validation: bool = False) -> Path:
        """Writes ``last.ckpt`` now (every rank calls it; rank 0 writes). The loggers are flushed
        first: the rows up to the checkpoint are on disk when it is (a resume continues from them)."""
        for logger in trainer.loggers:
            logger.save()
        trainer.save_checkpoint(self.path)
        self._saved_at, self._saved_after_validation = trainer.global_step, after_validation
        return self.path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step and step % self.every_n_steps == 0 and step != self._saved_at:
            if self._active(trainer):
                self.save(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._active(trainer):
            self.save(trainer, after_validation=True)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # the validation at the epoch's end (if any) ran before this hook and saved already
        if self._active(trainer) and not (
            self._saved_at == trainer.global_step and self._saved_after_validation
        ):
            self.save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._active(trainer) and self._saved_at != trainer.global_step:
            self.save(trainer)


def last_checkpoint_path(trainer: L.Trainer) -> Path:
    """Where ``last.ckpt`` of ``trainer``'s run is: the :class:`PeriodicCheckpoint`'s file, else
    ``<ModelCheckpoint dirpath>/last.ckpt``, else ``<default_root_dir>/checkpoints/last.ckpt``."""
    for cb in trainer.callbacks:
        if isinstance(cb, PeriodicCheckpoint):
            return cb.path
    folder = (
        trainer.checkpoint_callback.dirpath
        if isinstance(trainer.checkpoint_callback, ModelCheckpoint)
        else None
    )
    return Path(folder or Path(trainer.default_root_dir) / "checkpoints") / PeriodicCheckpoint.FILENAME


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
