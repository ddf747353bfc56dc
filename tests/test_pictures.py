"""Labelled pictures: prediction panels (header, task names, legends, depth colour bar), gate maps
with a legend, and the gate statistics summarised on the console with every value in gates.md."""

import logging
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mtl.decoders.moe import _palette, gate_figure, gate_picture, gate_summary, write_gate_report
from mtl.decoders.taskexpert import GateReport
from mtl.eval_steps import EvalContext
from mtl.tasks import build_tasks
from mtl.tasks.base import colormap
from mtl.visualise import panel_layout, task_row

H, W = 48, 64


def _sample():
    """Ground truth and predictions of one sample for the four NYUD-v2 tasks."""
    tasks = build_tasks(["semseg", "depth", "normals", "edge"], num_classes={"semseg": 5})
    yy, xx = torch.meshgrid(torch.linspace(0, 1, H), torch.linspace(0, 1, W), indexing="ij")
    truth = {
        "semseg": (xx * 4.99).long(),
        "depth": (1.0 + 3.0 * yy)[None].clone(),
        "normals": torch.nn.functional.normalize(
            torch.stack([xx - 0.5, yy - 0.5, torch.ones_like(xx)]), dim=0
        ),
        "edge": (xx > 0.5).float()[None],
    }
    truth["depth"][:, :4, :6] = 0  # missing ground truth
    pred = {
        "semseg": (xx * 4.99).long().flip(-1),
        "depth": (1.2 + 2.5 * yy)[None].clone(),
        "normals": truth["normals"].flip(0),
        "edge": xx[None],
    }
    pred["depth"][:, 30:40, 40:60] = -0.5  # non-positive predictions
    pred["depth"][:, 0, -1] = float("nan")
    image = np.full((H, W, 3), 90, np.uint8)
    return tasks, truth, pred, image


def _region(panel, box):
    top, left, h, w = box
    return panel[top : top + h, left : left + w]


def _has_ink(region) -> bool:
    return bool((region.min(axis=-1) < 100).any())


def test_panel_has_a_header_band_task_names_and_the_columns_in_order():
    tasks, truth, pred, image = _sample()
    rows = {t: task_row(task, pred[t], truth[t]) for t, task in tasks.items()}
    panel, boxes = panel_layout(image, rows, title="sample 0")
    assert panel.dtype == np.uint8 and panel.ndim == 3 and panel.shape[2] == 3  # the loggers' HWC uint8
    header = boxes["header"]
    assert header[:2] == (0, 0) and header[2] >= 20 and header[3] == panel.shape[1]
    assert _has_ink(_region(panel, header))  # title and column headers are drawn
    first = boxes["semseg/image"][0]
    assert first >= header[2]  # rows start below the header band
    for t in tasks:
        assert _has_ink(_region(panel, boxes[f"{t}/label"])), t  # the task's name
        assert (
            boxes[f"{t}/image"][1]
            < boxes[f"{t}/truth"][1]
            < boxes[f"{t}/prediction"][1]
            < boxes[f"{t}/legend"][1]
        )
        assert (_region(panel, boxes[f"{t}/image"]) == 90).all()
        assert boxes[f"{t}/legend"][3] > 0, t  # every built-in task has a legend
    # normals and edges keep their colours (labelled, not recoloured)
    assert np.array_equal(_region(panel, boxes["normals/truth"]), tasks["normals"].to_rgb(truth["normals"]))
    assert np.array_equal(_region(panel, boxes["edge/prediction"]), tasks["edge"].to_rgb(pred["edge"]))


