"""Counting host–device synchronisations: the places where the CPU waits for the GPU.

A CUDA kernel launch returns at once; the host only waits when it needs a value the device has
not produced yet (``.item()``, ``float(t)``, ``bool(t)``, ``.tolist()``, ``.cpu()``), when an
operation's output shape depends on the data (``nonzero``, boolean-mask indexing,
``torch.bincount``, ``unique``) or when it copies host data to the device without
``non_blocking`` (``torch.tensor(v, device=cuda)``). Each such wait drains the queue of launched
kernels, so a training step with a few of them runs at the speed of its launches instead of its
kernels.

:class:`HostSyncCounter` counts them with a :class:`~torch.overrides.TorchFunctionMode` (the
Python methods that read a tensor on the host: ``tolist``, ``cpu``, ``numpy``, ``to("cpu")``,
``torch.tensor(..., device=...)``) and a :class:`~torch.utils._python_dispatch.TorchDispatchMode`
(the aten operators: ``_local_scalar_dense`` behind ``item``/``float``/``bool``, ``is_nonzero``,
``equal``, data-dependent shapes, copies between the host and a device). These operators dispatch
on the CPU as well, so the count a CPU run gives is the count a GPU run would have; it is what
``benchmarks/host_syncs.py`` reports and what ``tests/ops/test_host_syncs.py`` bounds.

On a CPU run every tensor counts as a device tensor except those a GPU run would keep on the
host as well: tensors made without a ``device`` (``torch.tensor(x)``, ``torch.zeros(n)``: the
optimisers' step counters, Lightning's host values), copies made with ``.cpu()`` / ``.to("cpu")``
and everything computed from host tensors only; reads of host tensors cost nothing. The data
pipeline (``torch.utils.data``, loader workers on a GPU run) and the optimisers' own host
bookkeeping (``torch.optim``) are not counted. A blocking ``x.to(device)`` of a host tensor is
counted on a GPU run only (``emulate=False``): on the CPU it cannot be told from Lightning's
batch transfer, which is ``non_blocking`` on a GPU.
"""

from __future__ import annotations

import os
import sys
import weakref
from collections import Counter
from collections.abc import Callable
from types import FrameType
from typing import Any

import lightning as L
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten

# aten operators that return a host value or whose output shape depends on the data
_READS = {
    aten._local_scalar_dense.default,  # item(), float(t), int(t), bool(t)
    aten.is_nonzero.default,
    aten.equal.default,
}
_DATA_SHAPED = {
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten.repeat_interleave.Tensor,
    aten.bincount.default,  # CUDA reads max(input) to size the output
}
# Python-level host reads (no aten operator on the CPU: counted before dispatch)
_METHODS = {
    torch.Tensor.tolist: "tolist",
    torch.Tensor.cpu: "cpu",
    torch.Tensor.numpy: "numpy",
    torch.Tensor.__array__: "numpy",
}
_OPTIM = "torch/optim/"  # asking code whose tensors stay on the host on a GPU (step counters)
_DATA = "torch/utils/data/"  # anywhere up the stack: the data pipeline (loader workers on a GPU run)
_THIS = __file__.replace("\\", "/")
_TORCH = os.path.dirname(torch.__file__).replace("\\", "/") + "/"


_FACTORIES = {
    torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.full, torch.empty, torch.eye,
    torch.arange, torch.linspace, torch.rand, torch.randn, torch.randint, torch.randperm,
}  # fmt: skip


def _names_host(device: Any) -> bool:
    """``device`` names the host explicitly (the string ``"cpu"``; a ``torch.device`` object is taken
    for the module's device, which is the CPU on a CPU run)."""
    return isinstance(device, str) and torch.device(device).type == "cpu"


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


