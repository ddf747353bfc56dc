"""The loggers of the framework: their histories continue when a run resumes; factories that need a
decision at run time.

A resumed run (``ckpt_path=…`` into the same run folder) continues every logger's history:
:func:`resume_loggers` tells each logger the step of the checkpoint before anything is logged.
``metrics.csv`` keeps its earlier rows (those logged after the checkpoint, which the resumed run
logs again, are dropped) and is appended to; TensorBoard hides the events after the checkpoint
(``purge_step``) and writes into the same folder; wandb continues the same run id. A fresh run into
a folder that already holds a ``metrics.csv`` moves it aside (``metrics.1.csv``, …): nothing is
deleted.
"""

from __future__ import annotations

import csv
import logging
import os
import warnings
from pathlib import Path
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger as _CSVLogger
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.loggers import TensorBoardLogger as _TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

log = logging.getLogger(__name__)


class ResumableLogger:
    """A logger whose history a resumed run continues (see :func:`resume_loggers`)."""

    def resume(self, step: int | None) -> None:
        """Called once, before anything is logged: ``step`` is the ``global_step`` of the checkpoint
        the run resumes from, ``None`` for a fresh run."""
        raise NotImplementedError


def resume_loggers(loggers: list[Logger], step: int | None) -> None:
    """Tells every logger where the run starts (``step``: the resumed checkpoint's ``global_step``,
    ``None``: a fresh run). Loggers of other classes start a history of their own, with a warning on
    resume."""
    for logger in loggers:
        if isinstance(logger, ResumableLogger):
            logger.resume(step)
        elif step is not None:
            log.warning(
                "logger %s does not continue the earlier run's history on resume (use mtl.loggers.CSVLogger, "
                "mtl.loggers.TensorBoardLogger or mtl.loggers.wandb_logger)",
                type(logger).__name__,
            )


def _step_of(row: dict[str, str]) -> int | None:
    try:
        return int(float(row.get("step") or ""))
    except ValueError:
        return None


class _HistoryWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an existing ``metrics.csv`` is never deleted: continued on
    resume (rows from ``resume_step`` on dropped), moved aside for a fresh run."""

    def __init__(self, log_dir: str, resume_step: int | None) -> None:
        self._resume_step = resume_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:  # Lightning's deletes metrics.csv
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        if self._resume_step is None:
            n = 1
            while path.with_name(f"{path.stem}.{n}{path.suffix}").exists():
                n += 1
            kept = path.with_name(f"{path.stem}.{n}{path.suffix}")
            path.rename(kept)
            log.warning("%s holds an earlier run's history: moved to %s (this run starts afresh)", path, kept)
            return
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header, rows = list(reader.fieldnames or []), list(reader)
        kept_rows = [r for r in rows if (_step_of(r) is None or _step_of(r) < self._resume_step)]
        if len(kept_rows) != len(rows):
            tmp = path.with_name(path.name + ".tmp")
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=header)
                writer.writeheader()
                writer.writerows(kept_rows)
            os.replace(tmp, path)
        self.metrics_keys = header  # appended rows keep the columns; new keys rewrite the header
        log.info(
            "%s continues: %d earlier rows kept, %d logged after step %d dropped (logged again now)",
            path,
            len(kept_rows),
            len(rows) - len(kept_rows),
            self._resume_step,
        )


class CSVLogger(_CSVLogger, ResumableLogger):
    """Lightning's ``CSVLogger`` whose ``metrics.csv`` survives a resume (and a fresh start: moved
    aside). Arguments as Lightning's."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._resume_step: int | None = None

    def resume(self, step: int | None) -> None:
        if self._experiment is not None:
            raise RuntimeError("CSVLogger.resume() must be called before anything is logged")
        self._resume_step = step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        """The writer (rank 0): continues ``metrics.csv`` on resume."""
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _HistoryWriter(self.log_dir, self._resume_step)
        return self._experiment


class TensorBoardLogger(_TensorBoardLogger, ResumableLogger):
    """Lightning's ``TensorBoardLogger``; on resume it writes into the same folder and hides the
    events logged after the checkpoint (``SummaryWriter(purge_step=…)``). Arguments as Lightning's."""

    def resume(self, step: int | None) -> None:
        if self._experiment is not None:
            raise RuntimeError("TensorBoardLogger.resume() must be called before anything is logged")
        if step is not None:
            self._kwargs["purge_step"] = int(step)


