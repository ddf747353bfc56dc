"""Per-task gradients of the shared parameters (or of the shared representation), done right.

The machinery under every gradient-aggregation strategy. One step:

1. ``k`` backward passes with ``torch.autograd.grad`` (retained graph), task ``t``'s gradient
   of the shared inputs written into row ``t`` of a preallocated ``k × n`` device buffer
   (:class:`~mtl.strategies.grads.TaskJacobian`), its task-specific parameters' gradient into
   their own ``.grad`` (a slice of one flat vector). No ``.grad`` accumulation of shared
   parameters, hence no DDP hook and no gradient sync on these passes.
2. Unscale (fp16: the losses were multiplied by the scaler's scale), then average the rows
   over the ranks (parameter level) or sum the ``k × k`` Gramians (representation level). Under
   DDP each row's collective (an all-reduce, or a reduce-scatter: see below) starts
   asynchronously right after its task's backward pass (and each task's own parameters' gradient
   with it), so it overlaps the next task's backward pass; the step waits for them only before
   the Gramian (:class:`~mtl.strategies.grads.PendingMeans`).
3. The Gramian (``k × k``) is copied to the host once: the step's one host sync. A non-finite
   Gramian poisons ``.grad`` with NaN so the fp16 scaler skips the step.
4. ``combine`` maps the host Gramian (or, for coordinate-wise rules, the rows) to task weights
   on the host (the solvers are ``k × k`` problems, most of them CPU solvers anyway); the weights
   go back to the device without a sync and rank 0's are broadcast: one synchronised result.
5. Shared direction ``wᵀJ`` written with one ``torch.mv(..., out=...)`` into the flat ``.grad``
   (parameter level), or pushed through the encoder in one backward (representation level,
   the "-UB" trick of Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization",
   NeurIPS 2018), then the task-specific (and, at representation level, all) gradients are
   averaged over the ranks in one all-reduce.

At representation level (``rep_grad=True``) rows are gradients w.r.t. ``model.encode(x)``:
``k × |z|`` per rank instead of ``k × n``, and only the ``k × k`` Gramian crosses ranks
(with mean-reduced losses, the union's Gramian is ``Σ_r G_r / R²``).

What must cross the ranks at parameter level. With mean-reduced losses the union's row ``i`` is
``J̄_i = (1/R) Σ_r J_{r,i}``, so its Gramian ``Ḡ = J̄ J̄ᵀ = (1/R²) Σ_r Σ_s J_r J_sᵀ`` has cross-rank
terms ``J_r J_sᵀ`` (``r ≠ s``) that no rank can form from its own rows: the ``k × k`` Gramians
``J_r J_rᵀ`` summed over the ranks miss them (that sum is exact only at representation level, where
the ranks' representations are disjoint samples: there ``J`` is block-diagonal over the ranks and
the cross terms vanish). So the ``k × n`` rows must be averaged, but no rank needs all of them:
``Ḡ = Σ_b J̄_b J̄_bᵀ`` over column blocks ``b`` and ``wᵀJ̄`` is computed block by block. Strategies
that read the rows only through ``Ḡ`` and ``wᵀJ̄`` (:meth:`PerTaskGradients.shards_rows`: every
Gramian aggregator) therefore reduce-scatter each row (rank ``r`` receives the average of block
``r``, ``n/R`` columns), sum the ``R`` block Gramians (``k × k``), and all-gather the blocks of
``wᵀJ̄`` (``n``). In a ring, per rank: ``(R−1)/R · (k + 1) · n`` elements sent instead of the
all-reduce's ``2 (R−1)/R · k · n`` (``k = 4``: 37.5 % less), and the Gramian and the update cost
``1/R`` of the compute. Strategies that read the rows whole (DB-MTL's moving average, F-MTL's
perturbations, GradDrop's coordinate-wise rule) all-reduce them. Either way each row's collective
is launched asynchronously after its task's backward pass, and the task-specific parameters'
gradients (a few per cent of ``n`` for a shared encoder) are averaged during the passes too. The
Gramian-only mode (:mod:`~mtl.strategies.gramian_only`) trades the other way: ``k(k+1)/2 + 1``
rows of ``n`` all-reduced one at a time, one row of memory.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from mtl.contracts import StepForward, StrategyHost
from mtl.strategies.base import Logs, Strategy
from mtl.strategies.grads import (
    FlatGrad,
    GradientTargets,
    PendingMeans,
    TaskJacobian,
    all_gather_,
    all_reduce_mean_,
    all_reduce_sum_,
    broadcast_,
    gramian_stats,
    task_grads,
    to_host,
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
        gram: the union's ``k × k`` Gramian (unscaled, on the device).
        jac: the ``k × n`` rows it came from (unscaled), or ``None`` when they are not kept; under
            DDP with :meth:`~PerTaskGradients.shards_rows`, this rank's ``k × n/R`` column block.
        gram_host: the same Gramian on the host in float64 (the solvers read this one: no sync).
    """

    step: StepForward
    targets: GradientTargets
    scale: float
    gram: torch.Tensor
    jac: torch.Tensor | None
    gram_host: torch.Tensor


