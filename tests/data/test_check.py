"""``python -m mtl.data.check`` and training on real-format roots through the real configs."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from mtl.data.check import main
from mtl.data.fake import write_nyud, write_pascal
from mtl.pipeline import build_datamodule, train


def test_checker_passes_good_roots(tmp_path, capsys):
    nyud = write_nyud(tmp_path / "NYUDv2", n_train=2, n_val=2)  # the real 448×576
    pascal = write_pascal(tmp_path / "PASCALContext", n_train=2, n_val=2, size=(16, 20))
    assert main([str(nyud), "--dataset", "nyud", "--allow-partial"]) == 0
    assert main([str(pascal), "--dataset", "pascal_context", "--allow-partial", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "OK: no problems found" in out and "train: 2 ids, 2 good, 0 bad" in out
    assert "1 with person parts" in out
    # without --allow-partial the standard split counts are required
    assert main([str(nyud), "--dataset", "nyud"]) == 1
    assert "train: 2 ids, expected 795" in capsys.readouterr().out


def test_checker_names_every_bad_file(tmp_path, capsys):
    root = write_nyud(tmp_path / "NYUDv2", n_train=4, n_val=2)
    (root / "depth" / "000000.npy").unlink()
    (root / "normals" / "000001.png").write_bytes(b"\x89PNG broken")
    Image.fromarray(np.full((448, 576), 1, np.uint8)).save(root / "edge" / "000002.png")  # 0/1, not 0/255
    Image.fromarray(np.full((448, 576), 77, np.uint8)).save(root / "segmentation" / "000003.png")
    np.save(root / "depth" / "000004.npy", np.full((448, 576), 80.0, np.float32))
    Image.fromarray(np.zeros((480, 640, 3), np.uint8)).save(root / "images" / "000005.png")
    assert main([str(root), "--dataset", "nyud", "--allow-partial"]) == 1
    out = capsys.readouterr().out
    expected = {
        "depth/000000.npy": "file is missing",
        "normals/000001.png": "cannot decode image",
        "edge/000002.png": "expected binary 0/255",
        "segmentation/000003.png": "stored label 77 > 40",
        "depth/000004.npy": "depth range",
        "images/000005.png": "480×640 MTI-Net copy",
    }
    for path, reason in expected.items():
        line = next((ln for ln in out.splitlines() if path in ln), "")
        assert line.startswith("BAD") and reason in line, (path, out)
    assert "FAILED: 6 problem(s)" in out


def test_checker_cli_and_missing_root(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mtl.data.check", str(tmp_path / "nope"), "--dataset", "pascal_context"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1 and "does not exist" in proc.stdout


@pytest.mark.parametrize("data", ["nyud", "pascal_context"])
def test_real_data_configs_load_padded_batches(make_cfg, data):
    cfg = make_cfg([f"data={data}"])
    dm = build_datamodule(cfg)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 64, 80)
    for task in cfg.data.tasks:
        assert batch[task].shape[-2:] == (64, 80), task
    val = next(iter(dm.val_dataloader()))
    assert val["image"].shape[-2:] == (64, 80)
    if data == "pascal_context":  # 60×76 images padded with ignore labels, centred (2 px each side)
        assert all(m["pad_offset"] == (2, 2) for m in val["meta"])
        pad = torch.ones(64, 80, dtype=torch.bool)
        pad[2:62, 2:78] = False
        assert (val["semseg"][:, pad] == 255).all() and (val["image"][:, :, pad] == 0).all()


@pytest.mark.parametrize("data", ["nyud", "pascal_context"])
def test_the_gpu_path_batch_is_finished_into_the_worker_paths(make_cfg, data):
    """``data.photometric_on_device=true`` (what ``auto`` picks on a GPU): the loader's packed batch,
    finished by the data module's ``on_after_batch_transfer``, has the worker path's keys, dtypes and
    shapes, and its maps equal the worker path's batch of the same seed."""
    batches = {}
    for on_device in (False, True):
        cfg = make_cfg([f"data={data}", f"data.photometric_on_device={str(on_device).lower()}"])
        dm = build_datamodule(cfg)
        dm.setup("fit")
        assert dm.photometric_on_device is on_device
        packed = next(iter(dm.train_dataloader()))
        if on_device:
            assert packed["image"].dtype == torch.uint8 and packed["image"].shape[-1] == 3  # channels last
        batches[on_device] = dm.on_after_batch_transfer(packed, 0)
    worker, device = batches[False], batches[True]
    assert worker.keys() == device.keys()
    for key in cfg.data.tasks:
        assert worker[key].dtype == device[key].dtype and worker[key].shape == device[key].shape, key
        assert worker[key].equal(device[key]), key
    assert device["image"].dtype == torch.float32 and device["image"].shape == worker["image"].shape


@pytest.mark.parametrize("on_device", [False, True])
@pytest.mark.parametrize("data", ["nyud", "pascal_context"])
def test_train_on_real_format_data(make_cfg, data, on_device):
    overrides = [f"data={data}", "debug=fdr", "data.skip_bad_samples=true"]
    cfg = make_cfg([*overrides, f"data.photometric_on_device={str(on_device).lower()}"])
    metrics, objects = train(cfg)
    assert objects["trainer"].state.finished
    for task in cfg.data.tasks:
        assert np.isfinite(float(metrics[f"train/{task}/loss"])), task