def test_depth_shares_one_range_with_a_colour_bar_and_marks_nonpositive_predictions():
    tasks, truth, pred, image = _sample()
    depth = tasks["depth"]
    assert depth.nonpositive_rgb != depth.missing_rgb
    panel, boxes = panel_layout(image, {"depth": task_row(depth, pred["depth"], truth["depth"])})
    gt_px, pred_px = _region(panel, boxes["depth/truth"]), _region(panel, boxes["depth/prediction"])
    assert (gt_px[:4, :6] == depth.missing_rgb).all()  # missing ground truth
    assert (pred_px[30:40, 40:60] == depth.nonpositive_rgb).all()  # prediction <= 0 m: its own colour
    assert (pred_px[0, -1] == depth.nonpositive_rgb).all()  # NaN too
    assert not (gt_px[4:] == depth.nonpositive_rgb).all(axis=-1).any()
    # one range for both: the same depth gets the same colour in the ground truth and the prediction
    near, far = depth.display_range(truth["depth"], pred["depth"])
    assert 1.0 <= near < 1.3 and 3.6 < far <= 4.0
    same = depth.to_rgb(torch.full((1, 1, 1), 2.5), vrange=(near, far))[0, 0]
    y_gt = int(torch.argmin((truth["depth"][0, :, 10] - 2.5).abs()))
    y_pr = int(torch.argmin((pred["depth"][0, :, 10] - 2.5).abs()))
    assert np.abs(gt_px[y_gt, 10].astype(int) - same).max() <= 8
    assert np.abs(pred_px[y_pr, 10].astype(int) - same).max() <= 8
    # the colour bar: a vertical gradient from the far colour (top) to the near colour (bottom), as
    # tall as the maps, and the legend swatches of both invalid colours
    legend = _region(panel, boxes["depth/legend"])
    top, bottom = colormap(np.array(1 - 1 / (H - 1))), colormap(np.array(1 / (H - 1)))  # inside the outline
    cols = [
        x
        for x in range(legend.shape[1])
        if (legend[1, x] == top).all() and (legend[H - 2, x] == bottom).all()
    ]
    assert cols, "no colour bar running from the far to the near colour"
    assert legend.shape[0] >= H
    for rgb in (depth.missing_rgb, depth.nonpositive_rgb):
        assert (legend == rgb).all(axis=-1).sum() >= 25  # a swatch of at least 5 × 5 pixels


def test_depth_visualise_for_the_loggers_keeps_its_shape_and_marks_nonpositive_predictions():
    tasks, truth, pred, _ = _sample()
    depth = tasks["depth"]
    img = depth.visualise(pred["depth"][None], {"depth": truth["depth"][None]})
    assert img.shape == (H, 2 * W, 3) and img.dtype == np.uint8
    assert (img[30:40, W + 40 : W + 60] == depth.nonpositive_rgb).all()
    assert (img[:4, :6] == depth.missing_rgb).all()


def test_gate_maps_have_a_legend_of_every_expert_and_the_memory_scale():
    experts = 5  # 4 experts and the memory
    one_hot = torch.zeros(experts, 3, 4)
    one_hot[0] = 1.0  # every pixel: expert0 at full weight, memory weight 0
    names = [f"expert{j}" for j in range(experts - 1)] + ["memory"]
    raw = gate_picture([one_hot, one_hot], size=(H, W), memory=True)
    fig = gate_figure(
        [one_hot, one_hot], size=(H, W), memory=True, expert_names=names, title="gates of depth"
    )
    assert fig.dtype == np.uint8 and fig.shape[0] > raw.shape[0] and fig.shape[1] > raw.shape[1]
    colours = _palette(experts)
    for j in range(1, experts - 1):  # colours that no map pixel has: only the legend shows them
        assert (fig == colours[j]).all(axis=-1).sum() >= 25, names[j]
    # the memory weight's grey scale: a horizontal run of rising greys
    grey = (fig[..., 0] == fig[..., 1]) & (fig[..., 1] == fig[..., 2])
    rising = (np.diff(fig[..., 0].astype(int), axis=1) > 0) & grey[:, 1:] & grey[:, :-1]
    assert (
        max(
            max((len(r) for r in "".join("1" if v else "0" for v in row).split("0")), default=0)
            for row in rising
        )
        >= 20
    )
    with pytest.raises(ValueError, match="3 expert names"):
        gate_figure([one_hot], size=(H, W), memory=True, expert_names=names[:3], title="t")


def _gate_metrics(tasks, layers=4, experts=9, stage="test"):
    rng = np.random.default_rng(0)
    names = [f"expert{j}" for j in range(experts - 1)] + ["memory"]
    metrics = {f"{stage}/{t}/loss": 1.0 for t in tasks}
    for t in tasks:
        for layer in range(layers):
            w = rng.dirichlet(np.ones(experts))
            metrics.update(
                {f"{stage}/gates/{t}/layer{layer}/{e}": float(v) for e, v in zip(names, w, strict=True)}
            )
            metrics[f"{stage}/gates/{t}/layer{layer}/entropy"] = float(rng.uniform(0.2, 1))
    return metrics


