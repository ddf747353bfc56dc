"""``grad_checkpointing`` in MTLoRA's backbones: the activations of the shared blocks and of the forked
blocks (with their task streams) are recomputed in the backward pass, with the gradients (dropout
and stochastic-depth masks included) of the run without it."""

from __future__ import annotations

import pytest
import torch

from mtl.adapters.mtlora import MTLoRASwin
from mtl.adapters.mtlora_vit import MTLoRAViT

TASKS = ["semseg", "depth"]
SWIN = {"name": "swin_tiny_patch4_window7_224", "img_size": (64, 64), "window_size": 4, "embed_dim": 16,
        "depths": (1, 1, 2, 1), "num_heads": (1, 2, 2, 4)}  # fmt: skip
VIT = {"name": "vit_tiny_patch16_224", "img_size": (32, 48), "embed_dim": 32, "depth": 4, "num_heads": 2,
       "out_indices": [1, 3]}  # fmt: skip


def make(kind: str, checkpointing: bool):
    torch.manual_seed(0)
    cls, kw = (MTLoRASwin, SWIN) if kind == "swin" else (MTLoRAViT, VIT)
    backbone = cls(tasks=TASKS, rank=4, task_rank=2, dropout=0.1, drop_path_rate=0.2,
                   grad_checkpointing=checkpointing, **kw)  # fmt: skip
    with torch.no_grad():  # LoRA B starts at zero: give every factor a gradient
        for name, p in backbone.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    return backbone.train()


def run(backbone) -> tuple[dict[str, torch.Tensor], int]:
    """Gradients of a loss on every task's features, and the bytes autograd saved outside checkpoints."""
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() * t.element_size())
        return t

    x = torch.randn(2, 3, *backbone_size(backbone), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(3)  # dropout and stochastic depth draw the same masks in both runs
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        feats = backbone(x)
        loss = sum((f**2).mean() for maps in feats.values() for f in maps)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in backbone.named_parameters() if p.grad is not None}
    return grads, sum(saved)


def backbone_size(backbone) -> tuple[int, int]:
    return SWIN["img_size"] if isinstance(backbone, MTLoRASwin) else VIT["img_size"]


@pytest.mark.parametrize("kind", ["swin", "vit"])
def test_grad_checkpointing_keeps_the_gradients_and_saves_activations(kind):
    plain, plain_bytes = run(make(kind, False))
    ckpt, ckpt_bytes = run(make(kind, True))
    assert plain.keys() == ckpt.keys() and any("per_task" in n for n in plain)
    for n, g in plain.items():
        assert torch.allclose(g, ckpt[n], atol=1e-6, rtol=1e-5), (n, (g - ckpt[n]).abs().max())
    assert ckpt_bytes < 0.5 * plain_bytes, (ckpt_bytes, plain_bytes)  # the blocks' activations are recomputed


@pytest.mark.parametrize("kind", ["swin", "vit"])
def test_grad_checkpointing_is_off_in_eval_and_without_grad(kind):
    backbone = make(kind, True).eval()
    with torch.no_grad():
        a = backbone(torch.zeros(1, 3, *backbone_size(backbone)))
    b = make(kind, False).eval()(torch.zeros(1, 3, *backbone_size(backbone)))
    for t in TASKS:
        for x, y in zip(a[t], b[t], strict=True):
            assert torch.allclose(x, y, atol=1e-6)
