"""SAM, ASAM and F-MTL against step-by-step reference computations; bad configurations."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchjd.aggregation import IMTLG, UPGrad
from toy import ToyModule, ToyNet, one_torch_thread, setup, step  # noqa: F401

from mtl.strategies import SAM, FlatMTL, GradientAggregation, weights_from_gramian
from mtl.strategies.grads import frozen_bn_stats


def _flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def _loss_at(module, batch, params, delta, fn):
    backup = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, d in zip(params, delta, strict=True):
            p.add_(d)
    val = fn()
    with torch.no_grad():
        for p, b in zip(params, backup, strict=True):
            p.copy_(b)
    return val


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_and_asam_take_the_gradient_at_the_perturbed_point(adaptive):
    rho, eta = 0.1, 0.01
    sam = SAM(rho=rho, adaptive=adaptive, eta=eta, adaptive_scope="all")
    module, batch = setup(sam, k=2)
    params = list(module.model.parameters())
    before = [p.detach().clone() for p in params]

    def total_grad():
        losses = module.task_losses(module.model.run(batch["image"]), batch)
        return torch.autograd.grad(sum(losses.values()), params)

    g = total_grad()
    if adaptive:  # ε = ρ T²g / ‖Tg‖, T = |w| + η
        t = [p.detach().abs() + eta for p in params]
        tg = [a * b for a, b in zip(t, g, strict=True)]
        eps = [rho * a * b / _flat(tg).norm() for a, b in zip(t, tg, strict=True)]
    else:  # ε = ρ g / ‖g‖
        eps = [rho * x / _flat(g).norm() for x in g]
    expected = _loss_at(module, batch, params, eps, total_grad)
    step(sam, module, batch)
    for p, e, b in zip(params, expected, before, strict=True):
        assert torch.allclose(p.grad, e, atol=1e-6)
        assert torch.equal(p.detach(), b)  # weights restored exactly


def test_fmtl_matches_the_reference_algorithm():
    rho = 0.05
    fmtl = FlatMTL(aggregator=IMTLG(), rho=rho, adaptive=False)
    module, batch = setup(fmtl, k=2)
    model = module.model
    shared = list(model.shared_parameters())

    def task_grad(t, inputs):
        loss = module.task_losses(model.run(batch["image"]), batch)[t]
        return torch.autograd.grad(loss, inputs)

    clean, flat, sam_heads = [], [], {}
    for t in model.tasks:
        head = list(model.task_parameters(t))
        g = task_grad(t, shared + head)
        gs, gh = g[: len(shared)], g[len(shared) :]
        eps = [rho * x / _flat(gs).norm() for x in gs] + [rho * x / _flat(gh).norm() for x in gh]
        g_sam = _loss_at(
            module, batch, shared + head, eps, lambda t=t, head=head: task_grad(t, shared + head)
        )
        clean.append(_flat(gs))
        flat.append(_flat(g_sam[: len(shared)]) - _flat(gs))
        sam_heads[t] = g_sam[len(shared) :]
    jc, jf = torch.stack(clean), torch.stack(flat)

    def agg(j):
        return weights_from_gramian(IMTLG(), (j @ j.T).double()).float() @ j

    expected = agg(jc) + agg(jf)
    step(fmtl, module, batch)
    assert torch.allclose(_flat([p.grad for p in shared]), expected, atol=1e-6)
    for t in model.tasks:
        for p, g in zip(model.task_parameters(t), sam_heads[t], strict=True):
            assert torch.allclose(p.grad, g, atol=1e-6)


def test_extra_passes_leave_batchnorm_statistics_alone():
    bn = nn.BatchNorm1d(3)
    x = torch.randn(8, 3)
    with frozen_bn_stats(bn):
        bn(x)
    assert torch.equal(bn.running_mean, torch.zeros(3)) and int(bn.num_batches_tracked) == 0
    bn(x)
    assert not torch.equal(bn.running_mean, torch.zeros(3)) and bn.momentum == 0.1


@pytest.mark.parametrize("rho", [0.0, -0.1])
def test_rho_must_be_positive(rho):
    with pytest.raises(ValueError, match="rho must be > 0"):
        SAM(rho=rho)
    with pytest.raises(ValueError, match="rho must be > 0"):
        FlatMTL(aggregator=UPGrad(), rho=rho)


def test_per_task_gradient_strategies_refuse_a_frozen_backbone():
    module = ToyModule(ToyNet(2))
    module.model.backbone = module.model.enc  # what MultiTaskNet calls its encoder
    for p in module.model.enc.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="backbone is frozen entirely"):
        GradientAggregation(aggregator=UPGrad()).setup(tasks=module.tasks, module=module)
    SAM().setup(tasks=module.tasks, module=module)  # loss-level strategies are fine


def test_rep_grad_needs_every_shared_parameter_below_the_representation():
    module = ToyModule(ToyNet(2))
    model = module.model
    model.representation_parameters = lambda: iter([model.enc.weight])  # enc.bias "above" it
    with pytest.raises(ValueError, match=r"\['enc.bias'\].*lie above the representation"):
        GradientAggregation(aggregator=UPGrad(), rep_grad=True).setup(tasks=module.tasks, module=module)
