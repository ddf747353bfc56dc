"""The strategies compute what their reference code computes (issue 19), checked against values derived
by hand or in closed form from the references' definitions on small inputs.

References: CAGrad (Cranial-XIX/CAGrad ``nyuv2/utils.py``, LibMTL ``CAGrad.py``), MGDA (Sener & Koltun,
isl-org/MultiObjectiveOptimization), DB-MTL (LibMTL ``DB_MTL.py`` and its defaults), UW (MTAN / LibMTL
start), Nash-MTL / FairGrad / MGDA official code (one backward of ``Σ w_t L_t``), ASAM (SamsungLabs/ASAM),
F-MTL (VietHoang1512/FS-MTL ``nyuv2/train.py``).
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torchjd.aggregation import IMTLG, FairGrad, GradDrop, NashMTL
from toy import one_torch_thread, setup, step  # noqa: F401

from mtl.strategies import SAM, FlatMTL, GradientAggregation, weights_from_gramian
from mtl.strategies.aggregators import MGDA, CAGrad, min_norm_weights

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "strategy"


def config(name: str):
    return OmegaConf.load(CONFIGS / f"{name}.yaml")


def combine(agg, jac: torch.Tensor) -> torch.Tensor:
    jac = jac.double()
    return weights_from_gramian(agg, jac @ jac.T) @ jac


def _flat(ts) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


# ---------------------------------------------------------------------------------------------- CAGrad
def _cagrad_eye2(c: float) -> torch.Tensor:
    """CAGrad on g1 = e1, g2 = e2 before rescaling: by symmetry w = (½, ½), so g_w = g0 = (½, ½),
    λ = c‖g0‖/‖g_w‖ = c and d = g0 + c g0."""
    return (1 + c) * torch.tensor([0.5, 0.5], dtype=torch.float64)


@pytest.mark.parametrize("name", ["cagrad", "fmtl"])
def test_cagrad_configs_divide_the_update_by_one_plus_c_squared(name):
    cfg = config(name).aggregator
    assert cfg.c == 0.4 and cfg.rescale == 1  # the authors' NYUv2 run: --alpha 0.4, rescale=1
    d = combine(instantiate(cfg), torch.eye(2))
    assert torch.allclose(d, _cagrad_eye2(0.4) / (1 + 0.4**2), atol=1e-6)  # 0.6034…, not 0.7


@pytest.mark.parametrize(("rescale", "divisor"), [(0, 1.0), (1, 1 + 0.5**2), (2, 1 + 0.5)])
def test_cagrad_rescale_variants(rescale, divisor):
    d = combine(CAGrad(c=0.5, rescale=rescale), torch.eye(2))
    assert torch.allclose(d, _cagrad_eye2(0.5) / divisor, atol=1e-6)
    jac = torch.tensor([[1.0, 0.2, 0.0], [-0.6, 1.0, 0.3], [0.1, -0.4, 1.2]], dtype=torch.float64)
    unscaled = combine(CAGrad(c=0.5, rescale=0), jac)
    assert torch.allclose(combine(CAGrad(c=0.5, rescale=rescale), jac), unscaled / divisor, rtol=1e-9)


def test_cagrad_rejects_an_unknown_rescale():
    with pytest.raises(ValueError, match="rescale must be 0 .* got 3"):
        CAGrad(c=0.4, rescale=3)


# ------------------------------------------------------------------------------------------------ MGDA
def _min_norm_by_enumeration(gram: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Independent solver for the test: every support's affine min-norm point (KKT system), keep the
    feasible one of least norm."""
    k = gram.shape[0]
    best_w, best = None, math.inf
    for r in range(1, k + 1):
        for support in itertools.combinations(range(k), r):
            idx = list(support)
            kkt = torch.zeros(r + 1, r + 1, dtype=torch.float64)
            kkt[:r, :r] = gram[idx][:, idx]
            kkt[:r, r] = kkt[r, :r] = 1.0
            rhs = torch.zeros(r + 1, dtype=torch.float64)
            rhs[r] = 1.0
            try:
                v = torch.linalg.solve(kkt, rhs)[:r]
            except RuntimeError:
                continue
            if (v >= 0).all():
                w = torch.zeros(k, dtype=torch.float64)
                w[idx] = v
                if float(w @ gram @ w) < best:
                    best_w, best = w, float(w @ gram @ w)
    return best_w, best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mgda_two_tasks_closed_form(seed):
    g = torch.randn(2, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if seed == 2:
        g[1] = 3 * g[0] + 0.1 * g[1]  # nearly parallel: the shorter gradient alone (γ clipped to 1)
    g1, g2 = g
    gamma = float(((g2 - g1) @ g2 / (g1 - g2).norm() ** 2).clamp(0, 1))
    expected = gamma * g1 + (1 - gamma) * g2
    assert torch.allclose(
        combine(instantiate(config("mgda").aggregator), g), expected, rtol=1e-10, atol=1e-12
    )


def test_mgda_config_reaches_the_exact_min_norm_point_for_three_tasks():
    # Frank–Wolfe with epsilon 1e-3 stops 4 % above the minimum here (weights 0.024 / 0.347 / 0.629)
    jac = torch.tensor([[1.0, 0.1, 0.0], [-0.2, 1.0, 0.3], [0.3, -0.5, 0.2]], dtype=torch.float64)
    gram = jac @ jac.T
    w_ref, value = _min_norm_by_enumeration(gram)
    w = weights_from_gramian(instantiate(config("mgda").aggregator), gram)
    assert float(w @ gram @ w) == pytest.approx(value, rel=1e-10)
    assert torch.allclose(w, w_ref, atol=1e-9)
    assert float(w[0]) == 0.0  # the first gradient is not in the optimal face


def test_mgda_three_tasks_closed_form_interior_point():
    # g_i = (p_i, 1) with p = (1, 0), (0, 1), (−1, −1): the hull's plane z = 1 is nearest at the centroid
    jac = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0], [-1.0, -1.0, 1.0]], dtype=torch.float64)
    w = weights_from_gramian(MGDA(), jac @ jac.T)
    assert torch.allclose(w, torch.full((3,), 1 / 3, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_min_norm_weights_agree_with_enumeration(seed):
    gen = torch.Generator().manual_seed(seed)
    k, n = 2 + seed % 4, 1 + seed  # also rank-deficient cases (n < k)
    jac = torch.randn(k, n, generator=gen, dtype=torch.float64)
    jac[1] = -0.5 * jac[0]  # a conflict
    gram = jac @ jac.T
    w = min_norm_weights(gram)
    assert float(w.sum()) == pytest.approx(1.0) and bool((w >= 0).all())
    assert float(w @ gram @ w) == pytest.approx(_min_norm_by_enumeration(gram)[1], abs=1e-12)


def test_mgda_unit_normalised_and_scaled_by_the_task_count():
    # unit gradients (1, 0), (0, 1): min-norm at (½, ½); update k·(½, ½) = (1, 1); raw weights k·½/‖g_i‖
    jac = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    agg = MGDA(normalization="l2", scale_by_tasks=True)
    assert torch.allclose(combine(agg, jac), torch.tensor([1.0, 1.0], dtype=torch.float64))
    assert torch.allclose(
        weights_from_gramian(agg, jac @ jac.T), torch.tensor([0.5, 1.0], dtype=torch.float64)
    )
    with pytest.raises(ValueError, match="normalization must be one of"):
        MGDA(normalization="loss")


# ---------------------------------------------------------------------------------------------- DB-MTL
def test_dbmtl_config_keeps_the_ema_coefficient_constant():
    cfg = config("dbmtl")
    assert cfg.beta == 0.9 and cfg.gamma == 0.0  # LibMTL: DB_beta 0.9, DB_beta_sigma 0
    db = instantiate(cfg)
    setup(db, k=2)
    jac = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    for s in (1, 2, 3, 100):
        db.steps = s
        w, rows = db.combine(jac, jac @ jac.T)
    # constant β: ĝ_s = (1 − 0.9^s) g after s steps of the same g; both rows rescaled to norm 3·that
    f = 1 - 0.9**4  # four combine calls
    assert torch.allclose(w @ rows, torch.tensor([3 * f, 3 * f]), atol=1e-5)


def test_dbmtl_logs_the_effective_weight_on_each_loss_gradient():
    db = instantiate(config("dbmtl"), beta=0.0)  # β = 0: ĝ_t is this step's ∇log L_t
    module, batch = setup(db, k=2)
    model = module.model
    shared = list(model.shared_parameters())
    losses = module.task_losses(model.run(batch["image"]), batch)
    grads = {t: _flat(torch.autograd.grad(v, shared, retain_graph=True)) for t, v in losses.items()}
    losses = {t: v.detach() for t, v in losses.items()}
    log_norms = {t: float((grads[t] / float(losses[t])).norm()) for t in losses}
    top = max(log_norms.values())
    expected = {t: top / log_norms[t] / float(losses[t]) for t in losses}  # α_t / L_t
    logs = step(db, module, batch)
    for t in losses:
        assert logs[f"{t}/weight"] == pytest.approx(expected[t], rel=1e-5)
        assert logs[f"{t}/scale"] == pytest.approx(top / log_norms[t], rel=1e-5)
    # the effective weights reproduce the update: d = Σ_t (α_t / L_t) ∇L_t
    d = sum(expected[t] * grads[t] for t in losses)
    assert torch.allclose(_flat([p.grad for p in shared]), d, atol=1e-6)


# -------------------------------------------------------------------------------------------------- UW
def test_uw_config_starts_where_the_field_does():
    uw = instantiate(config("uw"))
    setup(uw, k=3)
    assert torch.equal(uw.log_vars.detach(), torch.full((3,), -0.5))
    assert torch.allclose(uw.weights(torch.ones(3)), torch.full((3,), 0.5 * math.exp(0.5)))


# ------------------------------------------------------------------------ heads weighted by the task weight
def _task_grads(module, batch, params_of):
    losses = module.task_losses(module.model.run(batch["image"]), batch)
    return {t: torch.autograd.grad(v, list(params_of(t)), retain_graph=True) for t, v in losses.items()}


@pytest.mark.parametrize("name", ["fairgrad", "mgda"])
def test_configs_weight_each_head_by_its_task_weight(name):
    cfg = config(name)
    assert cfg.task_weighted_heads is True
    strategy = instantiate(cfg, _convert_="all")
    module, batch = setup(strategy, k=2)
    heads = _task_grads(module, batch, module.model.task_parameters)
    logs = step(strategy, module, batch)
    for t, grads in heads.items():
        for p, g in zip(module.model.task_parameters(t), grads, strict=True):
            assert torch.allclose(p.grad, logs[f"{t}/weight"] * g, atol=1e-6)


def test_nash_mtl_clips_only_the_shared_direction_like_its_reference():
    max_norm = 1e-3
    strategy = GradientAggregation(aggregator=NashMTL(n_tasks=2, max_norm=max_norm), task_weighted_heads=True)
    module, batch = setup(strategy, k=2)
    model = module.model
    shared = _task_grads(module, batch, lambda t: model.shared_parameters())
    heads = _task_grads(module, batch, model.task_parameters)
    logs = step(strategy, module, batch)
    alpha = {t: logs[f"{t}/weight"] for t in heads}
    full = sum(alpha[t] * _flat(shared[t]) for t in heads)
    assert float(full.norm()) > 10 * max_norm  # clipping is active
    expected = full * max_norm / (float(full.norm()) + 1e-6)  # torch's clip_grad_norm_ on the shared part
    assert torch.allclose(_flat([p.grad for p in model.shared_parameters()]), expected, rtol=1e-4)
    for t, grads in heads.items():  # heads: the unclipped weights
        for p, g in zip(model.task_parameters(t), grads, strict=True):
            assert torch.allclose(p.grad, alpha[t] * g, atol=1e-7)


def test_task_weighted_heads_need_task_weights():
    with pytest.raises(ValueError, match="GradDrop has no task weights"):
        setup(GradientAggregation(aggregator=GradDrop(), task_weighted_heads=True), k=2)
    unweighted = GradientAggregation(aggregator=FairGrad(alpha=1.0))  # the default: heads get ∇L_t
    module, batch = setup(unweighted, k=2)
    heads = _task_grads(module, batch, module.model.task_parameters)
    step(unweighted, module, batch)
    for t, grads in heads.items():
        for p, g in zip(module.model.task_parameters(t), grads, strict=True):
            assert torch.allclose(p.grad, g, atol=1e-6)


# ------------------------------------------------------------------------------------------- SAM / ASAM
def test_asam_scales_only_the_weights_like_the_authors_code():
    rho, eta = 0.5, 0.01
    sam = SAM(rho=rho, adaptive=True, eta=eta)  # adaptive_scope="weights" by default
    module, batch = setup(sam, k=2)
    named = list(module.model.named_parameters())
    params = [p for _, p in named]

    def total_grad():
        losses = module.task_losses(module.model.run(batch["image"]), batch)
        return torch.autograd.grad(sum(losses.values()), params)

    g = total_grad()
    t = [p.detach().abs() + eta if "weight" in n else torch.ones_like(p) for n, p in named]  # biases: T = 1
    tg = [a * b for a, b in zip(t, g, strict=True)]
    eps = [rho * a * b / _flat(tg).norm() for a, b in zip(t, tg, strict=True)]
    backup = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, e in zip(params, eps, strict=True):
            p.add_(e)
    expected = total_grad()
    with torch.no_grad():
        for p, b in zip(params, backup, strict=True):
            p.copy_(b)
    step(sam, module, batch)
    for p, e in zip(params, expected, strict=True):
        assert torch.allclose(p.grad, e, atol=1e-6)
    with pytest.raises(ValueError, match="adaptive_scope must be one of"):
        SAM(adaptive_scope="biases")


# ----------------------------------------------------------------------------------------------- F-MTL
def _reference_fmtl_rows(module, batch, rho: float, adaptive: bool):
    """The reference's per-task rows: clean g_i and flat h_i = g_i^SAM − g_i of the shared parameters and
    the heads' g_i^SAM, with ε = ρ T²g/‖Tg‖ (T = |w| when adaptive, else 1) for the shared and the head
    set separately."""
    model = module.model
    shared = list(model.shared_parameters())

    def grads_at(t, params, delta):
        backup = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, d in zip(params, delta, strict=True):
                p.add_(d)
        loss = module.task_losses(model.run(batch["image"]), batch)[t]
        out = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, b in zip(params, backup, strict=True):
                p.copy_(b)
        return out

    def eps(params, grads):
        t = [p.detach().abs() if adaptive else torch.ones_like(p) for p in params]
        tg = [a * b for a, b in zip(t, grads, strict=True)]
        return [rho * a * b / _flat(tg).norm() for a, b in zip(t, tg, strict=True)]

    clean, flat, sam_heads = [], [], {}
    for t in model.tasks:
        head = list(model.task_parameters(t))
        g = grads_at(t, shared + head, [torch.zeros_like(p) for p in shared + head])
        gs, gh = list(g[: len(shared)]), list(g[len(shared) :])
        g_sam = grads_at(t, shared + head, eps(shared, gs) + eps(head, gh))
        clean.append(_flat(gs))
        flat.append(_flat(g_sam[: len(shared)]) - _flat(gs))
        sam_heads[t] = g_sam[len(shared) :]
    return torch.stack(clean), torch.stack(flat), sam_heads


def test_fmtl_defaults_are_the_reference_dense_recipe():
    cfg = config("fmtl")
    assert (cfg.rho, cfg.adaptive, cfg.eta) == (2.0, True, 0.0)
    fmtl = FlatMTL(aggregator=IMTLG())  # the class defaults are the same recipe
    module, batch = setup(fmtl, k=2)
    jc, jf, sam_heads = _reference_fmtl_rows(module, batch, rho=2.0, adaptive=True)

    def agg(j):
        return weights_from_gramian(IMTLG(), (j @ j.T).double()).float() @ j

    step(fmtl, module, batch)
    assert torch.allclose(
        _flat([p.grad for p in module.model.shared_parameters()]), agg(jc) + agg(jf), atol=1e-5
    )
    for t, grads in sam_heads.items():
        for p, g in zip(module.model.task_parameters(t), grads, strict=True):
            assert torch.allclose(p.grad, g, atol=1e-6)


def test_fmgda_config_is_the_reference_f_mgda():
    fmtl = instantiate(config("fmtl_mgda"), _convert_="all")
    module, batch = setup(fmtl, k=2)
    jc, jf, _ = _reference_fmtl_rows(module, batch, rho=2.0, adaptive=True)

    def reference_mgda(j):  # unit rows, the 2-task closed-form min-norm point, times k
        u1, u2 = j / j.norm(dim=1, keepdim=True)
        gamma = float(((u2 - u1) @ u2 / (u1 - u2).norm() ** 2).clamp(0, 1))
        return 2 * (gamma * u1 + (1 - gamma) * u2)

    step(fmtl, module, batch)
    got = _flat([p.grad for p in module.model.shared_parameters()])
    assert torch.allclose(got, reference_mgda(jc) + reference_mgda(jf), atol=1e-5)
