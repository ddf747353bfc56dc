"""PUP decoder: the reference's head computed step by step (VITA-Group/M3ViT models/vit_up_head.py,
``num_conv: 4``, ``num_upsampe_layer: 4``), the Decoder contract, SyncBN conversion, M³ViT with PUP."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mtl.backbones.m3vit import M3ViT
from mtl.contracts import Decoder, DecoderOutput
from mtl.decoders.pup import PUPDecoder
from mtl.heads import TaskHeads
from mtl.model import MultiTaskNet


def reference_head(
    x: torch.Tensor, branch: nn.Module, head: nn.Conv2d, size: tuple[int, int]
) -> torch.Tensor:
    """The reference's forward, written out: tokens' LayerNorm (eps 1e-6), then
    conv_0 → BN → ReLU → ×2, conv_1 → BN → ReLU → ×2, conv_2 → BN → ReLU → ×2, conv_3 → BN → ReLU,
    conv_4 (1 × 1, the task head), ×2 → the input size (``align_corners=False`` throughout)."""
    b, c, h, w = x.shape
    tokens = x.flatten(2).transpose(1, 2)  # B × hw × C
    tokens = F.layer_norm(tokens, (c,), branch.norm.weight, branch.norm.bias, eps=1e-6)
    y = tokens.transpose(1, 2).reshape(b, c, h, w)
    for i, (conv, bn, _) in enumerate(branch.blocks):
        y = F.conv2d(y, conv.weight, conv.bias, padding=1)
        y = F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=False, eps=bn.eps)
        y = F.relu(y)
        if i < 3:
            y = F.interpolate(
                y, size=(2 * y.shape[-2], 2 * y.shape[-1]), mode="bilinear", align_corners=False
            )
    y = F.conv2d(y, head.weight, head.bias)
    y = F.interpolate(y, size=(2 * y.shape[-2], 2 * y.shape[-1]), mode="bilinear", align_corners=False)
    assert y.shape[-2:] == size
    return y


def test_pup_head_with_the_task_head_is_the_reference_computation():
    torch.manual_seed(0)
    dec = PUPDecoder(in_channels=[24, 40], tasks=["semseg", "depth"], channels=16).eval()
    heads = TaskHeads(in_channels=dec.out_channels, out_channels={"semseg": 5, "depth": 1})
    with torch.no_grad():  # non-trivial norm affine and BN statistics
        for m in dec.modules():
            if isinstance(m, nn.LayerNorm | nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    feats = [torch.randn(2, 24, 3, 4), torch.randn(2, 40, 3, 4)]  # stride 16 of a 48 × 64 input
    out = dec(feats, tasks=["semseg", "depth"])
    assert isinstance(out, DecoderOutput) and out.features["depth"].shape == (2, 16, 24, 32)  # stride 2
    preds = heads(out.features, size=(48, 64))
    for t in ("semseg", "depth"):
        ref = reference_head(feats[-1], dec.per_task[t], heads.heads[t], (48, 64))
        torch.testing.assert_close(preds[t], ref, atol=1e-5, rtol=1e-5)


def test_pup_structure_and_contract():
    dec = PUPDecoder(in_channels=[384], tasks=["a", "b"])
    assert isinstance(dec, Decoder) and dec.out_channels == 256 and set(dec.per_task) == {"a", "b"}
    branch = dec.per_task["a"]
    assert isinstance(branch.norm, nn.LayerNorm) and branch.norm.eps == 1e-6
    convs = [blk[0] for blk in branch.blocks]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.bias is not None) for c in convs] == [
        (384, 256, (3, 3), True),
        (256, 256, (3, 3), True),
        (256, 256, (3, 3), True),
        (256, 256, (3, 3), True),
    ]
    assert all(isinstance(blk[1], nn.BatchNorm2d) and isinstance(blk[2], nn.ReLU) for blk in branch.blocks)
    assert not list(dec.shared_parameters())  # nothing shared between tasks
    only_b = dec([torch.randn(1, 384, 2, 2)], tasks=["b"])
    assert set(only_b.features) == {"b"}
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(dec)  # what Lightning's sync_batchnorm does
    assert all(not isinstance(m, nn.BatchNorm2d) for m in synced.modules())
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in synced.modules()) == 8
    with pytest.raises(ValueError, match="in_index=2 is not a level"):
        PUPDecoder(in_channels=[384, 384], tasks=["a"], in_index=2)
    with pytest.raises(ValueError, match="unknown task"):
        dec([torch.randn(1, 384, 2, 2)], tasks=["c"])


def test_m3vit_with_pup_heads_trains_per_task():
    torch.manual_seed(0)
    backbone = M3ViT(
        name="vit_tiny_patch16_224",
        img_size=(32, 48),
        depth=2,
        embed_dim=32,
        num_heads=2,
        out_indices=[1],
        tasks=["semseg", "depth"],
        num_experts=4,
        top_k=2,
    )
    model = MultiTaskNet(
        backbone=backbone, decoder=partial(PUPDecoder, channels=8), tasks={"semseg": 3, "depth": 1}
    ).train()
    out = model.run(torch.randn(2, 3, 32, 48))
    assert out.preds["semseg"].shape == (2, 3, 32, 48) and out.aux_loss is not None
    (sum(p.mean() for p in out.preds.values()) + out.aux_loss).backward()
    assert set(model.decoder.per_task) == {"semseg", "depth"}
    assert {id(p) for p in model.decoder.per_task["depth"].parameters()} <= {
        id(p) for p in model.task_parameters("depth")
    }
