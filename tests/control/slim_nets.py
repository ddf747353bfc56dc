"""A tiny slimmable ViT + slimmable decoder network, shared by the controllable-model tests."""

from __future__ import annotations

import torch

from mtl.backbones.slimmable_vit import SlimmableViT
from mtl.decoders.slimmable import SlimmableDecoder
from mtl.model import MultiTaskNet

TASKS = {"semseg": 5, "depth": 1}


def vit_kwargs(depth: int, out_indices: list[int]) -> dict:
    """A 32 × 48 px ViT with embedding 32 and 4 heads."""
    return {"name": "vit_tiny_patch16_224", "img_size": (32, 48), "embed_dim": 32, "depth": depth,
            "num_heads": 4, "out_indices": out_indices}  # fmt: skip


def slim_net(widths: tuple[float, ...], depth: int, out_indices: list[int]) -> MultiTaskNet:
    """:func:`vit_kwargs`' ViT, slimmable, with a 16-channel slimmable decoder, in eval mode, seeded."""
    torch.manual_seed(0)
    return MultiTaskNet(
        backbone=SlimmableViT(widths=widths, **vit_kwargs(depth, out_indices)),
        decoder=lambda **kw: SlimmableDecoder(channels=16, widths=widths, **kw),
        tasks=TASKS,
    ).eval()
