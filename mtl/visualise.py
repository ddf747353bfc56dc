"""Pictures of predictions for the loggers (TensorBoard, W&B) and for ``eval.py``.

:class:`PredictionPictures` is the evaluation step that writes ``pictures/sample_<i>.png``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from mtl.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from mtl.eval_steps import EvalContext, EvalStep

if TYPE_CHECKING:
    from mtl.data.datamodule import MTLDataModule
    from mtl.module import MTLModule


def log_pictures(loggers: Iterable, pictures: Mapping[str, np.ndarray], step: int) -> int:
    """Sends ``key → H × W × 3 uint8`` pictures to every logger that takes images.

    Returns:
        How many pictures were sent (loggers without image support, e.g. CSV, are skipped).
    """
    sent = 0
    for logger in loggers:
        kind = type(logger).__name__
        for key, img in pictures.items():
            if kind == "TensorBoardLogger":
                logger.experiment.add_image(key, img, global_step=step, dataformats="HWC")
            elif kind == "WandbLogger":
                logger.log_image(key=key, images=[img], step=step)
            else:
                continue
            sent += 1
    return sent


def log_images(loggers: Iterable, stage: str, pictures: Mapping[str, np.ndarray], step: int) -> None:
    """:func:`log_pictures` with keys ``{stage}/{task}/prediction``."""
    log_pictures(loggers, {f"{stage}/{task}/prediction": img for task, img in pictures.items()}, step)


def prediction_panel(
    image: np.ndarray, rows: Mapping[str, tuple[np.ndarray, np.ndarray]], gap: int = 4
) -> np.ndarray:
    """One picture per sample: a row per task of ``image | prediction | ground truth``.

    Args:
        image: ``H × W × 3`` uint8 input.
        rows: task → (prediction, ground truth), each ``H × W × 3`` uint8 (the task's colours:
            palette for semseg / parts, colour map for depth, RGB for normals, grey for
            edges and saliency).
        gap: white separator width in pixels.

    Returns:
        ``T·H + (T−1)·gap × 3W + 2·gap × 3`` uint8.
    """
    h, w = image.shape[:2]
    vgap = np.full((h, gap, 3), 255, dtype=np.uint8)
    strips = []
    for task, (pred, gt) in rows.items():
        if pred.shape[:2] != (h, w) or gt.shape[:2] != (h, w):
            raise ValueError(
                f"panel row '{task}': pictures {pred.shape}, {gt.shape} differ from the image {image.shape}"
            )
        strips.append(np.concatenate([image, vgap, pred, vgap, gt], axis=1))
    hgap = np.full((gap, strips[0].shape[1], 3), 255, dtype=np.uint8)
    out = [strips[0]]
    for s in strips[1:]:
        out += [hgap, s]
    return np.concatenate(out, axis=0)


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


@torch.no_grad()
def prediction_panels(module: MTLModule, datamodule: MTLDataModule, n: int) -> dict[str, np.ndarray]:
    """``sample_<i>`` → :func:`prediction_panel` of the first ``n`` test samples.

    Rows are the tasks the model predicts (``model.tasks_at_inference``: the evaluated subset),
    in the tasks' own colours (:meth:`~mtl.tasks.base.Task.to_rgb`).
    """
    module.eval()
    panels: dict[str, np.ndarray] = {}
    for batch in datamodule.eval_dataloader(shard=False):  # the split's first samples, whatever the ranks
        preds = module(batch["image"].to(module.device))
        for i in range(batch["image"].shape[0]):
            if len(panels) == n:
                return panels
            one = {k: v[i : i + 1] if torch.is_tensor(v) else v for k, v in batch.items()}
            rows = {
                t: (
                    task.to_rgb(task.postprocess(preds[t][i : i + 1].float())[0].cpu()),
                    task.to_rgb(task.target_for_display(one).cpu()),
                )
                for t, task in module.tasks.items()
                if t in preds
            }
            panels[f"sample_{len(panels):03d}"] = prediction_panel(denormalise(one["image"][0]), rows)
    return panels


class PredictionPictures(EvalStep):
    """Evaluation step: prediction panels of the first ``n`` samples after the test pass.

    Writes ``<output_dir>/pictures/sample_<i>.png`` and sends them to the trainer's loggers
    (``eval/sample_<i>``); ``ctx.reports["pictures"]`` lists the files. Under DDP rank 0 alone
    draws and writes them (the other ranks report none).

    Args:
        n: number of samples (``eval.pictures``; 0: none).
    """

    def __init__(self, *, n: int = 0) -> None:
        if n < 0:
            raise ValueError(f"eval.pictures must be >= 0, got {n}")
        self.n = int(n)

    def after_test(self, ctx: EvalContext) -> None:
        if not self.n or not ctx.is_global_zero:
            return
        panels = prediction_panels(ctx.module, ctx.datamodule, self.n)
        ctx.reports["pictures"] = [str(p) for p in save_pictures(panels, ctx.output_dir / "pictures")]
        log_pictures(ctx.trainer.loggers, {f"eval/{k}": v for k, v in panels.items()}, step=0)
