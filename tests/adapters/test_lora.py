"""LoRA: identity at initialisation, frozen base, exact merge/unmerge, injection into timm models."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from mtl.adapters.lora import LoRALinear, inject_lora, lora_modules, merge_lora, unmerge_lora


def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        embed_dim=32,
        depth=2,
        num_heads=2,
        num_classes=0,
    )


def tiny_swin() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "swin_tiny_patch4_window7_224",
        pretrained=False,
        img_size=(64, 64),
        window_size=4,
        embed_dim=16,
        depths=(1, 1, 2, 1),
        num_heads=(1, 2, 2, 4),
        num_classes=0,
    )


def test_lora_linear_formula_and_init():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    lora = LoRALinear(base, rank=3, scale=4.0, dropout=0.0)
    x = torch.randn(7, 6)
    torch.testing.assert_close(lora(x), base(x))  # B = 0 at initialisation
    assert lora.lora_A.abs().sum() > 0 and not base.weight.requires_grad and not base.bias.requires_grad
    with torch.no_grad():
        lora.lora_B.normal_()
    expected = base(x) + 4.0 * x @ lora.lora_A.T @ lora.lora_B.T  # y = Wx + s·B·A·x, s used as is
    torch.testing.assert_close(lora(x), expected)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        LoRALinear(nn.Linear(2, 2), rank=0)


def test_merge_unmerge_round_trip():
    torch.manual_seed(0)
    lora = LoRALinear(nn.Linear(8, 4), rank=2, dropout=0.05).eval()
    with torch.no_grad():
        lora.lora_B.normal_()
    x = torch.randn(3, 8)
    w0, y = lora.base.weight.clone(), lora(x)
    lora.merge()
    lora.merge()  # idempotent
    assert lora.merged
    torch.testing.assert_close(lora(x), y, atol=1e-5, rtol=1e-5)
    lora.unmerge()
    torch.testing.assert_close(lora.base.weight, w0, atol=1e-6, rtol=0)
    torch.testing.assert_close(lora(x), y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make", [tiny_vit, tiny_swin])
def test_injection_into_timm_models(make):
    model = make().eval()
    size = 32 if make is tiny_vit else 64
    x = torch.randn(2, 3, size, size)
    before = model(x)
    names = inject_lora(model, rank=4)
    assert names and {n.rsplit(".", 1)[-1] for n in names} == {"qkv", "proj", "fc1", "fc2"}
    assert all(n.split(".")[-1] != "head" for n in names)
    torch.testing.assert_close(model(x), before)  # identical output at initialisation
    for m in lora_modules(model):
        with torch.no_grad():
            m.lora_B.normal_(std=0.02)
    adapted = model(x)
    assert not torch.allclose(adapted, before)
    # gradients reach exactly the LoRA parameters of the adapted layers (other params untouched here)
    adapted.sum().backward()
    for m in lora_modules(model):
        assert m.lora_A.grad is not None and m.base.weight.grad is None
    assert merge_lora(model) == len(names)
    torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=1e-5)
    unmerge_lora(model)
    torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=1e-5)


def test_inject_errors_list_the_linear_names():
    with pytest.raises(ValueError, match=r"no nn.Linear named \['q_proj'\].*'fc1'"):
        inject_lora(tiny_vit(), rank=2, targets=["q_proj"])
