"""Static loss weighting: equal weights (EW) or fixed per-task weights.

EW is the "equal weighting" baseline of LibMTL (Lin & Zhang, 2023); the fixed weights
default to the per-task weights used by ATRC / InvPT / TaskExpert (Multi-Task-Transformer code).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from mtl.contracts import StepForward, StrategyHost
from mtl.strategies.base import Logs, Strategy


class FixedWeights(Strategy):
    """``L = Σ_t w_t L_t`` with constant weights.

    Args:
        weights: task → weight; tasks not listed use their default weight.
        uniform: ignore the task defaults and use weight 1 for every task (EW).
        diagnostics_every: see :class:`Strategy`.
    """

    def __init__(
        self,
        *,
        weights: Mapping[str, float] | None = None,
        uniform: bool = False,
        diagnostics_every: int = 0,
    ) -> None:
        super().__init__(diagnostics_every=diagnostics_every)
        self.overrides = dict(weights or {})
        self.uniform = uniform
        self.weights: dict[str, float] = {}

    def setup(self, *, tasks: Mapping, module: StrategyHost) -> None:
        super().setup(tasks=tasks, module=module)
        stray = sorted(set(self.overrides) - set(tasks))
        if stray:
            raise ValueError(f"strategy weights given for {stray}, not in the task list {list(tasks)}")
        self.weights = {
            t: float(self.overrides.get(t, 1.0 if self.uniform else task.default_weight))
            for t, task in tasks.items()
        }

    def combine(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The weighted total loss."""
        return sum(self.weights[t] * loss for t, loss in losses.items())

    def backward(self, step: StepForward, *, module: StrategyHost, batch: dict) -> Logs:
        losses, extra = step.losses, step.aux
        w = torch.tensor([self.weights[t] for t in losses])
        logs = self.diagnostics(losses, module, w)
        self.tick()
        total = self.combine(losses)
        module.manual_backward(total if extra is None else total + extra)
        return logs
