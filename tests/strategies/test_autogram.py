"""Gramian-only mode on torchjd's autogram engine: the same Gramian and update as the polarised passes and
the buffered Jacobian, and a one-line fallback (saying why) where the engine cannot see every parameter."""

from __future__ import annotations

import functools
import re
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torchjd.aggregation import MGDA, UPGrad
from toy import ToyModule, ToyNet, one_torch_thread, toy_batch  # noqa: F401

from mtl.backbones import TimmBackbone
from mtl.backbones.timm_backbone import TokenOwningViT
from mtl.decoders.multihead import MultiHeadDecoder
from mtl.model import MultiTaskNet
from mtl.strategies import GradientAggregation
from mtl.strategies.autogram import LOOPED_OPS, autogram_refusal
from mtl.tasks import build_tasks


class OwnsDirectly(nn.Module):
    """Like timm's ViT: a parameter of its own (a learned offset) beside a called submodule."""

    def __init__(self, d_in: int, d_rep: int) -> None:
        super().__init__()
        self.offset = nn.Parameter(torch.randn(d_in) * 0.1)
        self.lin = nn.Linear(d_in, d_rep)

    def forward(self, x):
        return self.lin(x + self.offset)


class UsesChildWeight(nn.Module):
    """Uses its child's weight without calling the child: invisible to the engine's hooks."""

    def __init__(self, d_in: int, d_rep: int) -> None:
        super().__init__()
        self.first = nn.Linear(d_in, d_rep)
        self.second = nn.Linear(d_rep, d_rep)

    def forward(self, x):
        return F.linear(torch.tanh(self.first(x)), self.second.weight, self.second.bias)


def encoder(kind: str, d_in: int = 4, d_rep: int = 3) -> nn.Module:
    torch.manual_seed(0)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(d_in, 5), nn.Tanh(), nn.Linear(5, d_rep))
    if kind == "batchnorm":
        return nn.Sequential(nn.Linear(d_in, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, d_rep))
    if kind == "owns":
        return OwnsDirectly(d_in, d_rep)
    return UsesChildWeight(d_in, d_rep)


def record_gramians(strategy) -> list[torch.Tensor]:
    """The Gramian of every later ``strategy.measure`` call, appended to the returned list."""
    grams = []
    measure = strategy.measure

    def recording(*args):
        gram, jac = measure(*args)
        grams.append(gram.detach().clone())
        return gram, jac

    strategy.measure = recording
    return grams


#: the three ways of getting the Gramian: the k × n buffer, the k(k+1)/2+1 passes, the engine
MODES = {
    "buffered": {},
    "passes": {"gramian_only": True, "autogram": False},
    "autogram": {"gramian_only": True},
}


def run_modes(make, setup_fn, check_autogram, warning=Warning) -> dict:
    """{mode: (last Gramian, gradients after 2 steps)} of ``GradientAggregation(make(), **mode)`` on the
    model of ``setup_fn(strategy) -> (module, batch)``; no warning of class ``warning`` (no fallback);
    ``check_autogram(strategy, module)`` runs after the engine's steps."""
    results = {}
    for name, kwargs in MODES.items():
        strategy = GradientAggregation(aggregator=make(), **kwargs)
        module, batch = setup_fn(strategy)
        grams = record_gramians(strategy)
        with warnings.catch_warnings():
            warnings.simplefilter("error", warning)
            grads = run(strategy, module, batch, steps=2)  # step 1 cross-checks, step 2 uses the engine
        results[name] = grams[-1], grads
        if name == "autogram":
            assert strategy.autogram and strategy.autogram_fallback is None and strategy._autogram_checked
            check_autogram(strategy, module)
    return results


def setup(strategy, kind: str, k: int = 3, scale: float = 1.0):
    model = ToyNet(k)
    model.enc = model.backbone = encoder(kind)
    module = ToyModule(model, scale=scale)
    strategy.setup(tasks=module.tasks, module=module)
    return module, toy_batch(k)


