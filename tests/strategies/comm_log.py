"""Records the collectives and backward passes of a step (``torch.distributed`` and ``torch.autograd.grad``
wrapped), for the DDP communication tests and ``benchmarks/ddp_comm.py``."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

#: bytes each rank sends per byte of the collective's buffer in a ring of R ranks (the buffer is the
#: input of a reduce-scatter, the output of an all-gather); a broadcast is counted as its size
RING = {
    "all_reduce": lambda r: 2 * (r - 1) / r,
    "reduce_scatter": lambda r: (r - 1) / r,
    "all_gather": lambda r: (r - 1) / r,
    "broadcast": lambda r: 1.0,
}
#: torch.distributed functions wrapped → the collective they are (both names where torch renamed one)
WRAPPED = {
    "all_reduce": "all_reduce",
    "broadcast": "broadcast",
    "reduce_scatter_single": "reduce_scatter",
    "reduce_scatter_tensor": "reduce_scatter",
    "all_gather_single": "all_gather",
    "all_gather_into_tensor": "all_gather",
}


@dataclass
class CommLog:
    """Records collectives and backward passes (``torch.autograd.grad``) in call order.

    Events: ``("grad",)``, ``(collective, buffer bytes, async_op)`` with ``collective`` one of
    :data:`RING`'s keys; :meth:`step` marks a step boundary.
    """

    events: list[tuple] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)

    def __enter__(self) -> CommLog:
        self._saved = {name: vars(dist)[name] for name in WRAPPED if name in vars(dist)}
        self._grad = torch.autograd.grad

        def wrap(name: str, fn):
            kind = WRAPPED[name]

            def collective(*args, async_op=False, **kwargs):
                # the buffer: the tensor argument (the input of a reduce-scatter, the output of a gather)
                t = args[1] if kind == "reduce_scatter" else args[0]
                self.events.append((kind, t.numel() * t.element_size(), bool(async_op)))
                return fn(*args, async_op=async_op, **kwargs)

            return collective

        def grad(*args, **kwargs):
            self.events.append(("grad",))
            return self._grad(*args, **kwargs)

        for name, fn in self._saved.items():
            setattr(dist, name, wrap(name, fn))
        torch.autograd.grad = grad
        return self

    def __exit__(self, *exc) -> None:
        for name, fn in self._saved.items():
            setattr(dist, name, fn)
        torch.autograd.grad = self._grad

    def step(self) -> None:
        """Marks the end of a step."""
        self.steps.append(len(self.events))

    def step_events(self, i: int = -1) -> list[tuple]:
        """The events of step ``i``."""
        bounds = [0, *self.steps]
        i = i % len(self.steps)
        return self.events[bounds[i] : bounds[i + 1]]

    def summary(self, i: int = -1, ranks: int = 2) -> dict[str, float]:
        """Step ``i``'s counts: collectives, async ones, bytes sent per rank (ring model, :data:`RING`),
        of them the ones overlapped (async and followed by a backward pass of the same step),
        broadcasts, backward passes."""
        ev = self.step_events(i)
        grads = [j for j, e in enumerate(ev) if e[0] == "grad"]
        last_grad = grads[-1] if grads else -1
        colls = [(j, e) for j, e in enumerate(ev) if e[0] != "grad"]
        sent = [(j, e, e[1] * RING[e[0]](ranks)) for j, e in colls]
        return {
            "collectives": len(colls),
            "async": sum(e[2] for _, e in colls),
            "sent": sum(b for _, _, b in sent),
            "overlapped": sum(b for j, e, b in sent if e[2] and j < last_grad),
            "kinds": sorted({e[0] for _, e in colls}),
            "passes": len(grads),
        }
