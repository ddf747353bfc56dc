"""Aggregators whose reference code computes something torchjd's do not: exact MGDA, CAGrad's rescale.

Both are torchjd :class:`~torchjd.aggregation.GramianWeightedAggregator` s (weights from the Gramian
``G = JJᵀ`` only), so every path of :mod:`mtl.strategies.aggregation` (buffered, ``rep_grad``,
``gramian_only``, F-MTL) takes them like torchjd's own.

- MGDA: Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018
  (code: isl-org/MultiObjectiveOptimization, ``multi_task/min_norm_solvers.py``). The update is the
  min-norm point of the convex hull of the task gradients. The reference reaches it with Frank–Wolfe
  iterations that stop on a tolerance; here the ``k × k`` problem is solved exactly (Wolfe's
  min-norm-point active-set algorithm: finite, exact up to float64 rounding), so the result does not
  depend on a stopping rule. ``normalization="l2"`` solves it on unit-norm gradients (the reference's
  optional ``l2`` gradient normalisation, also F-MTL's F-MGDA); ``scale_by_tasks`` multiplies the
  update by ``k`` (F-MTL's reference code does, "to match the sum loss").
- CAGrad: Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning", NeurIPS 2021
  (code: Cranial-XIX/CAGrad, ``nyuv2/utils.py``; LibMTL ``weighting/CAGrad.py``). torchjd's CAGrad
  returns ``g0 + λ g_w``; the reference divides it by ``1 + c²`` (``rescale=1``, its default), by
  ``1 + c`` (``rescale=2``) or not at all (``rescale=0``).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchjd.aggregation import CAGradWeighting, GramianWeightedAggregator, Weighting

_RESCALES = {0: "none", 1: "1 + c²", 2: "1 + c"}
_NORMALIZATIONS = ("none", "l2")


def _affine_minimiser(gram: Tensor, support: list[int]) -> Tensor:
    """Weights ``v`` (summing to 1) of the min-norm point of the affine hull of the ``support`` points.

    Solves the KKT system ``[G_SS 1; 1ᵀ 0] [v; μ] = [0; 1]`` (least squares if it is singular)."""
    s = len(support)
    idx = torch.tensor(support)
    kkt = torch.zeros(s + 1, s + 1, dtype=gram.dtype)
    kkt[:s, :s] = gram[idx][:, idx]
    kkt[:s, s] = 1.0
    kkt[s, :s] = 1.0
    rhs = torch.zeros(s + 1, dtype=gram.dtype)
    rhs[s] = 1.0
    try:
        sol = torch.linalg.solve(kkt, rhs)
    except RuntimeError:  # singular: affinely dependent points (only through rounding)
        sol = torch.linalg.lstsq(kkt, rhs.unsqueeze(1), driver="gelsd").solution.squeeze(1)
    return sol[:s]


def min_norm_weights(gram: Tensor, *, tol: float = 1e-12) -> Tensor:
    """The convex weights ``w`` minimising ``wᵀ G w`` (the min-norm point of the hull of the gradients).

    Wolfe's min-norm-point algorithm ("Finding the nearest point in a polytope", Math. Programming
    1976) on the Gramian, in float64 on the CPU (``k × k``: microseconds): a corral ``S`` of affinely
    independent gradients whose affine min-norm point lies inside their hull; a gradient ``i`` with
    ``(Gw)_i < wᵀGw`` enters it, a weight that reaches 0 on the way to a new affine minimiser leaves
    it. Optimal when ``min_i (Gw)_i ≥ wᵀGw`` (the KKT conditions of the problem on the simplex), up to
    ``tol`` relative to the largest squared gradient norm.

    Args:
        gram: the ``k × k`` Gramian ``G = JJᵀ``.
        tol: optimality and positivity tolerance, relative to ``max_i G_ii``.

    Returns:
        ``w`` (``k``, on ``gram``'s device and dtype), ``w ≥ 0``, ``Σ w = 1``.
    """
    k = gram.shape[0]
    g = gram.detach().to("cpu", torch.float64)
    top = float(g.diagonal().max()) if k else 0.0
    if not top > 0 or not bool(torch.isfinite(g).all()):  # every gradient 0 (or not finite): any w
        return torch.full((k,), 1.0 / max(k, 1), dtype=gram.dtype, device=gram.device)
    g = g / top
    w = torch.zeros(k, dtype=torch.float64)
    first = int(torch.argmin(g.diagonal()))
    w[first] = 1.0
    support = [first]
    for _ in range(50 * k + 50):  # finite in theory; the bound only guards against rounding loops
        gw = g @ w
        i = int(torch.argmin(gw))
        if float(gw[i]) >= float(w @ gw) - tol or i in support:
            break
        support.append(i)
        while True:  # minor cycle: move towards the affine minimiser of the corral, dropping zeros
            v = _affine_minimiser(g, support)
            ws = w[support]
            if bool((v > tol).all()):
                w.zero_()
                w[support] = v
                break
            out = v <= tol
            gap = ws[out] - v[out]
            theta = float(torch.where(gap > 0, ws[out] / gap.clamp_min(1e-300), 0.0).min())
            ws = ws + theta * (v - ws)
            keep = [j for j, x in zip(support, ws.tolist(), strict=True) if x > tol]
            w.zero_()
            w[keep] = ws[[support.index(j) for j in keep]]
            support = keep
        if i not in support:  # the entering gradient left at once: no descent left (rounding level)
            break
    w = w.clamp_min(0)
    return (w / w.sum()).to(gram.device, gram.dtype)


class MinNormWeighting(Weighting):
    """:class:`MGDA`'s weights from the Gramian (see :func:`min_norm_weights`)."""

    def __init__(self, normalization: str = "none", scale_by_tasks: bool = False) -> None:
        super().__init__()
        if normalization not in _NORMALIZATIONS:
            raise ValueError(
                f"MGDA normalization must be one of {list(_NORMALIZATIONS)} (the Gramian-only ones of the "
                f"reference's gradient normalisations), got {normalization!r}"
            )
        self.normalization, self.scale_by_tasks = normalization, bool(scale_by_tasks)

    def forward(self, gram: Tensor, /) -> Tensor:
        k = gram.shape[0]
        if self.normalization == "l2":  # unit-norm rows: Ĝ = D⁻¹ G D⁻¹, D = diag ‖g_i‖
            norms = gram.diagonal().clamp_min(0).sqrt().clamp_min(1e-30)
            weights = min_norm_weights(gram / torch.outer(norms, norms)) / norms
        else:
            weights = min_norm_weights(gram)
        return weights * k if self.scale_by_tasks else weights


class MGDA(GramianWeightedAggregator):
    """MGDA with the exact min-norm point of the convex hull of the task gradients.

    Args:
        normalization: ``"none"`` (the paper) or ``"l2"``: the min-norm problem is solved on the unit
            gradients ``g_i/‖g_i‖`` and the update is ``Σ_i w_i g_i/‖g_i‖``.
        scale_by_tasks: multiply the update by the number of tasks ``k`` (F-MTL's reference F-MGDA).
    """

    gramian_weighting: MinNormWeighting

    def __init__(self, normalization: str = "none", scale_by_tasks: bool = False) -> None:
        super().__init__(MinNormWeighting(normalization=normalization, scale_by_tasks=scale_by_tasks))

    def __repr__(self) -> str:
        w = self.gramian_weighting
        return f"MGDA(normalization={w.normalization!r}, scale_by_tasks={w.scale_by_tasks})"


class RescaledCAGradWeighting(Weighting):
    """torchjd's CAGrad weights divided by the reference's ``rescale`` divisor."""

    def __init__(self, c: float, rescale: int = 1, norm_eps: float = 1e-4) -> None:
        super().__init__()
        if rescale not in _RESCALES:
            raise ValueError(
                "CAGrad rescale must be 0 (none), 1 (divide by 1 + c²) or 2 (divide by 1 + c), "
                f"got {rescale!r}"
            )
        self.inner = CAGradWeighting(c=c, norm_eps=norm_eps)
        self.c, self.rescale = float(c), int(rescale)

    def divisor(self) -> float:
        """``1``, ``1 + c²`` or ``1 + c`` for ``rescale`` 0, 1, 2."""
        return {0: 1.0, 1: 1.0 + self.c**2, 2: 1.0 + self.c}[self.rescale]

    def forward(self, gram: Tensor, /) -> Tensor:
        return self.inner(gram) / self.divisor()


class CAGrad(GramianWeightedAggregator):
    """CAGrad (torchjd's solver) with the reference's ``rescale`` of the update.

    Args:
        c: radius of the ball around the mean gradient ``g0``, relative to ``‖g0‖``.
        rescale: ``1`` divides the update by ``1 + c²`` (the reference's default), ``2`` by ``1 + c``,
            ``0`` leaves it as ``g0 + λ g_w`` (torchjd's CAGrad).
        norm_eps: torchjd's threshold on the normalised ``‖g_w‖`` below which the update is 0.
    """

    gramian_weighting: RescaledCAGradWeighting

    def __init__(self, c: float, rescale: int = 1, norm_eps: float = 1e-4) -> None:
        super().__init__(RescaledCAGradWeighting(c=c, rescale=rescale, norm_eps=norm_eps))

    def __repr__(self) -> str:
        w = self.gramian_weighting
        return f"CAGrad(c={w.c}, rescale={w.rescale})"