def run(strategy, module, batch, steps: int) -> list[torch.Tensor]:
    for _ in range(steps):
        for p in module.model.parameters():
            p.grad = None
        strategy.backward(strategy.forward(batch, module=module), module=module, batch=batch)
    return [p.grad.clone() for p in module.model.parameters()]


@pytest.mark.parametrize("kind", ["mlp", "batchnorm"])
@pytest.mark.parametrize("make", [UPGrad, MGDA])
@pytest.mark.parametrize("scale", [1.0, 1024.0])
def test_autogram_gramian_and_update_equal_the_passes_and_the_buffer(kind, make, scale):
    def no_buffer_no_hooks(strategy, module):
        assert strategy._jac.buf is None and strategy._scratch.buf is None  # no k × n buffer
        assert all(not m._forward_hooks for m in module.model.modules())  # hooks gone after the step

    results = run_modes(make, lambda st: setup(st, kind, scale=scale), no_buffer_no_hooks)
    gram, grads = results["autogram"]
    for other in ("passes", "buffered"):
        ref_gram, ref_grads = results[other]
        assert torch.allclose(gram, ref_gram.to(gram), atol=1e-5, rtol=1e-5), other
        for a, b in zip(grads, ref_grads, strict=True):
            assert torch.allclose(a, b, atol=1e-5 * scale, rtol=1e-5), other


def test_autogram_engine_path_runs_one_batched_pass_not_the_polarised_ones(monkeypatch):
    import mtl.strategies.aggregation as aggregation

    strategy = GradientAggregation(aggregator=UPGrad(), gramian_only=True)
    module, batch = setup(strategy, "mlp")
    run(strategy, module, batch, steps=1)  # the cross-check step
    calls = []
    monkeypatch.setattr(aggregation, "polarised_gramian", lambda *a: calls.append(a))
    run(strategy, module, batch, steps=2)
    assert calls == []


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("owns", r"module 'enc' \(OwnsDirectly\) owns parameters directly \(offset\).*over 25%"),
        ("child_weight", "differs from the exact one"),
    ],
)
def test_autogram_falls_back_and_says_why(kind, reason):
    results = {}
    for autogram in (False, True):
        strategy = GradientAggregation(aggregator=UPGrad(), gramian_only=True, autogram=autogram)
        module, batch = setup(strategy, kind)
        grams = record_gramians(strategy)
        if autogram:
            with pytest.warns(UserWarning, match="autogram engine off.*polarised passes") as record:
                grads = run(strategy, module, batch, steps=2)
            assert len(record) == 1  # once, one line
            assert "\n" not in str(record[0].message)
            assert not strategy.autogram
            assert strategy.autogram_fallback is not None
            assert re.search(reason, strategy.autogram_fallback)
        else:
            grads = run(strategy, module, batch, steps=2)
        results[autogram] = grams, grads
    for a, b in zip(results[True][0] + results[True][1], results[False][0] + results[False][1], strict=True):
        assert torch.equal(a, b)  # the fallback is exactly today's passes


def test_autogram_refuses_ddp():
    model = ToyNet(2)
    reason = autogram_refusal(model, list(model.shared_parameters()), world=2)
    assert reason is not None and "DDP with 2 processes" in reason
    assert autogram_refusal(model, list(model.shared_parameters()), world=1) is None


# --- the project's ViT and Swin (timm, through TimmBackbone), tiny ---------------------------------------

TINY_VIT = dict(name="vit_base_patch16_384", img_size=(32, 32), depth=2, embed_dim=16, num_heads=2)
TINY_SWIN = dict(
    name="swin_tiny_patch4_window7_224",
    img_size=(32, 32),
    out_indices=[0, 1, 2, 3],
    embed_dim=8,
    depths=(1, 1, 1, 1),
    num_heads=(1, 1, 2, 2),
    window_size=4,
)
REAL_TASKS = ["semseg", "depth", "normals"]


