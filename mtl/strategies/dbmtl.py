"""DB-MTL: Lin et al., "Dual-Balancing Multi-Task Learning", 2023 (arXiv:2308.12029).

Loss-scale balancing: every task's row is the gradient of ``log L_t`` (``∇L_t / L_t``).
Gradient-magnitude balancing: an exponential moving average ``ĝ_t`` of each task's row,
with decay ``β / s^γ`` at step ``s = 1, 2, …`` (``ĝ ← g + β_s (ĝ − g)``, ``ĝ`` starting at 0),
then every task's EMA is rescaled to the largest EMA norm: ``d = Σ_t max_j‖ĝ_j‖ · ĝ_t / ‖ĝ_t‖``.

Needs per-task gradients of the shared parameters (``k`` backward passes) and one more
``k × n`` device buffer for the EMA; the EMA is built from rank-averaged rows, so it is the
same on every rank. It is not checkpointed (``persistent=False``: ``k × n`` floats); a resumed
run restarts it from the next step's gradients.
"""

from __future__ import annotations

import torch

from mtl.strategies.jacobian import PerTaskGradients, sync_weights


class DBMTL(PerTaskGradients):
    """Dual-balancing: log-loss gradients, EMA-normalised to the largest magnitude.

    Args:
        beta: EMA coefficient ``β``.
        gamma: decay exponent ``γ`` of ``β_s = β / s^γ``.
        eps: clamp of the losses before the logarithm and of the EMA norms.
        diagnostics_every: see :class:`~mtl.strategies.base.Strategy`.
    """

    supports_rep_grad = False

    def __init__(
        self, *, beta: float = 0.9, gamma: float = 0.5, eps: float = 1e-8, diagnostics_every: int = 0
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

    def combine(self, jac: torch.Tensor, gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.ema.shape != jac.shape or self.ema.device != jac.device:
            self.ema = torch.zeros_like(jac)  # zero-initialised EMA, as in the paper's code
        beta_s = self.beta / float(self.steps) ** self.gamma  # self.steps ≥ 1 here (ticked)
        self.ema.sub_(jac).mul_(beta_s).add_(jac)
        norms = self.ema.norm(dim=1).clamp_min(self.eps)
        weights = norms.max() / norms
        return sync_weights(weights), self.ema
