"""Gramian-only mode on torchjd's autogram engine: the same Gramian and update as the polarised passes and
the buffered Jacobian, and a one-line fallback (saying why) where the engine cannot see every parameter."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchjd.aggregation import MGDA, UPGrad
from toy import ToyModule, ToyNet, one_torch_thread, toy_batch  # noqa: F401

from mtl.strategies import GradientAggregation
from mtl.strategies.autogram import autogram_refusal


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


def setup(strategy, kind: str, k: int = 3, scale: float = 1.0):
    model = ToyNet(k)
    model.enc = model.backbone = encoder(kind)
    module = ToyModule(model, scale=scale)
    strategy.setup(tasks=module.tasks, module=module)
    grams = []
    measure = strategy.measure

    def recording(*args):
        gram, jac = measure(*args)
        grams.append(gram.detach().clone())
        return gram, jac

    strategy.measure = recording
    return module, toy_batch(k), grams


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
    results = {}
    for name, kwargs in {
        "buffered": {},
        "passes": {"gramian_only": True, "autogram": False},
        "autogram": {"gramian_only": True},
    }.items():
        strategy = GradientAggregation(aggregator=make(), **kwargs)
        module, batch, grams = setup(strategy, kind, scale=scale)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback
            grads = run(strategy, module, batch, steps=2)  # step 1 cross-checks, step 2 uses the engine
        results[name] = grams[-1], grads
        if name == "autogram":
            assert strategy.autogram and strategy.autogram_fallback is None and strategy._autogram_checked
            assert strategy._jac.buf is None and strategy._scratch.buf is None  # no k × n buffer
            assert all(not m._forward_hooks for m in module.model.modules())  # hooks gone after the step
    gram, grads = results["autogram"]
    for other in ("passes", "buffered"):
        ref_gram, ref_grads = results[other]
        assert torch.allclose(gram, ref_gram.to(gram), atol=1e-5, rtol=1e-5), other
        for a, b in zip(grads, ref_grads, strict=True):
            assert torch.allclose(a, b, atol=1e-5 * scale, rtol=1e-5), other


def test_autogram_engine_path_runs_one_batched_pass_not_the_polarised_ones(monkeypatch):
    import mtl.strategies.aggregation as aggregation

    strategy = GradientAggregation(aggregator=UPGrad(), gramian_only=True)
    module, batch, _ = setup(strategy, "mlp")
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
        module, batch, grams = setup(strategy, kind)
        if autogram:
            with pytest.warns(UserWarning, match="autogram engine off.*polarised passes") as record:
                grads = run(strategy, module, batch, steps=2)
            assert len(record) == 1  # once, one line
            assert "\n" not in str(record[0].message)
            assert not strategy.autogram
            assert strategy.autogram_fallback is not None
            assert __import__("re").search(reason, strategy.autogram_fallback)
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
