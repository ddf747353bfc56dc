"""Gradient plumbing shared by the strategies: flat device buffers, DDP averaging, BN freezing.

No Lightning here: distributed reductions go through ``torch.distributed`` directly, so the
strategies decide when (and what) to synchronise instead of relying on DDP's reducer, which
only averages the first backward pass after a forward.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


def world_size() -> int:
    """Number of DDP ranks (1 when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def all_reduce_mean_(t: torch.Tensor) -> torch.Tensor:
    """Averages ``t`` over the ranks in place (no-op in a single process)."""
    n = world_size()
    if n > 1:
        dist.all_reduce(t)
        t.div_(n)
    return t


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """Sums ``t`` over the ranks in place (no-op in a single process)."""
    if world_size() > 1:
        dist.all_reduce(t)
    return t


def _reduce_scatter(out: torch.Tensor, t: torch.Tensor, *, async_op: bool):
    # reduce_scatter_single replaces reduce_scatter_tensor in recent torch (the older name warns)
    fn = dist.reduce_scatter_single if "reduce_scatter_single" in vars(dist) else dist.reduce_scatter_tensor
    return fn(out, t, async_op=async_op)


def all_gather_(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Concatenates every rank's ``t`` (same size, rank order) into ``out`` (``R × t.numel()`` elements)."""
    if world_size() == 1:
        return out.copy_(t)
    fn = dist.all_gather_single if "all_gather_single" in vars(dist) else dist.all_gather_into_tensor
    fn(out, t)
    return out


class PendingMeans:
    """Rank means of tensors launched as soon as each is final and awaited together.

    :meth:`launch` starts an asynchronous sum all-reduce (``async_op=True``) of one tensor in place
    (e.g. one task's row of the Jacobian, right after that task's backward pass), so the
    communication runs while the next task's backward pass computes; :meth:`scatter` starts an
    asynchronous reduce-scatter instead (this rank receives the sum of one block of columns only);
    :meth:`wait` waits for all of them and divides by the number of ranks: the same arithmetic as
    :func:`all_reduce_mean_`. Each tensor is one collective (a flat row is already one bucket: the
    per-parameter gradients were copied into it). No-op in a single process.
    """

    def __init__(self) -> None:
        self._pending: list[tuple[dist.Work, torch.Tensor]] = []

    def launch(self, t: torch.Tensor) -> None:
        """Starts averaging ``t`` (contiguous) over the ranks; do not write ``t`` until :meth:`wait`."""
        if world_size() > 1 and t.numel() > 0:
            self._pending.append((dist.all_reduce(t, async_op=True), t))

    def scatter(self, out: torch.Tensor, t: torch.Tensor) -> None:
        """Starts averaging this rank's block of ``t`` (``R`` equal blocks, rank order) into ``out``;
        do not touch either until :meth:`wait`."""
        if world_size() == 1:
            out.copy_(t)
            return
        self._pending.append((_reduce_scatter(out, t, async_op=True), out))

    def wait(self) -> None:
        """Waits for every launched collective and turns the sums into means."""
        n = world_size()
        for work, t in self._pending:
            work.wait()
            t.div_(n)
        self._pending.clear()


def to_host(t: torch.Tensor) -> torch.Tensor:
    """A float64 host copy of a small tensor (the ``k × k`` Gramian): one device-to-host copy, the
    one place a step waits on the device; everything read from it afterwards is free."""
    return t.detach().double().cpu()


def to_device(t: torch.Tensor, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A small host result (task weights) on ``like``'s device, in ``dtype`` (default: ``like``'s),
    without a host sync: a blocking copy from pageable memory waits for the stream, so on CUDA the
    copy goes through pinned memory with ``non_blocking=True``."""
    t = t.detach().to(dtype or like.dtype)
    if t.device == like.device:
        return t
    if like.is_cuda and t.device.type == "cpu":
        t = t.pin_memory()
    return t.to(like.device, non_blocking=True, copy=True)


def broadcast_(t: torch.Tensor) -> torch.Tensor:
    """Makes every rank hold rank 0's ``t`` (one synchronised result for solvers with randomness)."""
    if world_size() > 1:
        dist.broadcast(t, src=0)
    return t


def trainable(params: Iterator[nn.Parameter] | Sequence[nn.Parameter]) -> list[nn.Parameter]:
    """The parameters that require gradients, without duplicates, in order."""
    seen: set[int] = set()
    out = []
    for p in params:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


class FlatGrad:
    """One preallocated flat device vector backing the ``.grad`` of a list of parameters.

    ``attach()`` points every parameter's ``.grad`` at its slice (the optimiser's
    ``zero_grad(set_to_none=True)`` detaches them again), so a combined update can be written
    with one ``torch.mv(..., out=flat)`` and synchronised with one all-reduce.
    """

    def __init__(self, params: Sequence[nn.Parameter]) -> None:
        self.params = list(params)
        self.sizes = [p.numel() for p in self.params]
        self.numel = sum(self.sizes)
        self.flat: torch.Tensor | None = None
        self.views: list[torch.Tensor] = []

    def attach(self) -> torch.Tensor:
        """Allocates the vector once (lazily, on the parameters' device), zeroes it, sets ``.grad``."""
        if self.flat is None or self.flat.device != self.params[0].device:
            p0 = self.params[0]
            self.flat = torch.zeros(self.numel, device=p0.device, dtype=p0.dtype)
            self.views = [v.view_as(p) for v, p in zip(self.flat.split(self.sizes), self.params, strict=True)]
        else:
            self.flat.zero_()
        for p, v in zip(self.params, self.views, strict=True):
            p.grad = v
        return self.flat


@dataclass
class GradientTargets:
    """What per-task-gradient strategies differentiate, collected once (after device moves / wrapping).

    Attributes:
        shared: the trainable parameters whose per-task gradients are combined (the shared
            parameters, or at representation level the parameters below the representation).
        task: task → its trainable task-specific parameters (they get their own task's gradient).
        flat: the flat ``.grad`` buffer of ``shared`` followed by every task's parameters.
    """

    shared: list[nn.Parameter]
    task: dict[str, list[nn.Parameter]]
    flat: FlatGrad

    @property
    def n_shared(self) -> int:
        """Number of elements of the shared parameters (the head of :attr:`flat`)."""
        return sum(self.flat.sizes[: len(self.shared)])

    def head(self, task: str) -> torch.Tensor:
        """Task ``task``'s own parameters' slice of the flat ``.grad`` (contiguous; empty if it has none).

        The flat vector holds the shared parameters, then every task's in :attr:`task`'s order.
        """
        start = self.n_shared
        for t, params in self.task.items():
            n = sum(p.numel() for p in params)
            if t == task:
                return self.flat.flat[start : start + n]
            start += n
        raise KeyError(f"no task {task!r} among the gradient targets' tasks {list(self.task)}")


class TaskJacobian:
    """A preallocated ``k × n`` device buffer: row ``i`` = task ``i``'s flattened gradient.

    Rows are written with ``torch._foreach_copy_`` straight from autograd's outputs into
    per-parameter views of the row: no concatenation temporaries, no CPU copies. The buffer
    is reallocated only when ``n`` (or the padding) changes (e.g. a representation of another
    batch size). With ``pad_to = R`` the rows are zero-padded to a multiple of ``R`` columns, so
    that they split into ``R`` equal blocks (one per rank, for a reduce-scatter).
    """

    def __init__(self, k: int) -> None:
        self.k = k
        self.buf: torch.Tensor | None = None
        self.row_views: list[list[torch.Tensor]] = []
        self.shapes: list[torch.Size] = []
        self.n = 0

    def ensure(self, like: Sequence[torch.Tensor], pad_to: int = 1) -> torch.Tensor:
        """The buffer for rows shaped like ``like``: ``k × n``, zero-padded to a multiple of ``pad_to``."""
        shapes = [t.shape for t in like]
        n = sum(t.numel() for t in like)
        width = -(-n // pad_to) * pad_to
        t0 = like[0]
        # float32 rows for half-precision gradients, the gradients' own dtype above (float64)
        dtype = torch.promote_types(t0.dtype, torch.float32)
        if (
            self.buf is None
            or self.shapes != shapes
            or self.buf.device != t0.device
            or self.buf.dtype != dtype
            or self.buf.shape[1] != width
        ):
            self.buf = torch.empty(self.k, width, device=t0.device, dtype=dtype)
            self.buf[:, n:].zero_()
            self.shapes, self.n = shapes, n
            sizes = [t.numel() for t in like]
            self.row_views = [
                [v.view(s) for v, s in zip(self.buf[i, :n].split(sizes), shapes, strict=True)]
                for i in range(self.k)
            ]
        return self.buf

    def write(self, i: int, grads: Sequence[torch.Tensor]) -> None:
        torch._foreach_copy_(self.row_views[i], list(grads))


def task_grads(
    loss: torch.Tensor, inputs: Sequence[torch.Tensor], *, retain_graph: bool = True
) -> tuple[torch.Tensor, ...]:
    """``∂loss/∂inputs`` without touching ``.grad`` (so no DDP hook fires); zeros for unused inputs."""
    return torch.autograd.grad(
        loss, list(inputs), retain_graph=retain_graph, allow_unused=True, materialize_grads=True
    )


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module) -> Iterator[None]:
    """Extra forward passes (SAM's perturbed point, FAMO's look-ahead) leave BN running stats alone.

    Sets ``momentum = 0`` on every batch-norm layer (running ← running), restoring it afterwards;
    the layers still normalise with the batch statistics, as in the first pass.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [
        (m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
        for m in bns
    ]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (mom, nbt) in zip(bns, saved, strict=True):
            m.momentum = mom
            if nbt is not None:
                m.num_batches_tracked.copy_(nbt)


def gramian_stats(
    gram: torch.Tensor, names: Sequence[str], weights: torch.Tensor | None
) -> dict[str, float | torch.Tensor]:
    """Diagnostics from the Gramian ``G = J Jᵀ``: norms, pairwise cosines, conflicting pairs, weights.

    Pass the host copy of the Gramian (:func:`to_host`) to read it without a sync; the weights are
    returned as the (device) tensor's elements.

    Keys are relative to ``train/``: ``grad/<t>/norm``, ``grad/cos/<a>-<b>``, ``grad/conflicts``,
    ``grad/<t>/weight``.
    """
    g = to_host(gram)  # free when ``gram`` is already the host copy
    norms = g.diagonal().clamp_min(0).sqrt()
    out = {f"grad/{t}/norm": float(norms[i]) for i, t in enumerate(names)}
    conflicts = 0
    for i, j in itertools.combinations(range(len(names)), 2):
        cos = float(g[i, j] / (norms[i] * norms[j]).clamp_min(1e-30))
        out[f"grad/cos/{names[i]}-{names[j]}"] = cos
        conflicts += cos < 0
    out["grad/conflicts"] = float(conflicts)
    if weights is not None:  # device scalars: logged without a host sync
        out.update({f"grad/{t}/weight": w for t, w in zip(names, weights.detach().unbind(0), strict=True)})
    return out
