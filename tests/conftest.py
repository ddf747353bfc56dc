"""Shared fixtures: compose the real Hydra configs in-process with small, fast overrides."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = str(ROOT / "configs")

os.environ.setdefault("WANDB_MODE", "offline")

# Small and quick: 64 px synthetic scenes, few samples, no image logging.
FAST = [
    "data.dataset.resolution=[64,64]",
    "data.dataset.length=16",
    "data.split_kwargs.val.length=8",
    "data.batch_size=4",
    "data.eval_batch_size=8",
    "extras.print_config=false",
]


def compose_cfg(overrides: list[str], tmp_path: Path, config_name: str = "train") -> DictConfig:
    """Composes ``configs/<config_name>.yaml`` with overrides; outputs go under ``tmp_path``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path)
            cfg.paths.log_dir = str(tmp_path / "logs")
            cfg.hydra.runtime.output_dir = str(tmp_path)
        HydraConfig().set_config(cfg)
    return cfg


@pytest.fixture
def make_cfg(tmp_path):
    """``make_cfg(overrides, config_name="train", fast=True)`` → composed config."""

    def _make(
        overrides: list[str] | None = None, config_name: str = "train", fast: bool = True
    ) -> DictConfig:
        return compose_cfg((FAST if fast else []) + list(overrides or []), tmp_path, config_name)

    return _make
