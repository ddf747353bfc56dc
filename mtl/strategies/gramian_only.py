"""Gramian-only aggregation at parameter level: one gradient in memory instead of ``k``.

Every Gramian-based aggregator (UPGrad, MGDA, CAGrad, IMTL-G, Nash-MTL, Aligned-MTL, DualProj,
PCGrad, GradVac, FairGrad, ConFIG through the Gramian root; see :mod:`mtl.strategies.aggregation`)
decides from ``G = JJᵀ`` alone, and its update ``Σ_i w_i g_i`` is the gradient of ``Σ_i w_i L_i``.
So the ``k × n`` Jacobian buffer is not needed: by polarisation,

    G_ii = ‖g_i‖²,   G_ij = (‖g_i + g_j‖² − ‖g_i‖² − ‖g_j‖²) / 2,

where ``g_i + g_j`` is the gradient of ``L_i + L_j``. One step costs ``k(k+1)/2`` backward passes
for the Gramian plus one for the update (``k = 4``: 11 instead of 4) and holds one ``n``-vector
scratch row instead of ``k`` rows: it trades compute for memory, for backbones whose ``k × n``
buffer does not fit. Under DDP every gradient is averaged over the ranks before its norm is
taken, so ``G`` is the union's Gramian exactly, as with the buffer (``tests/strategies``); these
all-reduces stay synchronous (one in flight would need a second scratch row), so this mode moves
``k(k+1)/2`` rows of ``n`` across the ranks per step, against ``k`` (overlapped) for the buffer.

The numerics: polarisation subtracts squared norms, so an entry loses about
``ε · (‖g_i‖² + ‖g_j‖²)`` (float32 ``ε`` ≈ 1e-7) of absolute precision, negligible beside the
weights' sensitivity in practice; norms are accumulated in float64.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from mtl.strategies.grads import GradientTargets, TaskJacobian, all_reduce_mean_, task_grads, world_size

_CHUNK = 1 << 20  # elements cast to float64 at a time


def _sq_norm(grads: Sequence[torch.Tensor], scratch: TaskJacobian) -> torch.Tensor:
    """‖g‖² of the union's gradient (rank mean) in float64, without a float64 copy of ``g``."""
    if world_size() > 1:  # one all-reduce of a flat copy
        scratch.write(0, grads)
        row = all_reduce_mean_(scratch.buf[0])
        grads = [row]
    total = torch.zeros((), dtype=torch.float64, device=grads[0].device)
    for g in grads:
        for chunk in g.reshape(-1).split(_CHUNK):
            c = chunk.double()
            total += torch.dot(c, c)
    return total


def polarised_gramian(
    targets: GradientTargets, objectives: Mapping[str, torch.Tensor], scale: float, scratch: TaskJacobian
) -> torch.Tensor:
    """The union's ``k × k`` Gramian of the shared parameters' task gradients (float64).

    Also adds each task's gradient of its own task-specific parameters to their ``.grad``
    (at the loss scale), as the buffered path does.

    Args:
        targets: the shared and task-specific parameters and their flat ``.grad``.
        objectives: task → the scalar whose gradient is the task's row (in task order).
        scale: the fp16 loss scale (the gradients are taken of ``objective · scale``).
        scratch: a one-row buffer, used under DDP for the row that crosses ranks.
    """
    names = list(objectives)
    shared = targets.shared
    ns = len(shared)
    if world_size() > 1:
        scratch.ensure(shared)  # the flat row that crosses ranks
    objs = [objectives[t] for t in names]
    k = len(names)
    gram = torch.zeros(k, k, dtype=torch.float64, device=shared[0].device)
    for i, t in enumerate(names):
        own = targets.task[t]
        grads = task_grads(objs[i] * scale, shared + own)
        gram[i, i] = _sq_norm(grads[:ns], scratch) / scale**2
        if len(grads) > ns:
            torch._foreach_add_([p.grad for p in own], list(grads[ns:]))
    for i in range(k):
        for j in range(i + 1, k):
            both = _sq_norm(task_grads((objs[i] + objs[j]) * scale, shared), scratch) / scale**2
            gram[i, j] = gram[j, i] = (both - gram[i, i] - gram[j, j]) / 2
    return gram


def weighted_direction(
    targets: GradientTargets, objectives: Mapping[str, torch.Tensor], weights: torch.Tensor, scale: float
) -> None:
    """Writes ``∇_shared Σ_i w_i L_i`` (at the loss scale) into the shared parameters' ``.grad``.

    ``objectives`` maps every task, in the order of ``weights``, to its objective ``L_i``.
    """
    total = sum(  # device scalars: no host sync
        w * objective for objective, w in zip(objectives.values(), weights.unbind(0), strict=True)
    )
    grads = task_grads(total * scale, targets.shared)
    torch._foreach_copy_(targets.flat.views[: len(targets.shared)], list(grads))
