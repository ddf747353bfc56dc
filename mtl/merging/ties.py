"""TIES-Merging: trim, elect sign, disjoint merge.

P. Yadav, D. Tam, L. Choshen, C. Raffel, M. Bansal, "TIES-Merging: Resolving Interference When
Merging Models", NeurIPS 2023. Released code: github.com/prateeky2806/ties-merging
(``src/ties_minimal.ipynb``, ``src/utils/merge_utils.py``; the same functions in fusion-bench,
``fusion_bench/method/ties_merging/ties_merging_utils.py``). This module computes what that code
computes:

1. Trim: per task, over the whole flattened task vector τ_t (all merged parameters as one row),
   the threshold is the ``(N − int(k·N))``-th smallest |τ_t| (``kthvalue``) and every entry with
   |τ_t| ≥ threshold is kept — ``int(k·N) + 1`` entries, plus any tied with the threshold.
2. Elect: γ = sign(Σ_t τ̂_t) per entry; entries where the kept values cancel exactly (γ = 0) get
   the majority sign of the model, sign(Σ γ) over every entry of every merged parameter.
3. Disjoint merge: where γ > 0 the positive kept entries, elsewhere the negative ones, averaged
   over their count (clamped to 1). (With no majority either, sign(Σ γ) = 0, the zero-sign entries
   therefore take the negative ones, as in the reference.)
4. θ = θ0 + λ τ_m (λ = 1 and k = 0.2, the code's ``K = 20``, in the reference example).

Deliberate differences: k = 1 keeps every entry (the reference's ``kthvalue(0)`` fails there);
the majority is counted exactly in integers (the reference sums the float32 sign vector).

Memory: :meth:`TIESMerging.prepare` holds one flattened |τ_t| at a time for its threshold;
:meth:`TIESMerging.merge_tensor` stacks the T task vectors of one parameter (T × its size). The
model-wide majority sign needs one more pass over the parameters, made only when some entry's
kept values cancel exactly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from einops import rearrange

from mtl.merging.base import MergeMethod, check_fraction, check_lam, task_vector


def kept_threshold_index(n: int, keep: float) -> int:
    """1-based rank (ascending |τ|) of the trim threshold: ``n − int(n·keep)``, as the TIES code.

    Every entry at or above that rank is kept, i.e. ``int(n·keep) + 1`` entries when magnitudes
    are distinct. Only for ``keep < 1`` (the rank would be 0 at ``keep = 1``).
    """
    return n - int(n * keep)


def magnitude_threshold(values: torch.Tensor, keep: float) -> float:
    """The TIES trim threshold of ``values`` (flattened): its ``kept_threshold_index``-th smallest
    magnitude; 0 (keep everything) for ``keep >= 1``."""
    if keep >= 1.0:
        return 0.0
    flat = rearrange(values, "... -> (...)").abs()
    return float(flat.kthvalue(kept_threshold_index(flat.numel(), keep)).values)


def elected_signs(taus: torch.Tensor) -> torch.Tensor:
    """γ = sign(Σ_t τ̂_t) of trimmed task vectors ``taus`` (T, ...) before the zero-sign rule."""
    return torch.sign(taus.sum(dim=0))


def disjoint_mean(taus: torch.Tensor, elected: torch.Tensor) -> torch.Tensor:
    """Mean over t of the entries of ``taus`` (T, ...) on the side of ``elected``: positive entries
    where ``elected > 0``, negative ones elsewhere; the divisor is their count, clamped to 1."""
    agree = torch.where(elected > 0, taus > 0, taus < 0)
    count = agree.sum(dim=0).clamp(min=1)
    return (taus * agree).sum(dim=0) / count


class TIESMerging(MergeMethod):
    """Trim (top-k by magnitude over each whole task vector), elect sign by summed mass (majority
    sign where the mass cancels), disjoint mean, scale by λ — as the TIES authors' code.

    Args:
        k: fraction of each task vector's entries kept (0 < k ≤ 1; the reference example's
            ``K = 20`` percent is k = 0.2); ``int(k·N) + 1`` entries and ties are kept, as there.
            k = 1 keeps all.
        lam: scaling λ of the merged task vector (the reference example: 1).
    """

    def __init__(self, *, k: float = 0.2, lam: float = 1.0) -> None:
        if float(k) > 1.0:
            raise ValueError(
                f"method.k (kept fraction) must be in (0, 1], got {k}; "
                "the TIES code's K = 20 (percent) is k = 0.2"
            )
        self.k = check_fraction("method.k (kept fraction)", k, low_open=True)
        self.lam = check_lam(lam)
        self._thresholds: list[float] = []
        self._majority: float | None = None
        self._base: Mapping[str, torch.Tensor] | None = None
        self._states: Sequence[Mapping[str, torch.Tensor]] = ()
        self._keys: Sequence[str] = ()

    def prepare(
        self,
        *,
        base: Mapping[str, torch.Tensor] | None,
        states: Sequence[Mapping[str, torch.Tensor]],
        keys: Sequence[str],
    ) -> None:
        """Per task, the global magnitude threshold of its top-k entries (one task vector at a time)."""
        self._base, self._states, self._keys = base, states, keys
        self._majority = None
        self._thresholds = []
        for s in states:
            if self.k >= 1.0:
                self._thresholds.append(0.0)
                continue
            where = base[keys[0]].device if keys else None  # the task vectors' device
            flat = torch.empty(sum(base[k].numel() for k in keys), device=where)
            offset = 0
            for k in keys:  # τ_t of one parameter at a time into one flat buffer
                n = base[k].numel()
                flat[offset : offset + n] = rearrange(task_vector(base[k], s[k]), "... -> (...)")
                offset += n
            self._thresholds.append(magnitude_threshold(flat, self.k))
            del flat

    def _trimmed(self, base: torch.Tensor, thetas: Sequence[torch.Tensor]) -> torch.Tensor:
        """The stacked task vectors (T, ...) of one parameter with their trimmed entries zeroed."""
        taus = torch.stack([task_vector(base, th) for th in thetas])
        if self.k < 1.0:
            thr = torch.tensor(self._thresholds, dtype=taus.dtype, device=taus.device)
            thr = thr.view(-1, *([1] * (taus.dim() - 1)))
            taus = torch.where(taus.abs() >= thr, taus, torch.zeros_like(taus))
        return taus

    def majority_sign(self) -> float:
        """sign(Σ γ) over every entry of every merged parameter (one parameter at a time, cached)."""
        if self._majority is None:
            if self._base is None:
                raise RuntimeError("TIESMerging.majority_sign needs prepare() first")
            balance = 0
            for key in self._keys:
                elected = elected_signs(self._trimmed(self._base[key], [s[key] for s in self._states]))
                balance += int((elected > 0).sum()) - int((elected < 0).sum())
            self._majority = float((balance > 0) - (balance < 0))
        return self._majority

    def merge_tensor(
        self, key: str, base: torch.Tensor | None, thetas: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        taus = self._trimmed(base, thetas)
        elected = elected_signs(taus)
        cancelled = (elected == 0) & (taus != 0).any(dim=0)  # the only entries the majority changes
        if bool(cancelled.any()):
            elected = torch.where(elected == 0, torch.full_like(elected, self.majority_sign()), elected)
        return base.float() + self.lam * disjoint_mean(taus, elected)
