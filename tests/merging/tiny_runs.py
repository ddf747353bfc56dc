"""Tiny single-task checkpoints written by the real training pipeline, shared by the merging tests."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import FAST_SYNTHETIC, compose_cfg
from omegaconf import OmegaConf

from mtl.pipeline import train

#: a tiny Swin on 32 px scenes (train and eval configs alike)
TINY = [
    *FAST_SYNTHETIC,
    "data.dataset.resolution=[32,32]",
    "data.dataset.length=4",
    "data.split_kwargs.val.length=4",
    "++model.backbone.embed_dim=16",
    "++model.backbone.depths=[1,1,1,1]",
    "++model.backbone.num_heads=[1,1,2,2]",
    "++model.backbone.window_size=2",
    "model.decoder.channels=8",
]
#: 2 training steps (checkpoints in the real format, with the initial-weight fingerprint)
TRAIN = [
    "trainer.max_steps=2",
    "trainer.max_epochs=1",
    "+trainer.enable_progress_bar=false",
    "test=false",
    "logger=none",
    "module.log_images=false",
    "callbacks.lr_monitor=null",
]


def train_single_task(task: str, run_dir: Path, extra: list[str] | None = None) -> Path:
    """Trains ``experiment=synthetic_single_task task=<task>`` for 2 steps into ``run_dir``; saves the
    composed config where Hydra does (``.hydra/config.yaml``); returns ``last.ckpt``."""
    torch.set_num_threads(1)
    cfg = compose_cfg(
        ["experiment=synthetic_single_task", f"task={task}", *TINY, *TRAIN, *(extra or [])], run_dir
    )
    train(cfg)
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    # as Hydra writes it: unresolved (``${hydra:runtime.output_dir}`` and all), without the hydra node
    OmegaConf.save(
        OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), run_dir / ".hydra" / "config.yaml"
    )
    return run_dir / "checkpoints" / "last.ckpt"
