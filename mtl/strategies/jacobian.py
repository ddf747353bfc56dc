"""Per-task gradients of the shared parameters (or of the shared representation), done right.

The machinery under every gradient-aggregation strategy. One step:

1. ``k`` backward passes with ``torch.autograd.grad`` (retained graph), task ``t``'s gradient
   of the shared inputs written into row ``t`` of a preallocated ``k × n`` device buffer
   (:class:`~mtl.strategies.grads.TaskJacobian`), its task-specific parameters' gradient into
   their own ``.grad`` (a slice of one flat vector). No ``.grad`` accumulation of shared
   parameters, hence no DDP hook and no gradient sync on these passes.
2. Unscale (fp16: the losses were multiplied by the scaler's scale), then average the rows
   over the ranks (parameter level) or sum the ``k × k`` Gramians (representation level).
3. A non-finite Gramian poisons ``.grad`` with NaN so the fp16 scaler skips the step.
4. ``combine`` maps the Gramian (or, for coordinate-wise rules, the rows) to task weights;
   rank 0's weights are broadcast: one synchronised result.
5. Shared direction ``wᵀJ`` written with one ``torch.mv(..., out=...)`` into the flat ``.grad``
   (parameter level), or pushed through the encoder in one backward (representation level,
   the "-UB" trick of Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization",
   NeurIPS 2018), then the task-specific (and, at representation level, all) gradients are
   averaged over the ranks in one all-reduce.

At representation level (``rep_grad=True``) rows are gradients w.r.t. ``model.encode(x)``:
``k × |z|`` per rank instead of ``k × n``, and only the ``k × k`` Gramian crosses ranks
(with mean-reduced losses, the union's Gramian is ``Σ_r G_r / R²``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from mtl.strategies.base import Strategy
from mtl.strategies.grads import (
    FlatGrad,
    TaskJacobian,
    all_reduce_mean_,
    all_reduce_sum_,
    broadcast_,
    gramian_stats,
    task_grads,
    trainable,
    world_size,
)


class PerTaskGradients(Strategy):
    """Base of strategies that combine per-task gradients of the shared part.

    Args:
        rep_grad: per-task gradients w.r.t. the shared representation instead of the shared
            parameters (the "-UB" variant; needs ``model.encode`` / ``model.decode``).
        diagnostics_every: see :class:`Strategy`.
    """

    needs_task_grads = True
    supports_rep_grad = True

    def __init__(self, *, rep_grad: bool = False, diagnostics_every: int = 0) -> None:
        super().__init__(diagnostics_every=diagnostics_every)
        if rep_grad and not self.supports_rep_grad:
            raise ValueError(f"strategy {type(self).__name__} has no representation-level (rep_grad) variant")
        self.rep_grad = bool(rep_grad)
        self._ready = False
        self.last_weights: list[float] | None = None  # the last step's task weights (for inspection)

    def setup(self, *, tasks: Mapping, module) -> None:
        super().setup(tasks=tasks, module=module)
        if self.rep_grad:
            try:
                self._rep_split(module.model)
            except ValueError as err:
                agg = getattr(self, "aggregator", None) or getattr(self, "_make", None)
                agg = getattr(agg, "func", agg)  # a partial constructor (Nash-MTL)
                name = getattr(agg, "__name__", type(agg).__name__) if agg else type(self).__name__
                raise ValueError(f"strategy {name} (rep_grad=true): {err}") from err
        self._ready = False

    @staticmethod
    def _rep_split(model) -> list:
        rep = trainable(model.representation_parameters())
        if not rep:
            raise ValueError(
                "rep_grad=true needs trainable parameters below the shared representation "
                "(model.representation_parameters() has none: is the backbone frozen entirely?)"
            )
        ids = {id(p) for p in rep}
        above = [
            n
            for n, p in model.named_parameters()
            if p.requires_grad and id(p) not in ids and id(p) in {id(q) for q in model.shared_parameters()}
        ]
        if above:
            decoder = type(getattr(model, "decoder", model)).__name__
            raise ValueError(
                f"rep_grad=true: shared parameters {above[:4]}… lie above the representation returned by "
                f"model.encode(); give the decoder ({decoder}) an encode()/decode() "
                "split that includes its shared layers, or use rep_grad=false"
            )
        return rep

    def _prepare(self, module) -> None:
        """Parameter lists and buffers, collected at the first step (after device moves / wrapping)."""
        if self._ready:
            return
        model = module.model
        self._shared = self._rep_split(model) if self.rep_grad else trainable(model.shared_parameters())
        self._task = {t: trainable(model.task_parameters(t)) for t in self.task_names}
        params = self._shared + [p for t in self.task_names for p in self._task[t]]
        self._flat = FlatGrad(params)
        self._jac = TaskJacobian(len(self.task_names))
        self._ready = True

    # ---------------------------------------------------------------- forward
    def forward(self, batch: dict, *, module):
        if not self.rep_grad:
            return super().forward(batch, module=module)
        x = batch["image"]
        rep = module.model.encode(x)
        self._rep = list(rep)
        self._rep_in = [r.detach().requires_grad_(True) for r in self._rep]
        preds = module.model.decode(self._rep_in, size=tuple(x.shape[-2:]))
        return preds, module.task_losses(preds, batch), module.model.aux_loss()

    # ---------------------------------------------------------------- hooks for subclasses
    def task_objective(self, task: str, loss: torch.Tensor) -> torch.Tensor:
        """The objective whose gradient is task ``task``'s row (default: the loss itself)."""
        return loss

    def combine(self, jac: torch.Tensor, gram: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Returns ``(w, rows)`` with shared direction ``wᵀ rows``, or ``(None, direction)``."""
        raise NotImplementedError

    # ---------------------------------------------------------------- the step
    def per_task(self, losses: Mapping[str, torch.Tensor], scale: float) -> torch.Tensor:
        """Fills the Jacobian buffer and the task-specific ``.grad``; returns the buffer (scaled)."""
        inputs = self._rep_in if self.rep_grad else self._shared
        jac = self._jac.ensure(inputs)
        ns = len(inputs)
        for i, t in enumerate(self.task_names):
            grads = task_grads(
                self.task_objective(t, losses[t]).float() * scale, list(inputs) + self._task[t]
            )
            self._jac.write(i, grads[:ns])
            if len(grads) > ns:
                torch._foreach_add_([p.grad for p in self._task[t]], list(grads[ns:]))
        return jac

    def gramian(self, jac: torch.Tensor) -> torch.Tensor:
        """The union's Gramian: rows averaged over ranks first (parameter level) or Gramians summed."""
        if self.rep_grad:
            return all_reduce_sum_(jac @ jac.T) / world_size() ** 2
        all_reduce_mean_(jac)
        return jac @ jac.T

    def backward(
        self,
        losses: Mapping[str, torch.Tensor],
        *,
        module,
        extra: torch.Tensor | None = None,
        batch: dict | None = None,
    ) -> dict[str, float]:
        self._prepare(module)
        scale = float(module.grad_scale())
        flat = self._flat.attach()
        jac = self.per_task(losses, scale)
        if scale != 1.0:
            jac.div_(scale)
        gram = self.gramian(jac)
        diagnose = self.diagnose_now()
        self.tick()
        if not bool(torch.isfinite(gram).all()):  # fp16 overflow: the scaler skips this step
            flat.fill_(float("nan"))
            self._release()
            return {"skipped": 1.0}
        weights, rows = self.combine(jac, gram)
        self.last_weights = None if weights is None else weights.tolist()
        self.apply(flat, weights, rows, extra, scale)
        logs = gramian_stats(gram, self.task_names, weights) if diagnose else {}
        if weights is not None:
            logs.update(
                {f"{t}/weight": float(w) for t, w in zip(self.task_names, weights.cpu(), strict=True)}
            )
        return logs

    def shared_direction(self, weights: torch.Tensor | None, rows: torch.Tensor, out: torch.Tensor) -> None:
        if weights is None:
            out.copy_(rows)
        else:
            torch.mv(rows.T, weights.to(rows.dtype), out=out)

    def apply(
        self,
        flat: torch.Tensor,
        weights: torch.Tensor | None,
        rows: torch.Tensor,
        extra: torch.Tensor | None,
        scale: float,
    ) -> None:
        """Writes the shared direction and synchronises; ``.grad`` ends at the loss scale."""
        ns = self._flat.sizes[: len(self._shared)]
        n_shared = sum(ns)
        if not self.rep_grad:
            self.shared_direction(weights, rows, flat[:n_shared])
            flat[:n_shared].mul_(scale)
            if extra is not None:
                torch._foreach_add_(self._flat.views, list(task_grads(extra * scale, self._flat.params)))
                all_reduce_mean_(flat)
            else:
                all_reduce_mean_(flat[n_shared:])
        else:
            dz = torch.empty(rows.shape[-1], device=rows.device, dtype=rows.dtype)  # rows: J, or a direction
            self.shared_direction(weights, rows, dz)
            dz.mul_(scale)
            shapes = self._jac.shapes
            dz_list = [
                v.view(sh) for v, sh in zip(dz.split([sh.numel() for sh in shapes]), shapes, strict=True)
            ]
            if extra is not None:
                ex = task_grads(extra * scale, self._rep_in + self._flat.params)
                torch._foreach_add_(dz_list, list(ex[: len(self._rep_in)]))
                torch._foreach_add_(self._flat.views, list(ex[len(self._rep_in) :]))
            enc = torch.autograd.grad(
                self._rep, self._shared, grad_outputs=dz_list, allow_unused=True, materialize_grads=True
            )
            torch._foreach_add_(self._flat.views[: len(self._shared)], list(enc))
            all_reduce_mean_(flat)
        self._release()

    def _release(self) -> None:
        self._rep = []
        self._rep_in = []


def sync_weights(weights: torch.Tensor) -> torch.Tensor:
    """Rank 0's weights on every rank (solvers with randomness or tie-breaking)."""
    return broadcast_(weights.contiguous())
