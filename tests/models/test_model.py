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


# ---------------------------------------------------------------------------- typed contracts
def _mtlora_swin(**kw):
    from mtl.adapters.mtlora import MTLoRASwin

    torch.manual_seed(0)
    swin = dict(SWIN_MINI, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4), embed_dim=16)
    return MTLoRASwin(tasks=["semseg", "depth", "normals"], rank=4, task_rank=2, **swin, **kw)


def _mtlora_vit():
    from mtl.adapters.mtlora_vit import MTLoRAViT

    torch.manual_seed(0)
    vit = dict(name="vit_tiny_patch16_224", img_size=(32, 32), embed_dim=32, depth=4, num_heads=2)
    return MTLoRAViT(tasks=["semseg", "depth", "normals"], out_indices=[1, 3], rank=4, task_rank=2, **vit)


def _fork_counter(backbone):
    """Counts, per forked (task-LoRA) layer call, the task outputs it computed and its shared output
    (``None``)."""
    from collections import Counter

    from mtl.adapters.mtlora import TaskLoRALinear

    calls, layers = Counter(), [m for m in backbone.modules() if isinstance(m, TaskLoRALinear)]

    def counted(fork):
        def wrapper(*args, **kwargs):
            shared, outs = fork(*args, **kwargs)
            calls.update([*outs, *([None] if shared is not None else [])])
            return shared, outs

        return wrapper

    for m in layers:
        m.fork = counted(m.fork)
    return calls, len(layers)


@pytest.mark.parametrize("make, size", [(_mtlora_swin, 64), (_mtlora_vit, 32)], ids=["swin", "vit"])
def test_task_subset_forks_only_its_tasks_streams(make, size):
    """``tasks_at_inference=[depth]``: the task-conditioned backbone forks for depth only, and the
    shared stream stops inside the last fork level (nothing reads it after; the reference's task
    path reads the shared stream at proj and fc1 there, so only that level's fc2 skips it)."""
    backbone = make()
    net = MultiTaskNet(
        backbone=backbone,
        decoder=functools.partial(MultiHeadDecoder, channels=8),
        tasks={"semseg": 5, "depth": 1, "normals": 3},
        tasks_at_inference=["depth"],
    ).eval()
    calls, n = _fork_counter(backbone)  # n: 3 adapted layers (proj, fc1, fc2) per fork level
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        full = net(x, task_subset=["semseg", "depth", "normals"])
        assert dict(calls) == {None: n - 1, "semseg": n, "depth": n, "normals": n}
        calls.clear()
        only = net(x)
    assert list(only) == ["depth"]
    torch.testing.assert_close(only["depth"], full["depth"])
    assert dict(calls) == {None: n - 1, "depth": n}


def test_any_decoder_takes_per_task_features():
    """MTLoRA + the multi-head decoder (the issue's failing combination) and TaskExpert: the
    decoder runs once per task stream; each task equals its own single-task run."""
    from mtl.decoders.taskexpert import TaskExpertDecoder

    tasks = {"semseg": 5, "depth": 1, "normals": 3}
    for decoder in (
        functools.partial(MultiHeadDecoder, channels=8),
        functools.partial(TaskExpertDecoder, channels=8, num_experts=2),
    ):
        net = MultiTaskNet(backbone=_mtlora_swin(), decoder=decoder, tasks=tasks).eval()
        assert net.backbone.kind == "per_task"
        x = torch.randn(2, 3, 64, 64)
        out = net.run(x)
        assert {t: tuple(v.shape) for t, v in out.preds.items()} == {
            t: (2, k, 64, 64) for t, k in tasks.items()
        }
        for t in tasks:
            torch.testing.assert_close(net.run(x, tasks=[t]).preds[t], out.preds[t])
        if decoder.func is TaskExpertDecoder:  # gate maps and statistics of every pass, joined
            assert set(out.maps) == {f"gates_{t}" for t in tasks}
            assert {k.split("/")[1] for k in out.stats} == set(tasks)
        with pytest.raises(ValueError, match="no shared representation for rep_grad"):
            list(net.representation_parameters())
        with pytest.raises(ValueError, match="no shared representation"):
            net.encode(x)


def test_mtlora_with_the_multihead_decoder_trains(make_cfg):
    from mtl.pipeline import train

    cfg = make_cfg(
        [
            "experiment=synthetic_mtlora",
            "model.decoder._target_=mtl.decoders.multihead.MultiHeadDecoder",
            "data.tasks=[semseg,depth]",
            "logger=none",
            "callbacks=none",
            "debug=fdr",
        ]
    )
    metrics, objects = train(cfg)
    assert isinstance(objects["module"].model.decoder, MultiHeadDecoder)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))


def test_parts_are_typed_and_mismatches_are_refused_at_construction():
    from mtl.contracts import Backbone, Decoder
    from mtl.decoders.taskexpert import TaskExpertDecoder

    net = _net()
    assert isinstance(net.backbone, Backbone) and net.backbone.kind == "shared"
    assert isinstance(net.decoder, Decoder) and net.decoder.splits_representation
    x = torch.randn(1, 3, 64, 64)
    rep = net.encode(x)
    torch.testing.assert_close(net.decode(rep, size=(64, 64)).preds["depth"], net(x)["depth"])
    with pytest.raises(TypeError, match="must be an mtl.contracts.Backbone"):
        MultiTaskNet(backbone=torch.nn.Identity(), decoder=MultiHeadDecoder, tasks={"depth": 1})
    built_for_two = functools.partial(TaskExpertDecoder, channels=8, num_experts=2)
    with pytest.raises(
        ValueError, match=r"built for 2 tapped layers of \[24, 48\] channels; the backbone gives 4"
    ):
        TaskExpertDecoder.check_features(
            built_for_two(in_channels=[24, 48], tasks=["depth"]), _net().backbone.feature_info
        )
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['edge'\]"):
        net.run(x, tasks=["edge"])


def test_no_attribute_probes_in_the_model():
    import inspect

    import mtl.model

    source = inspect.getsource(mtl.model)
    assert "getattr(" not in source and "hasattr(" not in source


@pytest.mark.parametrize(
    "override, expected",
    [
        (
            "model.decoder._target_=torch.nn.Identity",
            r"model.decoder: 'torch.nn.Identity' is not a mtl.contracts.Decoder",
        ),
        (
            "model.backbone._target_=mtl.decoders.hrnet.HRNetDecoder",
            r"model.backbone: 'mtl.decoders.hrnet.HRNetDecoder' is not a mtl.contracts.Backbone",
        ),
    ],
)
def test_config_check_names_a_part_that_breaks_its_contract(make_cfg, override, expected):
    from mtl.config_check import ConfigError, check_config

    cfg = make_cfg(["experiment=synthetic_mtlora", override])
    with pytest.raises(ConfigError, match=expected):
        check_config(cfg)
    check_config(make_cfg(["experiment=synthetic_mtlora"]))  # the preset itself is fine
