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
from dataclasses import dataclass, field

import torch

from mtl.contracts import StepForward, StrategyHost
from mtl.strategies.base import Strategy
from mtl.strategies.grads import (
    FlatGrad,
    GradientTargets,
    TaskJacobian,
    all_reduce_mean_,
    all_reduce_sum_,
    broadcast_,
    gramian_stats,
    task_grads,
    trainable,
    world_size,
)


@dataclass
class Measured:
    """One step after :meth:`PerTaskGradients.measure`: what :meth:`~PerTaskGradients.update` reads.

    Attributes:
        step: the training forward.
        targets: the shared / task-specific parameters and their flat ``.grad``.
        scale: the fp16 loss scale ``.grad`` is at.
        gram: the union's ``k × k`` Gramian (unscaled).
        jac: the ``k × n`` rows it came from (unscaled), or ``None`` when they are not kept.
    """

    step: StepForward
    targets: GradientTargets
    scale: float
    gram: torch.Tensor
    jac: torch.Tensor | None


@dataclass
class Update:
    """What :meth:`PerTaskGradients.update` wrote: the task weights (``None`` for a direction
    that is not a task combination, e.g. GradDrop's) and further scalars to log."""

    weights: torch.Tensor | None
    logs: dict[str, float] = field(default_factory=dict)


