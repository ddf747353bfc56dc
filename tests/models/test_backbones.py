"""ViT/Swin backbones at the field's resolutions: position embeddings, windows, taps, checkpointing.

Tiny widths and depths, ``pretrained=False``; weight files are written by the tests themselves.
"""

import logging

import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed

from mtl.backbones import TimmBackbone

TINY_VIT = dict(depth=4, embed_dim=32, num_heads=2)
TINY_SWIN = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8))


@pytest.mark.parametrize("size, grid", [((448, 576), (28, 36)), ((512, 512), (32, 32))])
def test_vit_384_weights_load_at_the_fields_resolutions(tmp_path, size, grid):
    """A checkpoint of a 384 × 384 ViT loads into one at 448 × 576 / 512 × 512: same weights,
    position embeddings resampled from 24 × 24 to the new grid."""
    src = timm.create_model("vit_base_patch16_384", **TINY_VIT)
    path = tmp_path / "vit384.pth"
    torch.save(src.state_dict(), path)
    kw = dict(name="vit_base_patch16_384", checkpoint_path=str(path), **TINY_VIT)
    at384 = TimmBackbone(img_size=(384, 384), **kw)
    bb = TimmBackbone(img_size=size, **kw)
    assert at384.model.pos_embed.shape == (1, 1 + 24 * 24, 32)
    torch.testing.assert_close(at384.model.pos_embed, src.pos_embed)
    assert bb.model.pos_embed.shape == (1, 1 + grid[0] * grid[1], 32)
    expected = resample_abs_pos_embed(src.pos_embed, list(grid), num_prefix_tokens=1)
    torch.testing.assert_close(bb.model.pos_embed, expected)
    for name, p in bb.model.named_parameters():
        name = name.removeprefix("prefix_tokens.")  # the ViT's tokens are owned by a called child
        if name != "pos_embed":
            torch.testing.assert_close(p, src.get_parameter(name), msg=name)
    with torch.no_grad():
        feats = bb(torch.randn(1, 3, *size))
    assert [tuple(f.shape) for f in feats] == [(1, 32, *grid)] * 4  # default taps: the last 4 blocks


def test_vit_taps_are_configurable():
    bb = TimmBackbone(name="vit_base_patch16_384", img_size=(64, 96), out_indices=[1, 3], **TINY_VIT)
    assert bb.out_indices == [1, 3] and len(bb.model.blocks) == 4
    assert [f.shape[-2:] for f in bb(torch.randn(1, 3, 64, 96))] == [(4, 6)] * 2
    shallow = TimmBackbone(name="vit_base_patch16_384", img_size=(64, 96), out_indices=[0, 1], **TINY_VIT)
    assert len(shallow.model.blocks) == 2  # blocks after the last tap are pruned


@pytest.mark.parametrize(
    "name, window", [("swin_tiny_patch4_window7_224", 7), ("swin_base_patch4_window12_384", 12)]
)
def test_swin_at_non_square_sizes_keeps_its_window(name, window):
    """448 × 576 maps (112 × 144 … 14 × 18) are not multiples of 7 or 12: timm pads inside the blocks."""
    bb = TimmBackbone(name=name, img_size=(448, 576), out_indices=[0, 1, 2, 3], **TINY_SWIN)
    assert [f["stride"] for f in bb.feature_info] == [4, 8, 16, 32]
    assert [layer.blocks[0].window_size for layer in bb.model.layers] == [(window, window)] * 4
    with torch.no_grad():
        feats = bb(torch.randn(1, 3, 448, 576))
    assert [tuple(f.shape[-2:]) for f in feats] == [(112, 144), (56, 72), (28, 36), (14, 18)]
    assert [f.shape[1] for f in feats] == bb.channels == [16, 32, 64, 128]


def test_img_size_constraints_are_named(caplog):
    with pytest.raises(ValueError, match=r"img_size \[100, 100\] must be a multiple of its patch stride 16"):
        TimmBackbone(name="vit_base_patch16_384", img_size=(100, 100), **TINY_VIT)
    with caplog.at_level(logging.WARNING):
        TimmBackbone(name="swin_tiny_patch4_window7_224", img_size=(64, 80), **TINY_SWIN)
    assert "not a multiple of its largest stride 32" in caplog.text


@pytest.mark.parametrize(
    "name, kwargs, module",
    [
        ("vit_base_patch16_384", TINY_VIT, "vision_transformer"),
        ("swin_tiny_patch4_window7_224", dict(TINY_SWIN, drop_path_rate=0.0), "swin_transformer"),
    ],
)
def test_gradient_checkpointing_gives_the_same_gradients(monkeypatch, name, kwargs, module):
    import importlib

    mod = importlib.import_module(f"timm.models.{module}")
    calls = []
    fn = "checkpoint" if hasattr(mod, "checkpoint") else "checkpoint_seq"
    original = getattr(mod, fn)
    monkeypatch.setattr(mod, fn, lambda *a, **k: calls.append(1) or original(*a, **k))
    torch.manual_seed(0)
    plain = TimmBackbone(name=name, img_size=(64, 64), **kwargs)
    ckpt = TimmBackbone(name=name, img_size=(64, 64), grad_checkpointing=True, **kwargs)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 64)
    grads = []
    for bb in (plain, ckpt):
        sum(f.square().mean() for f in bb(x)).backward()
        grads.append({n: p.grad for n, p in bb.named_parameters() if p.grad is not None})
    assert calls, "timm's checkpoint() was not used"
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], msg=n)


@pytest.mark.parametrize(
    "kwargs, size",
    [
        ({}, (32, 48)),
        ({"class_token": False, "global_pool": "avg"}, (32, 48)),
        ({"reg_tokens": 2, "no_embed_class": True}, (32, 48)),
        ({"dynamic_img_size": True}, (48, 64)),  # position embeddings resampled to another grid
    ],
    ids=["cls", "no-cls", "registers", "dynamic"],
)
def test_vit_tokens_match_timms_own_embedding(kwargs, size):
    """Pins :func:`vit_tokens` (public timm pieces, instead of timm's private ``_pos_embed``) to
    timm's ``forward_features``: this fails if timm changes how a ViT embeds its input."""
    from mtl.backbones.timm_backbone import vit_tokens

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=(32, 48), **TINY_VIT, **kwargs).eval()
    torch.nn.init.normal_(vit.pos_embed, std=0.5)  # timm initialises it small: make a mistake visible
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        tokens, grid = vit_tokens(vit, x)
        ours = vit.norm(vit.blocks(tokens))
        torch.testing.assert_close(ours, vit.forward_features(x))
    assert grid == (size[0] // 16, size[1] // 16)
    assert tokens.shape[1] == vit.num_prefix_tokens + grid[0] * grid[1]
