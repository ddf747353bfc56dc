"""M³ViT: the MoE layer (routing, dense equivalence, balancing, sparse dispatch), the backbone's
per-task passes, single-task inference, training with decoders and strategies, eval outputs."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_M3VIT
from hydra.errors import InstantiationException
from timm.layers import Mlp
from torch.utils.flop_counter import FlopCounterMode

from mtl.backbones.m3vit import M3ViT
from mtl.backbones.moe_mlp import MoEMlp, cv_squared
from mtl.backbones.timm_backbone import TimmBackbone
from mtl.decoders.multihead import MultiHeadDecoder
from mtl.decoders.taskexpert import TaskExpertDecoder
from mtl.model import MultiTaskNet
from mtl.pipeline import evaluate, train

TASKS = {"semseg": 5, "depth": 1, "normals": 3}
TINY = dict(name="vit_tiny_patch16_224", img_size=(32, 32), depth=4, embed_dim=32, num_heads=2)


def tiny_backbone(**kw) -> M3ViT:
    args = dict(TINY, tasks=list(TASKS), out_indices=[1, 3], num_experts=4, top_k=2) | kw
    return M3ViT(**args)


def tiny_model(decoder=MultiHeadDecoder, **kw) -> MultiTaskNet:
    torch.manual_seed(0)
    dec = (
        (lambda **a: decoder(channels=8, **a))
        if decoder is MultiHeadDecoder
        else (lambda **a: decoder(channels=8, num_experts=2, **a))
    )
    return MultiTaskNet(backbone=tiny_backbone(**kw), decoder=dec, tasks=TASKS)


# ---------------------------------------------------------------------------- the MoE layer
@pytest.mark.parametrize("router", ["per_task", "task_embedding"])
def test_top_k_picks_exactly_k_experts_with_softmax_gates(router):
    torch.manual_seed(0)
    # independently drawn routers and the additive task embedding: tasks route differently from the
    # start (by default the routers start identical and the concatenated task code's gate columns at
    # zero, as the reference's; tested below)
    moe = MoEMlp(
        dim=16,
        keys=["a", "b"],
        num_experts=8,
        top_k=3,
        router=router,
        task_embed="add",
        same_router_init=False,
    ).eval()
    tokens = torch.randn(50, 16)
    values, index, _ = moe.route(tokens, "a")
    assert index.shape == (50, 3)
    assert all(len(set(row.tolist())) == 3 for row in index)  # k distinct experts per token
    clean, _ = moe.router(tokens, "a")
    probs = clean.softmax(-1)
    # softmax over all experts, then the top k without renormalisation
    assert torch.allclose(values, probs.gather(1, index))
    assert (values.sum(-1) < 1).all() and (probs.gather(1, index) >= probs.topk(3, -1).values[:, -1:]).all()
    moe(tokens[None], key="a")
    assert moe.counts["a"].sum() == 50 * 3  # every token dispatched to exactly k experts
    assert not torch.equal(moe.route(tokens, "b")[1], index)  # the other task routes differently


@pytest.mark.parametrize("train_mode", [False, True])
def test_single_expert_equals_dense_mlp(train_mode):
    torch.manual_seed(0)
    mlp = Mlp(16, 64)
    moe = MoEMlp(dim=16, keys=["a"], num_experts=1, top_k=1, hidden=64)
    moe.upcycle(mlp)
    moe.train(train_mode)  # noisy gating while training: softmax over one expert is still 1
    x = torch.randn(2, 10, 16)
    y, balance = moe(x, key="a")
    assert torch.allclose(y, mlp(x), atol=1e-6)
    assert (balance == 0).all() if train_mode else balance is None


def test_m3vit_with_one_expert_equals_the_dense_vit():
    torch.manual_seed(0)
    dense = TimmBackbone(**TINY, out_indices=[1, 3]).eval()
    torch.manual_seed(0)  # same timm weights; the one expert copies each pretrained-like MLP whole
    moe = M3ViT(
        **TINY,
        tasks=["a", "b"],
        out_indices=[1, 3],
        num_experts=1,
        top_k=1,
        expert_hidden=128,
        expert_init="upcycle",
    ).eval()
    x = torch.randn(2, 3, 32, 32)
    for a, b in zip(dense(x), moe.features(x, ["b"]).per_task["b"], strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_balance_loss_zero_for_uniform_routing_and_larger_otherwise():
    assert cv_squared(torch.full((8,), 3.0)) == 0
    assert cv_squared(torch.tensor([4.0, 0, 0, 0])) > cv_squared(torch.tensor([2.0, 1, 1, 0])) > 0
    moe = MoEMlp(dim=8, keys=["a"], num_experts=4, top_k=4, noisy_gating=False).train()
    torch.nn.init.zeros_(moe.router.gate["a"].weight)  # uniform softmax: every expert equally used
    _, _, balance = moe.route(torch.randn(64, 8), "a")
    assert balance.abs() < 1e-6
    moe = MoEMlp(dim=8, keys=["a"], num_experts=4, top_k=1, noisy_gating=False).train()
    with torch.no_grad():
        moe.router.gate["a"].weight.zero_()
        moe.router.gate["a"].weight[0, 0] = 5.0  # tokens with x_0 > 0 all go to expert 0
    _, _, skewed = moe.route(torch.randn(64, 8), "a")
    assert skewed > 0.5


def test_noisy_gating_load_estimator_has_a_gradient():
    torch.manual_seed(0)
    moe = MoEMlp(dim=8, keys=["a"], num_experts=6, top_k=2, noisy_gating=True).train()
    _, _, balance = moe.route(torch.randn(40, 8), "a")
    balance.backward()
    assert moe.router.noise["a"].weight.grad.abs().sum() > 0  # through Shazeer's smooth load


def test_sparse_dispatch_equals_dense_and_cuts_flops():
    torch.manual_seed(0)
    sparse = MoEMlp(dim=32, keys=["a"], num_experts=16, top_k=4, noisy_gating=False).eval()
    dense = MoEMlp(dim=32, keys=["a"], num_experts=16, top_k=4, noisy_gating=False, dispatch="dense").eval()
    dense.load_state_dict(sparse.state_dict())
    x = torch.randn(2, 64, 32)
    assert torch.allclose(sparse(x, key="a")[0], dense(x, key="a")[0], atol=1e-5)
    flops = {}
    for name, m in (("sparse", sparse), ("dense", dense)):
        with FlopCounterMode(display=False) as counter:
            m(x, key="a")
        flops[name] = counter.get_total_flops()
    expert = 2 * 2 * 128 * 32 * 32  # two matmuls per token-expert pair
    router = 2 * 128 * 32 * 16
    assert flops["sparse"] == 4 * expert + router  # k experts per token, not E
    assert flops["dense"] == 16 * expert + router


# ---------------------------------------------------------------------------- the backbone
def test_single_task_inference_equals_the_multi_task_forward():
    model = tiny_model().eval()
    x = torch.randn(2, 3, 32, 32)
    full = model(x)
    assert set(full) == set(TASKS)
    only = model(x, task_subset=["depth"])
    assert set(only) == {"depth"} and torch.allclose(only["depth"], full["depth"], atol=1e-6)
    model.tasks_at_inference = ["normals"]
    assert torch.allclose(model(x)["normals"], full["normals"], atol=1e-6)
    with FlopCounterMode(display=False) as one:
        model(x)
    model.tasks_at_inference = None
    with FlopCounterMode(display=False) as every:
        model(x)
    # blocks 1-3 run once instead of three times (block 0 and the patch embedding are shared)
    assert every.get_total_flops() / 3 < one.get_total_flops() < 0.6 * every.get_total_flops()


def test_shared_pass_for_grouped_tasks_equals_separate_passes():
    groups = [["semseg", "normals"], ["depth"]]
    shared = tiny_model(task_groups=groups, noisy_gating=True).eval()  # router + noise weights per task
    separate = tiny_model(task_groups=groups, shared_pass=False, noisy_gating=True).eval()
    separate.load_state_dict(shared.state_dict())
    assert shared.backbone.passes(list(TASKS)) == [["semseg", "normals"], ["depth"]]
    assert len(separate.backbone.passes(list(TASKS))) == 3
    x = torch.randn(2, 3, 32, 32)
    a, b = shared(x), separate(x)
    assert all(torch.allclose(a[t], b[t], atol=1e-6) for t in TASKS)
    # a shared router is not task-specific: only the single-task group's router is
    assert not list(shared.backbone.task_parameters("semseg"))
    assert len(list(shared.backbone.task_parameters("depth"))) == 2 * len(shared.backbone.moe_blocks)


def test_training_forward_aux_loss_and_task_parameters():
    model = tiny_model(decoder=TaskExpertDecoder).train()
    out = model.run(torch.randn(2, 3, 32, 32))
    preds, aux = out.preds, out.aux_loss
    assert set(preds) == set(TASKS) and aux is not None and aux.requires_grad
    (sum(p.mean() for p in preds.values()) + aux).backward()
    for t in TASKS:
        routers = list(model.backbone.task_parameters(t))
        assert routers and all(p.grad is not None and p.grad.abs().sum() > 0 for p in routers), t
    shared = {id(p) for p in model.shared_parameters()}
    assert all(id(p) in shared for p in model.backbone.moe_layers()[1].experts.parameters())
    model.eval()
    out = model.run(torch.randn(2, 3, 32, 32))
    stats = model.finish_stats(out.stats)
    assert {"experts/depth/layer1/entropy", "experts/depth/layer3/max_share"} <= set(stats)
    assert any(k.startswith("gates/") for k in stats)  # TaskExpert's gate statistics still there
    assert out.aux_loss is None


def test_expert_usage_over_an_evaluation_equals_the_routing_counts():
    """Per-forward usage (``ModelOutput.stats``), averaged over batches of different sizes as
    ``MTLModule`` does, gives the entropy and largest share of the evaluation's total counts."""
    from mtl.module import StatMeans

    model = tiny_model().eval()
    model.backbone.reset_routing_counts()
    acc = StatMeans()
    with torch.no_grad():
        for b in (3, 1):
            out = model.run(torch.randn(b, 3, 32, 32))
            acc.update(out.stats, b)
    stats = model.finish_stats(acc.compute())
    assert not any(k.endswith("/usage") for k in stats)
    for block, per_task in model.backbone.routing_counts().items():
        for t, counts in per_task.items():
            share = counts / counts.sum()
            ent = -(share * share.clamp_min(1e-12).log()).sum() / torch.log(torch.tensor(float(len(share))))
            torch.testing.assert_close(
                stats[f"experts/{t}/layer{block}/entropy"].double(), ent, atol=1e-6, rtol=0
            )
            assert float(stats[f"experts/{t}/layer{block}/max_share"]) == pytest.approx(float(share.max()))


