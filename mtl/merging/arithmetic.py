"""Weight averaging and task arithmetic.

* Weight averaging ("model soups"): M. Wortsman et al., "Model soups: averaging weights of
  multiple fine-tuned models improves accuracy without increasing inference time", ICML 2022:
  θ = (1/T) Σ_t θ_t.
* Task arithmetic: G. Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023:
  θ = θ0 + λ Σ_t τ_t with task vectors τ_t = θ_t − θ0 and one scaling λ (chosen on held-out
  data in the paper; 0.3–0.4 is typical for 8 tasks). λ = 1/T is weight averaging.

Both are linear in the θ_t, so :meth:`~mtl.merging.base.MergeMethod.merge` reads one parameter
of each model at a time (running sums, no full task vector is ever materialised).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mtl.merging.base import MergeMethod, check_lam


class WeightAveraging(MergeMethod):
    """θ = mean of the fine-tuned weights (no θ0 needed)."""

    needs_base = False

    def merge_tensor(
        self, key: str, base: torch.Tensor | None, thetas: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        acc = thetas[0].float().clone()
        for th in thetas[1:]:
            acc.add_(th.float())
        return acc.div_(len(thetas))


class TaskArithmetic(MergeMethod):
    """θ = θ0 + λ Σ_t (θ_t − θ0).

    Args:
        lam: the scaling λ of the summed task vectors (λ = 1 with one model returns that model).
    """

    def __init__(self, *, lam: float = 0.3) -> None:
        self.lam = check_lam(lam)

    def merge_tensor(
        self, key: str, base: torch.Tensor | None, thetas: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        b = base.float()
        acc = torch.zeros_like(b)
        for th in thetas:  # running sum of τ_t, in place
            acc.add_(th.float()).sub_(b)
        return acc.mul_(self.lam).add_(b)
