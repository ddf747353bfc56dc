"""Progress reports that reach a log file: periodic training lines and a counter for long host work.

A terminal shows Lightning's progress bar; output sent to a file (SLURM, ``nohup``, ``> log``) gets
a bar's carriage-return updates at best, and Hydra's ``train.log`` gets nothing of it. Two tools:

* :class:`ProgressLog`, a Lightning callback: when standard output is not a terminal (``mode:
  auto``; ``always`` / ``never`` force it), one line every ``every_n_seconds`` seconds and/or every
  ``every_n_steps`` optimiser steps through Python logging (logger ``mtl.progress``: the console and
  Hydra's ``<run>/train.log``): epoch, optimiser step, the per-task losses the progress bar shows
  (refreshed every ``trainer.log_every_n_steps`` steps), images per second, elapsed time and ETA;
  validation and test progress (batch i/N) at a coarser interval; the headline validation metrics
  at every validation end. It reads only values already on the host (the ``<task>/loss``
  progress-bar values :class:`~mtl.module.MTLModule` copies, batch sizes, the clock): it adds no
  host–device synchronisation to a training step. Rank 0 alone writes. When it is active,
  Lightning's bar is off (:func:`progress_bar_enabled`).
* :class:`Progress`, a counter of a long host job (the exact SEISM edge evaluation, minutes in worker
  processes): a ``tqdm`` bar on a terminal, otherwise a log line every ``interval`` seconds (done /
  total, rate, elapsed, ETA). Metrics that count their own work derive from :class:`ReportsProgress`;
  :class:`ProgressLog` tells them how many images the test split holds for this process.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Iterable, Mapping, Sized
from typing import Any, Literal

import lightning as L
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

Mode = Literal["auto", "always", "never"]
MODES = ("auto", "always", "never")


def stdout_is_tty() -> bool:
    """Whether standard output is a terminal (Lightning's progress bar writes there)."""
    stream = sys.stdout
    return stream is not None and stream.isatty()


def check_mode(mode: str, key: str) -> str:
    """``mode`` if it is one of :data:`MODES`; otherwise a ``ValueError`` naming the config ``key``."""
    if mode not in MODES:
        raise ValueError(
            f"{key} = {mode!r}: expected one of {', '.join(MODES)} "
            "(auto: log lines when stdout is not a terminal)"
        )
    return mode


def logs_lines(mode: str) -> bool:
    """Whether ``mode`` reports by log lines (``always``, or ``auto`` without a terminal)."""
    return mode == "always" or (mode == "auto" and not stdout_is_tty())


def format_duration(seconds: float | None) -> str:
    """``H:MM:SS`` (``?`` when unknown or infinite)."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _process_rank() -> int:
    """This process's global rank: the process group's, else the one Lightning set (0 alone)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(rank_zero_only.rank)


class Progress:
    """Counts the items of a long host job and reports them (module docstring).

    Nothing is shown until :meth:`start` or the first :meth:`update`; ranks other than 0 never show
    anything.

    Args:
        desc: what is counted, e.g. ``"edge odsF (SEISM)"``.
        total: items expected (``None``: unknown, no ETA; :meth:`set_total` may give it later).
        mode: ``auto`` (a bar on a terminal, log lines otherwise), ``always`` (log lines) or ``never``.
        interval: seconds between two log lines.
        unit: name of the items in the lines.
        note: added to the first line (e.g. the worker count).
    """

    def __init__(
        self,
        desc: str,
        *,
        total: int | None = None,
        mode: Mode = "auto",
        interval: float = 20.0,
        unit: str = "images",
        note: str = "",
    ) -> None:
        check_mode(mode, "progress mode")
        if interval <= 0:
            raise ValueError(f"progress interval must be > 0 seconds, got {interval}")
        self.desc, self.total, self.mode = desc, total, mode
        self.interval, self.unit, self.note = float(interval), unit, note
        self.done = 0
        self._started: float | None = None
        self._last_line = 0.0
        self._bar: tqdm | None = None
        self._lines = False

    def start(self) -> None:
        """Starts the clock and shows the first line or the bar (once; :meth:`update` calls it too)."""
        if self._started is not None:
            return
        self._started = self._last_line = time.monotonic()
        if self.mode == "never" or _process_rank() != 0:
            return
        if logs_lines(self.mode):
            self._lines = True
            count = f"{self.total} {self.unit}" if self.total is not None else self.unit
            log.info("%s: evaluating %s%s", self.desc, count, self.note)
        else:
            self._bar = tqdm(total=self.total, desc=self.desc, unit="img", leave=False, dynamic_ncols=True)

    def set_total(self, total: int | None) -> None:
        """Sets the number of items expected."""
        self.total = total
        if self._bar is not None:
            self._bar.total = total
            self._bar.refresh()

    def update(self, n: int = 1) -> None:
        """Counts ``n`` more items done; writes a line when ``interval`` seconds have passed."""
        self.start()
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self._lines and time.monotonic() - self._last_line >= self.interval:
            self._last_line = time.monotonic()
            log.info("%s", self.line())

    def elapsed(self) -> float:
        """Seconds since the first update."""
        return 0.0 if self._started is None else time.monotonic() - self._started

    def eta(self) -> float | None:
        """Seconds left at the rate so far (``None`` without a total or before the first item)."""
        if self.total is None or self.done == 0:
            return None
        return self.elapsed() * max(self.total - self.done, 0) / self.done

    def line(self) -> str:
        """``<desc>: <done>/<total> <unit> (p %) | r <unit>/s | elapsed | ETA``."""
        elapsed = self.elapsed()
        if self.total:
            count = f"{self.done}/{self.total} {self.unit} ({100 * self.done / self.total:.0f}%)"
        else:
            count = f"{self.done} {self.unit}"
        rate = self.done / elapsed if elapsed > 0 else float("nan")
        return (
            f"{self.desc}: {count} | {rate:.2f} {self.unit}/s | elapsed {format_duration(elapsed)} | "
            f"ETA {format_duration(self.eta())}"
        )

    def close(self) -> None:
        """Ends the report: the bar is removed, a final line is written (when lines are on)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._lines:
            log.info(
                "%s: done, %s %s in %s", self.desc, self.done, self.unit, format_duration(self.elapsed())
            )
        self._lines = False
        self._started = None
        self.done = 0


class ReportsProgress:
    """A metric (or other part of the test stage) that reports the progress of its own work and is
    told, by :class:`ProgressLog` at the start of a test, how many images this process evaluates."""

    def expect_images(self, n: int | None) -> None:
        """The number of images this process will pass to the metric (``None``: unknown)."""
        raise NotImplementedError


def _loader_images(loader: Any, batches: float) -> int | None:
    """Images a data loader yields in ``batches`` batches (``None`` when not countable)."""
    if not math.isfinite(batches):
        return None
    size = loader.batch_size
    if size is None:
        return None
    n = int(batches) * int(size)
    sampler = loader.sampler
    return min(n, len(sampler)) if isinstance(sampler, Sized) else n


def _batch_images(batch: Any) -> int:
    """Images in a training batch (``batch["image"]``'s first dimension: host metadata, no sync)."""
    if isinstance(batch, Mapping) and isinstance(batch.get("image"), torch.Tensor):
        return int(batch["image"].shape[0])
    return 0


def _accumulation(pl_module: L.LightningModule) -> int:
    """Micro-batches per optimiser step (:class:`~mtl.module.MTLModule` accumulates itself)."""
    from mtl.module import MTLModule  # here: the module imports the metrics, which import this file

    return pl_module.accumulate if isinstance(pl_module, MTLModule) else 1


class ProgressLog(L.Callback):
    """Progress lines through Python logging, for runs whose output goes to a file (module docstring).

    Example line::

        train epoch 2/3 step 120/180 (67%) | loss semseg 1.234 depth 0.456 | 85.3 img/s |
        elapsed 0:02:10 | ETA 0:01:05

    Args:
        mode: ``auto`` (lines when standard output is not a terminal, Lightning's bar otherwise),
            ``always`` (lines, no bar) or ``never`` (nothing).
        every_n_seconds: a training line at most this often (0: no time-based lines).
        every_n_steps: a training line every this many optimiser steps (0: no step-based lines).
        eval_every_n_seconds: a validation / test line (batch i/N) at most this often (0: none;
            the headline line at every validation end is always written).

    Attributes:
        active: whether lines are written (fixed when built: ``mode`` and the terminal).
    """

    def __init__(
        self,
        *,
        mode: Mode = "auto",
        every_n_seconds: float = 60.0,
        every_n_steps: int = 0,
        eval_every_n_seconds: float = 120.0,
    ) -> None:
        super().__init__()
        self.mode = check_mode(mode, "callbacks.progress.mode")
        for key, value in (
            ("every_n_seconds", every_n_seconds),
            ("every_n_steps", every_n_steps),
            ("eval_every_n_seconds", eval_every_n_seconds),
        ):
            if value < 0:
                raise ValueError(
                    f"callbacks.progress.{key} = {value}: expected >= 0 (0 turns these lines off)"
                )
        self.every_n_seconds = float(every_n_seconds)
        self.every_n_steps = int(every_n_steps)
        self.eval_every_n_seconds = float(eval_every_n_seconds)
        self.active = logs_lines(self.mode)
        self._t0 = 0.0
        self._last_time = 0.0
        self._last_step = -1
        self._first_line = True
        self._fraction0 = 0.0
        self._images = 0  # images since the last line (all ranks)
        self._eval_time = 0.0  # validation seconds since the last line
        self._eval_t0 = 0.0
        self._eval_last = 0.0

    # --------------------------------------------------------------- helpers
    def _on(self, trainer: L.Trainer) -> bool:
        return self.active and trainer.is_global_zero

    @staticmethod
    def _totals(trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[float, float, float]:
        """Training batches per epoch, batches and optimiser steps of the whole run (``inf``: unbounded)."""
        per_epoch = float(trainer.num_training_batches)
        acc = _accumulation(pl_module)
        epochs = trainer.max_epochs if trainer.max_epochs not in (None, -1) else math.inf
        batches = per_epoch * epochs if per_epoch > 0 else math.inf
        steps = math.ceil(per_epoch / acc) * epochs if math.isfinite(batches) else math.inf
        if trainer.max_steps > 0:
            steps = min(steps, trainer.max_steps)
            batches = min(batches, trainer.max_steps * acc)
        return per_epoch, batches, steps

    def _fraction(self, trainer: L.Trainer, pl_module: L.LightningModule, batch_idx: int) -> float | None:
        """The part of the run done after batch ``batch_idx`` of the current epoch (``None``: unknown)."""
        per_epoch, batches, steps = self._totals(trainer, pl_module)
        parts = []
        if math.isfinite(batches) and batches > 0:
            parts.append((trainer.current_epoch * per_epoch + batch_idx + 1) / batches)
        if math.isfinite(steps) and steps > 0:
            parts.append(trainer.global_step / steps)
        return min(max(parts), 1.0) if parts else None

    @staticmethod
    def _losses(trainer: L.Trainer) -> str:
        """The per-task losses of the progress bar (host values: reading them syncs nothing; the module
        refreshes them every ``trainer.log_every_n_steps`` steps)."""
        stages = ("train", "val", "test")
        shown = [
            f"{k[: -len('/loss')]} {v:.4g}"
            for k, v in trainer.progress_bar_metrics.items()
            if k.endswith("/loss") and k.count("/") == 1 and k.split("/")[0] not in stages
        ]
        return "loss " + " ".join(shown) if shown else ""

    # -------------------------------------------------------------- training
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0 = self._last_time = time.monotonic()
        self._last_step, self._first_line = trainer.global_step, True
        self._images, self._eval_time = 0, 0.0
        done = self._fraction(trainer, pl_module, -1) if trainer.global_step > 0 else None  # resumed
        self._fraction0 = done or 0.0
        if not self._on(trainer):
            return
        per_epoch, _, steps = self._totals(trainer, pl_module)
        every = [f"every {self.every_n_seconds:g} s"] if self.every_n_seconds else []
        every += [f"every {self.every_n_steps} steps"] if self.every_n_steps else []
        log.info(
            "training: %s optimiser steps, %s epochs of %s batches, %d process(es); progress lines %s",
            "?" if not math.isfinite(steps) else int(steps),
            "?" if trainer.max_epochs in (None, -1) else trainer.max_epochs,
            "?" if not math.isfinite(per_epoch) else int(per_epoch),
            trainer.world_size,
            " and ".join(every) or "at validation ends only",
        )

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._on(trainer):
            return
        self._images += _batch_images(batch) * trainer.world_size
        now, step = time.monotonic(), trainer.global_step
        due = self._first_line
        due |= bool(self.every_n_seconds) and now - self._last_time >= self.every_n_seconds
        due |= bool(self.every_n_steps) and step - self._last_step >= self.every_n_steps
        if not due:
            return
        train_time = max(now - self._last_time - self._eval_time, 1e-9)
        rate = self._images / train_time
        elapsed = now - self._t0
        fraction = self._fraction(trainer, pl_module, batch_idx)
        eta = None
        if fraction is not None and fraction > self._fraction0:
            eta = elapsed * (1 - fraction) / (fraction - self._fraction0)
        _, _, steps = self._totals(trainer, pl_module)
        epochs = "?" if trainer.max_epochs in (None, -1) else trainer.max_epochs
        parts = [
            f"train epoch {trainer.current_epoch + 1}/{epochs} step {step}/"
            + ("?" if not math.isfinite(steps) else f"{int(steps)}")
            + (f" ({100 * fraction:.0f}%)" if fraction is not None else ""),
            self._losses(trainer),
            f"{rate:.1f} img/s",
            f"elapsed {format_duration(elapsed)}",
            f"ETA {format_duration(eta)}",
        ]
        log.info("%s", " | ".join(p for p in parts if p))
        self._last_time, self._last_step, self._first_line = now, step, False
        self._images, self._eval_time = 0, 0.0

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._on(trainer):
            elapsed = format_duration(time.monotonic() - self._t0)
            log.info("training done: step %d in %s", trainer.global_step, elapsed)

    # ------------------------------------------------------------ evaluation
    def _eval_start(self) -> None:
        self._eval_t0 = self._eval_last = time.monotonic()

    def _eval_batch(self, trainer: L.Trainer, stage: str, batch_idx: int, dataloader_idx: int) -> None:
        if not self._on(trainer) or trainer.sanity_checking or not self.eval_every_n_seconds:
            return
        now = time.monotonic()
        if now - self._eval_last < self.eval_every_n_seconds:
            return
        self._eval_last = now
        counts = trainer.num_val_batches if stage == "val" else trainer.num_test_batches
        total = counts[dataloader_idx] if dataloader_idx < len(counts) else math.inf
        done, elapsed = batch_idx + 1, now - self._eval_t0
        eta = elapsed * (total - done) / done if math.isfinite(total) else None
        of = f"/{int(total)}" if math.isfinite(total) else ""
        log.info(
            "%s batch %d%s | elapsed %s | ETA %s",
            stage,
            done,
            of,
            format_duration(elapsed),
            format_duration(eta),
        )

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_start()

    def on_validation_batch_end(
        self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._eval_batch(trainer, "val", batch_idx, dataloader_idx)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        seconds = time.monotonic() - self._eval_t0
        self._eval_time += seconds
        if not self._on(trainer):
            return
        # the progress bar's values: the loss and each task's main metric, already host numbers
        shown = {k: v for k, v in trainer.progress_bar_metrics.items() if k.startswith("val/")}
        delta = trainer.callback_metrics.get("val/delta_m")  # one read per validation, not per step
        if delta is not None:
            shown["val/delta_m"] = float(delta)
        values = " ".join(f"{k}={v:.4f}" for k, v in shown.items())
        epochs = "?" if trainer.max_epochs in (None, -1) else trainer.max_epochs
        log.info(
            "validation epoch %d/%s step %d (%s): %s",
            trainer.current_epoch + 1,
            epochs,
            trainer.global_step,
            format_duration(seconds),
            values or "no metric",
        )

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_start()
        loaders = trainer.test_dataloaders
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        counts = [_loader_images(dl, n) for dl, n in zip(loaders, trainer.num_test_batches, strict=False)]
        images = None if not counts or None in counts else sum(counts)
        for part in pl_module.modules():  # every rank: each counts its own share
            if isinstance(part, ReportsProgress):
                part.expect_images(images)
        if self._on(trainer):
            batches = sum(trainer.num_test_batches)
            log.info(
                "test: %s batches%s on %d process(es)",
                int(batches) if math.isfinite(batches) else "?",
                f" ({images} images on this process)" if images is not None else "",
                trainer.world_size,
            )

    def on_test_batch_end(
        self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._eval_batch(trainer, "test", batch_idx, dataloader_idx)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._on(trainer):
            log.info("test done in %s", format_duration(time.monotonic() - self._eval_t0))


def progress_bar_enabled(callbacks: Iterable[L.Callback]) -> bool:
    """Whether Lightning's progress bar should be on: not when a :class:`ProgressLog` writes lines."""
    return not any(isinstance(c, ProgressLog) and c.active for c in callbacks)