def test_one_shared_pass_encode_decode_keeps_the_balance_loss():
    """``task_groups=[[all]]``: a shared representation; ``encode_features`` + ``decode(features=)``
    give what ``run`` gives, the backbone's balancing loss included."""
    model = tiny_model(task_groups=[list(TASKS)], noisy_gating=False).train()
    assert model.backbone.kind == "shared"
    x = torch.randn(2, 3, 32, 32)
    whole = model.run(x)
    rep, feats = model.encode_features(x)
    out = model.decode(rep, size=(32, 32), features=feats)
    assert whole.aux_loss is not None
    torch.testing.assert_close(out.aux_loss, whole.aux_loss)
    for t in TASKS:
        torch.testing.assert_close(out.preds[t], whole.preds[t])


def test_bad_configuration_errors():
    with pytest.raises(ValueError, match="task_groups .* must list every task"):
        tiny_backbone(task_groups=[["semseg"], ["depth"]])
    with pytest.raises(ValueError, match="moe_blocks \\[7\\]"):
        tiny_backbone(moe_blocks=[7])
    with pytest.raises(ValueError, match="top_k <= num_experts"):
        tiny_backbone(top_k=5)
    with pytest.raises(ValueError, match="router='shared'"):
        tiny_backbone(router="shared")
    with pytest.raises(ValueError, match="tasks_at_inference has unknown task"):
        MultiTaskNet(
            backbone=tiny_backbone(), decoder=MultiHeadDecoder, tasks=TASKS, tasks_at_inference=["x"]
        )
    with pytest.raises(ValueError, match="no single task-independent feature list"):
        tiny_backbone()(torch.randn(1, 3, 32, 32))


