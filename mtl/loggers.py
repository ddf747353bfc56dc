"""Logger factories that need a decision at run time."""

from __future__ import annotations

import os
from pathlib import Path

from lightning.pytorch.loggers import WandbLogger


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def wandb_logger(*, offline: bool | None = None, **kwargs) -> WandbLogger:
    """A ``WandbLogger`` that runs offline when no API key is configured.

    Args:
        offline: force online (``False``) or offline (``True``); ``None`` decides from
            ``WANDB_API_KEY`` / ``~/.netrc`` and ``WANDB_MODE``.
        **kwargs: passed to ``WandbLogger`` (``project``, ``name``, ``save_dir``, …).
    """
    if offline is None:
        offline = os.environ.get("WANDB_MODE") in ("offline", "disabled") or not _has_wandb_key()
    return WandbLogger(offline=offline, **kwargs)


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
