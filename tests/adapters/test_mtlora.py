"""MTLoRA: equal to the base Swin at initialisation, the paper's trainable set, per-task streams."""

from __future__ import annotations

import pytest
import timm
import torch
from einops import rearrange

from mtl.adapters.lora import merge_lora, unmerge_lora
from mtl.adapters.mtlora import LowRankUpdate, MTLoRASwin
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
    assert not unexpected and all(k.startswith("head") for k in missing)
    base.eval()
    x = torch.randn(2, 3, 64, 64)
    feats = backbone(x)
    with torch.no_grad():
        h = base.patch_embed(x)
        expected = []
        for i, stage in enumerate(base.layers):
            h = stage(h)
            nxt = base.layers[i + 1].downsample if i + 1 < len(base.layers) else base.norm
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
    """Trainable parameters of MTLoRA Swin-T r = 64 on PASCAL's 5 tasks, next to the paper's 8.34M."""
    from mtl.params import parameter_counts, parameter_report
    from mtl.pipeline import build_datamodule, build_module

    cfg = make_cfg(["experiment=pascal_mtlora", "model.backbone.pretrained=false"], fast=False)
    model = build_module(cfg, build_datamodule(cfg)).model
    counts = parameter_counts(model)
    stage_dims, depths, tasks = (96, 192, 384, 768), (2, 2, 6, 2), 5
    # TA-LoRA on qkv (C→3C), proj (C→C), fc1 (C→4C), fc2 (4C→C): r·(4C + 2C + 5C + 5C) per block
    assert counts["backbone: task-agnostic LoRA"]["trainable"] == sum(
        64 * 16 * c * d for c, d in zip(stage_dims, depths, strict=True)
    )
    # TS-LoRA (rank 4) on proj, fc1, fc2 of each stage's last block, per task: 4·(2C + 5C + 5C)
    assert counts["backbone: task-specific LoRA"]["trainable"] == tasks * sum(4 * 12 * c for c in stage_dims)
    with capsys.disabled():
        print(f"\nMTLoRA Swin-T r=64, PASCAL 5 tasks (paper: 8.34M trainable):\n{parameter_report(model)}")
    assert 6.5e6 < counts["all"]["trainable"] < 9.5e6


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
