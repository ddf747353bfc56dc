"""Through the public entry point: 2-process DDP training, an Optuna sweep, a glob multirun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
SMALL = [
    "data.dataset.resolution=[64,64]",
    "data.dataset.length=16",
    "data.split_kwargs.val.length=8",
    "data.batch_size=4",
    "data.eval_batch_size=8",
    "logger=csv",
    "extras.print_config=false",
    "module.log_images=false",
]


def _run(args: list[str], log_dir: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    cmd = [sys.executable, "train.py", *args, *SMALL, f"paths.log_dir={log_dir}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.mark.slow
def test_two_process_ddp_training_through_train_py(tmp_path):
    _run(
        [
            "experiment=synthetic_taskexpert",
            "trainer=ddp_cpu",
            "trainer.devices=2",
            "trainer.max_steps=4",
            "trainer.max_epochs=2",
            "+callbacks.throughput._target_=mtl.callbacks.Throughput",
            "+callbacks.throughput.output_dir=${paths.output_dir}",
        ],
        tmp_path,
    )
    (run,) = list((tmp_path / "train" / "runs").iterdir())
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4  # 16 samples / (2 ranks × batch 4) = 2 steps per epoch, 2 epochs
    assert len(ckpt["rng_states"]) == 2  # one RNG state per rank
    # each rank its own random stream (dropout, stochastic depth), not rank 0's copy
    assert not torch.equal(ckpt["rng_states"][0]["torch"], ckpt["rng_states"][1]["torch"])
    assert (run / "train_ddp_process_1.log").exists()  # Lightning's launcher started rank 1
    report = json.loads((run / "throughput.json").read_text())
    assert report["world_size"] == 2 and report["images_per_sec"] > 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0 <= metrics["val/semseg/miou"] <= 1 and "val/score" in metrics


@pytest.mark.slow
def test_optuna_sweep_two_trials(tmp_path):
    _run(
        [
            "-m",
            "hparams_search=optuna",
            "hydra.sweeper.n_trials=2",
            "trainer.max_epochs=1",  # 4 steps, then one validation: the objective
            "+trainer.limit_val_batches=1",
        ],
        tmp_path,
    )
    (sweep,) = list((tmp_path / "train" / "multiruns").iterdir())
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(result["best_params"]) >= {"optimizer.lr", "strategy"}
    assert 0 <= result["best_value"] <= 1  # val/score: a mean of [0, 1] task metrics
    trials = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert len(trials) == 2 and all((t / "metrics.json").exists() for t in trials)
    for trial in trials:  # loss weights are searched in the trials of strategy=fixed only
        overrides = yaml.safe_load((trial / ".hydra" / "overrides.yaml").read_text())
        weights = [o for o in overrides if "weights." in o]
        assert bool(weights) == ("strategy=fixed" in overrides), overrides
        assert not [o for o in overrides if "task_options" in o]  # val/loss keeps the default weights
    summary = (sweep / "summary.md").read_text()  # mtl.sweep.SweepSummary: every trial, the best folder
    assert "2 jobs: 2 ok" in summary and f"{sweep}/" in summary.splitlines()[-1]


@pytest.mark.slow
def test_glob_multirun_over_synthetic_experiments(tmp_path):
    # the *_pretrained experiments need the pretraining cache (python -m mtl.pretrain): tests/test_pretrain.py
    experiments = (ROOT / "configs" / "experiment").glob("synthetic_*.yaml")
    names = sorted(p.stem for p in experiments if not p.stem.endswith("_pretrained"))
    proc = _run(
        ["-m", "experiment=glob(synthetic_*,exclude=*_pretrained)", "debug=fdr"], tmp_path, timeout=900
    )
    for name in names:
        assert f"experiment={name}" in proc.stdout + proc.stderr, name