class _FunctionCounter(TorchFunctionMode):
    def __init__(self, owner: HostSyncCounter) -> None:
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func: Callable, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        owner = self.owner
        if func in _FACTORIES:
            device = kwargs.get("device")
            data = args[0] if args else kwargs.get("data")
            if func in (torch.tensor, torch.as_tensor) and torch.is_tensor(data):
                return func(*args, **kwargs)  # a copy of a tensor: its operators are seen by dispatch
            if device is not None and not _names_host(device):
                if func in (torch.tensor, torch.as_tensor):  # host data copied to the device
                    owner._hit("tensor_to_device")
                return owner._quietly(func, args, kwargs)
            out = owner._quietly(func, args, kwargs)
            owner._mark_host(out)  # made without a device: a host tensor on a GPU run too
            return out
        name = _METHODS.get(func)
        src = args[0] if args else None
        to_host = False
        if func is torch.Tensor.to:
            device = kwargs.get("device")
            if device is None and len(args) > 1 and isinstance(args[1], (str, torch.device)):
                device = args[1]
            to_host = _names_host(device)
            if device is not None and not to_host and owner.emulate and owner.is_host(src):
                # host → device (counted on a GPU only: a CPU run cannot tell a blocking copy)
                out = owner._quietly(func, args, kwargs)
                if out.untyped_storage().data_ptr() == src.untyped_storage().data_ptr():
                    out = owner._quietly(torch.Tensor.clone, (out,), {})  # a new (device) storage
                return out
        if name is None and not to_host:
            return func(*args, **kwargs)
        if not owner.is_host(src):
            owner._hit(name or "to_cpu")
        if name in ("tolist", "numpy"):
            return owner._quietly(func, args, kwargs)
        out = owner._quietly(func, args, kwargs)
        if owner.emulate and out.untyped_storage().data_ptr() == src.untyped_storage().data_ptr():
            out = owner._quietly(torch.Tensor.clone, (out,), {})  # on the CPU: a new (host) storage
        owner._mark_host(out)
        return out


class _DispatchCounter(TorchDispatchMode):
    def __init__(self, owner: HostSyncCounter) -> None:
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        owner = self.owner
        inputs = _tensors((args, kwargs))
        on_device = [t for t in inputs if not owner.is_host(t)]
        if not owner._quiet and on_device:
            name = None
            if func in _READS or func in _DATA_SHAPED:
                name = func.overloadpacket.__name__
            elif func is aten.index.Tensor and any(
                i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1]
            ):
                name = "index_bool_mask"
            elif func is aten._to_copy.default and kwargs.get("device") is not None:
                if torch.device(kwargs["device"]).type == "cpu" and args[0].device.type != "cpu":
                    name = "copy_to_host"
            if name is not None:
                owner._hit(name)
        if not owner._quiet and not owner.emulate and func is aten._to_copy.default:
            target = kwargs.get("device")
            blocking = not kwargs.get("non_blocking", False)
            if blocking and target is not None and torch.device(target).type != "cpu" and args[0].is_cpu:
                owner._hit("copy_to_device")  # a GPU run: PyTorch waits for a blocking host-to-device copy
        out = func(*args, **kwargs)
        if owner.emulate and not owner._quiet and inputs and not on_device:  # from host tensors only
            for t in _tensors(out):
                owner._mark_host(t)
        return out


