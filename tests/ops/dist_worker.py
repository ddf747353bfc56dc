"""One rank of a 2-process (gloo) DDP run for ``test_distributed_eval.py`` / ``test_distributed_train.py``.

Launched as a subprocess with the DDP environment set (``LOCAL_RANK``, ``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``): Lightning then sees processes created externally, as under
torchrun, and each rank runs the same job::

    python tests/ops/dist_worker.py eval OUT CKPT EXPERIMENT   # evaluate(cfg) into OUT/rank<r>
    python tests/ops/dist_worker.py accumulate OUT STRATEGY    # a few steps, accumulate_grad_batches=2

The in-process single-process references come from the same functions (``eval_overrides``,
``build``, ``fit``) with ``world=1``.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy
from omegaconf import DictConfig
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchjd.aggregation import UPGrad

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from mtl.backbones import TimmBackbone  # noqa: E402
from mtl.decoders.multihead import MultiHeadDecoder  # noqa: E402
from mtl.model import MultiTaskNet  # noqa: E402
from mtl.module import MTLModule  # noqa: E402
from mtl.strategies import FixedWeights, GradientAggregation  # noqa: E402
from mtl.tasks import build_tasks  # noqa: E402

VAL_LENGTH = 7  # odd: a padding sampler would evaluate one image twice on 2 ranks
EVAL = [
    "data.dataset.resolution=[64,64]",
    "data.dataset.length=8",
    f"data.split_kwargs.val.length={VAL_LENGTH}",
    "data.batch_size=2",
    "data.eval_batch_size=2",
    "extras.print_config=false",
    "logger=none",
    "eval.edge.workers=0",
    "eval.pictures=2",
]
M3VIT = [  # a small M³ViT: 2 blocks, one MoE block, 4 experts, top-2
    "model.backbone.depth=2",
    "model.backbone.out_indices=[0,1]",
    "++model.backbone.embed_dim=32",
    "++model.backbone.num_heads=2",
    "model.backbone.num_experts=4",
    "model.backbone.top_k=2",
    "model.decoder.channels=16",
]


def eval_overrides(experiment: str, ckpt: str, world: int) -> list[str]:
    """The eval config's overrides: the experiment, small data, one CPU process or ``world`` gloo ranks."""
    trainer = ["trainer=cpu"] if world == 1 else ["trainer=ddp_cpu", f"trainer.devices={world}"]
    extra = M3VIT if "m3vit" in experiment else []
    return [f"experiment={experiment}", f"ckpt_path={ckpt}", *EVAL, *extra, *trainer]


def compose_cfg(overrides: list[str], output_dir: Path, config_name: str) -> DictConfig:
    """``configs/<config_name>.yaml`` with ``overrides``; outputs under ``output_dir``."""
    from mtl.pipeline import compose_train_config

    return compose_train_config(overrides, Path(output_dir), config_name)


def write_checkpoint(experiment: str, path: Path) -> Path:
    """A checkpoint of the freshly initialised model of ``experiment`` (what ``evaluate`` loads)."""
    from mtl.pipeline import build_datamodule, build_module

    cfg = compose_cfg(eval_overrides(experiment, str(path), 1), path.parent, "eval")
    torch.manual_seed(0)
    datamodule = build_datamodule(cfg)
    module = build_module(cfg, datamodule)
    torch.save({"state_dict": module.state_dict()}, path)
    return path


# ------------------------------------------------------------------ training with accumulation
TASKS = ["semseg", "depth", "normals"]
BATCH, MICRO, RES = 2, 4, 32  # per rank: 4 micro-batches of 2, accumulated by 2 → 2 optimiser steps


class FullyValid(Dataset):
    """Random images and targets with every pixel valid: the union's mean loss is the ranks' mean."""

    def __len__(self) -> int:
        return 2 * BATCH * MICRO

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(1000 + i)
        normals = torch.randn(3, RES, RES, generator=g)
        return {
            "image": torch.randn(3, RES, RES, generator=g),
            "semseg": torch.randint(0, 4, (RES, RES), generator=g),
            "depth": torch.rand(1, RES, RES, generator=g) + 0.5,
            "normals": normals / normals.norm(dim=0, keepdim=True),
        }


def build(strategy: str) -> MTLModule:
    """A tiny ViT multi-head model without batch statistics (they differ per rank)."""
    torch.manual_seed(0)
    tasks = build_tasks(TASKS, num_classes={"semseg": 4})
    backbone = TimmBackbone(
        name="vit_tiny_patch16_224", img_size=(RES, RES), out_indices=[0, 1], depth=2, embed_dim=32,
        num_heads=2,
    )  # fmt: skip
    model = MultiTaskNet(
        backbone=backbone,
        decoder=functools.partial(MultiHeadDecoder, channels=16),
        tasks={t: task.out_channels for t, task in tasks.items()},
    )
    for m in list(model.modules()):
        for name, child in list(m.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                setattr(m, name, nn.Identity())
    return MTLModule(
        model=model,
        tasks=tasks,
        optimizer=functools.partial(torch.optim.SGD, lr=0.05),
        strategy=FixedWeights(uniform=True) if strategy == "ew" else GradientAggregation(aggregator=UPGrad()),
        log_images=False,
        accumulate_grad_batches=2,
    )


HOOK_CALLS: list[int] = []  # the bucket index of every gradient all-reduce DDP ran


def counting_allreduce(state, bucket):
    """DDP's default all-reduce, counted."""
    HOOK_CALLS.append(bucket.index())
    return allreduce_hook(state, bucket)


class CountAllReduces(L.Callback):
    """Registers :func:`counting_allreduce` on the DDP model (Lightning's ``ddp_comm_hook`` is CUDA-only)."""

    def on_train_start(self, trainer, pl_module) -> None:
        trainer.strategy.model.register_comm_hook(None, counting_allreduce)


def fit(strategy: str, *, world: int, rank: int = 0) -> MTLModule:
    """``MICRO`` micro-batches per rank (batch ``BATCH × 2 / world``), 2 accumulated per step."""
    module = build(strategy)
    data = FullyValid()
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=False)
    loader = DataLoader(data, batch_size=BATCH * 2 // world, sampler=sampler)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=world,
        strategy=DDPStrategy() if world > 1 else "auto",
        callbacks=[CountAllReduces()] if world > 1 else [],
        max_steps=MICRO // 2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
    )
    trainer.fit(module, train_dataloaders=loader)
    return module


def main() -> None:
    job, out = sys.argv[1], Path(sys.argv[2])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if job == "eval":
        from mtl.pipeline import evaluate

        ckpt, experiment = sys.argv[3], sys.argv[4]
        cfg = compose_cfg(eval_overrides(experiment, ckpt, world), out / f"rank{rank}", "eval")
        metrics, objects = evaluate(cfg)
        report = {"metrics": metrics, "routing": objects["reports"].get("routing", {})}
        (out / f"returned_rank{rank}.json").write_text(json.dumps(report))
    elif job == "accumulate":
        strategy = sys.argv[3]
        module = fit(strategy, world=world, rank=rank)
        state = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
        torch.save(
            {"params": state, "hook_calls": list(HOOK_CALLS), "rng": torch.get_rng_state()},
            out / f"{strategy}_rank{rank}.pt",
        )
    else:
        raise ValueError(f"unknown job '{job}'")


if __name__ == "__main__":
    main()
