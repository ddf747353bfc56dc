"""Gramian-only parameter-level aggregation equals the Jacobian-buffer path, with one row of scratch."""

from __future__ import annotations

import pytest
import torch
from torchjd.aggregation import IMTLG, MGDA, CAGrad, GradDrop, UPGrad
from toy import one_torch_thread, setup, step  # noqa: F401

from mtl.strategies import GradientAggregation


@pytest.mark.parametrize("make", [UPGrad, MGDA, lambda: CAGrad(c=0.4), IMTLG])
@pytest.mark.parametrize("scale", [1.0, 1024.0])
def test_gramian_only_equals_the_buffered_jacobian(make, scale):
    grads = []
    for gramian_only in (False, True):
        strategy = GradientAggregation(aggregator=make(), gramian_only=gramian_only, diagnostics_every=1)
        module, batch = setup(strategy, k=3, scale=scale)
        logs = step(strategy, module, batch)
        grads.append([p.grad.clone() for p in module.model.parameters()])
        weights = [logs[f"t{i}/weight"] for i in range(3)]
        assert logs["grad/conflicts"] >= 0
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-5 * scale, rtol=1e-4)
    assert len(weights) == 3


def test_gramian_only_keeps_one_row_not_k():
    strategy = GradientAggregation(aggregator=UPGrad(), gramian_only=True)
    module, batch = setup(strategy, k=3)
    step(strategy, module, batch)
    assert strategy._scratch.buf is None  # one process: norms straight from autograd's output
    assert strategy._jac.buf is None  # no k × n Jacobian buffer


def test_gramian_only_refuses_graddrop_and_rep_grad():
    with pytest.raises(ValueError, match="rep_grad"):
        GradientAggregation(aggregator=UPGrad(), gramian_only=True, rep_grad=True)
    strategy = GradientAggregation(aggregator=GradDrop(), gramian_only=True)
    with pytest.raises(ValueError, match="GradDrop"):
        setup(strategy, k=2)