class HostSyncCounter:
    """Counts host–device synchronisations while active (module docstring)::

        with HostSyncCounter() as syncs:
            trainer.fit(module, loader)
        syncs.count, syncs.by_op, syncs.by_site

    On a CPU run (``emulate=True``, the default when the module's tensors are on the CPU) every
    tensor counts as a device tensor except the host tensors a GPU run would have as well: the
    ones made without a ``device`` (``torch.tensor(x)``, ``torch.zeros(n)``), copies made with
    ``.cpu()`` / ``.to("cpu")`` (new storages) and everything computed from host tensors only. With
    ``emulate=False`` (a GPU run) CPU tensors are the host tensors.

    Attributes:
        count: synchronisations counted so far.
        by_op: count per kind (``_local_scalar_dense``, ``tolist``, ``cpu``, ``bincount``, …).
        by_site: count per ``file:line`` of the code that asked (outside torch's own wrappers).
    """

    def __init__(self, *, emulate: bool = True) -> None:
        self.emulate = bool(emulate)
        self.count = 0
        self.by_op: Counter[str] = Counter()
        self.by_site: Counter[str] = Counter()
        self.paused = False
        self._quiet = 0
        self._host: dict[int, int] = {}  # storage address → live host tensors on it (emulation)
        self._modes: list[Any] = []

    def is_host(self, t: torch.Tensor) -> bool:
        """Whether ``t`` lives on the host (a read of it waits for nothing)."""
        if t.device.type != "cpu":
            return False
        if not self.emulate:
            return True
        ptr = t.untyped_storage().data_ptr()
        return ptr == 0 or ptr in self._host

    def _mark_host(self, t: Any) -> None:
        if not (self.emulate and isinstance(t, torch.Tensor) and t.device.type == "cpu"):
            return
        ptr = t.untyped_storage().data_ptr()
        if ptr == 0:
            return
        self._host[ptr] = self._host.get(ptr, 0) + 1
        weakref.finalize(t, self._unmark, ptr)

    def _unmark(self, ptr: int) -> None:
        n = self._host.get(ptr, 0) - 1
        if n > 0:
            self._host[ptr] = n
        else:
            self._host.pop(ptr, None)

    def _quietly(self, func: Callable, args: Any, kwargs: dict) -> Any:
        """``func`` without counting the operators it dispatches (the caller counted the call)."""
        self._quiet += 1
        try:
            return func(*args, **kwargs)
        finally:
            self._quiet -= 1

    def _site(self) -> str | None:
        """The asking code's ``file:line``, or ``None`` for host-resident work (module docstring)."""
        frame: FrameType | None = sys._getframe(1)
        site = None
        while frame is not None:
            path = frame.f_code.co_filename.replace("\\", "/")
            if _DATA in path:
                return None
            if site is None:  # the first frame outside torch and this file asks; torch/optim: host work
                if path.startswith(_TORCH) and _OPTIM in path:
                    return None
                if not path.startswith(_TORCH) and path != _THIS:
                    site = f"{path}:{frame.f_lineno}"
            frame = frame.f_back
        return site or "?"

    def _hit(self, name: str) -> None:
        if self.paused:
            return
        site = self._site()
        if site is None:
            return
        self.count += 1
        self.by_op[name] += 1
        self.by_site[site] += 1

    def __enter__(self) -> HostSyncCounter:
        self._modes = [_FunctionCounter(self), _DispatchCounter(self)]
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        self._modes = []


class SyncsPerStep(L.Callback):
    """Counts host syncs per training step of a ``trainer.fit`` (:class:`HostSyncCounter`).

    A step's count runs from one training batch's start to the next (so it includes the loop's
    bookkeeping, the progress bar and the loggers after the step); validation is left out.
    ``+callbacks.host_syncs._target_=mtl.host_syncs.SyncsPerStep`` adds it to a run.

    Args:
        warmup: first steps left out of :meth:`mean` (lazy optimiser state, first logs).

    Attributes:
        per_step: syncs of every step, in order.
        counter: the counter (``by_op`` / ``by_site`` over the steps after the warm-up).
    """

    def __init__(self, *, warmup: int = 2) -> None:
        super().__init__()
        self.warmup = int(warmup)
        self.counter = HostSyncCounter()
        self.per_step: list[int] = []
        self._mark: int | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.counter.emulate = pl_module.device.type == "cpu"  # a GPU run: CPU tensors are the host's
        self.counter.__enter__()

    def _close_step(self) -> None:
        if self._mark is not None:
            self.per_step.append(self.counter.count - self._mark)
            if len(self.per_step) == self.warmup:  # by_op / by_site: the measured steps only
                self.counter.by_op.clear()
                self.counter.by_site.clear()
        self._mark = self.counter.count

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._close_step()

    def on_validation_start(self, trainer, pl_module) -> None:
        self.counter.paused = True

    def on_validation_end(self, trainer, pl_module) -> None:
        self.counter.paused = False

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close_step()
        self.counter.__exit__(None, None, None)

    def mean(self) -> float:
        """Mean syncs per step after the warm-up."""
        steps = self.per_step[self.warmup :]
        if not steps:
            raise ValueError(f"no training step after the {self.warmup} warm-up steps was counted")
        return sum(steps) / len(steps)
