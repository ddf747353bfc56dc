"""Pictures of predictions for the loggers (TensorBoard, W&B) and for ``eval.py``.

:class:`PredictionPictures` is the evaluation step that writes ``pictures/sample_<i>.png``: one
labelled panel per sample (:func:`prediction_panel`: a header band with the column names, a row per
task with its name, the input, the ground truth, the prediction and a legend of the colours, e.g. the
depth colour bar in metres).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from mtl import drawing
from mtl.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from mtl.eval_steps import EvalContext, EvalStep
from mtl.tasks.base import Task, colormap, palette
from mtl.tasks.depth import Depth
from mtl.tasks.normals import Normals
from mtl.tasks.saliency import Saliency
from mtl.tasks.semseg import SemSeg

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


@dataclass
class PanelRow:
    """One task's row of a prediction panel.

    Attributes:
        truth: ground truth, ``H × W × 3`` uint8 in the task's colours.
        prediction: prediction, ``H × W × 3`` uint8, coloured like ``truth``.
        legend: what the colours mean (:func:`task_row`), any ``h × w × 3`` uint8; ``None``: none.
    """

    truth: np.ndarray
    prediction: np.ndarray
    legend: np.ndarray | None = None


#: a region of a picture: ``(top, left, height, width)`` in pixels
Box = tuple[int, int, int, int]

COLUMNS = ("image", "ground truth", "prediction", "legend")


def _class_legend(
    task: SemSeg, truth: torch.Tensor, pred: torch.Tensor, size: int, height: int
) -> np.ndarray:
    """Swatches of the classes in the picture, most pixels first, as many as fit two columns."""
    labels = torch.cat([truth.reshape(-1), pred.reshape(-1)]).long()
    ignored = bool((labels == task.ignore_index).any())
    ids, counts = labels[labels != task.ignore_index].unique(return_counts=True)
    order = [int(ids[j]) for j in counts.argsort(descending=True)]
    lh = drawing.line_height(size)
    fit = 2 * max(1, height // lh) - int(ignored)
    if len(order) > fit:  # one line less for the count of the classes left out
        height -= lh
        fit = max(1, 2 * max(1, height // lh) - int(ignored))
    shown = order[:fit]
    colours = palette()
    items = [(tuple(int(c) for c in colours[i]), f"class {i}") for i in shown]
    if ignored:
        items.append((tuple(int(c) for c in colours[task.ignore_index]), "ignored"))
    legend = drawing.swatch_legend(items, size, height=height)
    if len(shown) < len(order):
        more = drawing.text_block([f"+{len(order) - len(shown)} more classes"], size)
        legend = drawing.vstack([legend, more])
    return legend


def task_row(task: Task, pred: torch.Tensor, truth: torch.Tensor) -> PanelRow:
    """A :class:`PanelRow` of one sample: the task's colours and a legend of what they mean.

    Depth: ground truth and prediction share one colour range (:meth:`~mtl.tasks.depth.Depth.display_range`),
    shown as a colour bar in metres; missing ground truth and predictions <= 0 m get their own
    colours. Segmentation: the classes in the picture. Normals: the RGB encoding. Saliency / edges:
    a grey bar of the probability. Other tasks: their :meth:`~mtl.tasks.base.Task.to_rgb`, no legend.

    Args:
        task: the task.
        pred: the post-processed prediction of one sample (no batch dimension, on the CPU).
        truth: its ground truth in the same encoding (:meth:`~mtl.tasks.base.Task.target_for_display`).
    """
    h = int(truth.shape[-2])
    size = drawing.font_size(h)
    if isinstance(task, Depth):
        near, far = task.display_range(truth, pred)
        nonpositive = 100.0 * float((~(pred > 0)).float().mean())
        bar = drawing.labelled_colour_bar(
            colormap, f"{near:.2f} m", f"{far:.2f} m", size, length=h, middle=f"{(near + far) / 2:.2f} m"
        )
        keys = drawing.swatch_legend(
            [
                (task.missing_rgb, "no ground truth"),
                (task.nonpositive_rgb, f"pred <= 0 m ({nonpositive:.1f} %)"),
            ],
            size,
        )
        return PanelRow(
            task.to_rgb(truth, vrange=(near, far)),
            task.to_rgb(pred, vrange=(near, far), invalid=task.nonpositive_rgb),
            drawing.hstack([bar, keys], gap=2 * size),
        )
    legend = None
    if isinstance(task, SemSeg):
        legend = _class_legend(task, truth, pred, size, h)
    elif isinstance(task, Normals):
        legend = drawing.text_block(
            ["colour = (n + 1) / 2", "red: x, green: y, blue: z", "grey: no ground truth"], size
        )
    elif isinstance(task, Saliency):  # edges too
        bar = drawing.labelled_colour_bar(drawing.grey, "0", "1", size, length=h, middle="0.5")
        notes = drawing.text_block(
            [f"prediction: p({task.name})", f"truth: white = {task.name}", "black: none / ignored"], size
        )
        legend = drawing.hstack([bar, notes], gap=2 * size)
    return PanelRow(task.to_rgb(truth), task.to_rgb(pred), legend)


def panel_layout(
    image: np.ndarray, rows: Mapping[str, PanelRow], *, title: str | None = None, gap: int = 4
) -> tuple[np.ndarray, dict[str, Box]]:
    """:func:`prediction_panel` and where its parts are.

    Returns:
        The panel and its regions: ``header`` (title and column headers) and, per task ``t``,
        ``t/label``, ``t/image``, ``t/truth``, ``t/prediction`` and ``t/legend``.
    """
    h, w = image.shape[:2]
    for task, row in rows.items():
        if row.truth.shape[:2] != (h, w) or row.prediction.shape[:2] != (h, w):
            raise ValueError(
                f"panel row '{task}': pictures {row.truth.shape}, {row.prediction.shape} differ from the "
                f"image {image.shape}"
            )
    size = drawing.font_size(h)
    lh = drawing.line_height(size)
    label_w = max(drawing.text_width(t, size) for t in rows) + 2 * size
    legends = {t: r.legend if r.legend is not None else drawing.blank(0, 0) for t, r in rows.items()}
    legend_w = max([drawing.text_width(COLUMNS[3], size) + 4, *(lg.shape[1] for lg in legends.values())])
    lefts = [label_w + gap + k * (w + gap) for k in range(4)]  # image, truth, prediction, legend
    width = lefts[3] + legend_w
    widths = (w, w, w, legend_w)
    names = [drawing.wrap(name, size, col_w) for name, col_w in zip(COLUMNS, widths, strict=True)]
    n_lines = max(len(lines) for lines in names)
    top = lh if title else 0
    header = drawing.blank(top + lh * n_lines, width)
    if title:
        header[:lh] = drawing.text_block([title], size, width=width, height=lh, pad=0)
    for left, lines, col_w in zip(lefts, names, widths, strict=True):
        block = drawing.text_block(lines, size, width=col_w, height=lh * n_lines, align="center", pad=0)
        header[top:, left : left + col_w] = block
    boxes: dict[str, Box] = {"header": (0, 0, header.shape[0], width)}
    parts, y = [header], header.shape[0] + gap
    for t, row in rows.items():
        legend = legends[t]
        row_h = max(h, legend.shape[0])
        label = drawing.text_block([t], size, width=label_w, height=h, valign="middle")
        strip = drawing.hstack([label, image, row.truth, row.prediction, legend], gap=gap)
        parts.append(drawing.hstack([strip, drawing.blank(row_h, width - strip.shape[1])]))
        boxes[f"{t}/label"] = (y, 0, h, label_w)
        for left, key in zip(lefts[:3], ("image", "truth", "prediction"), strict=True):
            boxes[f"{t}/{key}"] = (y, left, h, w)
        boxes[f"{t}/legend"] = (y, lefts[3], legend.shape[0], legend.shape[1])
        y += row_h + gap
    return drawing.vstack(parts, gap=gap), boxes


def prediction_panel(
    image: np.ndarray, rows: Mapping[str, PanelRow], *, title: str | None = None, gap: int = 4
) -> np.ndarray:
    """One labelled picture per sample: a header band (``title``, then the column headers
    ``image | ground truth | prediction | legend``) and a row per task: its name, the input, the
    ground truth, the prediction and the legend of the task's colours (:func:`task_row`).

    Args:
        image: ``H × W × 3`` uint8 input.
        rows: task → :class:`PanelRow` (pictures ``H × W × 3`` uint8).
        title: the first line of the header band (e.g. the sample), or none.
        gap: white separator width in pixels.

    Returns:
        An ``H' × W' × 3`` uint8 picture (regions: :func:`panel_layout`).
    """
    return panel_layout(image, rows, title=title, gap=gap)[0]


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
    in the tasks' own colours with their legends (:func:`task_row`).
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
                t: task_row(
                    task,
                    task.postprocess(preds[t][i : i + 1].float())[0].cpu(),
                    task.target_for_display(one).cpu(),
                )
                for t, task in module.tasks.items()
                if t in preds
            }
            k = len(panels)
            panels[f"sample_{k:03d}"] = prediction_panel(
                denormalise(one["image"][0]), rows, title=f"sample {k}"
            )
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