def real_setup(strategy, backbone: str):
    torch.manual_seed(0)
    tasks = build_tasks(REAL_TASKS, num_classes={"semseg": 5})
    model = MultiTaskNet(
        backbone=TimmBackbone(**(TINY_VIT if backbone == "vit" else TINY_SWIN)),
        decoder=functools.partial(MultiHeadDecoder, channels=8),
        tasks={t: task.out_channels for t, task in tasks.items()},
    )
    module = ToyModule(model.double(), tasks=tasks)  # float64: the three modes' sums in other orders agree
    strategy.setup(tasks=tasks, module=module)
    g = torch.Generator().manual_seed(0)
    batch = {
        "image": torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64),
        "semseg": torch.randint(0, 5, (2, 32, 32), generator=g),
        "depth": torch.rand(2, 1, 32, 32, generator=g, dtype=torch.float64) + 0.5,
        "normals": F.normalize(torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64), dim=1),
    }
    return module, batch


@pytest.mark.parametrize("backbone", ["vit", "swin"])
def test_autogram_on_vit_and_swin_equals_the_passes_and_the_buffer(backbone):
    """timm's ViT (tokens owned by a called child) and Swin use the engine, no fallback, same Gramian
    and update as the k(k+1)/2+1 passes and the buffered Jacobian: in float64, the Gramian to 1e-9 of
    its largest entry (in float32 the three modes' sums in other orders differ by ~1e-5 of it), the
    update to 1e-6 (the solver's tolerance)."""
    LOOPED_OPS.clear()
    results = run_modes(UPGrad, lambda st: real_setup(st, backbone), lambda *_: None, warning=UserWarning)
    if backbone == "vit":  # torch's CPU fused attention has no vmap batching rule: noted, not warned
        assert any("attention" in op and op.endswith("backward") for op in LOOPED_OPS), LOOPED_OPS
    gram, grads = results["autogram"]
    assert gram.dtype == torch.float64 and all(g.dtype == torch.float64 for g in grads)
    for other in ("passes", "buffered"):
        ref_gram, ref_grads = results[other]
        bound = 1e-9 * ref_gram.diagonal().abs().max()
        assert ((gram - ref_gram.to(gram)).abs() <= bound).all(), (other, gram, ref_gram)
        largest = max(b.abs().max() for b in ref_grads)
        for a, b in zip(grads, ref_grads, strict=True):  # through the solver
            assert ((a - b).abs() <= 1e-6 * largest).all(), (other, (a - b).abs().max())


