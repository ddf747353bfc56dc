"""Shared fixtures: compose the real Hydra configs in-process with small, fast overrides."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from mtl.pipeline import compose_train_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = str(ROOT / "configs")

os.environ.setdefault("WANDB_MODE", "offline")
# The tests' models are tiny: one thread each is faster than fighting over the shared cores.
torch.set_num_threads(1)

# Small and quick: 64 px synthetic scenes, few samples, no image logging.
FAST_SYNTHETIC = [
    "data.dataset.resolution=[64,64]",
    "data.dataset.length=16",
    "data.split_kwargs.val.length=8",
    "data.batch_size=4",
    "data.eval_batch_size=8",
    "extras.print_config=false",
]
FAST = FAST_SYNTHETIC  # the name older tests use

# Real-format datasets (NYUD-v2, PASCAL-Context) written by the session fixture ``fake_data_dir``
# at small sizes: NYUD 64×80 images, PASCAL 60×76, both padded to 64×80.
FAKE_SIZES = {"NYUDv2": (64, 80), "PASCALContext": (60, 76)}


def fast_real(data_dir: Path) -> list[str]:
    """Overrides that make ``data=nyud`` / ``data=pascal_context`` quick on the fake roots."""
    return [
        f"paths.data_dir={data_dir}",
        "data.batch_size=2",
        "data.eval_batch_size=2",
        "data.num_workers=0",
        "data.pin_memory=false",
        "data.input_size=[64,80]",
        "++data.resize=null",  # fixed-size recipes (MTLoRA's 448×448) would exceed the pad size
        "extras.print_config=false",
    ]


# Real experiments train ViT-L (pretrained) with DDP on GPUs: in tests they get a tiny ViT from
# scratch on one CPU process instead (no download, no 300M-parameter model); see cpu_tiny().
TINY_VIT = [
    "model/backbone=vit_tiny",
    "+model.backbone.depth=4",
    "+model.backbone.embed_dim=32",
    "+model.backbone.num_heads=2",
    "model.backbone.out_indices=[0,1,2,3]",
]
CPU_TRAINER = ["trainer=cpu", "trainer.precision=32"]
TINY_MTLORA_SWIN = [
    "model.backbone.pretrained=false",
    "++model.backbone.embed_dim=16",
    "++model.backbone.depths=[1,1,2,1]",
    "++model.backbone.num_heads=[1,2,2,4]",
    "++model.backbone.window_size=4",
    "model.backbone.rank=4",
    "model.decoder.channels=8",
]
TINY_SLIMMABLE = [
    "model.backbone.pretrained=false",
    "model.backbone.name=vit_tiny_patch16_224",
    "++model.backbone.depth=4",
    "++model.backbone.embed_dim=32",
    "++model.backbone.num_heads=2",
    "model.backbone.out_indices=[0,1,2,3]",
    "model.decoder.channels=16",
]
TINY_MTLORA_VIT = [
    "model.backbone.pretrained=false",
    "model.backbone.name=vit_tiny_patch16_224",
    "+model.backbone.depth=4",
    "+model.backbone.embed_dim=32",
    "+model.backbone.num_heads=2",
    "model.backbone.out_indices=[0,1,2,3]",
    "model.backbone.rank=4",
    "model.decoder.channels=8",
]

TINY_M3VIT = [  # M³ViT keeps its MoE blocks: a 2-block ViT, 4 experts, top-2
    "model.backbone.pretrained=false",
    "model.backbone.name=vit_tiny_patch16_224",
    "++model.backbone.depth=2",
    "++model.backbone.embed_dim=32",
    "++model.backbone.num_heads=2",
    "model.backbone.out_indices=[0,1]",
    "model.backbone.num_experts=4",
    "model.backbone.top_k=2",
    "model.decoder.channels=16",
]


def cpu_tiny(cfg: DictConfig) -> list[str]:
    """Overrides for a composed config that would download weights or need GPUs."""
    backbone = cfg.get("model", {}).get("backbone", {}) or {}
    out = []
    target = str(backbone.get("_target_", ""))
    if target.endswith(("MTLoRASwin", "MTLoRAViT")):  # no model/backbone group: shrink in place
        out += TINY_MTLORA_SWIN if target.endswith("MTLoRASwin") else TINY_MTLORA_VIT
    elif target.endswith("SlimmableViT") and backbone.get("pretrained"):
        out += TINY_SLIMMABLE
    elif target.endswith("M3ViT") and backbone.get("pretrained"):
        out += TINY_M3VIT
    elif backbone.get("pretrained") or backbone.get("checkpoint_path"):
        out += TINY_VIT
    if (cfg.get("pretrained") or {}).get("source") == "synthetic":  # the cache of mtl.pretrain: its own
        out.append("pretrained=none")  # tests (tests/test_pretrain.py) load it; here the backbone is random
    if str(cfg.get("trainer", {}).get("accelerator", "cpu")) not in ("cpu", "auto"):
        out += CPU_TRAINER
    return out


def write_fake_data(data_dir: Path) -> Path:
    """Writes tiny NYUDv2/ and PASCALContext/ roots in the real on-disk formats under ``data_dir``."""
    from mtl.data.fake import write_nyud, write_pascal

    write_nyud(data_dir / "NYUDv2", n_train=3, n_val=2, size=FAKE_SIZES["NYUDv2"])
    write_pascal(data_dir / "PASCALContext", n_train=3, n_val=2, size=FAKE_SIZES["PASCALContext"])
    return data_dir


@pytest.fixture(scope="session")
def fake_data_dir(tmp_path_factory) -> Path:
    """A ``paths.data_dir`` holding tiny real-format NYUDv2/ and PASCALContext/ roots."""
    return write_fake_data(tmp_path_factory.mktemp("data"))


def compose_cfg(overrides: list[str], tmp_path: Path, config_name: str = "train") -> DictConfig:
    """Composes ``configs/<config_name>.yaml`` with overrides; outputs go under ``tmp_path``."""
    return compose_train_config(overrides, Path(tmp_path), config_name)


@pytest.fixture
def make_cfg(tmp_path, tmp_path_factory):
    """``make_cfg(overrides, config_name="train", fast=True)`` → composed config.

    ``fast`` picks the quick overrides that fit the composed data config: small synthetic
    scenes, or the tiny fake real-format roots (written once per session) for NYUD-v2 and
    PASCAL-Context; a pretrained backbone becomes a tiny ViT from scratch and a GPU trainer the
    CPU one (:func:`cpu_tiny`). Overrides given by the caller still win.
    """

    def _make(
        overrides: list[str] | None = None, config_name: str = "train", fast: bool = True
    ) -> DictConfig:
        overrides = list(overrides or [])
        if not fast:
            return compose_cfg(overrides, tmp_path, config_name)
        probe = compose_cfg(overrides, tmp_path, config_name)
        overrides = cpu_tiny(probe) + overrides
        target = str(probe.get("data", {}).get("dataset", {}).get("_target_", ""))
        if target.endswith("SyntheticScenes") or not target:
            return compose_cfg(FAST_SYNTHETIC + overrides, tmp_path, config_name)
        data_dir = tmp_path_factory.getbasetemp() / "fake_data"
        if not (data_dir / "PASCALContext").is_dir():
            write_fake_data(data_dir)
        return compose_cfg(fast_real(data_dir) + overrides, tmp_path, config_name)

    return _make


# What an in-process DDP run (Lightning with one gloo process, trainer=ddp_cpu devices=1) leaves in
# os.environ: a later `train.py` subprocess would inherit LOCAL_RANK / ports and take itself for an
# already-launched rank, waiting forever for a second process that is never started.
_DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "GLOBAL_RANK", "RANK", "WORLD_SIZE",
             "LOCAL_WORLD_SIZE", "GROUP_RANK", "PL_GLOBAL_SEED", "PL_SEED_WORKERS")  # fmt: skip


@pytest.fixture(autouse=True)
def _restore_distributed_env():
    saved = {k: os.environ.get(k) for k in _DIST_ENV}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
