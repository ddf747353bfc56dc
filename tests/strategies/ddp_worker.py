"""DDP equivalence worker: a few SGD steps of an ``MTLModule`` under each named strategy.

Run by ``test_ddp.py`` twice: as 2 CPU processes (gloo, Lightning ``ddp``, launched
externally with ``LOCAL_RANK``/``WORLD_SIZE`` set) on per-rank batches of ``B``, and in-process
as 1 process on batches of ``2B`` (the union of the ranks' batches). Every sample has all
pixels valid and the model has no batch statistics (BatchNorm → Identity), so the union's
mean loss is exactly the mean of the ranks' losses and the updates must agree.

    python tests/strategies/ddp_worker.py OUT_DIR ew,uw,...   (with the DDP env variables)
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from mtl.backbones import TimmBackbone  # noqa: E402
from mtl.decoders.multihead import MultiHeadDecoder  # noqa: E402
from mtl.model import MultiTaskNet  # noqa: E402
from mtl.module import MTLModule  # noqa: E402
from mtl.tasks import build_tasks  # noqa: E402

TASKS = ["semseg", "depth", "normals"]
STEPS = 3
BATCH = 2  # per rank
RES = 32


class FullyValid(Dataset):
    """Random images and targets with every pixel valid (no ignore labels, depth > 0)."""

    def __len__(self) -> int:
        return 2 * BATCH * STEPS

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(1000 + i)
        normals = torch.randn(3, RES, RES, generator=g)
        return {
            "image": torch.randn(3, RES, RES, generator=g),
            "semseg": torch.randint(0, 4, (RES, RES), generator=g),
            "depth": torch.rand(1, RES, RES, generator=g) + 0.5,
            "normals": normals / normals.norm(dim=0, keepdim=True),
        }


def build(strategy_name: str) -> MTLModule:
    torch.manual_seed(0)
    tasks = build_tasks(TASKS, num_classes={"semseg": 4})
    backbone = TimmBackbone(
        name="vit_tiny_patch16_224",
        img_size=(RES, RES),
        out_indices=[0, 1],
        depth=2,
        embed_dim=32,
        num_heads=2,
    )
    model = MultiTaskNet(
        backbone=backbone,
        decoder=functools.partial(MultiHeadDecoder, channels=16),
        tasks={t: task.out_channels for t, task in tasks.items()},
    )
    for m in list(model.modules()):  # batch statistics differ per rank: remove them
        for child_name, child in list(m.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                setattr(m, child_name, nn.Identity())
    cfg = OmegaConf.load(ROOT / "configs" / "strategy" / f"{strategy_name}.yaml")
    if "defaults" in cfg:
        base = OmegaConf.load(ROOT / "configs" / "strategy" / f"{cfg.defaults[0]}.yaml")
        cfg = OmegaConf.merge(base, {k: v for k, v in cfg.items() if k != "defaults"})
    strategy = instantiate(cfg, _convert_="all")
    return MTLModule(
        model=model,
        tasks=tasks,
        optimizer=functools.partial(torch.optim.SGD, lr=0.05),
        strategy=strategy,
        log_images=False,
    )


def run(strategy_name: str, *, devices: int, batch_size: int) -> dict[str, torch.Tensor]:
    module = build(strategy_name)
    data = FullyValid()
    # rank r reads samples r, r + R, …: its batches together are the single process's batches
    sampler = DistributedSampler(
        data, num_replicas=devices, rank=int(os.environ.get("LOCAL_RANK", 0)), shuffle=False
    )
    loader = DataLoader(data, batch_size=batch_size, sampler=sampler)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
    )
    trainer.fit(module, train_dataloaders=loader)
    return {k: v.detach().clone() for k, v in module.model.state_dict().items()}


if __name__ == "__main__":
    out, names = Path(sys.argv[1]), sys.argv[2].split(",")
    world = int(os.environ["WORLD_SIZE"])
    for n in names:
        params = run(n, devices=world, batch_size=BATCH)
        if int(os.environ["LOCAL_RANK"]) == 0:
            torch.save(params, out / f"{n}.pt")
