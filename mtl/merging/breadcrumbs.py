"""Model Breadcrumbs: sparse task vectors without their outliers.

M. Davari, E. Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse
Masks", ECCV 2024.

Per layer (here: per parameter tensor) and per task, the entries of τ_t are ranked by
magnitude; the bottom β fraction (small, noisy updates) and the top γ fraction (large
outliers) are masked out; the masked task vectors are summed and scaled:
θ = θ0 + λ Σ_t m_t ⊙ τ_t.

Memory: the masks are per task and per layer, so this is a running sum over the models of one
parameter at a time (like task arithmetic).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mtl.merging.base import MergeMethod, check_fraction, check_lam, task_vector


def breadcrumb_mask(tau: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """Boolean mask keeping the entries of ``tau`` ranked by magnitude between the bottom ``beta``
    and the top ``gamma`` fraction (ties broken by position)."""
    flat = tau.reshape(-1).abs()
    n = flat.numel()
    n_low, n_high = int(beta * n), int(gamma * n)
    if n_low + n_high >= n:
        return torch.zeros_like(tau, dtype=torch.bool)
    rank = torch.empty(n, dtype=torch.long)
    rank[flat.argsort(stable=True)] = torch.arange(n)
    return ((rank >= n_low) & (rank < n - n_high)).view_as(tau)


class ModelBreadcrumbs(MergeMethod):
    """Mask both magnitude tails of every layer's task vector, sum, scale.

    Args:
        beta: fraction of each layer's smallest-magnitude entries masked (the paper's
            best settings keep ~10 %: β ≈ 0.85–0.9).
        gamma: fraction of the largest-magnitude entries masked (the paper: ≈ 0.01).
        lam: scaling λ of the summed masked task vectors.
    """

    def __init__(self, *, beta: float = 0.85, gamma: float = 0.01, lam: float = 0.5) -> None:
        self.beta = check_fraction("method.beta", beta)
        self.gamma = check_fraction("method.gamma", gamma)
        if self.beta + self.gamma >= 1.0:
            raise ValueError(f"method.beta + method.gamma must be < 1 (nothing kept), got {beta} + {gamma}")
        self.lam = check_lam(lam)

    def merge_tensor(
        self, key: str, base: torch.Tensor | None, thetas: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        b = base.float()
        acc = torch.zeros_like(b)
        for th in thetas:
            tau = task_vector(base, th)
            acc.add_(tau * breadcrumb_mask(tau, self.beta, self.gamma))
        return acc.mul_(self.lam).add_(b)