class ResumableWandbLogger(WandbLogger, ResumableLogger):
    """``WandbLogger`` that continues the run folder's latest wandb run on resume (same run id, from
    ``<save_dir>/wandb/latest-run``); a new run when there is none."""

    def resume(self, step: int | None) -> None:
        if step is None or self._wandb_init.get("id"):
            return
        run_id = previous_wandb_run_id(Path(self._save_dir or ".") / "wandb")
        if run_id is None:
            log.warning(
                "no earlier wandb run under %s/wandb: the resumed run logs to a new one", self._save_dir
            )
            return
        self._id = self._wandb_init["id"] = run_id
        self._wandb_init["resume"] = "allow"
        log.info("wandb: continuing run %s", run_id)


def previous_wandb_run_id(wandb_dir: Path) -> str | None:
    """The id of the latest run in a ``wandb/`` folder (``latest-run`` → ``[offline-]run-<time>-<id>``)."""
    latest = wandb_dir / "latest-run"
    if not latest.exists():
        return None
    name = latest.resolve().name
    return name.rsplit("-", 1)[-1] if name.startswith(("run-", "offline-run-")) and "-" in name else None


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def wandb_logger(*, offline: bool | None = None, **kwargs) -> ResumableWandbLogger:
    """A ``WandbLogger`` that runs offline when no API key is configured and continues the run
    folder's wandb run on resume (:class:`ResumableWandbLogger`).

    Args:
        offline: force online (``False``) or offline (``True``); ``None`` decides from
            ``WANDB_API_KEY`` / ``~/.netrc`` and ``WANDB_MODE``.
        **kwargs: passed to ``WandbLogger`` (``project``, ``name``, ``save_dir``, …).
    """
    if offline is None:
        offline = os.environ.get("WANDB_MODE") in ("offline", "disabled") or not _has_wandb_key()
    return ResumableWandbLogger(offline=offline, **kwargs)


def code_version() -> dict[str, str | bool]:
    """The code a run used: the git commit of the ``mtl`` checkout and whether it had local changes.

    Falls back to the installed package version outside a git checkout.
    """
    import subprocess

    import mtl

    root = Path(mtl.__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        return {"commit": commit, "dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return {"version": version("mtl")}
        except PackageNotFoundError:
            return {"version": "unknown"}


#: start-up messages of the libraries that are advertisements or internal notes, not information
#: about the run: logger name → message prefixes dropped
QUIET_MESSAGES: dict[str, tuple[str, ...]] = {
    # "💡 Tip: … litlogger / litmodels …" (Lightning ≥ 2.6)
    "lightning.pytorch.utilities.rank_zero": ("💡 Tip:",),
    "lightning.fabric.utilities.rank_zero": ("💡 Tip:",),
    # a note Lightning logs for every checkpoint saved without an explicit weights_only
    "lightning.pytorch.trainer.connectors.checkpoint_connector": ("`weights_only` was not set",),
}
#: warnings of the libraries about their own code (nothing a user of this project can change):
#: (message regex, category)
QUIET_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    # Lightning 2.6's pytree helper builds torch.utils._pytree.LeafSpec, deprecated in torch ≥ 2.10
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
)


class _DropMessages(logging.Filter):
    """Drops the records whose message starts with one of ``prefixes``."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_libraries() -> None:
    """Silences the libraries' start-up noise (:data:`QUIET_MESSAGES`, :data:`QUIET_WARNINGS`) and,
    when the logging is configured (Hydra's job logging: console and ``<task>.log``), sends
    Lightning's messages through it: once on the console, and into the run's log file.

    Lightning adds a console handler of its own to the ``lightning`` logger; under a configured root
    logger its messages would print twice (and, imported before the configuration, never reach the
    log file). Idempotent.
    """
    for name, prefixes in QUIET_MESSAGES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(prefixes))
    for message, category in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    if logging.getLogger().hasHandlers():
        for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
            logger = logging.getLogger(name)
            for handler in [h for h in logger.handlers if type(h) is logging.StreamHandler]:
                logger.removeHandler(handler)
            logger.propagate = True
