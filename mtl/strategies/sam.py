"""Sharpness-aware minimisation of the weighted multi-task loss.

- SAM: Foret et al., "Sharpness-Aware Minimization for Efficiently Improving Generalization",
  ICLR 2021: ``ε = ρ g / ‖g‖``, update with ``∇L(w + ε)``.
- ASAM: Kwon et al., "ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant Learning
  of Deep Neural Networks", ICML 2021: ``ε = ρ T² g / ‖T g‖`` with ``T = |w| + η``
  (applied to every parameter).

Two forward/backward passes per step. Both gradients are averaged over the ranks (the
perturbation is the union's), BatchNorm statistics are updated by the first pass only, and
the fp16 scaler's scale is removed before the perturbation is computed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mtl.contracts import StepForward, StrategyHost
from mtl.strategies.grads import FlatGrad, all_reduce_mean_, frozen_bn_stats, task_grads, trainable
from mtl.strategies.weighting import FixedWeights


def check_rho(rho: float) -> float:
    if not rho > 0:
        raise ValueError(f"strategy rho must be > 0 (the perturbation radius), got {rho}")
    return float(rho)


def ascent_step(
    params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], rho: float, adaptive: bool, eta: float
) -> list[torch.Tensor]:
    """The SAM / ASAM perturbation ``ε`` of ``params`` for the (unscaled) gradient ``grads``."""
    if adaptive:
        t = [p.detach().abs().add_(eta) for p in params]
        tg = torch._foreach_mul(list(grads), t)
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tg)))
        return torch._foreach_mul(torch._foreach_mul(tg, t), float(rho) / max(float(norm), 1e-12))
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(grads))))
    return torch._foreach_mul(list(grads), float(rho) / max(float(norm), 1e-12))


class SAM(FixedWeights):
    """SAM / ASAM on ``Σ_t w_t L_t`` (equal weights by default).

    Args:
        rho: perturbation radius ``ρ`` (> 0).
        adaptive: ASAM instead of SAM.
        eta: ASAM's ``η``.
        weights: task → loss weight; tasks not listed use their default weight (or 1 if uniform).
        uniform: weight 1 for every task not listed in ``weights``.
        diagnostics_every: see :class:`~mtl.strategies.base.Strategy`.
    """

    def __init__(
        self,
        *,
        rho: float = 0.05,
        adaptive: bool = False,
        eta: float = 0.01,
        weights=None,
        uniform: bool = True,
        diagnostics_every: int = 0,
    ) -> None:
        super().__init__(weights=weights, uniform=uniform, diagnostics_every=diagnostics_every)
        self.rho, self.adaptive, self.eta = check_rho(rho), bool(adaptive), float(eta)
        self._flat: FlatGrad | None = None

    def backward(self, step: StepForward, *, module: StrategyHost, batch: dict) -> dict[str, float]:
        losses, extra = step.losses, step.aux
        params = trainable(module.model.parameters())
        if self._flat is None or [id(p) for p in self._flat.params] != [id(p) for p in params]:
            self._flat = FlatGrad(params)
        w = torch.tensor([self.weights[t] for t in losses])
        logs = self.diagnostics(losses, module, w)
        self.tick()
        scale = float(module.grad_scale())
        flat = self._flat.attach()
        total = self.combine(losses) + (extra if extra is not None else 0)
        torch._foreach_copy_(self._flat.views, list(task_grads(total * scale, params, retain_graph=False)))
        all_reduce_mean_(flat.div_(scale))
        if not bool(torch.isfinite(flat).all()):
            flat.fill_(float("nan"))
            return {"skipped": 1.0}
        backup = [p.detach().clone() for p in params]  # restored bit-exactly after the second pass
        with torch.no_grad():
            torch._foreach_add_(
                params, ascent_step(params, self._flat.views, self.rho, self.adaptive, self.eta)
            )
        with frozen_bn_stats(module.model):
            again = self.forward(batch, module=module)  # the loss at the perturbed point
            total2 = self.combine(again.losses) + (again.aux if again.aux is not None else 0)
            grads = task_grads(total2 * scale, params, retain_graph=False)
        with torch.no_grad():
            torch._foreach_copy_(params, backup)
        del backup
        torch._foreach_copy_(self._flat.views, list(grads))
        all_reduce_mean_(flat)
        return logs
