"""Loss weighting: UW, DWA, RLW, GLS, GradNorm, FAMO, DB-MTL against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from toy import one_torch_thread, setup, step  # noqa: F401

from mtl.strategies import (
    DBMTL,
    FAMO,
    DynamicWeightAverage,
    FixedWeights,
    GeometricLoss,
    GradNorm,
    RandomLossWeighting,
    UncertaintyWeighting,
)


def test_uw_formula_and_its_gradient():
    uw = UncertaintyWeighting()
    setup(uw, k=2)
    with torch.no_grad():
        uw.log_vars.copy_(torch.tensor([0.0, math.log(2.0)]))
    losses = torch.tensor([2.0, 0.5])
    total = uw.total(losses)
    # ½e^{-s}L + ½s: task 0 → 1.0; task 1 → ½·½·0.5 + ½ log 2
    assert float(total.detach()) == pytest.approx(1.0 + 0.125 + 0.5 * math.log(2.0))
    total.backward()
    # ∂/∂s = −½e^{-s}L + ½: task 0 → −0.5; task 1 → −0.125 + 0.5
    assert torch.allclose(uw.log_vars.grad, torch.tensor([-0.5, 0.375]))
    assert torch.allclose(uw.weights(losses), torch.tensor([0.5, 0.25]))


def test_dwa_weights_from_known_loss_histories():
    dwa = DynamicWeightAverage(temperature=2.0)
    module, batch = setup(dwa, k=2)
    assert torch.equal(dwa.weights(torch.ones(2)), torch.ones(2))  # first two epochs: 1
    for epoch_losses in ([1.0, 2.0], [0.5, 2.0]):  # epoch means
        dwa.loss_sum = torch.tensor(epoch_losses, dtype=torch.float64)
        dwa.count = torch.tensor(1.0)
        dwa.epoch_end()
    r = torch.tensor([0.5, 1.0])  # L(e−1)/L(e−2)
    expected = 2 * torch.exp(r / 2) / torch.exp(r / 2).sum()
    assert torch.allclose(dwa.weights(torch.ones(2)), expected)
    logs = step(dwa, module, batch)  # the step accumulates into the next epoch's mean
    assert logs["t0/weight"] == pytest.approx(float(expected[0]))
    assert float(dwa.count) == 1


def test_rlw_draws_softmax_normal_weights_reproducibly():
    a, b = RandomLossWeighting(seed=3), RandomLossWeighting(seed=3)
    ma, batch = setup(a, k=3)
    mb, _ = setup(b, k=3)
    wa = [step(a, ma, batch) for _ in range(3)]
    wb = [step(b, mb, batch) for _ in range(3)]
    assert wa == wb  # same seed → same draws (every DDP rank agrees)
    assert wa[0] != wa[1]  # a fresh draw every step
    for w in wa:
        vals = [w[f"t{i}/weight"] for i in range(3)]
        assert sum(vals) == pytest.approx(1.0) and min(vals) > 0


def test_gls_is_the_geometric_mean():
    gls = GeometricLoss()
    losses = torch.tensor([4.0, 1.0], requires_grad=True)
    total = gls.total(losses)
    assert float(total) == pytest.approx(2.0)
    total.backward()
    # ∂/∂L_t = L / (K L_t)
    assert torch.allclose(losses.grad, torch.tensor([0.25, 1.0]))
    assert torch.allclose(gls.weights(losses.detach()), torch.tensor([0.25, 1.0]))


def test_gradnorm_weight_update_by_hand():
    gn = GradNorm(alpha=1.0, lr=0.1)
    setup(gn, k=2)
    gn.initial_losses = torch.tensor([2.0, 2.0])
    # losses (1, 2): ratios (0.5, 1), rates (2/3, 4/3); norms (1, 3), weights (1, 1):
    # G = (1, 3), Ḡ = 2, targets (4/3, 8/3); sign(G − target) = (−1, +1)
    # w ← w − 0.1·sign·norm = (1.1, 0.7), renormalised to sum 2: (1.2222, 0.7778)
    gn.update(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 3.0]))
    assert torch.allclose(gn.weights, torch.tensor([1.1, 0.7]) * 2 / 1.8)


def test_gradnorm_measures_the_last_shared_layer_and_trains():
    gn = GradNorm()
    module, batch = setup(gn, k=2)
    logs = step(gn, module, batch)
    assert logs["t0/weight"] == 1.0  # the first step uses the initial weights
    assert float(gn.weights.sum()) == pytest.approx(2.0)
    assert all(p.grad is not None for p in module.model.parameters())


def test_famo_weights_and_logit_update_by_hand():
    famo = FAMO(lr=0.025, weight_decay=0.0)
    module, batch = setup(famo, k=2)
    # z = (½, ½), ℓ = (1, 4): c = 1 / (½/1 + ½/4) = 1.6 → weights c·z/ℓ = (0.8, 0.2)
    assert torch.allclose(famo.task_weights(torch.tensor([1.0, 4.0])), torch.tensor([0.8, 0.2]))
    # task 0 halves its loss, task 1 stays: δ = (log 2, 0), ∇ξ = z(δ − zᵀδ) = (¼ log 2, −¼ log 2);
    # the first Adam step moves each logit by lr·sign: task 0 (which improved) loses weight
    famo.prev = torch.tensor([1.0, 4.0])
    famo.update(torch.tensor([0.5, 4.0]))
    assert torch.allclose(famo.logits, torch.tensor([-0.025, 0.025]), atol=1e-6)
    logs = step(famo, module, batch)
    assert logs["t0/weight"] + logs["t1/weight"] == pytest.approx(1.0)
    famo.after_step(batch, module=module, losses={})  # the extra no-grad forward
    assert int(famo.adam_t) == 2


def test_dbmtl_direction_by_hand():
    db = DBMTL(beta=0.9, gamma=0.5)
    setup(db, k=2)
    jac = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    db.steps = 1
    w, rows = db.combine(jac, jac @ jac.T)
    # step 1: ĝ = g + 0.9 (0 − g) = 0.1 g; norms (0.3, 0.1); both rescaled to 0.3
    assert torch.allclose(w @ rows, torch.tensor([0.3, 0.3]))
    db.steps = 2
    w, rows = db.combine(jac, jac @ jac.T)
    # step 2: β₂ = 0.9/√2; ĝ = g + β₂(0.1g − g) = g(1 − 0.9β₂)
    f = 1 - 0.9 * 0.9 / math.sqrt(2)
    assert torch.allclose(w @ rows, torch.tensor([3 * f, 3 * f]), atol=1e-6)


def test_fixed_weights_reject_unknown_tasks():
    with pytest.raises(ValueError, match=r"\['nope'\]"):
        setup(FixedWeights(weights={"nope": 1.0}), k=2)


@pytest.mark.parametrize(
    "make", [UncertaintyWeighting, DynamicWeightAverage, RandomLossWeighting, GeometricLoss, FAMO]
)
def test_one_backward_strategies_log_diagnostics_every_n_steps(make):
    strategy = make(diagnostics_every=1)
    module, batch = setup(strategy, k=3)
    logs = step(strategy, module, batch)
    assert {"grad/t0/norm", "grad/cos/t0-t1", "grad/conflicts", "grad/t2/weight"} <= set(logs)


@pytest.mark.parametrize(
    "make", [UncertaintyWeighting, DynamicWeightAverage, RandomLossWeighting, GradNorm, FAMO]
)
def test_strategy_state_survives_a_checkpoint(make):
    """State lives in fixed-shape buffers/parameters, so a resumed run loads it strictly."""
    a = make()
    module, batch = setup(a, k=3)
    for _ in range(3):
        step(a, module, batch)
        a.after_step(batch, module=module, losses={})
        a.epoch_end()
    b = make()
    setup(b, k=3)
    b.load_state_dict(a.state_dict())
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb
        if torch.is_tensor(va):
            assert torch.equal(va, vb)
        else:  # the extra state: step counter, epoch, …
            assert va == vb and va["steps"] == 3