class PerTaskGradients(Strategy):
    """Base of strategies that combine per-task gradients of the shared part.

    :meth:`backward` is the skeleton every such strategy shares (a template method): collect
    the parameters once, attach the flat ``.grad``, :meth:`measure` the union's Gramian, tick,
    poison ``.grad`` with NaN on a non-finite Gramian (the fp16 scaler skips the step), let
    :meth:`update` write the update, log the weights and diagnostics. Subclasses override the
    hooks: :meth:`task_objective`, :meth:`combine` (buffered Jacobian), or :meth:`measure` /
    :meth:`usable` / :meth:`update` for another way to measure or to update (Gramian-only
    aggregation, F-MTL).

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
        self._targets: GradientTargets | None = None  # cache: parameter lists and the flat .grad
        self._jac = TaskJacobian(0)
        self.last_weights: list[float] | None = None  # the last step's task weights (for inspection)

    def method_name(self) -> str:
        """The method's name in error messages (default: the class name)."""
        return type(self).__name__

    def setup(self, *, tasks: Mapping, module: StrategyHost) -> None:
        super().setup(tasks=tasks, module=module)
        if self.rep_grad:
            try:
                self._rep_split(module.model)
            except ValueError as err:
                raise ValueError(f"strategy {self.method_name()} (rep_grad=true): {err}") from err
        self._targets = None
        self._jac = TaskJacobian(len(self.task_names))

    @staticmethod
    def _rep_split(model) -> list:
        rep = trainable(model.representation_parameters())
        if not rep:
            raise ValueError(
                "rep_grad=true needs trainable parameters below the shared representation "
                "(model.representation_parameters() has none: is the backbone frozen entirely?)"
            )
        ids = {id(p) for p in rep}
        shared_ids = {id(q) for q in model.shared_parameters()}
        above = [
            n
            for n, p in model.named_parameters()
            if p.requires_grad and id(p) not in ids and id(p) in shared_ids
        ]
        if above:
            raise ValueError(
                f"rep_grad=true: shared parameters {above[:4]}… lie above the representation returned by "
                f"model.encode(); give the decoder ({type(model.decoder).__name__}) an encode()/decode() "
                "split that includes its shared layers, or use rep_grad=false"
            )
        return rep

    def _prepare(self, module: StrategyHost) -> GradientTargets:
        """Parameter lists and the flat ``.grad``, collected at the first step (after device moves /
        wrapping) and reused."""
        if self._targets is None:
            model = module.model
            shared = self._rep_split(model) if self.rep_grad else trainable(model.shared_parameters())
            task = {t: trainable(model.task_parameters(t)) for t in self.task_names}
            params = shared + [p for t in self.task_names for p in task[t]]
            self._targets = GradientTargets(shared=shared, task=task, flat=FlatGrad(params))
        return self._targets

    # ---------------------------------------------------------------- forward
    def forward(self, batch: dict, *, module: StrategyHost) -> StepForward:
        if not self.rep_grad:
            return super().forward(batch, module=module)
        x = batch["image"]
        rep, feats = module.model.encode_features(x)  # feats: the backbone's aux loss and statistics
        rep = list(rep)
        rep_in = [r.detach().requires_grad_(True) for r in rep]
        out = module.model.decode(rep_in, size=tuple(x.shape[-2:]), features=feats)
        return StepForward(
            preds=out.preds,
            losses=module.task_losses(out, batch),
            aux=out.aux_loss,
            rep=rep,
            rep_in=rep_in,
        )

    # ---------------------------------------------------------------- hooks for subclasses
    def task_objective(self, task: str, loss: torch.Tensor) -> torch.Tensor:
        """The objective whose gradient is task ``task``'s row (default: the loss itself)."""
        return loss

    def combine(self, jac: torch.Tensor, gram: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Returns ``(w, rows)`` with shared direction ``wᵀ rows``, or ``(None, direction)``."""
        raise NotImplementedError

    def measure(
        self, step: StepForward, targets: GradientTargets, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The union's ``k × k`` Gramian (unscaled) and the ``k × n`` rows it came from (``None``
        when they are not kept); also adds every task's gradient of its task-specific parameters
        to their ``.grad`` (at the loss scale). Default: the buffered Jacobian."""
        jac = self.per_task(step, targets, scale)
        if scale != 1.0:
            jac.div_(scale)
        return self.gramian(jac), jac

    def usable(self, gram: torch.Tensor, targets: GradientTargets) -> bool:
        """Whether the step can go on (default: a finite Gramian; fp16 overflow makes it inf/nan)."""
        return bool(torch.isfinite(gram).all())

    def update(self, m: Measured, *, module: StrategyHost, batch: dict) -> Update | None:
        """Writes the update into ``.grad`` (at the loss scale, synchronised over the ranks);
        ``None`` means the step turned out unusable (``.grad`` is then poisoned, the step skipped).
        Default: :meth:`combine` the buffered rows, then :meth:`write_update`."""
        weights, rows = self.combine(m.jac, m.gram)
        self.write_update(m.step, m.targets, weights, rows, m.scale)
        return Update(weights)

    # ---------------------------------------------------------------- the step
    def per_task(self, step: StepForward, targets: GradientTargets, scale: float) -> torch.Tensor:
        """Fills the Jacobian buffer and the task-specific ``.grad``; returns the buffer (scaled)."""
        inputs = step.rep_in if self.rep_grad else targets.shared
        jac = self._jac.ensure(inputs)
        ns = len(inputs)
        for i, t in enumerate(self.task_names):
            own = targets.task[t]
            grads = task_grads(self.task_objective(t, step.losses[t]).float() * scale, list(inputs) + own)
            self._jac.write(i, grads[:ns])
            if len(grads) > ns:
                torch._foreach_add_([p.grad for p in own], list(grads[ns:]))
        return jac

    def gramian(self, jac: torch.Tensor) -> torch.Tensor:
        """The union's Gramian: rows averaged over ranks first (parameter level) or Gramians summed."""
        if self.rep_grad:
            return all_reduce_sum_(jac @ jac.T) / world_size() ** 2
        all_reduce_mean_(jac)
        return jac @ jac.T

    def backward(self, step: StepForward, *, module: StrategyHost, batch: dict) -> dict[str, float]:
        targets = self._prepare(module)
        scale = float(module.grad_scale())
        flat = targets.flat.attach()
        gram, jac = self.measure(step, targets, scale)
        diagnose = self.diagnose_now()
        self.tick()
        done = None
        if self.usable(gram, targets):
            done = self.update(Measured(step, targets, scale, gram, jac), module=module, batch=batch)
        if done is None:  # fp16 overflow: the scaler skips this step
            flat.fill_(float("nan"))
            return {"skipped": 1.0}
        weights = done.weights
        self.last_weights = None if weights is None else weights.tolist()
        logs = gramian_stats(gram, self.task_names, weights) if diagnose else {}
        if weights is not None:
            logs.update(
                {f"{t}/weight": float(w) for t, w in zip(self.task_names, weights.cpu(), strict=True)}
            )
        logs.update(done.logs)
        return logs

    def shared_direction(self, weights: torch.Tensor | None, rows: torch.Tensor, out: torch.Tensor) -> None:
        if weights is None:
            out.copy_(rows)
        else:
            torch.mv(rows.T, weights.to(rows.dtype), out=out)

    def write_update(
        self,
        step: StepForward,
        targets: GradientTargets,
        weights: torch.Tensor | None,
        rows: torch.Tensor,
        scale: float,
    ) -> None:
        """Writes the shared direction ``wᵀ rows`` (plus the auxiliary loss's gradient) into the
        flat ``.grad`` and synchronises; ``.grad`` ends at the loss scale."""
        flat = targets.flat.flat
        views, params = targets.flat.views, targets.flat.params
        extra = step.aux
        if not self.rep_grad:
            n_shared = targets.n_shared
            self.shared_direction(weights, rows, flat[:n_shared])
            flat[:n_shared].mul_(scale)
            if extra is not None:
                torch._foreach_add_(views, list(task_grads(extra * scale, params)))
                all_reduce_mean_(flat)
            else:
                all_reduce_mean_(flat[n_shared:])
            return
        rep, rep_in = step.rep, step.rep_in
        dz = torch.empty(rows.shape[-1], device=rows.device, dtype=rows.dtype)  # rows: J, or a direction
        self.shared_direction(weights, rows, dz)
        dz.mul_(scale)
        shapes = self._jac.shapes
        dz_list = [v.view(sh) for v, sh in zip(dz.split([sh.numel() for sh in shapes]), shapes, strict=True)]
        if extra is not None:
            ex = task_grads(extra * scale, rep_in + params)
            torch._foreach_add_(dz_list, list(ex[: len(rep_in)]))
            torch._foreach_add_(views, list(ex[len(rep_in) :]))
        enc = torch.autograd.grad(
            rep, targets.shared, grad_outputs=dz_list, allow_unused=True, materialize_grads=True
        )
        torch._foreach_add_(views[: len(targets.shared)], list(enc))
        all_reduce_mean_(flat)


def sync_weights(weights: torch.Tensor) -> torch.Tensor:
    """Rank 0's weights on every rank (solvers with randomness or tie-breaking)."""
    return broadcast_(weights.contiguous())
