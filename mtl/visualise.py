"""Pictures of predictions for the loggers (TensorBoard, W&B) and for ``eval.py``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mtl.data.transforms import IMAGENET_MEAN, IMAGENET_STD


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


def denormalise(image: torch.Tensor) -> np.ndarray:
    """An ImageNet-normalised ``3 × H × W`` tensor back to ``H × W × 3`` uint8 RGB."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    rgb = (image.detach().float().cpu() * std + mean).clamp(0, 1)
    return (rgb.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


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
