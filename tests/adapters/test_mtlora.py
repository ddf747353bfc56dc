"""MTLoRA: equal to the base Swin at initialisation, the paper's trainable set, per-task streams, and
the computation, decoder, parameter count and recipe of the authors' code (scale-lab/MTLoRA), each
checked against values derived here from the reference's definitions."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from mtl.adapters.lora import LoRALinear, merge_lora, unmerge_lora
from mtl.adapters.mtlora import LowRankUpdate, MTLoRASwin, TaskLoRALinear, fork_swin_block
from mtl.decoders.hrnet import HRNetDecoder
from mtl.model import MultiTaskNet

TASKS = ["semseg", "depth"]
SWIN = {
    "name": "swin_tiny_patch4_window7_224",
    "img_size": (64, 64),
    "window_size": 4,
    "embed_dim": 16,
    "depths": (1, 1, 2, 1),
    "num_heads": (1, 2, 2, 4),
}


def make(**kw) -> MTLoRASwin:
    torch.manual_seed(0)
    return MTLoRASwin(tasks=TASKS, rank=4, task_rank=2, **SWIN, **kw)


def test_initial_features_equal_the_base_swin():
    backbone = make().eval()
    torch.manual_seed(0)
    base = timm.create_model(
        SWIN["name"], pretrained=False, num_classes=0, **{k: v for k, v in SWIN.items() if k != "name"}
    )
    plain = {
        k.replace(".shared.base.", ".").replace(".base.", "."): v
        for k, v in backbone.model.state_dict().items()
        if "lora_" not in k
    }
    missing, unexpected = base.load_state_dict(plain, strict=False)
    # the reference (scale-lab/MTLoRA) has no LayerNorm after the last stage: ours is gone too
    assert (
        not unexpected and all(k.startswith(("head", "norm.")) for k in missing) and "norm.weight" in missing
    )
    base.eval()
    x = torch.randn(2, 3, 64, 64)
    feats = backbone(x)
    with torch.no_grad():
        h = base.patch_embed(x)
        expected = []
        for i, stage in enumerate(base.layers):
            h = stage(h)
            nxt = base.layers[i + 1].downsample if i + 1 < len(base.layers) else nn.Identity()
            expected.append(rearrange(nxt(h), "b h w c -> b c h w"))
    for t in TASKS:
        assert [tuple(f.shape[1:]) for f in feats[t]] == [(32, 8, 8), (64, 4, 4), (128, 2, 2), (128, 2, 2)]
        for f, e in zip(feats[t], expected, strict=True):
            torch.testing.assert_close(f, e, atol=1e-5, rtol=1e-5)
    assert [f["stride"] for f in backbone.feature_info] == [8, 16, 32, 32]


def test_trainable_set_is_the_papers():
    backbone = make()
    trainable = {n for n, p in backbone.named_parameters() if p.requires_grad}
    frozen = {n for n, p in backbone.named_parameters() if not p.requires_grad}
    assert frozen and all(".base." in n for n in frozen)  # only the pretrained Linear weights and biases
    assert any("per_task.semseg.lora_A" in n for n in trainable)
    assert any(n.endswith("qkv.lora_B") for n in trainable)
    for part in ("patch_embed", "relative_position_bias_table", "downsample.reduction", "norm1"):
        assert any(part in n for n in trainable), part
    # task-specific LoRA only in the last block of each stage, on proj, fc1 and fc2
    ts = sorted({n.split(".per_task")[0] for n in trainable if ".per_task." in n})
    assert ts == sorted(
        f"model.layers.{i}.blocks.{b}.{m}"
        for i, b in enumerate([0, 0, 1, 0])
        for m in ("attn.proj", "mlp.fc1", "mlp.fc2")
    )
    strict = make(train_patch_embed=False, train_norms=False, train_pos_bias=False, train_merging=False)
    assert all("lora_" in n for n, p in strict.named_parameters() if p.requires_grad)


def test_task_streams_and_gradients_are_task_specific():
    backbone = make()
    for m in backbone.modules():
        if isinstance(m, LowRankUpdate):
            torch.nn.init.normal_(m.lora_B, std=0.5)
    net = MultiTaskNet(
        backbone=backbone, decoder=lambda **kw: HRNetDecoder(channels=8, **kw), tasks={t: 1 for t in TASKS}
    )
    x = torch.randn(2, 3, 64, 64)
    feats = backbone(x)
    assert not torch.allclose(feats["semseg"][0], feats["depth"][0])
    out = net(x)
    assert {k: tuple(v.shape) for k, v in out.items()} == {t: (2, 1, 64, 64) for t in TASKS}
    out["depth"].sum().backward()
    ts_semseg = list(backbone.task_parameters("semseg"))
    ts_depth = list(backbone.task_parameters("depth"))
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in ts_semseg)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ts_depth)
    shared = {id(p) for p in net.shared_parameters()}
    assert not shared & {id(p) for p in ts_semseg + ts_depth}


def test_merging_task_agnostic_lora_keeps_outputs():
    backbone = make().eval()
    for m in backbone.modules():
        for name in ("lora_B",):
            if hasattr(m, name):
                torch.nn.init.normal_(getattr(m, name), std=0.2)
    x = torch.randn(1, 3, 64, 64)
    before = backbone(x)
    assert merge_lora(backbone) > 0
    after = backbone(x)
    unmerge_lora(backbone)
    again = backbone(x)
    for t in TASKS:
        for a, b, c in zip(before[t], after[t], again[t], strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)


def test_rejects_a_non_swin():
    with pytest.raises(ValueError, match="needs a timm Swin"):
        MTLoRASwin(name="vit_tiny_patch16_224", tasks=TASKS, img_size=(32, 32))


@pytest.mark.slow
def test_swin_t_r64_pascal_parameter_count(make_cfg, capsys):
    """Trainable parameters of experiment=pascal_mtlora (Swin-T, r = 64, the paper's 4 tasks): the
    reference's 8,344,634 (the paper's 8.34M)."""
    from mtl.params import parameter_counts, parameter_report
    from mtl.pipeline import build_datamodule, build_module

    cfg = make_cfg(["experiment=pascal_mtlora", "model.backbone.pretrained=false"], fast=False)
    model = build_module(cfg, build_datamodule(cfg)).model
    counts = parameter_counts(model)
    stage_dims, depths, tasks = (96, 192, 384, 768), (2, 2, 6, 2), 4
    # TA-LoRA on qkv (C→3C), proj (C→C), fc1 (C→4C), fc2 (4C→C): r·(4C + 2C + 5C + 5C) per block
    assert counts["backbone: task-agnostic LoRA"]["trainable"] == sum(
        64 * 16 * c * d for c, d in zip(stage_dims, depths, strict=True)
    )
    # TS-LoRA (rank 4) on proj, fc1, fc2 of each stage's last block, per task: 4·(2C + 5C + 5C)
    assert counts["backbone: task-specific LoRA"]["trainable"] == tasks * sum(4 * 12 * c for c in stage_dims)
    with capsys.disabled():
        print(f"\nMTLoRA Swin-T r=64, PASCAL 4 tasks (paper: 8.34M trainable):\n{parameter_report(model)}")
    assert counts["all"]["trainable"] == REFERENCE_TRAINABLE


def test_vit_variant_equals_base_at_init_and_forks_at_taps():
    from mtl.adapters.mtlora_vit import MTLoRAViT
    from mtl.backbones import TimmBackbone

    vit = {"name": "vit_tiny_patch16_224", "img_size": (32, 48), "embed_dim": 32, "depth": 4, "num_heads": 2}
    torch.manual_seed(0)
    adapted = MTLoRAViT(tasks=TASKS, out_indices=[1, 3], rank=4, task_rank=2, **vit).eval()
    torch.manual_seed(0)
    base = TimmBackbone(out_indices=[1, 3], **vit).eval()
    base.model.load_state_dict(
        {
            k.replace(".shared.base.", ".").replace(".base.", "."): v
            for k, v in adapted.model.state_dict().items()
            if "lora_" not in k
        }  # fmt: skip
    )
    x = torch.randn(2, 3, 32, 48)
    feats, expected = adapted(x), base(x)
    for t in TASKS:
        assert [tuple(f.shape) for f in feats[t]] == [(2, 32, 2, 3)] * 2
        for f, e in zip(feats[t], expected, strict=True):
            torch.testing.assert_close(f, e, atol=1e-5, rtol=1e-5)
    forked = sorted({n.split(".per_task")[0] for n, _ in adapted.named_parameters() if ".per_task." in n})
    assert forked == sorted(
        f"model.blocks.{i}.{m}" for i in (1, 3) for m in ("attn.proj", "mlp.fc1", "mlp.fc2")
    )
    assert all(".base." in n for n, p in adapted.named_parameters() if not p.requires_grad)


# ------------------------------------------------------------------ the reference's computation
# The per-linear rule of scale-lab/MTLoRA (models/lora.py, MTLoRALinear, shared mode "matrix") and its
# Swin block (models/swin_transformer_mtlora.py), written out here with the modules' weights.
PASCAL4 = {"semseg": 21, "human_parts": 7, "saliency": 1, "normals": 3}
REFERENCE_TRAINABLE = 8_344_634  # the reference's printed count: Swin-T, r = 64, task rank 4, PASCAL4
REFERENCE_TRAINABLE_PLUS = 7_054_394  # the same with DOWNSAMPLER_ENABLED (MTLoRA+)
GLOBAL_SWIN = {  # every window covers its whole map: attention is global, no shift
    "name": "swin_tiny_patch4_window7_224",
    "img_size": (32, 32),
    "window_size": 8,
    "embed_dim": 8,
    "depths": (2, 2, 2, 2),
    "num_heads": (1, 2, 2, 4),
}


def perturbed(module: nn.Module) -> nn.Module:
    """Every LoRA B (task-agnostic and task-specific) non-zero, and eval mode (no dropout)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return module.eval()


