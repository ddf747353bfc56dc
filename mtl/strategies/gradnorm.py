"""GradNorm: Chen et al., "GradNorm: Gradient Normalization for Adaptive Loss Balancing in
Deep Multitask Networks", ICML 2018.

Learnable weights ``w_t`` (summing to ``K``) are moved so that each task's weighted gradient
norm at the last shared layer, ``G_t = w_t ‖∇_W L_t‖``, approaches ``Ḡ · r_t^α`` with
``r_t = (L_t / L_t(0)) / mean_j(L_j / L_j(0))`` the relative inverse training rate. The
gradient-norm loss ``Σ_t |G_t − Ḡ r_t^α|`` (target held constant) has the closed-form
gradient ``sign(G_t − target_t) ‖∇_W L_t‖`` w.r.t. ``w_t``; one SGD step on it per training
step, then renormalisation to ``Σ w = K``. The model takes one backward of ``Σ w_t L_t``.

This follows the paper. LibMTL's GradNorm (``weighting/GradNorm.py``) differs, so its numbers are not
comparable: it measures the norms over the whole shared encoder, parametrises the weights as
``K softmax(θ)``, takes ``L_t(0)`` as the first epoch's mean loss and trains with equal weights
during that epoch.

The per-task norms cost ``K`` backward passes from the losses to ``W`` only (the heads and
task branches), not through the backbone. Under DDP the ``W`` gradients and the losses are
averaged over the ranks first, so every rank holds the same weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from mtl.contracts import StepForward, StrategyHost
from mtl.strategies.base import Logs, Strategy
from mtl.strategies.grads import all_reduce_mean_, task_grads, trainable

if TYPE_CHECKING:
    from mtl.model import MultiTaskNet


def last_shared_layer(model: MultiTaskNet, name: str | None = None) -> list[torch.nn.Parameter]:
    """The shared parameters GradNorm measures: those whose name starts with ``name``, or by
    default the last shared weight tensor (ndim > 1) in registration order."""
    shared_ids = {id(p) for p in trainable(model.shared_parameters())}
    named = [(n, p) for n, p in model.named_parameters() if id(p) in shared_ids]
    if name is not None:
        chosen = [p for n, p in named if n.startswith(name)]
        if not chosen:
            raise ValueError(
                f"GradNorm layer '{name}' matches no trainable shared parameter; "
                f"the last shared ones are {[n for n, _ in named][-5:]}"
            )
        return chosen
    weights = [p for _, p in named if p.ndim > 1]
    if not weights:
        raise ValueError("GradNorm needs a trainable shared weight (is the backbone frozen entirely?)")
    return weights[-1:]


class GradNorm(Strategy):
    """Adaptive loss weights balancing the gradient norms at the last shared layer.

    Args:
        alpha: asymmetry ``α`` (1.5 in the paper for NYUv2).
        lr: step size of the weight update.
        layer: parameter-name prefix of the layer ``W`` (default: the last shared weight).
        diagnostics_every: see :class:`Strategy`.
    """

    # needs only the last shared layer's per-task gradients: last_shared_layer() checks it in setup
    needs_task_grads = False

    def __init__(
        self, *, alpha: float = 1.5, lr: float = 0.025, layer: str | None = None, diagnostics_every: int = 0
    ) -> None:
        super().__init__(diagnostics_every=diagnostics_every)
        if lr <= 0:
            raise ValueError(f"GradNorm lr must be > 0, got {lr}")
        self.alpha, self.lr, self.layer = float(alpha), float(lr), layer
        self.register_buffer("weights", torch.zeros(0))
        self.register_buffer("initial_losses", torch.zeros(0))

    def setup(self, *, tasks: Mapping, module: StrategyHost) -> None:
        super().setup(tasks=tasks, module=module)
        last_shared_layer(module.model, self.layer)  # fail early on a bad layer name
        self.weights = torch.ones(len(tasks))
        self.initial_losses = torch.zeros(len(tasks))

    def update(self, losses: torch.Tensor, norms: torch.Tensor) -> None:
        """One weight step from the (rank-averaged) losses and per-task gradient norms at ``W``."""
        # on the device, without a host sync: the first step's losses become the initial ones, and a
        # step whose norms are not finite (fp16 overflow) leaves the weights and initial losses alone
        initial = torch.where(self.initial_losses.sum() == 0, losses, self.initial_losses)
        ratio = losses / initial.clamp_min(1e-12)
        rate = ratio / ratio.mean()
        g = self.weights * norms
        target = g.mean() * rate**self.alpha
        w = (self.weights - self.lr * torch.sign(g - target) * norms).clamp_min(1e-6)
        finite = torch.isfinite(norms).all()
        self.initial_losses = torch.where(finite, initial, self.initial_losses)
        self.weights = torch.where(finite, w * (len(w) / w.sum()), self.weights)

    def backward(self, step: StepForward, *, module: StrategyHost, batch: dict) -> Logs:
        losses, extra = step.losses, step.aux
        layer = last_shared_layer(module.model, self.layer)
        scale = float(module.grad_scale())
        rows = [
            torch.cat([g.reshape(-1) for g in task_grads(loss.float() * scale, layer)])
            for loss in losses.values()
        ]
        jac = all_reduce_mean_(torch.stack(rows) / scale)
        stacked = torch.stack([loss.detach().float() for loss in losses.values()])
        all_reduce_mean_(stacked)
        self.weights = self.weights.to(stacked.device)
        self.initial_losses = self.initial_losses.to(stacked.device)
        w = self.weights.clone()
        logs = self.diagnostics(losses, module, w)
        self.tick()
        total = sum(wt * loss for wt, loss in zip(w, losses.values(), strict=True))
        module.manual_backward(total if extra is None else total + extra)
        self.update(stacked, norms=jac.norm(dim=1))
        logs.update({f"{t}/weight": v for t, v in zip(losses, w.unbind(0), strict=True)})  # no host sync
        return logs
