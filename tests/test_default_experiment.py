"""The main job a new user runs, `python train.py`, learns visibly within its budget.

Runs the real entry point with no arguments (the default experiment on synthetic scenes)
and checks the issue's bar: val semseg mIoU >= 0.5 and depth RMSE at most half that of
predicting the mean training depth. About 4-5 minutes on a 2-core CPU, hence `slow`.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mtl.data.synthetic import SyntheticScenes
from mtl.metrics.trivial import trivial_baselines

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_python_train_py_learns_visibly(tmp_path):
    env = {**os.environ, "MTL_ROOT": str(tmp_path), "WANDB_MODE": "offline"}
    subprocess.run(
        [sys.executable, "train.py", "extras.print_config=false"],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
    )
    (run,) = (tmp_path / "logs" / "train" / "runs").iterdir()
    metrics = json.loads((run / "metrics.json").read_text())
    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    ds = cfg.data.dataset
    kwargs = dict(resolution=tuple(ds.resolution), seed=ds.seed, tasks=["semseg", "depth"])
    base = trivial_baselines(
        SyntheticScenes(split="train", length=200, **kwargs),
        SyntheticScenes(split="val", length=cfg.data.split_kwargs.val.length, **kwargs),
        num_classes=SyntheticScenes.NUM_CLASSES["semseg"],
        limit=None,
    )
    assert metrics["val/semseg/miou"] >= 0.5, metrics
    assert metrics["val/depth/rmse"] <= 0.5 * base["depth_rmse_mean"], (metrics, base)
    assert (run / "checkpoints" / "best.ckpt").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
