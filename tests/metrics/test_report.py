"""results.md in the published layout (headline rows, units, arrows) and the picture panels."""

import numpy as np
import pytest

from mtl.report import published_table, write_results
from mtl.tasks import build_tasks
from mtl.visualise import PanelRow, panel_layout, prediction_panel


def _nyud():
    tasks = build_tasks(["semseg", "depth", "normals", "edge"], num_classes={"semseg": 40})
    metrics = {
        "test/semseg/miou": 0.5012,
        "test/semseg/iou_3": 0.2,
        "test/depth/rmse": 0.55123,
        "test/normals/mean": 19.5,
        "test/edge/odsf": 0.771,
        "test/edge/ods_threshold": 0.3,
        "test/delta_m": -1.234,
    }
    return tasks, metrics


def test_published_table_layout_units_and_headlines():
    tasks, metrics = _nyud()
    md = published_table(metrics, tasks, name="ours", dataset="nyud").splitlines()
    assert md[0] == "| model | semseg mIoU ↑ | depth RMSE ↓ | normals mErr ↓ | edge odsF ↑ | Δm (%) ↑ |"
    assert md[2] == "| InvPT (ViT-L, published) | 53.56 | 0.5183 | 19.04 | 78.10 | — |"
    assert md[-1] == "| **ours** | 50.12 | 0.5512 | 19.50 | 77.10 | -1.23 |"
    assert "TaskExpert (ViT-L, published) | 55.35† |" in "\n".join(md)
    assert len(published_table(metrics, tasks, dataset="synthetic").splitlines()) == 3  # no headline rows
    assert len(published_table(metrics, tasks, dataset="nyud", headline=False).splitlines()) == 3


def test_write_results_three_files(tmp_path):
    tasks, metrics = _nyud()
    write_results(tmp_path, metrics, tasks, name="ours", dataset="nyud")
    assert (tmp_path / "results.json").is_file()
    header, row = (tmp_path / "results.csv").read_text().splitlines()
    assert header.startswith("model,") and "test/semseg/iou_3" in header and row.startswith("ours,")
    md = (tmp_path / "results.md").read_text()
    assert "| edge | odsF (%) ↑ | 77.10 |" in md and "iou_3" not in md


def test_prediction_panel_rows_and_size_check():
    img = np.zeros((8, 10, 3), dtype=np.uint8)
    rows = {t: PanelRow(np.full_like(img, v), np.full_like(img, v + 1)) for t, v in (("a", 1), ("b", 3))}
    panel, boxes = panel_layout(img, rows, gap=2)
    assert np.array_equal(prediction_panel(img, rows, gap=2), panel)
    for t, v in (("a", 1), ("b", 3)):  # image | ground truth | prediction, in that order, 2 px apart
        for key, value in (("image", 0), ("truth", v), ("prediction", v + 1)):
            top, left, h, w = boxes[f"{t}/{key}"]
            assert (h, w) == (8, 10) and (panel[top : top + h, left : left + w] == value).all(), (t, key)
        assert boxes[f"{t}/truth"][1] == boxes[f"{t}/image"][1] + 12
    top, left, _, _ = boxes["a/image"]
    assert boxes["b/image"][0] >= top + 8 + 2 and (panel[top + 8, left : left + 10] == 255).all()  # white gap
    with pytest.raises(ValueError, match="panel row 'a'"):
        prediction_panel(img, {"a": PanelRow(np.zeros((4, 4, 3), np.uint8), img)})
