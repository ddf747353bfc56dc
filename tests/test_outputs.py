"""What train.py and eval.py say (issue 22, items 6 and 8): the run folder, checkpoints and result
files are named; the results table goes through logging (into eval.log); the start is quiet (no
config dump by default, no Lightning tips, no library deprecation warning, no "Total FLOPs: 0");
``--cfg job`` answers without importing torch."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from conftest import FAST_SYNTHETIC

from mtl.pipeline import evaluate, train

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.dataset.length=8", "logger=none", "module.log_images=false", "trainer.max_epochs=1"]


@pytest.mark.parametrize("script", ["train.py", "eval.py"])
def test_cfg_job_answers_without_importing_torch(script):
    """Hydra parses the command line before torch and Lightning are imported (13 s before)."""
    argv = [script, *(["ckpt_path=x.ckpt"] if script == "eval.py" else []), "--cfg", "job"]
    code = (
        "import runpy, sys\n"
        f"sys.argv = {argv!r}\n"
        "try:\n"
        f"    runpy.run_path({script!r}, run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('TORCH IMPORTED' if 'torch' in sys.modules else 'NO TORCH')\n"
    )
    args = [sys.executable, "-c", code]
    out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, check=True).stdout
    assert "data:" in out and out.strip().endswith("NO TORCH"), out[-2000:]


def test_train_names_its_outputs_and_the_start_is_quiet(make_cfg, tmp_path, caplog, capsys):
    caplog.set_level(logging.INFO)
    metrics, objects = train(make_cfg(TINY))
    text = caplog.text
    # the short summary instead of the config dump
    assert f"run folder: {tmp_path}" in text
    assert "experiment: synthetic_baseline" in text and "tasks: semseg, depth, normals, edge" in text
    assert "backbone: TimmBackbone" in text and "device: " in text
    # where the outputs are, at the end
    ckpts = tmp_path / "checkpoints"
    assert f"best checkpoint: {ckpts / 'best.ckpt'} (val/loss" in text
    assert f"checkpoint: {ckpts / 'last.ckpt'}" in text
    assert f"python eval.py ckpt_path={ckpts / 'best.ckpt'}" in text
    # no Lightning model summary (its FLOPs column is 0 without an example input): our table instead
    from lightning.pytorch.callbacks import ModelSummary

    assert not any(isinstance(c, ModelSummary) for c in objects["trainer"].callbacks)
    assert "Total FLOPs" not in capsys.readouterr().out and "parameters:" in text
    # Lightning's advertisements are dropped, its other messages reach the log (and the log file)
    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    caplog.clear()
    rank_zero_info("💡 Tip: For seamless cloud logging and experiment tracking, try installing litlogger")
    rank_zero_info("GPU available: no")
    assert "Tip" not in caplog.text and "GPU available: no" in caplog.text
    # the library-internal deprecation warning (Lightning's pytree helper on torch >= 2.10)
    from lightning.pytorch.utilities._pytree import _tree_flatten

    with warnings.catch_warnings(record=True) as caught:
        _tree_flatten({"a": [1, 2]})
    assert not [w for w in caught if "LeafSpec" in str(w.message)]


def test_extras_print_config_is_opt_in(make_cfg):
    assert make_cfg([], fast=False).extras.print_config is False


def test_eval_logs_its_table_and_names_its_files(make_cfg, tmp_path, caplog, capsys):
    train(make_cfg(TINY))
    out = tmp_path / "eval"
    cfg = make_cfg([f"ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}", "eval.pictures=0"], "eval")
    cfg.paths.output_dir = str(out)
    caplog.set_level(logging.INFO)
    capsys.readouterr()
    evaluate(cfg)
    text = caplog.text
    assert "results (val split):" in text and "| model |" in text  # through logging: eval.log has it
    assert str(out / "results.md") in text and str(out / "results.provenance.json") in text
    assert str(out / "results.config.yaml") in text and (out / "results.config.yaml").is_file()
    printed = capsys.readouterr().out
    assert "| model |" not in printed  # not printed besides: once on the console (Hydra's handler)
    assert "Test metric" not in printed  # nor Lightning's own table of the same metrics
    meta = json.loads((out / "results.provenance.json").read_text())
    assert meta["config"] == str(out / "results.config.yaml")
    assert meta["run_config"] == str(tmp_path / "config.yaml")


@pytest.mark.slow
def test_the_scripts_end_to_end(tmp_path):
    """``python train.py`` with non-default model/data, then ``python eval.py ckpt_path=…`` alone."""
    run, ev = tmp_path / "run", tmp_path / "eval"
    overrides = [*FAST_SYNTHETIC, *TINY, "data.tasks=[semseg,depth]", "model.decoder.channels=16"]
    overrides.remove("extras.print_config=false")  # the default now
    train_out = subprocess.run(
        [sys.executable, "train.py", *overrides, f"hydra.run.dir={run}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    said = train_out.stdout + train_out.stderr
    assert train_out.returncode == 0, said[-3000:]
    head = "\n".join(said.splitlines()[:60])
    for noise in ("💡", "LeafSpec", "FLOPs", "_target_:", "weights_only` was not set"):
        assert noise not in said, (noise, head)
    assert f"run folder: {run}" in head
    best = run / "checkpoints" / "best.ckpt"
    assert f"python eval.py ckpt_path={best}" in said
    ev_out = subprocess.run(
        [sys.executable, "eval.py", f"ckpt_path={best}", f"hydra.run.dir={ev}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    said = ev_out.stdout + ev_out.stderr
    assert ev_out.returncode == 0, said[-3000:]
    assert str(run / ".hydra" / "config.yaml") in said  # which config was used
    assert len(re.findall(r"^\| model \|", said, flags=re.M)) == 1  # the table, once
    assert "| model |" in (ev / "eval.log").read_text()
    results = json.loads((ev / "results.json").read_text())
    val = json.loads((run / "metrics.json").read_text())
    assert results["test/semseg/miou"] == pytest.approx(val["val/semseg/miou"], abs=1e-5)
