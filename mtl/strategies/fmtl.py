"""F-MTL: Phan et al., "Improving Multi-task Learning via Seeking Task-based Flat Regions",
2022 (arXiv:2211.13723).

Per step, for each task ``i`` (REFERENCE.md): clean gradient ``g_i`` on the shared and on head
``i``'s parameters; perturb shared + head ``i`` by ``ρ g/‖g‖`` (norms taken separately for the
shared and the head set; ASAM variant ``ρ T²g/‖Tg‖``); gradient ``g_i^SAM`` at the perturbed
point; flat component ``g_i^flat = g_i^SAM − g_i``; restore. Update: head ``i`` takes
``g_i^SAM``; shared parameters take ``Agg(g_1..g_k) + Agg(g^flat_1..g^flat_k)`` with any
aggregator of :mod:`mtl.strategies.aggregation` (two independent instances, so stateful ones
such as GradVac or Nash-MTL keep separate histories).

Costs one forward/backward per task at the clean point and one per task at its perturbed
point (only that task's branch is decoded). BatchNorm statistics move on the first pass only.
Memory: the ``k × n`` buffer is reused for the flat components; one ``n``-vector backs up the
weights during each perturbed pass (restored bit-exactly). Under DDP the clean rows are
averaged before anything is perturbed (every rank perturbs identically) and the perturbed
gradients are averaged in one all-reduce of the buffer.
"""

from __future__ import annotations

import copy

import torch
from torchjd.aggregation import GradDrop

from mtl.strategies.aggregation import GradientAggregation, weights_from_gramian
from mtl.strategies.grads import all_reduce_mean_, frozen_bn_stats, gramian_stats, task_grads
from mtl.strategies.jacobian import sync_weights
from mtl.strategies.sam import ascent_step, check_rho


class FlatMTL(GradientAggregation):
    """Task-based flat regions plus a gradient aggregator.

    Args:
        aggregator: a torchjd aggregator (or a partial taking ``n_tasks``), e.g. CAGrad, IMTL-G.
        rho: perturbation radius ``ρ`` (> 0).
        adaptive: ASAM-style perturbation ``ρ T² g / ‖T g‖``, ``T = |w| + η``.
        eta: ASAM's ``η``.
        diagnostics_every: see :class:`~mtl.strategies.base.Strategy`.
    """

    supports_rep_grad = False

    def __init__(
        self,
        *,
        aggregator,
        rho: float = 0.05,
        adaptive: bool = False,
        eta: float = 0.01,
        diagnostics_every: int = 0,
    ) -> None:
        super().__init__(aggregator=aggregator, rep_grad=False, diagnostics_every=diagnostics_every)
        self.rho, self.adaptive, self.eta = check_rho(rho), bool(adaptive), float(eta)

    def setup(self, *, tasks, module) -> None:
        super().setup(tasks=tasks, module=module)
        self.flat_aggregator = copy.deepcopy(self.aggregator)

    def _direction(
        self, agg, jac: torch.Tensor, gram: torch.Tensor, out: torch.Tensor, add: bool
    ) -> torch.Tensor | None:
        if isinstance(agg, GradDrop):
            d = sync_weights(agg(jac))
            if add:
                out.add_(d)
            else:
                out.copy_(d)
            return None
        w = sync_weights(weights_from_gramian(agg, gram.double()).to(jac.device, jac.dtype))
        if add:
            out.addmv_(jac.T, w)
        else:
            torch.mv(jac.T, w, out=out)
        return w

    def backward(self, losses, *, module, extra=None, batch=None) -> dict[str, float]:
        if batch is None:
            raise ValueError("F-MTL needs the batch to evaluate each task at its perturbed weights")
        self._prepare(module)
        scale = float(module.grad_scale())
        flat = self._flat.attach()
        n_shared = sum(self._flat.sizes[: len(self._shared)])
        ex = task_grads(extra * scale, self._flat.params) if extra is not None else None
        jac = self.per_task(losses, scale).div_(scale)
        gram = self.gramian(jac)  # rows averaged over the ranks
        diagnose = self.diagnose_now()
        self.tick()
        heads = flat[n_shared:]
        all_reduce_mean_(heads.div_(scale))  # clean head gradients, unscaled, union-averaged
        if not bool(torch.isfinite(gram).all() and torch.isfinite(heads).all()):
            flat.fill_(float("nan"))
            return {"skipped": 1.0}
        shared_dir = flat[:n_shared]
        w_clean = self._direction(self.aggregator, jac, gram, shared_dir, add=False)
        shared_views = self._jac.row_views
        for i, t in enumerate(self.task_names):
            head = self._task[t]
            head_grads = [p.grad for p in head]
            e_shared = ascent_step(self._shared, shared_views[i], self.rho, self.adaptive, self.eta)
            e_head = ascent_step(head, head_grads, self.rho, self.adaptive, self.eta) if head else []
            backup = [p.detach().clone() for p in self._shared + head]  # exact restore
            with torch.no_grad():
                torch._foreach_add_(self._shared + head, e_shared + e_head)
            del e_shared, e_head
            with frozen_bn_stats(module.model):
                preds = module(batch["image"], task_subset=[t])
                loss = self.task_objects[t].loss(preds[t], batch)
                g = task_grads(loss.float() * scale, self._shared + head, retain_graph=False)
            with torch.no_grad():
                torch._foreach_copy_(self._shared + head, backup)
            del backup
            ns = len(self._shared)
            torch._foreach_sub_(
                shared_views[i], torch._foreach_div(list(g[:ns]), scale)
            )  # row i ← g_i − g_i^SAM
            if head:
                torch._foreach_copy_(head_grads, list(g[ns:]))  # head i ← g_i^SAM (scaled)
        all_reduce_mean_(jac.neg_())  # rows: rank-averaged g_i^SAM − g_i
        all_reduce_mean_(heads)
        gram_flat = jac @ jac.T
        if not bool(torch.isfinite(gram_flat).all()):
            flat.fill_(float("nan"))
            return {"skipped": 1.0}
        w_flat = self._direction(self.flat_aggregator, jac, gram_flat, shared_dir, add=True)
        shared_dir.mul_(scale)
        if ex is not None:
            torch._foreach_add_(self._flat.views, list(ex))
            all_reduce_mean_(flat)
        logs = gramian_stats(gram, self.task_names, w_clean) if diagnose else {}
        if w_clean is not None:
            logs.update(
                {f"{t}/weight": float(v) for t, v in zip(self.task_names, w_clean.cpu(), strict=True)}
            )
        if w_flat is not None:
            logs.update(
                {f"{t}/flat_weight": float(v) for t, v in zip(self.task_names, w_flat.cpu(), strict=True)}
            )
        return logs
