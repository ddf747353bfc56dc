"""DB-MTL: Lin et al., "Dual-Balancing Multi-Task Learning", 2023 (arXiv:2308.12029).

Loss-scale balancing: every task's row is the gradient of ``log L_t`` (``∇L_t / L_t``).
Gradient-magnitude balancing: an exponential moving average ``ĝ_t`` of each task's row,
with decay ``β / s^γ`` at step ``s = 1, 2, …`` (``ĝ ← g + β_s (ĝ − g)``, ``ĝ`` starting at 0),
then every task's EMA is rescaled to the largest EMA norm: ``d = Σ_t max_j‖ĝ_j‖ · ĝ_t / ‖ĝ_t‖``.

Defaults are the reference's (LibMTL ``weighting/DB_MTL.py`` with its ``DB_beta = 0.9``,
``DB_beta_sigma = 0``): a constant EMA coefficient ``β_s = 0.9``. ``gamma > 0`` decays it (``γ = 0.5``
gives ``β_100 = 0.09``, an EMA that forgets almost at once).

Logged weights: ``<task>/weight`` is the **effective weight on** ``∇L_t``, ``α_t / L_t`` with
``α_t = max_j‖ĝ_j‖ / ‖ĝ_t‖``: the update is ``Σ_t α_t ĝ_t``, and ``ĝ_t`` estimates ``∇L_t / L_t``, so
the update equals ``Σ_t (α_t / L_t) ∇L_t`` whenever the EMA equals the current log-loss gradient
(exactly at ``β = 0``; for ``β > 0`` once the EMA has settled on the mean log-loss gradient), so
it is comparable with the ``w_t`` of ``Σ_t w_t ∇L_t`` that the other strategies log. ``L_t`` is the
rank-averaged loss, clamped at ``eps``.
``<task>/scale`` is ``α_t`` itself (the magnitude balancing on the log-loss gradients).

Needs per-task gradients of the shared parameters (``k`` backward passes) and one more
``k × n`` device buffer for the EMA; the EMA is built from rank-averaged rows, so it is the
same on every rank. It is checkpointed in the strategy's extra state (not as a buffer: its
shape is known only at the first step), so a resumed run continues the same EMA.
"""

from __future__ import annotations

import torch

from mtl.contracts import StrategyHost
from mtl.strategies.grads import all_reduce_mean_
from mtl.strategies.jacobian import Measured, PerTaskGradients, Update, sync_weights


class DBMTL(PerTaskGradients):
    """Dual-balancing: log-loss gradients, EMA-normalised to the largest magnitude.

    Args:
        beta: EMA coefficient ``β`` (the reference's 0.9).
        gamma: decay exponent ``γ`` of ``β_s = β / s^γ`` (the reference's 0: constant ``β``).
        eps: clamp of the losses before the logarithm and of the EMA norms.
        diagnostics_every: see :class:`~mtl.strategies.base.Strategy`.
    """

    supports_rep_grad = False

    def __init__(
        self, *, beta: float = 0.9, gamma: float = 0.0, eps: float = 1e-8, diagnostics_every: int = 0
    ) -> None:
        super().__init__(rep_grad=False, diagnostics_every=diagnostics_every)
        if not 0 <= beta < 1:
            raise ValueError(f"DB-MTL beta must be in [0, 1), got {beta}")
        self.beta, self.gamma, self.eps = float(beta), float(gamma), float(eps)
        self.register_buffer("ema", torch.zeros(0), persistent=False)  # its shape is known at step 1

    def extra_state(self) -> dict:
        return {"ema": self.ema}

    def load_extra_state(self, state: dict) -> None:
        if "ema" in state:
            self.ema = state["ema"].to(self.ema.device)

    def task_objective(self, task: str, loss: torch.Tensor) -> torch.Tensor:
        return torch.log(loss.clamp_min(self.eps))

    def combine(
        self, jac: torch.Tensor, gram: torch.Tensor, gram_host: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.ema.shape != jac.shape or self.ema.device != jac.device:
            self.ema = torch.zeros_like(jac)  # zero-initialised EMA, as in the paper's code
        beta_s = self.beta / float(self.steps) ** self.gamma  # self.steps ≥ 1 here (ticked)
        self.ema.sub_(jac).mul_(beta_s).add_(jac)
        norms = self.ema.norm(dim=1).clamp_min(self.eps)
        weights = norms.max() / norms
        return sync_weights(weights), self.ema

    def update(self, m: Measured, *, module: StrategyHost, batch: dict) -> Update | None:
        scales, rows = self.combine(m.jac, m.gram, m.gram_host)
        self.write_update(m.step, m.targets, scales, rows, m.scale)
        losses = torch.stack([m.step.losses[t].detach().float() for t in self.task_names])
        losses = all_reduce_mean_(losses.to(scales.device)).clamp_min(self.eps)
        effective = sync_weights((scales / losses.to(scales.dtype)).contiguous())
        logs = {f"{t}/scale": a for t, a in zip(self.task_names, scales.unbind(0), strict=True)}  # no sync
        return Update(effective, logs)