def low_rank(x, update) -> torch.Tensor:
    return update.scale * x @ update.lora_A.T @ update.lora_B.T


def pretrained(layer, x) -> torch.Tensor:
    return x @ layer.base.weight.T + (layer.base.bias if layer.base.bias is not None else 0)


def adapted(layer, x) -> torch.Tensor:
    """``W x + b + s·B A x``: a LoRALinear, or a forked layer's shared output."""
    if isinstance(layer, LoRALinear):
        return pretrained(layer, x) + layer.scale * x @ layer.lora_A.T @ layer.lora_B.T
    return pretrained(layer, x) + low_rank(x, layer.shared)


def layer_norm(norm, x) -> torch.Tensor:
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    return (x - mu) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def relative_bias(table: torch.Tensor, side: int) -> torch.Tensor:
    """Swin's relative position bias of a ``side × side`` window: heads × N × N."""
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    idx = (ys[:, None] - ys[None, :] + side - 1) * (2 * side - 1) + (xs[:, None] - xs[None, :] + side - 1)
    return table[idx].permute(2, 0, 1)


def attention(attn, x, bias=None) -> torch.Tensor:
    """Global multi-head self-attention before the output projection (x: B × L × C)."""
    b, n, c = x.shape
    heads = attn.num_heads
    q, k, v = adapted(attn.qkv, x).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    w = q @ k.transpose(-2, -1) * (c // heads) ** -0.5
    w = torch.softmax(w + (0 if bias is None else bias), dim=-1)
    return (w @ v).transpose(1, 2).reshape(b, n, c)


def reference_block(blk, x, bias=None) -> torch.Tensor:
    h = x + adapted(blk.attn.proj, attention(blk.attn, layer_norm(blk.norm1, x), bias))
    return h + adapted(blk.mlp.fc2, F.gelu(adapted(blk.mlp.fc1, layer_norm(blk.norm2, h))))


def reference_fork(blk, x, tasks, mode="matrix", bias=None):
    """The shared output and each task's output of a forked block (x: B × L × C)."""
    proj, fc1, fc2 = blk.attn.proj, blk.mlp.fc1, blk.mlp.fc2
    a = attention(blk.attn, layer_norm(blk.norm1, x), bias)
    h = x + adapted(proj, a)
    n2 = layer_norm(blk.norm2, h)
    g = F.gelu(adapted(fc1, n2))
    shared, outs = h + adapted(fc2, g), {}
    for t in tasks:
        if mode == "matrix":  # W·x_shared + b + s·B_t A_t x_t
            h_t = x + pretrained(proj, a) + low_rank(a, proj.per_task[t])
            g_t = F.gelu(pretrained(fc1, n2) + low_rank(layer_norm(blk.norm2, h_t), fc1.per_task[t]))
            o_t = pretrained(fc2, g) + low_rank(g_t, fc2.per_task[t])
        elif mode == "matrixv2":  # W·x_shared + b + s·B A x_shared + s·B_t A_t x_t
            h_t = x + adapted(proj, a) + low_rank(a, proj.per_task[t])
            g_t = F.gelu(adapted(fc1, n2) + low_rank(layer_norm(blk.norm2, h_t), fc1.per_task[t]))
            o_t = adapted(fc2, g) + low_rank(g_t, fc2.per_task[t])
        else:  # task_stream: the whole adapted layer on the task stream
            h_t = x + adapted(proj, a) + low_rank(a, proj.per_task[t])
            n_t = layer_norm(blk.norm2, h_t)
            g_t = F.gelu(adapted(fc1, n_t) + low_rank(n_t, fc1.per_task[t]))
            o_t = adapted(fc2, g_t) + low_rank(g_t, fc2.per_task[t])
        outs[t] = h_t + o_t
    return shared, outs


def patch_merging(pm, z) -> torch.Tensor:
    """Swin's merging of 2 × 2 neighbours (order (0,0), (1,0), (0,1), (1,1)), LayerNorm, reduction."""
    cat = torch.cat([z[:, 0::2, 0::2], z[:, 1::2, 0::2], z[:, 0::2, 1::2], z[:, 1::2, 1::2]], dim=-1)
    return (
        adapted(pm.reduction, layer_norm(pm.norm, cat))
        if isinstance(pm.reduction, LoRALinear)
        else (layer_norm(pm.norm, cat) @ pm.reduction.weight.T)
    )


@pytest.mark.parametrize(
    "mode, plus", [("matrix", False), ("matrix", True), ("matrixv2", False), ("task_stream", False)]
)
def test_task_features_follow_the_reference_formula(mode, plus):
    """Every LoRA B non-zero: each task's feature maps equal the reference's rule computed here, per
    linear layer, from the modules' weights (attention once on the shared stream; a forked layer's
    task output W·x_shared + b + s·B_t A_t x_t; the task streams through the shared merging; no
    final norm)."""
    torch.manual_seed(0)
    backbone = perturbed(
        MTLoRASwin(tasks=TASKS, rank=4, task_rank=2, shared_mode=mode, lora_merging=plus, **GLOBAL_SWIN)
    )
    x = torch.randn(2, 3, 32, 32)
    feats = backbone(x)
    body = backbone.model
    with torch.no_grad():
        z, side = body.patch_embed(x), 8
        expected = {t: [] for t in TASKS}
        for i, stage in enumerate(body.layers):
            if i:
                z, side = patch_merging(stage.downsample, z), side // 2
            tokens = rearrange(z, "b h w c -> b (h w) c")
            bias = relative_bias(stage.blocks[0].attn.relative_position_bias_table, side)
            for blk in stage.blocks[:-1]:
                tokens = reference_block(blk, tokens, bias)
            blk = stage.blocks[-1]
            shared, outs = reference_fork(
                blk, tokens, TASKS, mode, relative_bias(blk.attn.relative_position_bias_table, side)
            )
            for t in TASKS:
                y = rearrange(outs[t], "b (h w) c -> b h w c", h=side)
                y = patch_merging(body.layers[i + 1].downsample, y) if i + 1 < len(body.layers) else y
                expected[t].append(rearrange(y, "b h w c -> b c h w"))
            z = rearrange(shared, "b (h w) c -> b h w c", h=side)
    for t in TASKS:
        for got, want in zip(feats[t], expected[t], strict=True):
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(feats["semseg"][0], feats["depth"][0])


def test_shared_stream_is_timms_block_with_shifted_padded_windows():
    """The forked block's shared output equals timm's own block (its forked layers give the shared
    output when called): shifted windows, padding to whole windows and the shift mask included."""
    torch.manual_seed(0)
    swin = dict(SWIN, img_size=(96, 96), depths=(2, 2, 2, 2))
    backbone = perturbed(MTLoRASwin(tasks=TASKS, rank=4, task_rank=2, **swin))
    body = backbone.model
    z = body.patch_embed(torch.randn(2, 3, 96, 96))
    with torch.no_grad():
        for stage in body.layers:
            z = stage.downsample(z)
            for blk in stage.blocks[:-1]:
                z = blk(z)
            last = stage.blocks[-1]
            shared, _ = fork_swin_block(last, z, TASKS)
            torch.testing.assert_close(shared, last(z), atol=2e-5, rtol=1e-4)
            z = shared
    shifted = [s.blocks[-1] for s in body.layers if any(s.blocks[-1].shift_size)]
    assert len(shifted) == 3 and body.layers[2].blocks[-1].input_resolution == (6, 6)  # 6 → padded to 8


def test_one_dropout_mask_and_no_dropout_on_task_inputs():
    """As the reference's MTLoRALinear: the task LoRA reads the shared input with the shared
    branch's dropout mask; a task stream's own input is read without dropout."""
    torch.manual_seed(0)
    layer = TaskLoRALinear(nn.Linear(6, 5), tasks=["a"], rank=3, task_rank=3, scale=2.0, dropout=0.5).train()
    with torch.no_grad():
        nn.init.normal_(layer.shared.lora_B)
        layer.per_task["a"].lora_A.copy_(layer.shared.lora_A)
        layer.per_task["a"].lora_B.copy_(layer.shared.lora_B)
    x, x_a = torch.randn(64, 6), torch.randn(64, 6)
    shared, outs = layer.fork(x, None, ["a"])
    torch.testing.assert_close(outs["a"], shared)  # identical TA / TS weights: the same dropped input
    _, outs = layer.fork(x, {"a": x_a}, ["a"])
    want = (
        x @ layer.base.weight.T + layer.base.bias + 2.0 * x_a @ layer.shared.lora_A.T @ layer.shared.lora_B.T
    )
    torch.testing.assert_close(outs["a"], want)


def test_no_final_norm_and_the_references_drop_path():
    backbone = make()
    assert not [n for n, _ in backbone.named_parameters() if n.startswith("model.norm.")]
    assert backbone.model.layers[-1].blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)


