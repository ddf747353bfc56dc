"""Slimmable encoder and decoders: exact at full width, cheaper when narrower."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from slim_nets import slim_net, vit_kwargs
from torch import nn

from mtl.backbones import TimmBackbone
from mtl.backbones.slimmable_vit import SlimmableViT
from mtl.control.cost import CostModel, WidthConfig, active_parameters, apply_config
from mtl.decoders.slimmable import SlimmableDecoder
from mtl.model import MultiTaskNet

VIT = vit_kwargs(depth=4, out_indices=[1, 3])
WIDTHS = (0.25, 0.5, 0.75, 1.0)


def make_net() -> MultiTaskNet:
    return slim_net(WIDTHS, depth=4, out_indices=[1, 3])


def test_full_width_vit_equals_the_timm_vit():
    torch.manual_seed(0)
    slim = SlimmableViT(widths=WIDTHS, **VIT).eval()
    plain = TimmBackbone(**VIT).eval()
    plain.load_state_dict(slim.state_dict())  # same parameter names: pretrained weights load as usual
    x = torch.randn(2, 3, 32, 48)
    for a, b in zip(slim(x), plain(x), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    slim.set_width(0.5)
    narrow = slim(x)
    assert [f.shape for f in narrow] == [f.shape for f in plain(x)]  # embedding width is unchanged
    assert not torch.allclose(narrow[-1], plain(x)[-1])
    assert slim.model.blocks[0].attn.active_heads() == 2 and slim.model.blocks[0].mlp.active_hidden() == 64
    with pytest.raises(ValueError, match="width must be in"):
        slim.set_width(0.0)


def test_full_width_decoder_equals_plain_convolutions():
    torch.manual_seed(0)
    dec = SlimmableDecoder(in_channels=[8, 8], tasks=["a"], channels=6, widths=WIDTHS).eval()
    feats = [torch.randn(2, 8, 6, 6), torch.randn(2, 8, 3, 3)]
    br = dec.per_task["a"]
    lat = [F.conv2d(f, m.weight, m.bias) for m, f in zip(br.lateral, feats, strict=True)]
    x = lat[0] + F.interpolate(lat[1], size=(6, 6), mode="bilinear", align_corners=False)
    bn = br.bn.bn[-1]  # the full-width statistics
    y = F.relu(F.batch_norm(F.conv2d(x, br.conv.weight, padding=1), bn.running_mean, bn.running_var,
                            bn.weight, bn.bias))  # fmt: skip
    torch.testing.assert_close(dec(feats).features["a"], F.conv2d(y, br.out.weight, br.out.bias))
    dec.set_widths({"a": 0.5})
    assert dec(feats).features["a"].shape == (2, 6, 6, 6)  # the head still reads the full width
    assert br.bn.bn[1].num_features == 3
    with pytest.raises(ValueError, match="not one of"):
        dec.set_widths({"a": 0.3})
    with pytest.raises(KeyError, match="no decoder for task 'b'"):
        dec.set_widths({"b": 0.5})


def test_flops_and_parameters_grow_with_every_width():
    net = make_net()
    cost = CostModel(net, (32, 48))
    enc = [cost(WidthConfig(w, {"semseg": 1.0, "depth": 1.0})) for w in WIDTHS]
    dec = [cost(WidthConfig(1.0, {"semseg": w, "depth": 0.25})) for w in WIDTHS]
    for series in (enc, dec):
        flops, params = zip(*series, strict=True)
        assert all(a < b for a, b in zip(flops, flops[1:], strict=False)), flops
        assert all(a < b for a, b in zip(params, params[1:], strict=False)), params
    full = cost(WidthConfig(1.0, {"semseg": 1.0, "depth": 1.0}))
    inactive_bn = sum(
        p.numel() for m in net.decoder.modules() if isinstance(m, nn.ModuleList) for bn in list(m)[:-1]
        if isinstance(bn, nn.BatchNorm2d) for p in bn.parameters()
    )  # fmt: skip
    assert full[1] == sum(p.numel() for p in net.parameters()) - inactive_bn
    assert cost(WidthConfig(1.0, {"semseg": 1.0, "depth": 1.0})) is full  # cached


def test_config_changes_predictions_only_through_widths():
    net = make_net()
    x = torch.randn(1, 3, 32, 48)
    apply_config(net, WidthConfig(1.0, {"semseg": 1.0, "depth": 1.0}))
    full = net(x)
    apply_config(net, WidthConfig(1.0, {"semseg": 0.25, "depth": 1.0}))
    part = net(x)
    torch.testing.assert_close(part["depth"], full["depth"])  # other tasks untouched
    assert not torch.allclose(part["semseg"], full["semseg"])
    assert active_parameters(net) < sum(p.numel() for p in net.parameters())
