"""A new strategy: weight every task by the inverse of its current loss (a loss-weighting one)."""

from __future__ import annotations

import torch

from mtl.contracts import StepForward, StrategyHost
from mtl.strategies.base import Logs, Strategy
from mtl.strategies.grads import all_reduce_mean_


class InverseLossWeights(Strategy):
    """``L = Σ_t L_t / sg(L_t)``: every task contributes a loss of 1 at the current point.

    Args:
        eps: added to each loss before inverting it.
        diagnostics_every: see :class:`mtl.strategies.base.Strategy`.
    """

    def __init__(self, *, eps: float = 1e-8, diagnostics_every: int = 0) -> None:
        super().__init__(diagnostics_every=diagnostics_every)
        if eps <= 0:
            raise ValueError(f"strategy.eps must be > 0, got {eps}")
        self.eps = eps

    def backward(self, step: StepForward, *, module: StrategyHost, batch: dict) -> Logs:
        losses = step.losses
        # the weights come from the losses averaged over the DDP ranks, so every rank uses the same
        current = all_reduce_mean_(torch.stack([loss.detach().float() for loss in losses.values()]))
        weights = 1.0 / (current + self.eps)
        logs = self.diagnostics(losses, module, weights)
        self.tick()
        total = sum(w * loss for w, loss in zip(weights, losses.values(), strict=True))
        module.manual_backward(total if step.aux is None else total + step.aux)
        # 0-dim device tensors: logged without a host sync
        return logs | {f"{t}/weight": w for t, w in zip(losses, weights, strict=True)}
