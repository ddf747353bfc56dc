"""TaskExpert decoder: shapes, gates, memory, gradients, task/shared split, options and errors."""

import functools
import itertools

import pytest
import torch

from mtl.backbones import TimmBackbone
from mtl.decoders.moe import gate_picture
from mtl.decoders.taskexpert import TaskExpertDecoder
from mtl.model import MultiTaskNet
from mtl.module import StatMeans
from mtl.tasks import build_tasks

TASKS = ["semseg", "depth", "normals"]
OUT = {"semseg": 5, "depth": 1, "normals": 3}
TINY_VIT = dict(name="vit_tiny_patch16_224", depth=3, embed_dim=32, num_heads=2)


def _feats(channels, sizes, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, c, *s, generator=g) for c, s in zip(channels, sizes, strict=True)]


def _decoder(in_channels, **kw):
    torch.manual_seed(0)
    kw = {"channels": 8, "num_experts": 3, **kw}
    return TaskExpertDecoder(in_channels=in_channels, tasks=TASKS, **kw)


def _randomise_gates(dec):
    """Gates start at zero (uniform weights); give them weights so that tests see real routing."""
    with torch.no_grad():
        for branch in dec.per_task.values():
            for g in branch.gates:
                g.weight.normal_(0, 1)


@pytest.mark.parametrize("subset", [("depth",), ("semseg", "normals"), ("normals", "semseg", "depth")])
def test_output_shapes_for_every_task_subset(subset):
    dec = _decoder([16, 16, 16])
    out = dec(_feats([16, 16, 16], [(4, 5)] * 3), tasks=list(subset)).features
    assert {t: tuple(v.shape) for t, v in out.items()} == {t: (2, 8, 4, 5) for t in subset}


@pytest.mark.parametrize(
    "channels, sizes",
    [
        ([12], [(4, 6)]),  # one tap
        ([12, 12], [(4, 6), (4, 6)]),  # ViT-like: every tap at stride 16
        ([6, 12, 24, 48], [(16, 20), (8, 10), (4, 5), (2, 3)]),  # Swin-like pyramid (padded last stage)
    ],
)
def test_output_at_finest_tap_for_any_tap_list(channels, sizes):
    dec = _decoder(channels)
    out = dec(_feats(channels, sizes)).features
    assert all(v.shape == (2, 8, *sizes[0]) for v in out.values())
    with pytest.raises(ValueError, match=f"built for {len(channels)} tapped layers"):
        dec(_feats(channels, sizes)[:-1] if len(channels) > 1 else _feats(channels, sizes) * 2)


@pytest.mark.parametrize("top_k", [None, 2])
def test_gate_weights_sum_to_one_per_pixel(top_k):
    dec = _decoder([16, 16], top_k=top_k).eval()
    _randomise_gates(dec)
    maps = dec(_feats([16, 16], [(4, 5)] * 2)).maps
    assert set(maps) == {f"gates_{t}" for t in TASKS}
    for layers in maps.values():
        assert len(layers) == 2
        for g in layers:  # (B, experts + memory, h, w)
            assert g.shape == (2, 4, 4, 5) and (g >= 0).all()
            torch.testing.assert_close(g.sum(dim=1), torch.ones(2, 4, 5))
            if top_k:
                assert ((g > 0).sum(dim=1) == top_k).all()
            else:
                assert (g > 0).all() and not torch.allclose(g, torch.full_like(g, 0.25))


