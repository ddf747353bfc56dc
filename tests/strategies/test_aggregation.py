"""Gradient aggregation: hand-computed cases, the Gramian route, the flat-buffer strategy."""

from __future__ import annotations

import math

import pytest
import torch
from torchjd.aggregation import (
    IMTLG,
    MGDA,
    AlignedMTL,
    CAGrad,
    ConFIG,
    DualProj,
    FairGrad,
    GradDrop,
    GradVac,
    NashMTL,
    PCGrad,
    UPGrad,
)
from toy import one_torch_thread, setup, step  # noqa: F401

from mtl.strategies import GradientAggregation, weights_from_gramian
from mtl.strategies.grads import gramian_stats


def combine(agg, jac: torch.Tensor) -> torch.Tensor:
    jac = jac.double()
    return weights_from_gramian(agg, jac @ jac.T) @ jac


def test_pcgrad_projects_conflicting_gradients_onto_each_others_normal_plane():
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])  # g1·g2 = −1 < 0
    g1_pc = g1 - (g1 @ g2) / (g2 @ g2) * g2  # (0.5, 0.5)
    g2_pc = g2 - (g1 @ g2) / (g1 @ g1) * g1  # (0, 1)
    expected = g1_pc + g2_pc  # (0.5, 1.5)
    assert torch.allclose(combine(PCGrad(), torch.stack([g1, g2])).float(), expected, atol=1e-6)
    # no conflict: plain sum
    assert torch.allclose(
        combine(PCGrad(), torch.tensor([[1.0, 0.0], [1.0, 1.0]])).float(), torch.tensor([2.0, 1.0])
    )


