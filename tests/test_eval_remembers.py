"""``eval.py ckpt_path=<run>/checkpoints/x.ckpt`` alone evaluates the run as it was trained (issue 22,
item 2): the run's saved config gives the model, data and task options, the command line still wins,
and a checkpoint that does not fit the model gets a clear error, shape mismatches included."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import compose_cfg
from omegaconf import OmegaConf

from mtl.merging import TaskArithmetic
from mtl.merging.run import merge_checkpoints
from mtl.pipeline import eval_config, evaluate, train

# not the defaults of configs/eval.yaml (4 tasks, 64-channel decoder, 128 px, 1040 scenes)
TRAIN = [
    "data.tasks=[semseg,depth]",
    "model.decoder.channels=16",
    "data.dataset.length=8",
    "logger=none",
    "module.log_images=false",
    "trainer.max_epochs=1",
]
QUICK_EVAL = ["eval.pictures=0", "eval.edge.exact=false"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, dict[str, float]]:
    """A 2-step training run with non-default model and data: its folder and final val metrics."""
    from conftest import FAST_SYNTHETIC

    folder = tmp_path_factory.mktemp("run")
    metrics, _ = train(compose_cfg([*FAST_SYNTHETIC, *TRAIN], folder))
    assert (folder / "config.yaml").is_file() and (folder / "checkpoints" / "last.ckpt").is_file()
    return folder, metrics


def _eval(ckpt: Path, out: Path, *overrides: str) -> tuple[dict[str, float], dict]:
    """``python eval.py ckpt_path=<ckpt> <overrides>`` (no training override), into ``out``."""
    return evaluate(compose_cfg([f"ckpt_path={ckpt}", *QUICK_EVAL, *overrides], out, config_name="eval"))


def test_only_ckpt_path_evaluates_the_run_as_trained(run, tmp_path):
    folder, val = run
    results, objects = _eval(folder / "checkpoints" / "last.ckpt", tmp_path)
    assert list(objects["module"].tasks) == ["semseg", "depth"]
    # the same weights on the same validation scenes: the final validation metrics
    assert results["test/semseg/miou"] == pytest.approx(val["val/semseg/miou"], abs=1e-5)
    assert results["test/depth/rmse"] == pytest.approx(val["val/depth/rmse"], rel=1e-4)
    meta = json.loads((tmp_path / "results.provenance.json").read_text())
    assert meta["run_config"] == str(folder / "config.yaml")
    assert meta["config"] == str(tmp_path / "results.config.yaml")
    used = OmegaConf.load(tmp_path / "results.config.yaml")
    assert used.model.decoder.channels == 16 and list(used.data.tasks) == ["semseg", "depth"]
    assert used.paths.output_dir == str(tmp_path)  # this job's own paths, not the run's


def test_an_explicit_override_wins_over_the_run_config(run, tmp_path):
    folder, _ = run
    _, objects = _eval(folder / "checkpoints" / "last.ckpt", tmp_path, "data.split_kwargs.val.length=4")
    assert len(objects["datamodule"].eval_set("val")) == 4  # the run validated on 8 scenes
    meta = json.loads((tmp_path / "results.provenance.json").read_text())
    assert "data.split_kwargs.val.length=4" in meta["overrides"]


def test_a_shape_mismatch_is_a_clear_error_naming_both_shapes(run, tmp_path):
    folder, _ = run
    ckpt = folder / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError, match="does not match the configured model") as err:
        _eval(ckpt, tmp_path, "model.decoder.channels=32")
    message = str(err.value)
    assert "shape mismatches" in message and "checkpoint (16" in message and "model (32" in message
    assert str(folder / "config.yaml") in message and "model." in message


def test_without_the_run_config_the_error_says_what_to_do(run, tmp_path):
    folder, _ = run
    alone = tmp_path / "moved.ckpt"  # a checkpoint taken out of its run folder
    alone.write_bytes((folder / "checkpoints" / "last.ckpt").read_bytes())
    with pytest.raises(ValueError, match="shape mismatches.*run folder"):
        _eval(alone, tmp_path / "out")
    # eval.run_config names the run's config explicitly
    results, _ = _eval(alone, tmp_path / "out2", f"eval.run_config={folder / 'config.yaml'}")
    assert "test/depth/rmse" in results


def test_a_merged_checkpoint_evaluates_with_only_ckpt_path(run, tmp_path):
    folder, val = run
    copy = tmp_path / "run"  # merge.py reads the run's .hydra/config.yaml, which Hydra runs write
    shutil.copytree(folder, copy)
    (copy / ".hydra").mkdir()
    shutil.copy(folder / "config.yaml", copy / ".hydra" / "config.yaml")
    merged, _ = merge_checkpoints(
        ckpts=[str(copy / "checkpoints" / "last.ckpt")], method=TaskArithmetic(lam=1.0), output_dir=tmp_path
    )
    assert "config" in torch.load(merged, weights_only=True)
    results, _ = _eval(merged, tmp_path / "eval")
    assert OmegaConf.load(tmp_path / "eval" / "results.config.yaml").model.decoder.channels == 16
    assert results["test/semseg/miou"] == pytest.approx(val["val/semseg/miou"], abs=1e-5)
    meta = json.loads((tmp_path / "eval" / "results.provenance.json").read_text())
    assert "inside the checkpoint" in meta["run_config"]


def test_hydra_run_config_keeps_interpolations_and_the_command_line_wins(tmp_path):
    """A run's .hydra/config.yaml (unresolved): ``${task}`` resolves in the run's context, group and
    key overrides and deletions of the command line are applied on top of it."""
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    trained = compose_cfg(["experiment=synthetic_single_task", "task=depth", "model.decoder.channels=8"], run)
    OmegaConf.save(
        OmegaConf.masked_copy(trained, [k for k in trained if k != "hydra"]), run / ".hydra/config.yaml"
    )
    assert OmegaConf.load(run / ".hydra/config.yaml").data.tasks == ["${task}"]
    ckpt = run / "checkpoints" / "best.ckpt"
    overrides = [f"ckpt_path={ckpt}", "model/decoder=hrnet", "+task_options.depth.weight=2.0"]
    cfg = compose_cfg(overrides, tmp_path / "eval", config_name="eval")
    out, source = eval_config(cfg, ckpt, {"state_dict": {}}, overrides)
    assert source == str(run / ".hydra" / "config.yaml")
    assert list(out.data.tasks) == ["depth"]  # the run's ${task}
    assert out.model.decoder._target_.endswith("HRNetDecoder")  # the command line's group wins
    assert out.task_options.depth.weight == 2.0
    assert out.eval.split == "val" and out.paths.output_dir == str(tmp_path / "eval")  # this job's
    alone, source = eval_config(cfg, ckpt, {"state_dict": {}}, overrides[:1])
    assert alone.model.decoder.channels == 8 and alone.model.decoder._target_.endswith("MultiHeadDecoder")
    off = compose_cfg([f"ckpt_path={ckpt}", "eval.run_config=null"], tmp_path / "eval", config_name="eval")
    assert eval_config(off, ckpt, {"state_dict": {}}, [])[1] is None
