"""Backbone wrapper, multi-head decoder, heads and MultiTaskNet contracts."""

import functools

import pytest
import torch

from mtl.backbones import TimmBackbone
from mtl.decoders import MultiHeadDecoder
from mtl.model import MultiTaskNet

SWIN_MINI = dict(
    name="swin_tiny_patch4_window7_224",
    img_size=(64, 64),
    embed_dim=24,
    depths=(1, 1, 1, 1),
    num_heads=(1, 2, 4, 8),
    window_size=4,
)


@pytest.mark.parametrize(
    "kwargs, strides",
    [
        (dict(name="vit_tiny_patch16_224", img_size=(64, 96), out_indices=[2, 5, 8, 11]), [16] * 4),
        (dict(SWIN_MINI, out_indices=[0, 1, 2, 3]), [4, 8, 16, 32]),
        (dict(name="resnet18", out_indices=[-3, -2, -1]), [8, 16, 32]),
    ],
)
def test_backbone_feature_info_matches_outputs(kwargs, strides):
    bb = TimmBackbone(**kwargs)
    h, w = kwargs.get("img_size", (64, 64))
    feats = bb(torch.randn(2, 3, h, w))
    assert [f["stride"] for f in bb.feature_info] == strides
    for f, info in zip(feats, bb.feature_info, strict=True):
        assert f.shape == (2, info["channels"], h // info["stride"], w // info["stride"])


def test_unknown_backbone_lists_close_matches():
    with pytest.raises(
        ValueError, match=r"'vit_tiny_patch16_2244' is not a timm model.*vit_tiny_patch16_224"
    ):
        TimmBackbone(name="vit_tiny_patch16_2244")


def test_bad_out_indices_and_missing_checkpoint_are_clear():
    with pytest.raises(ValueError, match="out of range"):
        TimmBackbone(name="vit_tiny_patch16_224", img_size=(32, 32), out_indices=[12])
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        TimmBackbone(name="vit_tiny_patch16_224", checkpoint_path="/tmp/nope.pth")


def test_local_checkpoint_is_loaded(tmp_path):
    src = TimmBackbone(name="vit_tiny_patch16_224", img_size=(32, 32))
    import timm

    full = timm.create_model("vit_tiny_patch16_224", img_size=(32, 32))
    path = tmp_path / "vit.pth"
    torch.save(full.state_dict(), path)
    loaded = TimmBackbone(name="vit_tiny_patch16_224", img_size=(32, 32), checkpoint_path=str(path))
    w = loaded.model.blocks[0].attn.qkv.weight
    assert torch.equal(w, full.blocks[0].attn.qkv.weight)
    assert not torch.equal(w, src.model.blocks[0].attn.qkv.weight)


def _net(tasks=None):
    tasks = tasks or {"semseg": 5, "depth": 1, "normals": 3}
    bb = TimmBackbone(**SWIN_MINI)
    dec = functools.partial(MultiHeadDecoder, channels=16)
    return MultiTaskNet(backbone=bb, decoder=dec, tasks=tasks)


def test_multitasknet_predicts_every_task_at_input_resolution():
    net = _net()
    out = net(torch.randn(2, 3, 64, 64))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "semseg": (2, 5, 64, 64),
        "depth": (2, 1, 64, 64),
        "normals": (2, 3, 64, 64),
    }
    sub = net(torch.randn(1, 3, 64, 64), task_subset=["depth"])
    assert list(sub) == ["depth"]


def test_shared_and_task_parameters_partition_the_model():
    net = _net()
    shared = {id(p) for p in net.shared_parameters()}
    per_task = [{id(p) for p in net.task_parameters(t)} for t in net.tasks]
    assert all(not (shared & s) for s in per_task)
    assert not (per_task[0] & per_task[1])
    assert shared | set().union(*per_task) == {id(p) for p in net.parameters()}
    backbone = {id(p) for p in net.backbone.parameters()}
    assert backbone <= shared
    # a task's loss reaches its own parameters and the shared ones, not another task's
    out = net(torch.randn(1, 3, 64, 64))
    out["depth"].mean().backward()
    assert all(p.grad is None for p in net.task_parameters("semseg"))
    assert any(p.grad is not None for p in net.task_parameters("depth"))