def test_mgda_finds_the_min_norm_point_of_the_convex_hull():
    # ‖α(2,0) + (1−α)(0,1)‖² = 4α² + (1−α)² is minimal at α = 1/5 → (0.4, 0.8)
    d = combine(MGDA(epsilon=1e-9, max_iters=10_000), torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
    assert torch.allclose(d.float(), torch.tensor([0.4, 0.8]), atol=1e-4)
    # one gradient inside the hull's min-norm region: the shorter one wins outright
    d = combine(MGDA(epsilon=1e-9, max_iters=10_000), torch.tensor([[1.0, 0.0], [3.0, 1.0]]))
    assert torch.allclose(d.float(), torch.tensor([1.0, 0.0]), atol=1e-4)


def test_cagrad_closed_form_and_optimality():
    c = 0.5
    # symmetric orthogonal tasks: d = (1 + c) g0
    d = combine(CAGrad(c=c), torch.eye(2))
    assert torch.allclose(d.float(), torch.tensor([0.75, 0.75]), atol=1e-4)
    # general case: d maximises min_i g_iᵀd over the ball ‖d − g0‖ ≤ c‖g0‖
    jac = torch.tensor([[1.0, 0.2, 0.0], [-0.6, 1.0, 0.3], [0.1, -0.4, 1.2]], dtype=torch.float64)
    g0 = jac.mean(0)
    d = combine(CAGrad(c=c), jac)
    radius = c * g0.norm()
    assert (d - g0).norm() <= radius * (1 + 1e-4)
    best = (jac @ d).min()
    u = torch.randn(4000, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cand = g0 + radius * u / u.norm(dim=1, keepdim=True)
    assert best >= (cand @ jac.T).min(dim=1).values.max() - 1e-4


def test_imtlg_gives_equal_projections_on_every_task_gradient():
    jac = torch.randn(3, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    d = combine(IMTLG(), jac)
    proj = jac @ d / jac.norm(dim=1)
    assert torch.allclose(proj, proj.mean().expand(3), rtol=1e-6)
    assert proj.mean() > 0


def test_upgrad_and_dualproj_never_conflict_with_a_task():
    jac = torch.tensor([[1.0, 0.0, 0.0], [-2.0, 1.0, 0.0], [0.5, -3.0, 1.0]], dtype=torch.float64)
    for agg in (UPGrad(), DualProj()):
        d = combine(agg, jac)
        # torchjd regularises the Gramian (reg_eps = 1e-4 after normalisation): tolerance to match
        assert (jac @ d >= -1e-2 * d.norm() * jac.norm(dim=1)).all()
        assert (jac.mean(0) @ d) > 0


@pytest.mark.parametrize(
    "make",
    [
        lambda: MGDA(),
        lambda: PCGrad(),
        lambda: CAGrad(c=0.4),
        lambda: IMTLG(),
        lambda: NashMTL(n_tasks=3),
        lambda: AlignedMTL(),
        lambda: UPGrad(),
        lambda: GradVac(),
        lambda: DualProj(),
        lambda: ConFIG(),
        lambda: FairGrad(alpha=1.0),
    ],
    ids=lambda f: "",
)
def test_the_gramian_route_equals_the_aggregator_on_the_jacobian(make):
    """Only the Gramian is needed: weights from G (or from a k × k root of it) reproduce A(J)."""
    jac = torch.randn(3, 9, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    jac[1] -= 1.5 * jac[0]  # a conflict
    torch.manual_seed(0)
    direct = make()(jac)
    torch.manual_seed(0)
    via_g = combine(make(), jac)
    assert torch.allclose(via_g, direct, rtol=1e-4, atol=1e-6), (via_g, direct)


def test_graddrop_has_no_gramian_weights():
    with pytest.raises(ValueError, match="coordinate-wise"):
        weights_from_gramian(GradDrop(), torch.eye(2))


def _manual_jacobian(module, batch, inputs):
    losses = module.task_losses(module.model.run(batch["image"]), batch)
    rows = []
    for loss in losses.values():
        g = torch.autograd.grad(loss, inputs, retain_graph=True)
        rows.append(torch.cat([x.reshape(-1) for x in g]))
    return torch.stack(rows), losses


@pytest.mark.parametrize("scale", [1.0, 1024.0])
def test_strategy_shared_params_follow_the_aggregate_heads_their_own_task(scale):
    strategy = GradientAggregation(aggregator=CAGrad(c=0.4))
    module, batch = setup(strategy, k=3, scale=scale)
    model = module.model
    shared = list(model.shared_parameters())
    jac, losses = _manual_jacobian(module, batch, shared)
    expected = CAGrad(c=0.4)(jac)
    step(strategy, module, batch)
    got = torch.cat([p.grad.reshape(-1) for p in shared]) / scale
    assert torch.allclose(got, expected, atol=1e-5)
    for t, loss in losses.items():
        own = torch.autograd.grad(loss, list(model.task_parameters(t)), retain_graph=True)
        for p, g in zip(model.task_parameters(t), own, strict=True):
            assert torch.allclose(p.grad / scale, g, atol=1e-6)


def test_representation_level_variant_pushes_the_aggregate_through_the_encoder():
    strategy = GradientAggregation(aggregator=MGDA(), rep_grad=True)
    module, batch = setup(strategy, k=2)
    model = module.model
    rep = model.encode(batch["image"])[0]
    rep_in = rep.detach().requires_grad_(True)
    losses = module.task_losses(model.decode([rep_in]), batch)
    jz = torch.stack(
        [torch.autograd.grad(v, rep_in, retain_graph=True)[0].reshape(-1) for v in losses.values()]
    )
    w = weights_from_gramian(MGDA(), (jz @ jz.T).double()).float()
    dz = (w @ jz).reshape(rep.shape)
    expected = torch.autograd.grad(rep, list(model.shared_parameters()), grad_outputs=dz)
    logs = step(strategy, module, batch)
    for p, g in zip(model.shared_parameters(), expected, strict=True):
        assert torch.allclose(p.grad, g, atol=1e-6)
    assert math.isclose(logs["t0/weight"] + logs["t1/weight"], 1.0, rel_tol=1e-4)  # MGDA: convex weights


def test_non_finite_gradients_poison_grad_so_the_fp16_scaler_skips():
    strategy = GradientAggregation(aggregator=UPGrad())
    module, batch = setup(strategy, k=2, scale=float("inf"))
    logs = step(strategy, module, batch)
    assert logs == {"skipped": 1.0}
    assert all(torch.isnan(p.grad).all() for p in module.model.shared_parameters())


def test_diagnostics_from_the_gramian():
    jac = torch.tensor([[3.0, 0.0], [-1.0, 1.0], [0.0, 2.0]])
    stats = gramian_stats(jac @ jac.T, ["a", "b", "c"], torch.tensor([0.2, 0.3, 0.5]))
    assert stats["grad/a/norm"] == pytest.approx(3.0)
    assert stats["grad/b/norm"] == pytest.approx(math.sqrt(2))
    assert stats["grad/cos/a-b"] == pytest.approx(-1 / math.sqrt(2))
    assert stats["grad/cos/a-c"] == pytest.approx(0.0)
    assert stats["grad/cos/b-c"] == pytest.approx(1 / math.sqrt(2))
    assert stats["grad/conflicts"] == 1.0
    assert stats["grad/c/weight"] == pytest.approx(0.5)
    strategy = GradientAggregation(aggregator=UPGrad(), diagnostics_every=2)
    module, batch = setup(strategy, k=2)
    assert "grad/conflicts" in step(strategy, module, batch)  # step 0
    assert "grad/conflicts" not in step(strategy, module, batch)  # step 1