# ---------------------------------------------------------------------------- training and eval
TINY_CFG = [
    "experiment=synthetic_m3vit",
    "data.dataset.resolution=[32,32]",
    *TINY_M3VIT,
    "data.tasks=[semseg,depth]",
    "logger=none",
    "callbacks=none",
]


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(["strategy=ew"], marks=pytest.mark.slow),
        pytest.param(["strategy=uw"], marks=pytest.mark.slow),
        ["strategy=pcgrad"],
        ["model=taskexpert", "strategy=pcgrad"],
    ],
    ids=["ew", "uw", "pcgrad", "taskexpert-pcgrad"],
)
def test_training_step_with_decoders_and_strategies(make_cfg, extra):
    overrides = TINY_CFG + extra
    if "model=taskexpert" in extra:
        overrides += ["model/backbone=m3vit_tiny", "model.decoder.num_experts=2"]
    cfg = make_cfg(overrides + ["debug=fdr"])
    metrics, objects = train(cfg)
    model = objects["module"].model
    assert isinstance(model.backbone, M3ViT) and torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert "train/aux_loss" in metrics and "val/experts/semseg/layer1/entropy" in metrics


def test_representation_level_strategy_refused_with_its_name(make_cfg):
    one_pass = make_cfg(
        TINY_CFG + ["strategy=mgda_ub", "debug=fdr", "model.backbone.task_groups=[[semseg,depth]]"]
    )
    train(one_pass)  # one shared pass for every task: a shared representation, MGDA-UB works
    cfg = make_cfg(TINY_CFG + ["strategy=mgda_ub", "debug=fdr"])
    with pytest.raises(
        (ValueError, InstantiationException), match="strategy MGDA.*rep_grad=true.*own features"
    ):
        train(cfg)


