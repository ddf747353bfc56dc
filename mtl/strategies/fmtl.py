"""F-MTL: Phan et al., "Improving Multi-task Learning via Seeking Task-based Flat Regions",
2022 (arXiv:2211.13723); published as "Beyond Losses Reweighting: Empowering Multi-Task Learning
via the Generalization Perspective", ICCV 2025. Code: VietHoang1512/FS-MTL.

Per step, for each task ``i`` (as the reference code does): clean gradient ``g_i`` on the shared
and on head ``i``'s parameters; perturb shared + head ``i`` by ``ρ g/‖g‖`` (norms taken separately for the
shared and the head set; ASAM variant ``ρ T²g/‖Tg‖``); gradient ``g_i^SAM`` at the perturbed
point; flat component ``g_i^flat = g_i^SAM − g_i``; restore. Update: head ``i`` takes
``g_i^SAM``; shared parameters take ``Agg(g_1..g_k) + Agg(g^flat_1..g^flat_k)`` with any
aggregator of :mod:`mtl.strategies.aggregation` (two independent instances, so stateful ones
such as GradVac or Nash-MTL keep separate histories).

Defaults are the reference's dense-prediction recipe (VietHoang1512/FS-MTL, ``nyuv2/train.py`` and
``city2scape/train.py``: ``rho = 2``, ``adaptive = True``, CAGrad ``c = 0.4`` with its ``rescale = 1``).
Its ASAM scale is ``T = |w|`` on every shared and head parameter, biases included: ``eta = 0`` here
(``eta > 0`` gives ``T = |w| + η``, ASAM's form, so that zero weights are perturbed too). ``ρ = 0.05``
without ASAM is the reference's Multi-MNIST setting. The reference's F-MGDA solves the min-norm
problem on unit-norm ``g_i`` and on unit-norm flat components and multiplies the update by ``k``:
``strategy=fmtl_mgda`` (:class:`mtl.strategies.aggregators.MGDA` with ``normalization="l2"``,
``scale_by_tasks=True``); with the plain MGDA aggregator (raw gradients, no ``k``) it is MGDA of the
same two gradient sets.

Costs one forward/backward per task at the clean point and one per task at its perturbed
point (only that task's branch is decoded). BatchNorm statistics move on the first pass only.
Memory: the ``k × n`` buffer is reused for the flat components; one ``n``-vector backs up the
weights during each perturbed pass (restored bit-exactly). Under DDP the clean rows are
averaged before anything is perturbed (every rank perturbs identically), each asynchronously
right after its task's clean pass; each task's flat component (and its head's perturbed
gradient) is averaged asynchronously right after its perturbed pass, overlapping the next task's
passes. Host syncs: one per Gramian (the clean one and the flat one, copied to the host for the
solver) and none for the perturbation (its norms stay on the device).
"""

from __future__ import annotations

import copy

import torch
from torchjd.aggregation import GradDrop

from mtl.contracts import StepForward, StrategyHost
from mtl.strategies.aggregation import GradientAggregation, weights_from_gramian
from mtl.strategies.grads import (
    GradientTargets,
    PendingMeans,
    all_reduce_mean_,
    frozen_bn_stats,
    task_grads,
    to_device,
    to_host,
)
from mtl.strategies.jacobian import Measured, Update, sync_weights
from mtl.strategies.sam import ascent_step, check_rho