def test_memory_path_changes_the_output():
    feats = _feats([16, 16, 16], [(4, 5)] * 3)
    dec = _decoder([16, 16, 16]).eval()
    _randomise_gates(dec)
    ref_out = dec(feats)
    ref = ref_out.features
    mem_gate = torch.stack([g[:, -1] for layers in ref_out.maps.values() for g in layers])
    assert (mem_gate > 0).all() and (mem_gate.mean(dim=(1, 2, 3)) > 0.01).all()  # read at every layer
    with torch.no_grad():  # a different memory initialisation (the first write) changes every task
        for branch in dec.per_task.values():
            branch.memory_proj.weight.mul_(-1.0)
    out = dec(feats).features
    for t in TASKS:
        assert (out[t] - ref[t]).abs().max() > 1e-3, t
    # the ablation without memory has no memory expert and produces other features
    no_mem = _decoder([16, 16, 16], use_memory=False).eval()
    assert no_mem.expert_names == ["expert0", "expert1", "expert2"]
    assert (no_mem(feats).features["depth"] - ref["depth"]).abs().max() > 1e-3


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"memory_init": "learned", "memory_update": "ema", "gate_input": "feature_memory"},
        {"memory_init": "zeros", "memory_update": "replace", "expert_kernel": 3, "top_k": 2},
    ],
)
def test_gradients_reach_every_expert_gate_and_memory_parameter(options):
    dec = _decoder([16, 16, 16], **options).train()
    out = dec(_feats([16, 16, 16], [(4, 5)] * 3)).features
    sum((v * torch.randn_like(v)).sum() for v in out.values()).backward()
    dead = [n for n, p in dec.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not dead, dead
    for layer in dec.experts:  # each of the N experts (groups of the batched convs) individually
        for w in (layer.fc1.weight, layer.fc2.weight):
            per_expert = w.grad.reshape(layer.num_experts, -1).abs().sum(dim=1)
            assert (per_expert > 0).all()


def test_task_parameters_hold_gates_and_memory_shared_hold_experts():
    bb = TimmBackbone(**dict(TINY_VIT, img_size=(32, 48), out_indices=[0, 1]))
    dec = functools.partial(TaskExpertDecoder, channels=8, num_experts=2)
    net = MultiTaskNet(backbone=bb, decoder=dec, tasks=OUT)
    shared = {id(p) for p in net.shared_parameters()}
    per_task = {t: {id(p) for p in net.task_parameters(t)} for t in OUT}
    branch = net.decoder.per_task["depth"]
    for p in [*branch.gates.parameters(), *branch.memory_proj.parameters(), *branch.read_norm.parameters()]:
        assert id(p) in per_task["depth"] and id(p) not in shared
    assert all(id(p) in shared for p in net.decoder.experts.parameters())
    assert not (per_task["semseg"] & per_task["depth"]) and not (shared & per_task["normals"])
    assert len(shared) + sum(map(len, per_task.values())) == len(list(net.parameters()))


def test_validation_stats_and_gate_pictures():
    dec = _decoder([16, 16]).eval()
    _randomise_gates(dec)
    feats = _feats([16, 16], [(4, 5)] * 2, b=3)
    out = dec(feats)
    stats = out.stats
    for t, layer in itertools.product(TASKS, range(2)):
        means = [float(stats[f"gates/{t}/layer{layer}/{e}"]) for e in dec.expert_names]
        assert sum(means) == pytest.approx(1.0, abs=1e-5)
        assert 0 < float(stats[f"gates/{t}/layer{layer}/entropy"]) <= 1.0
    assert len(stats) == len(TASKS) * 2 * (len(dec.expert_names) + 1)
    assert torch.equal(dec(feats).stats["gates/depth/layer1/entropy"], stats["gates/depth/layer1/entropy"])
    assert dec.train()(feats).stats == {} and dec(feats).maps == {}  # statistics and maps: eval only
    dec.eval()
    pics = dec.picture_maps(out.maps, 1, size=(16, 20))
    assert set(pics) == {f"gates_{t}" for t in TASKS}
    h, w, _ = pics["gates_depth"].shape  # labelled: title, layer headers, row names, legend
    assert h > 2 * 16 and w > 2 * 20 + 2 and pics["gates_depth"].dtype.name == "uint8"
    picture = gate_picture([torch.tensor([[[1.0]], [[0.0]]])], size=(2, 2), memory=True)
    assert (picture[2:] == 0).all()  # memory weight 0 → black bottom row


def test_gate_statistics_accumulate_to_those_of_the_whole_evaluation():
    """Per-forward batch means, averaged with batch-size weights over an evaluation (MTLModule's
    accumulation), equal the statistics of one forward over all the samples."""
    dec = _decoder([16, 16]).eval()
    _randomise_gates(dec)
    feats = _feats([16, 16], [(4, 5)] * 2, b=5)
    acc = StatMeans()
    for part in ([f[:3] for f in feats], [f[3:] for f in feats]):
        acc.update(dec(part).stats, part[0].shape[0])
    whole = dec(feats).stats
    means = acc.compute()
    assert means.keys() == whole.keys()
    for k in whole:
        torch.testing.assert_close(means[k], whole[k], msg=k)


def test_balance_loss_and_intermediate_supervision():
    dec = _decoder([16, 16, 16], balance_weight=0.1, top_k=2, intermediate_supervision=True).train()
    _randomise_gates(dec)
    out = dec(_feats([16, 16, 16], [(4, 5)] * 3))
    assert out.aux_loss is not None and float(out.aux_loss.detach()) > 0
    assert len(out.intermediate) == 2 and out.intermediate_weight == 1.0
    dec.eval()
    out = dec(_feats([16, 16, 16], [(4, 5)] * 3))
    assert out.aux_loss is None and out.intermediate == []
    assert _decoder([16]).train()(_feats([16], [(2, 2)])).aux_loss is None


def test_intermediate_losses_through_the_heads():
    bb = TimmBackbone(**dict(TINY_VIT, img_size=(32, 32), out_indices=[0, 1, 2]))
    dec = functools.partial(
        TaskExpertDecoder, channels=8, num_experts=2, intermediate_supervision=True, intermediate_weight=0.5
    )
    tasks = build_tasks(["semseg", "depth"], num_classes={"semseg": 4})
    net = MultiTaskNet(backbone=bb, decoder=dec, tasks={t: k.out_channels for t, k in tasks.items()})
    batch = {
        "image": torch.randn(2, 3, 32, 32),
        "semseg": torch.randint(0, 4, (2, 32, 32)),
        "depth": torch.rand(2, 1, 32, 32) + 0.5,
    }

    def intermediate_losses(out):
        return {
            t: sum(out.intermediate_weight * tasks[t].loss(p, batch) for p in preds)
            for t, preds in out.intermediate.items()
        }

    out = net.train().run(batch["image"])
    assert out.intermediate_weight == 0.5
    assert all(p.shape[-2:] == (32, 32) for preds in out.intermediate.values() for p in preds)
    extra = intermediate_losses(out)
    assert set(extra) == {"semseg", "depth"} and all(float(v) > 0 for v in extra.values())
    assert intermediate_losses(net.eval().run(batch["image"])) == {}


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"memory_update": "gru"}, r"memory_update='gru'; expected one of \('add', 'ema', 'replace'\)"),
        ({"gate_input": "memory"}, "gate_input='memory'"),
        ({"memory_init": "random"}, "memory_init='random'"),
        ({"top_k": 5}, r"top_k=5; expected 1..4"),
        ({"memory_momentum": 0.0}, "memory_momentum=0.0"),
        ({"expert_kernel": 5}, "kernel 1 or 3"),
    ],
)
def test_bad_options_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        _decoder([16], **kw)


def test_unknown_task_in_subset_is_named():
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['edge'\]"):
        _decoder([16])(_feats([16], [(2, 2)]), tasks=["edge"])
