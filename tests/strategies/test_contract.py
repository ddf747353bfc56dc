"""The strategy contract: every strategy config is a well-behaved child of ``MTLModule``.

A strategy is an ``nn.Module`` child of the module that trains, so nothing of ``nn.Module`` may
be hidden by a method of another meaning: ``module.apply(fn)`` (weight-init helpers, torch and
Lightning utilities) must reach every submodule for every config in ``configs/strategy/``.
The strategies see the module only through :class:`~mtl.contracts.StrategyHost` and keep no
tensor of one step for the next (``tests/strategies/toy.py``'s stand-in has nothing else).
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from torch import nn
from torchjd.aggregation import MGDA, UPGrad
from toy import TINY, ToyModule, ToyNet, one_torch_thread, setup  # noqa: F401

from mtl.contracts import StepForward, StrategyHost
from mtl.pipeline import build_datamodule, build_module
from mtl.strategies import FlatMTL, GradientAggregation, Strategy

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "strategy"
CONFIGS = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
# configs that only compose with their own model: the experiment that uses them
OWN_MODEL = {"sandwich": ["experiment=synthetic_slimmable", "data.dataset.length=4", "data.batch_size=2"]}


def test_every_strategy_config_is_listed():
    assert len(CONFIGS) >= 27 and {"ew", "upgrad_gramian", "mgda_ub", "fmtl", "sandwich"} <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_module_apply_reaches_every_submodule(make_cfg, name):
    """``MTLModule.apply(fn)`` calls ``fn`` on every submodule, the strategy's included (a strategy
    method named ``apply`` used to hide ``nn.Module.apply`` for 16 of the configs)."""
    overrides = OWN_MODEL.get(name, TINY) + [f"strategy={name}"]
    cfg = make_cfg(overrides)
    module = build_module(cfg, build_datamodule(cfg))  # sets the strategy up exactly as training does
    assert isinstance(module.strategy, Strategy) and isinstance(module, StrategyHost)
    seen: list[nn.Module] = []
    assert module.apply(seen.append) is module
    assert {id(m) for m in seen} == {id(m) for m in module.modules()}
    assert any(m is module.strategy for m in seen)

    def zero_linear_biases(m: nn.Module) -> None:  # what a weight-init helper does
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    module.apply(zero_linear_biases)
    biases = [m.bias for m in module.modules() if isinstance(m, nn.Linear) and m.bias is not None]
    assert biases and all(not b.any() for b in biases)


def _tensors(strategy: nn.Module) -> set[int]:
    """Ids of every tensor held in a plain attribute of the strategy or its submodules."""
    held = set()
    for m in strategy.modules():
        for v in vars(m).values():
            items = v if isinstance(v, list | tuple) else [v]
            held |= {id(t) for t in items if torch.is_tensor(t)}
    return held


@pytest.mark.parametrize(
    "make",
    [
        lambda: GradientAggregation(aggregator=UPGrad()),
        lambda: GradientAggregation(aggregator=MGDA(), rep_grad=True),
        lambda: GradientAggregation(aggregator=UPGrad(), gramian_only=True),
        lambda: FlatMTL(aggregator=UPGrad()),
    ],
    ids=["buffered", "rep_grad", "gramian_only", "fmtl"],
)
def test_the_step_travels_in_step_forward_not_on_the_strategy(make):
    """The representation-level forward hands ``rep`` / ``rep_in`` to backward in the
    :class:`StepForward`; no tensor of the step (losses, predictions, representation) is kept
    on the strategy, between forward and backward or after."""
    strategy = make()
    module, batch = setup(strategy, k=2)
    step = strategy.forward(batch, module=module)
    assert isinstance(step, StepForward) and set(step.losses) == {"t0", "t1"}
    if strategy.rep_grad:
        assert step.rep is not None and step.rep_in is not None
        assert all(r.requires_grad and r.is_leaf for r in step.rep_in)
    else:
        assert step.rep is None and step.rep_in is None
    per_step = [*step.losses.values(), *step.preds.values(), *(step.rep or []), *(step.rep_in or [])]
    per_step_ids = {id(t) for t in per_step}
    assert not per_step_ids & _tensors(strategy)  # between forward and backward
    strategy.backward(step, module=module, batch=batch)
    assert not per_step_ids & _tensors(strategy)


def test_gradient_aggregation_names_its_aggregator_in_errors():
    """The rep_grad refusal names the method (the aggregator's class, or a partial's target)."""
    module = ToyModule(ToyNet(2))
    model = module.model
    model.representation_parameters = lambda: iter([model.enc.weight])
    with pytest.raises(ValueError, match=r"strategy UPGrad \(rep_grad=true\)"):
        GradientAggregation(aggregator=UPGrad(), rep_grad=True).setup(tasks=module.tasks, module=module)
    with pytest.raises(ValueError, match=r"strategy MGDA \(rep_grad=true\)"):
        GradientAggregation(aggregator=functools.partial(MGDA), rep_grad=True).setup(
            tasks=module.tasks, module=module
        )