@pytest.mark.slow
def test_eval_of_a_task_subset_writes_metrics_routing_and_cost(make_cfg, tmp_path):
    cfg = make_cfg(TINY_CFG + ["trainer.max_steps=2", "trainer.max_epochs=1", "callbacks=default"])
    train(cfg)
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    cfg = make_cfg(
        TINY_CFG + [f"ckpt_path={ckpt}", "model.tasks_at_inference=[depth]", "eval.pictures=1"],
        config_name="eval",
    )
    metrics, objects = evaluate(cfg)
    assert any(k.startswith("test/depth/") for k in metrics)
    assert not any(k.startswith("test/semseg/") for k in metrics)  # only the subset ran
    shares = json.loads((tmp_path / "experts.json").read_text())
    assert set(shares) == {"1"} and set(shares["1"]) == {"depth"}
    assert abs(sum(shares["1"]["depth"]) - 1) < 1e-6
    assert (tmp_path / "routing.png").stat().st_size > 0 and "| depth |" in (
        tmp_path / "experts.md"
    ).read_text()
    cost = json.loads((tmp_path / "cost.json").read_text())
    assert cost["tasks"] == ["depth"] and cost["gflops"] > 0


# ---------------------------------------------------------------------------- the reference's choices
# VITA-Group/M3ViT: models/gate_funs/noisy_gate_vmoe.py (gate, cv²), utils/moe_utils.py (loss sum),
# models/vision_transformer_moe.py (task code), utils/common_config.py (one gate copied to every task's)
def test_balance_loss_is_the_reference_closed_form_with_the_unbiased_variance():
    # E = 2 experts, top-1, an identity router: a token's logits are its two coordinates
    moe = MoEMlp(dim=2, keys=["a"], num_experts=2, top_k=1).train()
    with torch.no_grad():
        moe.router.gate["a"].weight.copy_(torch.eye(2))
    l3 = math.log(3.0)
    tokens = torch.tensor([[l3, 0.0]] * 3 + [[0.0, l3]])
    values, index, balance = moe.route(tokens, "a")
    # softmax (3/4, 1/4): three tokens go to expert 0, one to expert 1, each with gate 3/4.
    # importance (9/4, 3/4): mean 3/2, unbiased variance 2 · (3/4)² / (2 − 1) = 9/8 → cv² = 1/2;
    # load (3, 1): mean 2, unbiased variance 2 → cv² = 1/2. (Population variance: 1/4 each.)
    assert index.flatten().tolist() == [0, 0, 0, 1]
    torch.testing.assert_close(values.flatten(), torch.full((4,), 0.75))
    assert balance.item() == pytest.approx(1.0, abs=1e-6)
    assert cv_squared(torch.tensor([3.0, 1.0])).item() == pytest.approx(0.5)
    assert cv_squared(torch.tensor([1.0, 2.0, 3.0])).item() == pytest.approx(1.0 / 4.0)  # var 1, mean 2


