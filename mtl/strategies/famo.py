"""FAMO: Liu et al., "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023.

Task logits ``ξ``, ``z = softmax(ξ)``. The model follows
``d = Σ_t c z_t / ℓ_t ∇ℓ_t`` with ``c = (Σ_t z_t / ℓ_t)^{-1}`` (one backward of
``c Σ_t z_t log ℓ_t``, ``c`` held constant), ``ℓ_t = L_t − min_t + ε``. After the optimiser
step one extra no-grad forward on the same batch gives ``ℓ'``; ``ξ`` then takes an Adam step
(with L2 decay ``γ``) on ``∂/∂ξ Σ_t z_t (log ℓ_t − log ℓ'_t)`` — the softmax Jacobian applied
to the per-task log-loss decrease — so that tasks that improved least gain weight.

Losses are averaged over the ranks before they touch ``ξ``, so ``ξ`` is the same everywhere.
The look-ahead forward runs with BatchNorm statistics frozen.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from mtl.contracts import StepForward, StrategyHost
from mtl.strategies.base import Logs, Strategy
from mtl.strategies.grads import all_reduce_mean_, frozen_bn_stats


class FAMO(Strategy):
    """Fast adaptive multitask optimisation: ``O(1)`` extra cost per step.

    Args:
        lr: Adam step size of the logits (0.025 in the paper).
        weight_decay: L2 decay ``γ`` of the logits (1e-3 on NYUv2 in the paper).
        eps: ``ε`` in ``ℓ_t = L_t − min_t + ε``.
        min_losses: lower bound ``min_t`` of each task's loss (0 for the losses used here).
        diagnostics_every: see :class:`Strategy`.
    """

    def __init__(
        self,
        *,
        lr: float = 0.025,
        weight_decay: float = 1e-3,
        eps: float = 1e-8,
        min_losses: float = 0.0,
        diagnostics_every: int = 0,
    ) -> None:
        super().__init__(diagnostics_every=diagnostics_every)
        if lr <= 0:
            raise ValueError(f"FAMO lr must be > 0, got {lr}")
        self.lr, self.weight_decay, self.eps, self.min_losses = (
            float(lr),
            float(weight_decay),
            float(eps),
            float(min_losses),
        )
        for name in ("logits", "adam_m", "adam_v", "prev"):
            self.register_buffer(name, torch.zeros(0))
        self.register_buffer("adam_t", torch.zeros((), dtype=torch.long))
        self._t: int | None = None  # adam_t on the host (read once, then mirrored: no sync per step)

    def load_extra_state(self, state: dict) -> None:
        self._t = None  # a checkpoint was loaded: read the buffer again

    def setup(self, *, tasks: Mapping, module: StrategyHost) -> None:
        super().setup(tasks=tasks, module=module)
        k = len(tasks)
        self.logits, self.adam_m, self.adam_v, self.prev = (torch.zeros(k) for _ in range(4))

    def shifted(self, losses: torch.Tensor) -> torch.Tensor:
        return (losses - self.min_losses).clamp_min(0) + self.eps

    def task_weights(self, losses: torch.Tensor) -> torch.Tensor:
        """Effective weights ``c z_t / ℓ_t`` on ``∇L_t``."""
        z = torch.softmax(self.logits.to(losses.device), 0)
        inv = z / self.shifted(losses)
        return inv / inv.sum()

    def backward(self, step: StepForward, *, module: StrategyHost, batch: dict) -> Logs:
        losses, extra = step.losses, step.aux
        stacked = torch.stack([loss.float() for loss in losses.values()])
        z = torch.softmax(self.logits.to(stacked.device), 0)
        ell = self.shifted(stacked)
        c = 1.0 / (z / ell.detach()).sum()
        total = c * (z * torch.log(ell)).sum()
        w = self.task_weights(stacked.detach())
        logs = self.diagnostics(losses, module, w)
        self.tick()
        module.manual_backward(total if extra is None else total + extra)
        self.prev = all_reduce_mean_(stacked.detach().clone())
        logs.update({f"{t}/weight": v for t, v in zip(losses, w.unbind(0), strict=True)})  # no host sync
        return logs

    def update(self, new_losses: torch.Tensor) -> None:
        """The logits' Adam step from this step's losses (``prev``) and the look-ahead ones."""
        dev = new_losses.device
        logits = self.logits.to(dev)
        z = torch.softmax(logits, 0)
        delta = torch.log(self.shifted(self.prev.to(dev))) - torch.log(self.shifted(new_losses))
        grad = z * (delta - (z * delta).sum()) + self.weight_decay * logits  # softmax Jacobianᵀ δ + L2
        self.adam_t += 1
        self._t = int(self.adam_t) if self._t is None else self._t + 1
        b1, b2, t = 0.9, 0.999, self._t
        self.adam_m = b1 * self.adam_m.to(dev) + (1 - b1) * grad
        self.adam_v = b2 * self.adam_v.to(dev) + (1 - b2) * grad**2
        m_hat, v_hat = self.adam_m / (1 - b1**t), self.adam_v / (1 - b2**t)
        self.logits = logits - self.lr * m_hat / (v_hat.sqrt() + 1e-8)

    @torch.no_grad()
    def after_step(self, batch: dict, *, module: StrategyHost, losses: Mapping[str, torch.Tensor]) -> None:
        with frozen_bn_stats(module.model):
            out = module.model.run(batch["image"])
            new = torch.stack([loss.float() for loss in module.task_losses(out, batch).values()])
        self.update(all_reduce_mean_(new))
