"""Model Breadcrumbs: sparse task vectors without their outliers.

M. Davari, E. Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse
Masks", ECCV 2024. Released code: github.com/rezazzr/breadcrumbs (``src/task_vectors.py``,
``TaskVectorMiddleKeep``, driven by ``merging_trend_eval.py`` / ``find_best_hyperparam.py``).

The rule of that code, per task vector τ_t and per parameter tensor, row by row along the **last
dimension** (d entries per row):

1. remove the ``int(d·γ)`` largest-magnitude entries of the row (outliers),
2. of what remains, keep the ``int(d·β)`` largest-magnitude entries, zero the rest,

so β is the fraction of each row *kept* and γ the fraction of the largest entries *removed*
(the code's ``--beta`` = ``top_k_keep``, ``--gamma`` = ``top_k_remove``); 0-dim tensors are kept
whole. The masked task vectors are summed and scaled by α (the code's ``--alpha``):
θ = θ0 + α Σ_t m_t ⊙ τ_t. The same numbers as the authors' command line give the same merge.

Options (``granularity``): ``row`` (the authors' rule, default); ``channel`` ranks each output
channel (the tensor as ``shape[0]`` rows of all its other entries; equal to ``row`` for linear
weights and 1-D tensors) — a row of a conv kernel has only k_w entries, so ``row`` with β·k_w < 1 masks conv
weights entirely; ``tensor`` ranks the whole tensor as one row (this project's rule before
issue 19; its old ``beta`` was the fraction removed from the bottom: old β_old, γ ≙ new
β = 1 − β_old − γ with ``granularity=tensor``). Ties in magnitude are broken by position (the
reference's ``torch.topk`` leaves them unspecified).

Memory: the masks are per task and per tensor, so this is a running sum over the models of one
parameter at a time (like task arithmetic).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any, Literal

import torch
from einops import rearrange

from mtl.merging.base import MergeMethod, check_fraction, check_lam, task_vector

Granularity = Literal["row", "channel", "tensor"]
GRANULARITIES: tuple[str, ...] = ("row", "channel", "tensor")


def _rows(tau: torch.Tensor, granularity: Granularity) -> torch.Tensor:
    """``tau`` as the 2-D (rows, d) array whose rows are ranked separately."""
    if granularity == "row":
        return rearrange(tau, "... d -> (...) d")
    if granularity == "channel" and tau.dim() > 1:
        return rearrange(tau, "c ... -> c (...)")
    return rearrange(tau, "... -> 1 (...)")


def breadcrumb_mask(
    tau: torch.Tensor, beta: float, gamma: float, granularity: Granularity = "row"
) -> torch.Tensor:
    """Boolean mask of ``tau``: per row (see ``granularity``) of d entries, the ``int(d·beta)``
    largest magnitudes after the ``int(d·gamma)`` largest are removed (ties broken by position).
    A 0-dim tensor is kept whole, as in the authors' code."""
    if tau.dim() == 0:
        return torch.ones_like(tau, dtype=torch.bool)
    rows = _rows(tau, granularity)
    d = rows.shape[-1]
    n_remove, n_keep = int(d * gamma), int(d * beta)
    order = rows.abs().argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(d, device=tau.device).expand_as(order))
    return ((rank >= n_remove) & (rank < n_remove + n_keep)).view(tau.shape)


class ModelBreadcrumbs(MergeMethod):
    """Mask both magnitude tails of every row of every task vector, sum, scale — as the
    Breadcrumbs authors' code, with its parameter names and meanings.

    Args:
        alpha: scaling α of the summed masked task vectors (the authors' ``--alpha``).
        beta: fraction of each row's entries **kept** (the authors' ``--beta`` = ``top_k_keep``;
            their search range 0.05–0.2).
        gamma: fraction of each row's largest-magnitude entries removed (the authors' ``--gamma``
            = ``top_k_remove``; their search range 0.001–0.01).
        granularity: what a row is: ``row`` (the last dimension; the authors), ``channel`` (all
            entries of one output channel), ``tensor`` (the whole tensor; the previous rule).
        lam: the old name of ``alpha``; refused with a message naming ``method.alpha``.
    """

    def __init__(
        self,
        *,
        alpha: float = 0.5,
        beta: float = 0.14,
        gamma: float = 0.01,
        granularity: Granularity = "row",
        lam: float | None = None,
    ) -> None:
        if lam is not None:
            raise ValueError(
                f"method.lam={lam}: Breadcrumbs' scaling is now method.alpha (the authors' name), and "
                "method.beta is the fraction of each row KEPT (it was the fraction removed): the old "
                "beta=0.85 gamma=0.01 lam=0.5 is alpha=0.5 beta=0.14 gamma=0.01 granularity=tensor"
            )
        self.alpha = check_lam(alpha, name="method.alpha (task-vector scaling α)")
        self.beta = check_fraction("method.beta (fraction kept)", beta)
        self.gamma = check_fraction("method.gamma (fraction of the largest removed)", gamma)
        if granularity not in GRANULARITIES:
            raise ValueError(f"method.granularity must be one of {GRANULARITIES}, got {granularity!r}")
        self.granularity: Granularity = granularity
        if self.beta > 0.5:
            warnings.warn(
                f"method.beta={beta} keeps {beta:.0%} of each row: beta is the fraction KEPT (the "
                "Breadcrumbs authors' meaning; it was the fraction removed before issue 19)",
                stacklevel=2,
            )
        self._emptied: list[str] = []

    def merge_tensor(
        self, key: str, base: torch.Tensor | None, thetas: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        b = base.float()
        acc = torch.zeros_like(b)
        for th in thetas:
            tau = task_vector(base, th)
            acc.add_(tau * breadcrumb_mask(tau, self.beta, self.gamma, self.granularity))
        if b.dim() > 0 and int(_rows(b, self.granularity).shape[-1] * self.beta) == 0:
            self._emptied.append(f"{key} {tuple(b.shape)}")
        return acc.mul_(self.alpha).add_(b)

    def merge(
        self,
        *,
        base: Mapping[str, torch.Tensor] | None,
        states: Sequence[Mapping[str, torch.Tensor]],
        keys: Sequence[str],
        context: Mapping[str, Any] | None = None,
        out: MutableMapping[str, torch.Tensor] | None = None,
    ) -> MutableMapping[str, torch.Tensor]:
        """As :meth:`MergeMethod.merge`; warns once, naming them, about tensors whose rows are too
        short for ``beta`` to keep any entry (their task vectors are dropped, as by the authors)."""
        self._emptied = []
        result = super().merge(base=base, states=states, keys=keys, context=context, out=out)
        if self._emptied:
            shown = ", ".join(self._emptied[:5]) + (" …" if len(self._emptied) > 5 else "")
            warnings.warn(
                f"Breadcrumbs (granularity={self.granularity}, beta={self.beta}) keeps no entry of "
                f"{len(self._emptied)} tensors (int(row length·beta) = 0), as the authors' rule does: "
                f"{shown}; method.granularity=channel or tensor ranks longer rows",
                stacklevel=2,
            )
        return result