def test_mtlora_plus_adapts_patch_merging():
    backbone = make(lora_merging=True)
    reductions = [stage.downsample.reduction for stage in backbone.model.layers[1:]]
    assert all(isinstance(r, LoRALinear) for r in reductions)
    assert all(not r.base.weight.requires_grad and r.lora_A.requires_grad for r in reductions)
    assert not any(isinstance(s.downsample.reduction, LoRALinear) for s in make().model.layers[1:])


def test_hrnet_decoder_is_the_references():
    """Per task: bias-free 1×1 convs to [18, 36, 72, 144], upsample, concat (270), 1×1 conv with bias
    to 1080, BatchNorm, ReLU (the 1080 → K conv is the task head)."""
    dec = HRNetDecoder(in_channels=[192, 384, 768, 768], tasks=["semseg"])
    convs = [m for m in dec.per_task["semseg"].modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.bias is not None) for c in convs] == [
        (192, 18, (1, 1), False),
        (384, 36, (1, 1), False),
        (768, 72, (1, 1), False),
        (768, 144, (1, 1), False),
        (270, 1080, (1, 1), True),
    ]
    assert dec.out_channels == 1080
    torch.manual_seed(0)
    dec = HRNetDecoder(in_channels=[4, 6, 8, 8], tasks=["a"], channels=[2, 3, 4, 5]).eval()
    branch = dec.per_task["a"]
    conv, bn = branch.fuse[0], branch.fuse[1]
    with torch.no_grad():
        for t in (bn.weight, bn.bias, bn.running_mean):
            t.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    feats = [
        torch.randn(2, 4, 8, 8),
        torch.randn(2, 6, 4, 4),
        torch.randn(2, 8, 2, 2),
        torch.randn(2, 8, 2, 2),
    ]
    with torch.no_grad():
        ups = [
            F.interpolate(F.conv2d(f, p.weight), size=(8, 8), mode="bilinear", align_corners=False)
            for f, p in zip(feats, branch.proj, strict=True)
        ]
        y = F.conv2d(torch.cat(ups, 1), conv.weight, conv.bias)
        y = (y - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
        want = torch.relu(y * bn.weight[:, None, None] + bn.bias[:, None, None])
        got = dec(feats, tasks=["a"]).features["a"]
    assert got.shape == (2, 56, 8, 8)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def reference_trainable(
    tasks: dict[str, int], *, rank: int = 64, task_rank: int = 4, plus: bool = False
) -> int:
    """The reference's trainable parameters for Swin-T (embed 96, depths 2-2-6-2, heads 3-6-12-24,
    window 7) with its decoder, in closed form."""
    dims, depths, heads = [96, 192, 384, 768], [2, 2, 6, 2], [3, 6, 12, 24]
    n = 3 * 16 * 96 + 96 + 2 * 96  # patch embedding (4×4 conv) and its LayerNorm
    for c, d, h in zip(dims, depths, heads, strict=True):
        n += d * (4 * c + 13 * 13 * h + rank * 16 * c)  # norm1, norm2, relative bias, TA-LoRA
        n += len(tasks) * task_rank * 12 * c  # TS-LoRA on proj, fc1, fc2 of the last block
    for c in dims[:3]:  # patch merging: LayerNorm(4C) + reduction 4C → 2C (MTLoRA+: frozen, LoRA)
        n += 8 * c + (rank * 6 * c if plus else 8 * c * c)
    levels, widths = [192, 384, 768, 768], [18, 36, 72, 144]
    per_task = sum(a * b for a, b in zip(levels, widths, strict=True)) + 270 * 1080 + 1080 + 2 * 1080
    return n + len(tasks) * per_task + sum(1081 * k for k in tasks.values())  # + the 1080 → K convs


def test_swin_t_r64_trainable_count_equals_the_references():
    """Swin-T, r = 64, the paper's 4 tasks: 8,344,634 trainable parameters (the paper's 8.34M):
    backbone adapters and trainable set, decoder (per-task projections + fusion) and heads (1080 → K)."""
    assert reference_trainable(PASCAL4) == REFERENCE_TRAINABLE
    assert reference_trainable(PASCAL4, plus=True) == REFERENCE_TRAINABLE_PLUS
    backbone = MTLoRASwin(name="swin_tiny_patch4_window7_224", tasks=list(PASCAL4), img_size=(224, 224))
    net = MultiTaskNet(backbone=backbone, decoder=HRNetDecoder, tasks=PASCAL4)
    assert sum(p.numel() for p in net.parameters() if p.requires_grad) == REFERENCE_TRAINABLE
    assert sum(p.numel() for p in net.heads.parameters()) == sum(1081 * k for k in PASCAL4.values())


def test_swin_t_r64_mtlora_plus_trainable_count_equals_the_references():
    backbone = MTLoRASwin(
        name="swin_tiny_patch4_window7_224", tasks=list(PASCAL4), img_size=(224, 224), lora_merging=True
    )
    net = MultiTaskNet(backbone=backbone, decoder=HRNetDecoder, tasks=PASCAL4)
    assert sum(p.numel() for p in net.parameters() if p.requires_grad) == REFERENCE_TRAINABLE_PLUS


def test_pascal_mtlora_is_the_papers_setup(make_cfg):
    """The paper's 4 tasks, the reference's drop path, decoder widths and cosine floor: timm's cosine
    from 5e-4 to MIN_LR 5e-6 after a warm-up from WARMUP_LR 5e-7 (all × batch/512)."""
    from mtl.optim import lr_lambda

    cfg = make_cfg(["experiment=pascal_mtlora"], fast=False)
    assert list(cfg.data.tasks) == list(PASCAL4)
    assert cfg.model.backbone.drop_path_rate == 0.2 and cfg.model.backbone.shared_mode == "matrix"
    assert list(cfg.model.decoder.channels) == [18, 36, 72, 144]
    sched = {k: v for k, v in cfg.scheduler.items() if k != "name"}
    total, warm = 10_000, cfg.scheduler.warmup_steps
    f = lr_lambda(cfg.scheduler.name, total_steps=total, **sched)
    base, min_lr, warmup_lr = 5e-4, 5e-6, 5e-7
    assert f(0) == pytest.approx(warmup_lr / base)
    mid = warm + (total - warm) // 2
    timm_mid = min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * (mid - warm) / (total - warm)))
    assert f(mid) == pytest.approx(timm_mid / base)
    assert f(total) == pytest.approx(min_lr / base)