class FlatMTL(GradientAggregation):
    """Task-based flat regions plus a gradient aggregator.

    Args:
        aggregator: a torchjd aggregator (or a partial taking ``n_tasks``), e.g. CAGrad, IMTL-G.
        rho: perturbation radius ``ρ`` (> 0); the reference's dense recipe: 2.
        adaptive: ASAM-style perturbation ``ρ T² g / ‖T g‖``, ``T = |w| + η`` on every parameter
            (the reference's dense recipe: on).
        eta: ASAM's ``η`` (the reference: 0, ``T = |w|``).
        diagnostics_every: see :class:`~mtl.strategies.base.Strategy`.
    """

    supports_rep_grad = False

    def __init__(
        self,
        *,
        aggregator,
        rho: float = 2.0,
        adaptive: bool = True,
        eta: float = 0.0,
        diagnostics_every: int = 0,
    ) -> None:
        super().__init__(aggregator=aggregator, rep_grad=False, diagnostics_every=diagnostics_every)
        self.rho, self.adaptive, self.eta = check_rho(rho), bool(adaptive), float(eta)

    def setup(self, *, tasks, module: StrategyHost) -> None:
        super().setup(tasks=tasks, module=module)
        self.flat_aggregator = copy.deepcopy(self.aggregator)

    def _direction(
        self, agg, jac: torch.Tensor, gram_host: torch.Tensor, out: torch.Tensor, add: bool
    ) -> torch.Tensor | None:
        if isinstance(agg, GradDrop):
            d = sync_weights(agg(jac))
            if add:
                out.add_(d)
            else:
                out.copy_(d)
            return None
        w = sync_weights(to_device(weights_from_gramian(agg, gram_host), jac))
        if add:
            out.addmv_(jac.T, w)
        else:
            torch.mv(jac.T, w, out=out)
        return w

    def measure(
        self, step: StepForward, targets: GradientTargets, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The clean Gramian (rows averaged over the ranks); the clean head gradients unscaled and
        union-averaged in place (averaged during the passes: :meth:`heads_early`)."""
        gram, jac = super().measure(step, targets, scale)
        self._heads(targets).div_(scale)
        return gram, jac

    def shards_rows(self) -> bool:
        return False  # the perturbation of task i reads its whole averaged row

    def heads_early(self, step: StepForward) -> bool:
        return True  # the perturbation of head i reads its union-averaged clean gradient

    def finite_checks(self, gram: torch.Tensor, targets: GradientTargets) -> list[torch.Tensor]:
        return [gram, self._heads(targets)]

    @staticmethod
    def _heads(targets: GradientTargets) -> torch.Tensor:
        """The task-specific part of the flat ``.grad``."""
        return targets.flat.flat[targets.n_shared :]

    def update(self, m: Measured, *, module: StrategyHost, batch: dict) -> Update | None:
        step, targets, jac, scale = m.step, m.targets, m.jac, m.scale
        shared = targets.shared
        flat, views, params = targets.flat.flat, targets.flat.views, targets.flat.params
        ex = task_grads(step.aux * scale, params) if step.aux is not None else None  # at the clean point
        shared_dir = flat[: targets.n_shared]
        w_clean = self._direction(self.aggregator, jac, m.gram_host, shared_dir, add=False)
        shared_views = self._jac.row_views
        ns = len(shared)
        pending = PendingMeans()
        for i, t in enumerate(self.task_names):
            head = targets.task[t]
            head_grads = [p.grad for p in head]
            e_shared = ascent_step(shared, shared_views[i], self.rho, self.adaptive, self.eta)
            e_head = ascent_step(head, head_grads, self.rho, self.adaptive, self.eta) if head else []
            backup = [p.detach().clone() for p in shared + head]  # exact restore
            with torch.no_grad():
                torch._foreach_add_(shared + head, e_shared + e_head)
            del e_shared, e_head
            with frozen_bn_stats(module.model):
                out = module.model.run(batch["image"], tasks=[t])
                loss = module.tasks[t].loss(out.preds[t], batch)
                g = task_grads(loss.float() * scale, shared + head, retain_graph=False)
            with torch.no_grad():
                torch._foreach_copy_(shared + head, backup)
            del backup
            # row i ← g_i^SAM − g_i (rank-averaged, launched now: it overlaps the next task's passes)
            torch._foreach_sub_(shared_views[i], torch._foreach_div(list(g[:ns]), scale))
            pending.launch(jac[i].neg_())
            if head:
                torch._foreach_copy_(head_grads, list(g[ns:]))  # head i ← g_i^SAM (scaled)
                pending.launch(targets.head(t))
            del g
        pending.wait()
        gram_flat = to_host(jac @ jac.T)  # the flat Gramian's one host sync (its solver reads it)
        if not bool(torch.isfinite(gram_flat).all()):
            return None
        w_flat = self._direction(self.flat_aggregator, jac, gram_flat, shared_dir, add=True)
        shared_dir.mul_(scale)
        if ex is not None:
            torch._foreach_add_(views, list(ex))
            all_reduce_mean_(flat)
        logs = {}
        if w_flat is not None:  # device scalars: no host sync
            logs = {f"{t}/flat_weight": v for t, v in zip(self.task_names, w_flat.unbind(0), strict=True)}
        return Update(w_clean, logs)