@dataclass
class Update:
    """What :meth:`PerTaskGradients.update` wrote: the task weights (on the device, synchronised;
    ``None`` for a direction that is not a task combination, e.g. GradDrop's) and further scalars to
    log (device tensors, so that logging them costs no host sync)."""

    weights: torch.Tensor | None
    logs: dict[str, float | torch.Tensor] = field(default_factory=dict)


class PerTaskGradients(Strategy):
    """Base of strategies that combine per-task gradients of the shared part.

    :meth:`backward` is the skeleton every such strategy shares (a template method): collect
    the parameters once, attach the flat ``.grad``, :meth:`measure` the union's Gramian, tick,
    poison ``.grad`` with NaN on a non-finite Gramian (the fp16 scaler skips the step), let
    :meth:`update` write the update, log the weights and diagnostics. Subclasses override the
    hooks: :meth:`task_objective`, :meth:`combine` (buffered Jacobian), or :meth:`measure` /
    :meth:`finite_checks` / :meth:`update` for another way to measure or to update (Gramian-only
    aggregation, F-MTL).

    One host sync per step: the copy of the ``k × k`` Gramian (with the finite flags) to the host.

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
        self._shard: torch.Tensor | None = None  # this rank's column block of the averaged rows
        self._sharded = False  # whether this step's rows are sharded (see shards_rows)
        self.last_weights: torch.Tensor | None = None  # the last step's task weights (device, for inspection)

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

    def combine(
        self, jac: torch.Tensor, gram: torch.Tensor, gram_host: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Returns ``(w, rows)`` with shared direction ``wᵀ rows``, or ``(None, direction)``; ``w`` on
        ``rows``' device. ``gram`` is the device Gramian, ``gram_host`` its float64 host copy (made
        here when not given)."""
        raise NotImplementedError

    def measure(
        self, step: StepForward, targets: GradientTargets, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The union's ``k × k`` Gramian (unscaled) and the ``k × n`` rows it came from (``None``
        when they are not kept); also adds every task's gradient of its task-specific parameters
        to their ``.grad`` (at the loss scale; rank-averaged already when :meth:`heads_early`).
        Default: the buffered Jacobian."""
        jac = self.per_task(step, targets, scale, reduce_heads=self.heads_early(step))
        return self.gramian(jac), jac

    def shards_rows(self) -> bool:
        """Whether the strategy needs the averaged rows only through the Gramian and a weighted sum
        ``wᵀJ̄`` (then, under DDP at parameter level, each rank keeps one column block of them: a
        reduce-scatter instead of an all-reduce, see the module docstring). Default: no (the rows
        are read whole, e.g. DB-MTL's moving average, F-MTL's perturbations)."""
        return False

    def heads_early(self, step: StepForward) -> bool:
        """Whether :meth:`per_task` averages the task-specific gradients over the ranks (during the
        passes). Default: at parameter level without an auxiliary loss; otherwise the final
        all-reduce of the whole ``.grad`` averages them with the rest."""
        return not self.rep_grad and step.aux is None

    def finite_checks(self, gram: torch.Tensor, targets: GradientTargets) -> list[torch.Tensor]:
        """Device tensors that must be finite for the step to go on (default: the Gramian; fp16
        overflow makes it inf/nan). Checked with the Gramian's copy to the host: no further sync."""
        return [gram]

    def update(self, m: Measured, *, module: StrategyHost, batch: dict) -> Update | None:
        """Writes the update into ``.grad`` (at the loss scale, synchronised over the ranks);
        ``None`` means the step turned out unusable (``.grad`` is then poisoned, the step skipped).
        Default: :meth:`combine` the buffered rows, then :meth:`write_update`."""
        weights, rows = self.combine(m.jac, m.gram, m.gram_host)
        self.write_update(m.step, m.targets, weights, rows, m.scale)
        return Update(weights)

    # ---------------------------------------------------------------- the step
    def per_task(
        self, step: StepForward, targets: GradientTargets, scale: float, *, reduce_heads: bool
    ) -> torch.Tensor:
        """Fills the Jacobian buffer (unscaled) and adds the task-specific gradients to ``.grad``;
        returns the buffer.

        At parameter level under DDP each row is averaged over the ranks asynchronously, launched
        right after its task's backward pass (with the task's own parameters' slice of ``.grad`` when
        ``reduce_heads``), and awaited after the last pass: the communication overlaps the next
        tasks' backward passes. When :meth:`shards_rows`, each row is reduce-scattered instead and
        the returned ``k × n/R`` block holds this rank's columns of the averaged rows.
        """
        inputs = step.rep_in if self.rep_grad else targets.shared
        ranks = world_size()
        self._sharded = not self.rep_grad and ranks > 1 and self.shards_rows()
        jac = self._jac.ensure(inputs, pad_to=ranks if self._sharded else 1)
        out = jac
        if self._sharded:
            shape = (jac.shape[0], jac.shape[1] // ranks)
            if self._shard is None or self._shard.shape != shape or self._shard.device != jac.device:
                self._shard = torch.empty(shape, device=jac.device, dtype=jac.dtype)
            out = self._shard
        ns = len(inputs)
        pending = PendingMeans()
        for i, t in enumerate(self.task_names):
            own = targets.task[t]
            grads = task_grads(self.task_objective(t, step.losses[t]).float() * scale, list(inputs) + own)
            self._jac.write(i, grads[:ns])
            if scale != 1.0:
                jac[i].div_(scale)
            if self._sharded:
                pending.scatter(out[i], jac[i])
            elif not self.rep_grad:
                pending.launch(jac[i])
            if len(grads) > ns:
                torch._foreach_add_([p.grad for p in own], list(grads[ns:]))
                if reduce_heads:
                    pending.launch(targets.head(t))
            del grads
        pending.wait()
        return out

    def gramian(self, jac: torch.Tensor) -> torch.Tensor:
        """The union's Gramian: of the rank-averaged rows (parameter level, averaged by
        :meth:`per_task`) or the sum of the ranks' Gramians (representation level)."""
        if self.rep_grad:
            return all_reduce_sum_(jac @ jac.T) / world_size() ** 2
        if self._sharded:  # column blocks: the Gramian is the sum of the blocks' Gramians
            return all_reduce_sum_(jac @ jac.T)
        return jac @ jac.T

    def fetch(self, gram: torch.Tensor, targets: GradientTargets) -> tuple[torch.Tensor, bool]:
        """The Gramian's float64 host copy and whether every :meth:`finite_checks` tensor is finite,
        in one device-to-host copy (the step's one host sync)."""
        k = gram.shape[0]
        flags = torch.stack([torch.isfinite(c).all() for c in self.finite_checks(gram, targets)])
        host = to_host(torch.cat([gram.detach().reshape(-1).double(), flags.double()]))
        return host[: k * k].view(k, k), bool(host[k * k :].all())

    def backward(self, step: StepForward, *, module: StrategyHost, batch: dict) -> Logs:
        targets = self._prepare(module)
        scale = float(module.grad_scale())
        flat = targets.flat.attach()
        gram, jac = self.measure(step, targets, scale)
        gram_host, finite = self.fetch(gram, targets)
        diagnose = self.diagnose_now()
        self.tick()
        done = None
        if finite:
            done = self.update(
                Measured(step, targets, scale, gram, jac, gram_host), module=module, batch=batch
            )
        if done is None:  # fp16 overflow: the scaler skips this step
            flat.fill_(float("nan"))
            return {"skipped": 1.0}
        weights = None if done.weights is None else done.weights.detach()
        self.last_weights = weights
        logs = gramian_stats(gram_host, self.task_names, weights) if diagnose else {}
        if weights is not None:  # device scalars: no host sync to log them
            logs.update({f"{t}/weight": w for t, w in zip(self.task_names, weights.unbind(0), strict=True)})
        logs.update(done.logs)
        return logs

    def shared_direction(self, weights: torch.Tensor | None, rows: torch.Tensor, out: torch.Tensor) -> None:
        if weights is None:
            out.copy_(rows)
        elif out.dtype == rows.dtype:
            torch.mv(rows.T, weights.to(rows.dtype), out=out)
        else:  # float32 rows of half-precision parameters
            out.copy_(torch.mv(rows.T, weights.to(rows.dtype)))

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
            # the rows are rank-averaged, so wᵀ rows is the same on every rank: no all-reduce of it
            n_shared = targets.n_shared
            if self._sharded:  # this rank's block of wᵀJ̄, gathered into a free row of the buffer
                full = self._jac.buf[0]  # its all-reduce is done: free
                all_gather_(full, torch.mv(rows.T, weights.to(rows.dtype)))
                flat[:n_shared].copy_(full[:n_shared])
            else:
                self.shared_direction(weights, rows, flat[:n_shared])
            flat[:n_shared].mul_(scale)
            if extra is not None:  # the auxiliary loss's gradient is rank-local: average everything
                torch._foreach_add_(views, list(task_grads(extra * scale, params)))
                all_reduce_mean_(flat)
            elif not self.heads_early(step):
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
