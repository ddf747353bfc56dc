"""Sharpness-aware minimisation of the weighted multi-task loss.

- SAM: Foret et al., "Sharpness-Aware Minimization for Efficiently Improving Generalization",
  ICLR 2021: ``ε = ρ g / ‖g‖``, update with ``∇L(w + ε)``.
- ASAM: Kwon et al., "ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant Learning
  of Deep Neural Networks", ICML 2021: ``ε = ρ T² g / ‖T g‖`` with ``T = |w| + η``. As in the
  authors' code (SamsungLabs/ASAM, ``asam.py``: ``rho = 0.5``, ``eta = 0.01``), ``T = |w| + η`` applies
  to the parameters whose name contains ``weight`` and ``T = 1`` to the others (biases, …):
  ``adaptive_scope="weights"``; ``"all"`` scales every parameter (F-MTL's reference does, with η = 0).

Two forward/backward passes per step. Both gradients are averaged over the ranks (the
perturbation is the union's), BatchNorm statistics are updated by the first pass only, and
the fp16 scaler's scale is removed before the perturbation is computed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mtl.contracts import StepForward, StrategyHost
from mtl.strategies.base import Logs
from mtl.strategies.grads import FlatGrad, all_reduce_mean_, frozen_bn_stats, task_grads, trainable
from mtl.strategies.weighting import FixedWeights


def check_rho(rho: float) -> float:
    if not rho > 0:
        raise ValueError(f"strategy rho must be > 0 (the perturbation radius), got {rho}")
    return float(rho)


SCOPES = ("weights", "all")


def check_scope(scope: str) -> str:
    if scope not in SCOPES:
        raise ValueError(f"strategy adaptive_scope must be one of {list(SCOPES)}, got {scope!r}")
    return scope


def ascent_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    rho: float,
    adaptive: bool,
    eta: float,
    scaled: Sequence[bool] | None = None,
) -> list[torch.Tensor]:
    """The SAM / ASAM perturbation ``ε`` of ``params`` for the (unscaled) gradient ``grads``.

    ASAM's ``T`` is ``|w| + η`` on the parameters flagged in ``scaled`` (default: all) and 1 elsewhere.
    """
    if adaptive:
        if scaled is None:
            scaled = [True] * len(params)
        t = [
            p.detach().abs().add_(eta) if s else torch.ones_like(p)
            for p, s in zip(params, scaled, strict=True)
        ]
        tg = torch._foreach_mul(list(grads), t)
        return torch._foreach_mul(torch._foreach_mul(tg, t), _radius(rho, tg))
    return torch._foreach_mul(list(grads), _radius(rho, grads))


def _radius(rho: float, grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """``ρ / max(‖g‖, 1e-12)`` as a float64 device scalar (no host sync; the multiplication rounds it
    to the gradients' dtype as a Python float would be)."""
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(grads))))
    return float(rho) / norm.double().clamp_min(1e-12)


class SAM(FixedWeights):
    """SAM / ASAM on ``Σ_t w_t L_t`` (equal weights by default).

    Args:
        rho: perturbation radius ``ρ`` (> 0).
        adaptive: ASAM instead of SAM.
        eta: ASAM's ``η``.
        adaptive_scope: ``"weights"``: ASAM's ``T = |w| + η`` on parameters named ``*weight*``, 1 on
            the others (the ASAM authors' code); ``"all"``: on every parameter.
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
        adaptive_scope: str = "weights",
        weights=None,
        uniform: bool = True,
        diagnostics_every: int = 0,
    ) -> None:
        super().__init__(weights=weights, uniform=uniform, diagnostics_every=diagnostics_every)
        self.rho, self.adaptive, self.eta = check_rho(rho), bool(adaptive), float(eta)
        self.adaptive_scope = check_scope(adaptive_scope)
        self._flat: FlatGrad | None = None
        self._scaled: list[bool] = []

    def backward(self, step: StepForward, *, module: StrategyHost, batch: dict) -> Logs:
        losses, extra = step.losses, step.aux
        params = trainable(module.model.parameters())
        if self._flat is None or [id(p) for p in self._flat.params] != [id(p) for p in params]:
            self._flat = FlatGrad(params)
            names = {id(p): n for n, p in module.model.named_parameters()}
            self._scaled = [self.adaptive_scope == "all" or "weight" in names.get(id(p), "") for p in params]
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
                params, ascent_step(params, self._flat.views, self.rho, self.adaptive, self.eta, self._scaled)
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
