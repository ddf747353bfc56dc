"""Every experiment composes and runs one train + val batch through the real entry pipeline."""

import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import InstantiationException, MissingConfigException
from omegaconf import DictConfig, OmegaConf

from mtl.pipeline import train

ROOT = Path(__file__).resolve().parents[1]

EXPERIMENTS = sorted(p.stem for p in (ROOT / "configs" / "experiment").glob("*.yaml"))


def test_default_experiment_is_synthetic_baseline(make_cfg):
    cfg = make_cfg(fast=False)
    assert cfg.hydra.runtime.choices["experiment"] == "synthetic_baseline"
    assert cfg.data.dataset._target_ == "mtl.data.synthetic.SyntheticScenes"
    job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    OmegaConf.to_yaml(job, resolve=True)  # every interpolation resolves


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_fast_dev_run(make_cfg, experiment):
    cfg = make_cfg([f"experiment={experiment}", "debug=fdr"])
    metrics, objects = train(cfg)
    assert objects["trainer"].state.finished
    for task in cfg.data.tasks:
        assert f"train/{task}/loss" in metrics
        assert any(k.startswith(f"val/{task}/") and not k.endswith("loss") for k in metrics), task


def test_missing_config_option_lists_choices(make_cfg):
    with pytest.raises(MissingConfigException) as err:
        make_cfg(["model/backbone=vit_tinyy"])
    assert "vit_tiny" in str(err.value) and "swin_mini" in str(err.value)


def test_unknown_task_and_unprovided_task_errors(make_cfg):
    cfg = make_cfg(["data.tasks=[semseg,depht]", "debug=fdr"])
    # Hydra wraps errors raised in constructors; the message names the task and the choices
    with pytest.raises(InstantiationException, match=r"does not provide task\(s\) \['depht'\]; it provides"):
        train(cfg)


def test_unknown_backbone_error(make_cfg):
    cfg = make_cfg(["model.backbone.name=swin_tinyy_patch4_window7_224", "debug=fdr"])
    with pytest.raises(InstantiationException, match="not a timm model.*swin_tiny_patch4_window7_224"):
        train(cfg)


def print_job(*overrides: str) -> DictConfig:
    """What ``python train.py <overrides> --cfg job`` prints, parsed."""
    out = subprocess.run(
        [sys.executable, "train.py", *overrides, "--cfg", "job"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return OmegaConf.create(out)


def test_print_config_job_shows_composed_config():
    cfg = print_job("experiment=synthetic_pascal_baseline")
    assert list(cfg.data.tasks) == ["semseg", "human_parts", "saliency", "normals", "edge"]
    assert Path(ROOT / "configs" / "train.yaml").is_file()


def test_a_preset_with_another_decoder_composes_on_the_command_line():
    """model=<preset> picks a backbone and a decoder; model/decoder=... swaps the decoder alone."""
    cfg = print_job("experiment=synthetic_mtlora", "model=mtlora", "model/decoder=multihead")
    assert cfg.model.backbone._target_ == "mtl.adapters.mtlora.MTLoRASwin"
    assert cfg.model.backbone.rank == 16  # the experiment's settings still apply
    assert cfg.model.decoder._target_ == "mtl.decoders.multihead.MultiHeadDecoder"
    assert cfg.model.decoder.channels == 32 and cfg.model.decoder.task_blocks == 1


def test_runs_without_any_logger(make_cfg):
    cfg = make_cfg(["logger=none", "trainer.max_epochs=1"])
    metrics, objects = train(cfg)
    assert objects["trainer"].global_step == 4 and "val/semseg/miou" in metrics