def test_balance_loss_sums_over_moe_layers_and_task_passes(monkeypatch):
    terms = []
    original = MoEMlp.forward_with_usage

    def recording(self, x, **kwargs):
        y, balance, usage = original(self, x, **kwargs)
        terms.append(balance.detach())
        return y, balance, usage

    monkeypatch.setattr(MoEMlp, "forward_with_usage", recording)
    torch.manual_seed(0)
    backbone = tiny_backbone().train()
    feats = backbone.features(torch.randn(2, 3, 32, 32), list(TASKS))
    assert len(terms) == len(TASKS) * len(backbone.moe_blocks)  # 3 task passes × 2 MoE blocks
    assert all(t > 0 for t in terms)
    torch.testing.assert_close(feats.aux_loss.detach(), 0.01 * torch.stack(terms).sum())


def test_no_router_noise_by_default_as_in_the_reference_runs():
    torch.manual_seed(0)
    moe = MoEMlp(dim=8, keys=["a"], num_experts=6, top_k=2).train()
    assert moe.router.noise is None and tiny_backbone().moe_layers()[1].router.noise is None
    tokens = torch.randn(40, 8)
    (v1, i1, b1), (v2, i2, b2) = moe.route(tokens, "a"), moe.route(tokens, "a")
    assert torch.equal(v1, v2) and torch.equal(i1, i2) and torch.equal(b1, b2)  # training, yet no noise
    clean, std = moe.router(tokens, "a")
    assert std is None
    torch.testing.assert_close(v1, clean.softmax(-1).topk(2, dim=-1).values)
    load = torch.bincount(i1.flatten(), minlength=6).float()  # the load is the token count per expert
    importance = torch.zeros(40, 6).scatter(1, i1, v1).sum(0)
    ref = importance.var() / importance.mean() ** 2 + load.var() / load.mean() ** 2
    torch.testing.assert_close(b1, ref)


def test_task_routers_start_identical_as_the_reference_copies_one_gate():
    torch.manual_seed(0)
    backbone = tiny_backbone().eval()
    for moe in backbone.moe_layers().values():
        weights = [moe.router.gate[t].weight for t in TASKS]
        assert all(torch.equal(weights[0], w) for w in weights[1:])
    feats = backbone.features(torch.randn(2, 3, 32, 32), list(TASKS)).per_task
    torch.testing.assert_close(feats["semseg"][-1], feats["depth"][-1])  # same routing at the start
    independent = tiny_backbone(same_router_init=False).moe_layers()[1].router.gate
    assert not torch.equal(independent["semseg"].weight, independent["depth"].weight)


