"""TIES-Merging: trim, elect sign, disjoint merge.

P. Yadav, D. Tam, L. Choshen, C. Raffel, M. Bansal, "TIES-Merging: Resolving Interference When
Merging Models", NeurIPS 2023.

1. Trim: keep the top-k % entries of each task vector τ_t by magnitude (over the whole task
   vector, as the paper's code does), zero the rest.
2. Elect: per entry, the sign with the larger total mass, γ = sign(Σ_t τ̂_t).
3. Disjoint merge: mean of the kept entries whose sign agrees with γ (zeros do not count).
4. θ = θ0 + λ τ_m (λ = 1 in the paper's default).

Memory: :meth:`TIESMerging.prepare` holds one flattened |τ_t| at a time for its threshold;
:meth:`TIESMerging.merge_tensor` stacks the T task vectors of one parameter (T × its size).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from mtl.merging.base import MergeMethod, check_fraction, check_lam, task_vector


def magnitude_threshold(values: torch.Tensor, keep: float) -> float:
    """The smallest magnitude among the top ``keep`` fraction of ``values`` (flattened)."""
    flat = values.reshape(-1).abs()
    n_keep = max(1, int(round(keep * flat.numel())))
    return float(flat.kthvalue(flat.numel() - n_keep + 1).values)


class TIESMerging(MergeMethod):
    """Trim (top-k by magnitude), elect sign by summed mass, disjoint mean, scale by λ.

    Args:
        k: fraction of each task vector's entries kept (0 < k ≤ 1; the paper: 0.2). k = 1 keeps all.
        lam: scaling λ of the merged task vector (the paper: 1).
    """

    def __init__(self, *, k: float = 0.2, lam: float = 1.0) -> None:
        self.k = check_fraction("method.k (kept fraction)", k, low_open=True)
        self.lam = check_lam(lam)
        self._thresholds: list[float] = []

    def prepare(
        self,
        *,
        base: Mapping[str, torch.Tensor] | None,
        states: Sequence[Mapping[str, torch.Tensor]],
        keys: Sequence[str],
    ) -> None:
        """Per task, the global magnitude threshold of its top-k entries (one task vector at a time)."""
        self._thresholds = []
        for s in states:
            if self.k >= 1.0:
                self._thresholds.append(0.0)
                continue
            flat = torch.empty(sum(base[k].numel() for k in keys))
            offset = 0
            for k in keys:  # |τ_t| of one parameter at a time into one flat buffer
                n = base[k].numel()
                flat[offset : offset + n] = task_vector(base[k], s[k]).reshape(-1)
                offset += n
            self._thresholds.append(magnitude_threshold(flat, self.k))
            del flat

    def merge_tensor(
        self, key: str, base: torch.Tensor | None, thetas: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        taus = torch.stack([task_vector(base, th) for th in thetas])  # (T, *shape)
        if self.k < 1.0:
            thr = torch.tensor(self._thresholds, dtype=taus.dtype).view(-1, *([1] * (taus.dim() - 1)))
            taus = torch.where(taus.abs() >= thr, taus, torch.zeros_like(taus))
        elected = torch.sign(taus.sum(dim=0))
        agree = (torch.sign(taus) == elected) & (taus != 0)
        count = agree.sum(dim=0).clamp(min=1)
        merged = (taus * agree).sum(dim=0) / count
        return base.float() + self.lam * merged