def test_vit_variant_follows_the_same_rule():
    """MTLoRA-ViT (our transfer): at each tapped block the reference's rule, with global attention
    and the class token; the task feature is the task's block output without the prefix token."""
    from mtl.adapters.mtlora_vit import MTLoRAViT
    from mtl.backbones.timm_backbone import vit_tokens

    vit = {"name": "vit_tiny_patch16_224", "img_size": (32, 48), "embed_dim": 32, "depth": 4, "num_heads": 2}
    torch.manual_seed(0)
    adapted_vit = perturbed(MTLoRAViT(tasks=TASKS, out_indices=[1, 3], rank=4, task_rank=2, **vit))
    x = torch.randn(2, 3, 32, 48)
    feats = adapted_vit(x)
    body = adapted_vit.model
    with torch.no_grad():
        tokens, (h, w) = vit_tokens(body, x)
        expected = {t: [] for t in TASKS}
        for i, blk in enumerate(body.blocks):
            if i in (1, 3):
                tokens, outs = reference_fork(blk, tokens, TASKS)
                for t in TASKS:
                    expected[t].append(rearrange(outs[t][:, 1:], "b (h w) c -> b c h w", h=h))
            else:
                tokens = reference_block(blk, tokens)
    for t in TASKS:
        for got, want in zip(feats[t], expected[t], strict=True):
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
