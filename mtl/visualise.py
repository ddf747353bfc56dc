"""Pictures of predictions for the loggers (TensorBoard, W&B) and for ``eval.py``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
from PIL import Image


def log_images(loggers: Iterable, stage: str, pictures: Mapping[str, np.ndarray], step: int) -> None:
    """Sends ``task → H × W × 3 uint8`` pictures to every logger that takes images.

    Keys are ``{stage}/{task}/prediction``. Loggers without image support are skipped.
    """
    for logger in loggers:
        kind = type(logger).__name__
        for task, img in pictures.items():
            key = f"{stage}/{task}/prediction"
            if kind == "TensorBoardLogger":
                logger.experiment.add_image(key, img, global_step=step, dataformats="HWC")
            elif kind == "WandbLogger":
                logger.log_image(key=key, images=[img], step=step)


def save_pictures(pictures: Mapping[str, np.ndarray], directory: str | Path, prefix: str = "") -> list[Path]:
    """Writes ``task → picture`` as PNG files and returns their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for task, img in pictures.items():
        path = directory / f"{prefix}{task}.png"
        Image.fromarray(img).save(path)
        paths.append(path)
    return paths