def test_task_embedding_router_concatenates_the_reference_mlp_task_code():
    from mtl.backbones.moe_mlp import TaskCode

    torch.manual_seed(0)
    backbone = tiny_backbone(router="task_embedding", task_embed_dim=8).train()
    code = backbone.task_code
    assert isinstance(code, TaskCode) and code.norm.eps == 1e-6
    assert code.fc1.weight.shape == (8, len(TASKS)) and code.fc2.weight.shape == (8, 8)
    for moe in backbone.moe_layers().values():
        gate = moe.router.gate.weight
        assert gate.shape == (4, 32 + 8) and not gate[:, 32:].any()  # the task columns start at zero
        with torch.no_grad():
            gate[:, 32:].normal_()
    moe = backbone.moe_layers()[1]
    tokens = torch.randn(10, 32)
    for i, t in enumerate(TASKS):  # one-hot(task) → Linear → GELU → Linear → LayerNorm, concatenated
        h = F.gelu(F.linear(F.one_hot(torch.tensor(i), len(TASKS)).float(), code.fc1.weight, code.fc1.bias))
        c = F.layer_norm(
            F.linear(h, code.fc2.weight, code.fc2.bias), (8,), code.norm.weight, code.norm.bias, 1e-6
        )
        expected = torch.cat([tokens, c.expand(10, -1)], dim=-1) @ moe.router.gate.weight.T
        torch.testing.assert_close(moe.router(tokens, t, backbone.task_code(t))[0], expected)
    feats = backbone.features(torch.randn(2, 3, 32, 32), list(TASKS))
    (feats.aux_loss + sum(f[-1].mean() for f in feats.per_task.values())).backward()
    assert code.fc1.weight.grad.abs().sum() > 0  # one code module for every layer, trained through the gates
    assert not list(backbone.task_parameters("depth"))  # shared router and code: nothing task-only
    with pytest.raises(ValueError, match="needs the task code"):
        moe.router(tokens, "depth")


@pytest.mark.parametrize(
    ("experiment", "tasks", "size"),
    [
        ("nyud_m3vit_ref", ["semseg", "depth"], [480, 640]),
        ("pascal_m3vit_ref", ["semseg", "human_parts", "saliency", "normals", "edge"], [512, 512]),
    ],
)
def test_reference_recipe_experiments_compose_to_the_reference_settings(make_cfg, experiment, tasks, size):
    cfg = make_cfg([f"experiment={experiment}"], fast=False)
    assert list(cfg.data.tasks) == tasks and list(cfg.data.input_size) == size
    opt = cfg.optimizer
    assert (opt._target_, opt.lr, opt.momentum, opt.weight_decay) == ("torch.optim.SGD", 0.002, 0.9, 1e-4)
    assert (cfg.scheduler.name, cfg.scheduler.power, cfg.scheduler.warmup_steps) == ("poly", 0.9, 0)
    assert (cfg.trainer.max_epochs, cfg.trainer.max_steps, cfg.trainer.sync_batchnorm) == (100, -1, True)
    assert cfg.data.batch_size == 8 and cfg.module.no_decay_1d is False and cfg.trainer.precision == 32
    b = cfg.model.backbone
    assert (b.name, b.num_heads, list(b.out_indices), b.num_experts, b.top_k, b.expert_hidden) == (
        "deit_small_patch16_224",
        12,
        [11],
        16,
        4,
        None,
    )
    assert (b.moe_every, b.router, b.noisy_gating, b.same_router_init, b.balance_weight) == (
        2,
        "per_task",
        False,
        True,
        0.01,
    )
    d = cfg.model.decoder
    assert (d._target_, d.channels, d.num_convs, d.in_index, d.norm) == (
        "mtl.decoders.pup.PUPDecoder",
        256,
        4,
        -1,
        True,
    )


def test_atrc_recipe_experiments_keep_their_recipe_with_the_reference_gating(make_cfg):
    cfg = make_cfg(["experiment=nyud_m3vit"], fast=False)
    assert cfg.optimizer._target_ == "torch.optim.Adam" and cfg.trainer.max_steps == 40000
    assert cfg.model.decoder._target_.endswith("MultiHeadDecoder") and len(cfg.data.tasks) == 4
    assert cfg.model.backbone.noisy_gating is False and cfg.model.backbone.same_router_init is True