def test_console_gate_summary_is_short_and_the_file_holds_every_value(tmp_path):
    tasks = ["semseg", "depth", "normals", "edge"]
    metrics = _gate_metrics(tasks)
    gate_keys = [k for k in metrics if "/gates/" in k]
    assert len(gate_keys) == 160
    lines = write_gate_report(metrics, tmp_path, "test", max_lines=10)
    assert 2 <= len(lines) <= 10 and str(tmp_path / "gates.md") in lines[-1]
    for t in tasks:
        assert sum(line.strip().startswith(t) for line in lines) == 1  # one line per task
    table = (tmp_path / "gates.md").read_text()
    rows = [r for r in table.splitlines() if r.startswith("| ") and not r.startswith("| task")]
    assert len(rows) == 4 * 4
    values = {}
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        header = [c.strip() for c in table.splitlines()[2].strip("|").split("|")]
        for name, cell in zip(header[2:], cells[2:], strict=True):
            values[f"test/gates/{cells[0]}/layer{cells[1]}/{name}"] = float(cell)
    assert set(values) == set(gate_keys)
    assert all(values[k] == pytest.approx(metrics[k], abs=5e-5) for k in gate_keys)
    # the top expert of a task is its largest mean over the layers
    names = [f"expert{j}" for j in range(8)] + ["memory"]
    mean = {e: np.mean([metrics[f"test/gates/depth/layer{i}/{e}"] for i in range(4)]) for e in names}
    depth_line = next(line for line in lines if line.strip().startswith("depth"))
    assert re.search(r"depth\s+(\w+) ([\d.]+)", depth_line).groups() == (
        max(mean, key=mean.get),
        f"{max(mean.values()):.2f}",
    )


def test_many_tasks_still_fit_the_line_budget_and_models_without_gates_get_nothing(tmp_path):
    metrics = _gate_metrics([f"task{i}" for i in range(15)], layers=2, experts=3)
    lines = gate_summary(metrics, "test", max_lines=6)
    assert len(lines) <= 6 and "more tasks" in lines[-1]
    assert (
        write_gate_report({"test/depth/rmse": 0.5}, tmp_path) == [] and not (tmp_path / "gates.md").exists()
    )


def test_gate_report_step_logs_the_summary_and_names_the_file(tmp_path, caplog):
    metrics = _gate_metrics(["semseg", "depth", "normals", "edge"])
    ctx = EvalContext(
        cfg={},
        module=None,
        datamodule=None,
        trainer=SimpleNamespace(is_global_zero=True),
        output_dir=tmp_path,
        input_size=(H, W),
        metrics=metrics,
    )
    with caplog.at_level(logging.INFO, logger="mtl.decoders.taskexpert"):
        GateReport(max_lines=10).after_test(ctx)
    logged = "\n".join(r.getMessage() for r in caplog.records).splitlines()
    assert 2 <= len(logged) <= 10 and ctx.reports["gates"] == str(tmp_path / "gates.md")
    other = EvalContext(
        cfg={},
        module=None,
        datamodule=None,
        trainer=SimpleNamespace(is_global_zero=False),
        output_dir=tmp_path / "rank1",
        input_size=(H, W),
        metrics=metrics,
    )
    GateReport().after_test(other)
    assert not (tmp_path / "rank1").exists() and "gates" not in other.reports
    with pytest.raises(ValueError, match="max_lines must be >= 2"):
        GateReport(max_lines=1)


def test_a_class_legend_that_does_not_fit_counts_the_rest_within_the_row():
    tasks = build_tasks(["semseg"], num_classes={"semseg": 40})
    labels = torch.arange(H * W).reshape(H, W) % 40
    labels[0, 0] = 255  # and the ignored pixels' swatch
    row = task_row(tasks["semseg"], labels.flip(0), labels)
    assert row.legend is not None and 0 < row.legend.shape[0] <= H  # the row keeps the maps' height
