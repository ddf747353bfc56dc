"""Gradient aggregation over per-task gradients, with torchjd's aggregators for the maths.

Methods (the ``aggregator`` given by its config's ``_target_``):

- MGDA: Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018.
- PCGrad: Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020.
- CAGrad: Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning", NeurIPS 2021.
- IMTL-G: Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021.
- Nash-MTL: Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022.
- Aligned-MTL: Senushkin et al., "Independent Component Alignment for Multi-Task Learning", CVPR 2023.
- UPGrad / DualProj: Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024.
- GradVac: Wang et al., "Gradient Vaccine", ICLR 2021.
- GradDrop: Chen et al., "Just Pick a Sign: Optimizing Deep Multitask Models with Gradient
  Sign Dropout", NeurIPS 2020.
- ConFIG: Liu et al., "ConFIG: Towards Conflict-free Training of Physics Informed Neural Networks", ICLR 2025.
- FairGrad: Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024.

MGDA and CAGrad default to :mod:`mtl.strategies.aggregators` (the exact min-norm point; CAGrad with
its authors' ``rescale``), torchjd's for the others.

Every method except GradDrop returns a combination ``wᵀJ`` of the task gradients whose
weights depend on the Gramian ``G = JJᵀ`` only, so the strategy needs ``G`` (``k × k``), not
``J``, to decide: Gramian weightings take ``G`` directly; the others are equivariant under
rotations of the parameter space, so they run on a ``k × k`` root ``R`` (``RRᵀ = G``, i.e.
``J = RQᵀ``) and their output ``Qc`` is mapped back to weights ``w = (Rᵀ)⁺c``. Only GradDrop,
which works coordinate-wise, reads ``J`` itself.

The weights are computed from the host copy of the Gramian (``k × k``, float64; the step's one
host sync, see :mod:`mtl.strategies.jacobian`): the solvers are small problems, most of them on
the CPU already (quadprog, cvxpy, NumPy), so no solver waits on the device again; the weights go
back to the device without a sync.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import torch
from torch import nn
from torchjd.aggregation import Aggregator, GradDrop, GramianWeightedAggregator, NashMTL, WeightedAggregator

from mtl.contracts import StepForward, StrategyHost
from mtl.strategies.autogram import autogram_refusal, engine_gramian, gramians_agree, make_engine
from mtl.strategies.grads import (
    GradientTargets,
    TaskJacobian,
    all_reduce_mean_,
    task_grads,
    to_device,
    to_host,
    world_size,
)
from mtl.strategies.gramian_only import polarised_gramian, weighted_direction
from mtl.strategies.jacobian import Measured, PerTaskGradients, Update, sync_weights


def gramian_root(gram: torch.Tensor) -> torch.Tensor:
    """A ``k × k`` matrix ``R`` with ``R Rᵀ = G`` (eigendecomposition, negative noise clipped)."""
    evals, evecs = torch.linalg.eigh(gram)
    return evecs * evals.clamp_min(0).sqrt()


def weights_from_gramian(aggregator: Aggregator, gram: torch.Tensor) -> torch.Tensor:
    """Task weights ``w`` such that ``aggregator(J) = wᵀJ`` for any ``J`` with ``JJᵀ = gram``.

    Give it the host copy of the Gramian: the solvers then run on the host without a sync.

    Raises:
        ValueError: for aggregators that are not a function of the Gramian (GradDrop).
    """
    if isinstance(aggregator, GramianWeightedAggregator):
        return aggregator.gramian_weighting(gram)
    if isinstance(aggregator, GradDrop):
        raise ValueError("GradDrop works coordinate-wise on the Jacobian: it has no Gramian weights")
    root = gramian_root(gram)
    if isinstance(aggregator, WeightedAggregator):
        return aggregator.weighting(root)
    return torch.linalg.pinv(root.T) @ aggregator(root)


class GradientAggregation(PerTaskGradients):
    """Shared parameters follow a torchjd aggregator of the per-task gradients.

    Args:
        aggregator: a ``torchjd.aggregation.Aggregator``, or a partial constructor that
            takes ``n_tasks`` (Nash-MTL).
        rep_grad: aggregate gradients w.r.t. the shared representation ("-UB" variant).
        gramian_only: parameter level without the ``k × n`` Jacobian buffer: the Gramian by
            polarisation, ``k(k+1)/2 + 1`` backward passes and one ``n``-vector of scratch
            (:mod:`mtl.strategies.gramian_only`); not for GradDrop or ``rep_grad``.
        autogram: with ``gramian_only``, take the Gramian from torchjd's ``autogram.Engine`` (one
            backward pass batched over the tasks) where the model allows it, else (with a one-line
            warning saying why) the polarised passes (:mod:`mtl.strategies.autogram`).
        task_weighted_heads: each task's own parameters get ``w_t ∇L_t`` instead of ``∇L_t``, as in
            the official code of MGDA, Nash-MTL and FairGrad (one backward of ``Σ_t w_t L_t``). For
            Nash-MTL, whose reference clips only the shared gradient to ``max_norm``, the heads then
            take the unclipped weights and the shared direction is clipped (``torch``'s
            ``clip_grad_norm_`` rule); not for GradDrop (no weights).
        diagnostics_every: see :class:`~mtl.strategies.base.Strategy`.
    """

    def __init__(
        self,
        *,
        aggregator: Aggregator | functools.partial,
        rep_grad: bool = False,
        gramian_only: bool = False,
        autogram: bool = True,
        task_weighted_heads: bool = False,
        diagnostics_every: int = 0,
    ) -> None:
        super().__init__(rep_grad=rep_grad, diagnostics_every=diagnostics_every)
        self.task_weighted_heads = bool(task_weighted_heads)
        self._shared_max_norm = 0.0  # Nash-MTL's max_norm, applied to the shared direction only
        if gramian_only and rep_grad:
            raise ValueError(
                "strategy gramian_only=true is a parameter-level mode; rep_grad=true already keeps only "
                "k × |representation| (set one of them)"
            )
        self.gramian_only = bool(gramian_only)
        self.autogram = bool(autogram) and self.gramian_only
        self.autogram_fallback: str | None = None  # why the polarised passes are used, once decided
        self._autogram_checked = False  # the first step compares the engine's Gramian with the exact one
        self._engine = None  # the step's autogram engine (hooks live from forward to measure)
        if not isinstance(aggregator, Aggregator) and not callable(aggregator):
            raise ValueError(f"strategy aggregator must be a torchjd Aggregator, got {aggregator!r}")
        is_agg = isinstance(aggregator, Aggregator)
        self._make = None if is_agg else aggregator
        self.aggregator = aggregator if is_agg else None

    def method_name(self) -> str:
        """The aggregator's name (``MGDA``, ``NashMTL``, …), for error messages."""
        if self.aggregator is not None:
            return type(self.aggregator).__name__
        make = self._make.func if isinstance(self._make, functools.partial) else self._make
        return make.__name__ if isinstance(make, type) else type(make).__name__

    def setup(self, *, tasks, module: StrategyHost) -> None:
        super().setup(tasks=tasks, module=module)
        if self.aggregator is None:
            self.aggregator = self._make(n_tasks=len(tasks))
        if not isinstance(self.aggregator, Aggregator):
            raise ValueError(f"strategy aggregator must build a torchjd Aggregator, got {self.aggregator!r}")
        if self.gramian_only and isinstance(self.aggregator, GradDrop):
            raise ValueError("strategy gramian_only=true: GradDrop works coordinate-wise on J, not on G")
        if self.task_weighted_heads and isinstance(self.aggregator, GradDrop):
            raise ValueError("strategy task_weighted_heads=true: GradDrop has no task weights (set it false)")
        if self.task_weighted_heads and isinstance(self.aggregator, NashMTL) and self.aggregator.max_norm > 0:
            self._shared_max_norm = float(self.aggregator.max_norm)
            self.aggregator.max_norm = 0.0
        self._scratch = TaskJacobian(1)

    def weigh_heads(
        self, weights: torch.Tensor | None, gram: torch.Tensor, targets: GradientTargets
    ) -> torch.Tensor | None:
        """With ``task_weighted_heads``: scales each task's own gradients (in ``.grad``) by its weight
        and returns the weights of the shared direction (Nash-MTL: clipped to ``max_norm``)."""
        if not self.task_weighted_heads or weights is None:
            return weights
        for t, w in zip(self.task_names, weights.unbind(0), strict=True):  # device scalars: no sync
            targets.head(t).mul_(w)
        if self._shared_max_norm > 0:
            w64 = weights.to(torch.float64)
            norm = (w64 @ gram.to(w64.device, torch.float64) @ w64).sqrt()  # ‖Σ w_t g_t‖
            weights = weights * (self._shared_max_norm / (norm + 1e-6)).clamp(max=1.0)
        return weights

    def shards_rows(self) -> bool:
        """The weights come from the Gramian alone (not GradDrop), so under DDP each rank can keep one
        column block of the averaged rows (the buffered path; Gramian-only has no rows)."""
        return not self.gramian_only and not isinstance(self.aggregator, GradDrop)

    def _objectives(self, losses) -> dict[str, torch.Tensor]:
        return {t: self.task_objective(t, losses[t]).float() for t in self.task_names}

    def _autogram_off(self, reason: str) -> None:
        self.autogram, self.autogram_fallback, self._engine = False, reason, None
        warnings.warn(
            f"strategy gramian_only: autogram engine off, using the k(k+1)/2+1 polarised passes: {reason}",
            stacklevel=2,
        )

    def forward(self, batch: dict, *, module: StrategyHost) -> StepForward:
        if self.autogram:  # the engine's hooks must be in place before the forward
            targets = self._prepare(module)
            reason = autogram_refusal(module.model, targets.shared, world_size())
            if reason is not None:
                self._autogram_off(reason)
            else:
                self._engine = make_engine(module.model, targets.shared)
        return super().forward(batch, module=module)

    def measure(
        self, step: StepForward, targets: GradientTargets, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.gramian_only:
            return super().measure(step, targets, scale)
        objectives = self._objectives(step.losses)
        engine, self._engine = self._engine, None
        if engine is None:
            return polarised_gramian(targets, objectives, scale, self._scratch), None
        fast: torch.Tensor | None = None
        try:
            fast = engine_gramian(engine, list(objectives.values()), scale)
        except (RuntimeError, ValueError, NotImplementedError) as err:
            self._autogram_off(f"the engine failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
        del engine  # removes its hooks
        if fast is None or not self._autogram_checked:
            exact = polarised_gramian(targets, objectives, scale, self._scratch)
            if fast is not None and bool(torch.isfinite(exact).all()):
                if gramians_agree(fast, exact):
                    self._autogram_checked = True
                else:
                    err = ((fast - exact).abs().max() / exact.diagonal().abs().max()).item()
                    self._autogram_off(
                        f"its Gramian differs from the exact one by {err:.1e} of the largest diagonal entry "
                        "(a shared parameter used without its module being called?)"
                    )
            return exact, None
        for t, objective in objectives.items():  # each task's own parameters, as the passes do
            own = targets.task[t]
            if own:
                torch._foreach_add_([p.grad for p in own], list(task_grads(objective * scale, own)))
        return fast, None

    def update(self, m: Measured, *, module: StrategyHost, batch: dict) -> Update | None:
        step, targets, scale = m.step, m.targets, m.scale
        if not self.gramian_only:
            weights, rows = self.combine(m.jac, m.gram, m.gram_host)
            self.write_update(step, targets, self.weigh_heads(weights, m.gram, targets), rows, scale)
            return Update(weights)
        flat = targets.flat.flat
        weights = sync_weights(
            to_device(weights_from_gramian(self.aggregator, m.gram_host), flat, torch.float32)
        )
        shared = self.weigh_heads(weights, m.gram, targets)
        weighted_direction(targets, self._objectives(step.losses), shared, scale)
        if step.aux is not None:
            torch._foreach_add_(targets.flat.views, list(task_grads(step.aux * scale, targets.flat.params)))
        all_reduce_mean_(flat)
        return Update(weights)

    def extra_state(self) -> dict:
        return {"solver": solver_state(self.aggregator)} if self.aggregator is not None else {}

    def load_extra_state(self, state: dict) -> None:
        if self.aggregator is not None and "solver" in state:
            load_solver_state(self.aggregator, state["solver"])

    def combine(
        self, jac: torch.Tensor, gram: torch.Tensor, gram_host: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        if isinstance(self.aggregator, GradDrop):
            direction = self.aggregator(jac)
            return None, direction if self.rep_grad else sync_weights(direction)
        gram_host = to_host(gram) if gram_host is None else gram_host
        return sync_weights(to_device(weights_from_gramian(self.aggregator, gram_host), jac)), jac


_MODULE_ATTRS = frozenset(vars(nn.Module()))
_SCALARS = (int, float, bool, str, type(None), torch.dtype)


def _is_plain(v) -> bool:
    if isinstance(v, tuple):
        return all(_is_plain(x) for x in v)
    return isinstance(v, _SCALARS) or (torch.is_tensor(v) and not isinstance(v, nn.Parameter))


def solver_state(aggregator: nn.Module) -> dict[str, dict]:
    """The running state torchjd solvers keep in plain attributes, for checkpoints.

    E.g. GradVac's EMA of pairwise cosine targets, Nash-MTL's previous weights, normalisation
    and step counter. Hyperparameters (attributes behind a property of the same name) and
    solver objects (cvxpy problems) are left out; NumPy arrays are stored as tensors.
    """
    out: dict[str, dict] = {}
    for path, mod in aggregator.named_modules():
        cls = type(mod)
        for key, value in vars(mod).items():
            if key in _MODULE_ATTRS or isinstance(getattr(cls, key.lstrip("_"), None), property):
                continue
            if isinstance(value, np.ndarray):
                out[f"{path}:{key}"] = {"ndarray": torch.from_numpy(np.array(value))}
            elif _is_plain(value):
                out[f"{path}:{key}"] = {"value": value}
    return out


def load_solver_state(aggregator: nn.Module, state: dict[str, dict]) -> None:
    """Restores :func:`solver_state` into an aggregator of the same kind."""
    modules = dict(aggregator.named_modules())
    for name, entry in state.items():
        path, key = name.rsplit(":", 1)
        if path not in modules:
            continue
        value = entry["ndarray"].numpy().copy() if "ndarray" in entry else entry["value"]
        setattr(modules[path], key, value)