def test_a_plain_timm_vit_is_refused_and_the_backbones_vit_is_not():
    backbone = TimmBackbone(**TINY_VIT)
    assert isinstance(backbone.model, TokenOwningViT)
    assert autogram_refusal(backbone, list(backbone.parameters()), world=1) is None
    plain = timm.create_model("vit_base_patch16_384", img_size=(32, 32), depth=2, embed_dim=16, num_heads=2)
    reason = autogram_refusal(plain, list(plain.parameters()), world=1)
    assert (
        reason is not None and "(VisionTransformer) owns parameters directly (cls_token, pos_embed)" in reason
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"reg_tokens": 2, "no_embed_class": True},
        {"dynamic_img_size": True},
        {"class_token": False, "global_pool": "avg"},
    ],
    ids=["cls", "registers", "dynamic", "no-cls"],
)
def test_vit_with_owned_tokens_loads_timm_keys_and_computes_timms_features(tmp_path, kwargs):
    """A timm-format state dict (keys ``cls_token``, ``pos_embed``, …) loads, through ``checkpoint_path``
    and through ``load_state_dict``; the features equal timm's own ViT's; the new keys round-trip."""
    vit = dict(depth=2, embed_dim=16, num_heads=2, **kwargs)
    torch.manual_seed(0)
    src = timm.create_model("vit_base_patch16_384", img_size=(32, 48), **vit).eval()
    vit["name"] = "vit_base_patch16_384"
    with torch.no_grad():
        for name in ("cls_token", "reg_token", "pos_embed"):
            if getattr(src, name) is not None:
                torch.nn.init.normal_(getattr(src, name), std=0.5)  # not timm's near-zero init
    path = tmp_path / "vit.pth"
    torch.save(src.state_dict(), path)
    assert {"pos_embed"} <= set(torch.load(path)) and ("cls_token" in torch.load(path)) == src.has_class_token

    by_file = TimmBackbone(checkpoint_path=str(path), img_size=(32, 48), out_indices=[0, 1], **vit).eval()
    by_load = TimmBackbone(img_size=(32, 48), out_indices=[0, 1], **vit).eval()
    result = by_load.model.load_state_dict(src.state_dict(), strict=False)  # timm's keys
    pruned = {
        f"{m}.{p}" for m in ("norm", "fc_norm", "head") for p in ("weight", "bias")
    }  # after the last tap
    assert result.missing_keys == [] and set(result.unexpected_keys) <= pruned
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        expected = src.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
        for bb in (by_file, by_load):
            assert isinstance(bb.model, TokenOwningViT)
            for name in ("cls_token", "reg_token", "pos_embed"):
                if getattr(src, name) is None:
                    assert getattr(bb.model, name) is None and getattr(bb.model.prefix_tokens, name) is None
                else:
                    torch.testing.assert_close(getattr(bb.model.prefix_tokens, name), getattr(src, name))
                    assert getattr(bb.model, name) is getattr(bb.model.prefix_tokens, name)
            for a, b in zip(bb(x), expected, strict=True):
                torch.testing.assert_close(a, b)
    state = by_load.state_dict()
    assert "model.prefix_tokens.pos_embed" in state and "model.pos_embed" not in state
    own = {n for n, _ in by_load.model.named_parameters(recurse=False)}
    assert own == set()  # every parameter is owned by a module the forward calls
    fresh = TimmBackbone(img_size=(32, 48), out_indices=[0, 1], **vit)
    fresh.load_state_dict(state)  # the new keys, strict
    for k, v in fresh.state_dict().items():
        torch.testing.assert_close(v, state[k])


def test_vit_set_input_size_goes_through_to_the_owned_tokens():
    vit = dict(depth=2, embed_dim=16, num_heads=2, dynamic_img_size=True)
    torch.manual_seed(0)
    src = timm.create_model("vit_base_patch16_384", img_size=(32, 48), **vit).eval()
    bb = TimmBackbone(name="vit_base_patch16_384", img_size=(32, 48), out_indices=[0, 1], **vit).eval()
    bb.model.load_state_dict(src.state_dict(), strict=False)
    for model in (src, bb.model):
        model.set_input_size(img_size=(64, 64))
    assert bb.model.prefix_tokens.grid_size == (4, 4) and bb.model.pos_embed.shape == src.pos_embed.shape
    torch.testing.assert_close(bb.model.pos_embed, src.pos_embed)
    x = torch.randn(1, 3, 32, 64)
    with torch.no_grad():
        for a, b in zip(
            bb(x), src.forward_intermediates(x, indices=[0, 1], intermediates_only=True), strict=True
        ):
            torch.testing.assert_close(a, b)


def test_old_token_keys_are_renamed_only_where_the_model_expects_the_new_ones():
    """upgrade_token_keys (model merging reads states and fingerprints by key): a checkpoint written
    before the ViT's tokens moved into ``prefix_tokens`` maps onto today's keys; keys the model still
    has under the old name (another class keeping its own tokens) and other keys stay."""
    from mtl.backbones.timm_backbone import upgrade_token_keys

    old = {
        "model.backbone.model.cls_token": 1,
        "model.backbone.model.pos_embed": 2,
        "model.backbone.model.blocks.0.norm1.weight": 3,
        "model.other.pos_embed": 4,
    }
    expected = {
        "model.backbone.model.prefix_tokens.cls_token",
        "model.backbone.model.prefix_tokens.pos_embed",
        "model.backbone.model.blocks.0.norm1.weight",
        "model.other.pos_embed",
    }
    new = upgrade_token_keys(old, expected)
    assert set(new) == expected and new["model.backbone.model.prefix_tokens.pos_embed"] == 2
    assert new["model.other.pos_embed"] == 4
    assert upgrade_token_keys(new, expected) == new  # today's keys pass unchanged
