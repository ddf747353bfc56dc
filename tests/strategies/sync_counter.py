"""Counts the host syncs a step would cost on a GPU, on the CPU (a ``TorchDispatchMode``).

On a CPU every tensor is on the host, so a plain counter cannot tell a read of a ``k``-vector
already copied to the host from a read that would wait on a GPU. This counter emulates the two
sides:

- *device* tensors: the ones the step starts from (the model's parameters, the batch, the
  strategy's buffers) and every tensor computed from one, or created with an explicit
  ``device=`` that is a device tensor's (storages are tracked, so views and in-place writes
  follow);
- *host* tensors: copies made with ``.cpu()`` or ``.to("cpu")``, tensors made without a device
  (``torch.tensor``, NumPy) and everything computed from host tensors only. While the counter is active a host
  tensor's ``.device`` reads ``meta`` (and factories called without a device make host
  tensors), so ``torch.full(..., device=host.device)`` or
  ``x.to(host.device)`` stay on the host, as they would on a GPU.

It counts, as on CUDA: reads of a device tensor's values (``aten._local_scalar_dense``: ``item``,
``float``, ``bool``, ``int``; ``Tensor.tolist``; ``Tensor.numpy``; ``Tensor.cpu``; a copy to a host
tensor's device) and host-to-device copies without ``non_blocking=True`` (PyTorch synchronises the
stream after a blocking copy from pageable memory).

    with HostSyncs(model.parameters(), batch.values()) as syncs:
        strategy.backward(...)
    syncs.count, syncs.where  # the number, and the Python line that caused each
"""

from __future__ import annotations

import traceback
from collections.abc import Iterable

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

_READS = {torch.ops.aten._local_scalar_dense.default}
_TO_COPY = torch.ops.aten._to_copy.default
_HOST = torch.device("meta")  # what a host tensor's .device reads while counting
_CPU = torch.device("cpu")


_FACTORIES = {
    torch.zeros, torch.ones, torch.full, torch.empty, torch.eye, torch.arange, torch.linspace,
    torch.rand, torch.randn, torch.randint, torch.randperm,
}  # fmt: skip


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class _HostDefault(TorchFunctionMode):
    """Factories called without ``device=`` make host tensors (the dispatcher fills in ``cpu``)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _FACTORIES and kwargs.get("device") is None:
            kwargs = dict(kwargs, device=_HOST)
        return func(*args, **kwargs)


class HostSyncs(TorchDispatchMode):
    """Counts the host syncs of the code run inside it (see the module docstring).

    Args:
        *seeds: iterables of the tensors that live on the device when the step starts.
    """

    def __init__(self, *seeds: Iterable[torch.Tensor]) -> None:
        super().__init__()
        self.device: set[int] = set()
        self._alive: list[torch.Tensor] = []  # device tensors are kept alive: no address is reused
        for group in seeds:
            for t in group:
                if isinstance(t, torch.Tensor):
                    self._mark(t)
        self.count = 0
        self.where: list[str] = []
        self._saved: dict[str, object] = {}
        self._reading = False

    def _mark(self, t: torch.Tensor) -> None:
        if t.numel() > 0 and _key(t) not in self.device:
            self.device.add(_key(t))
            self._alive.append(t.detach())

    def is_device(self, t: torch.Tensor) -> bool:
        """Whether ``t`` lives on the (emulated) device."""
        return t.numel() > 0 and _key(t) in self.device

    def _sync(self, what: str) -> None:
        self.count += 1
        frames = [
            f
            for f in traceback.extract_stack()[:-2]
            if "sync_counter" not in f.filename and "site-packages/torch/" not in f.filename
        ]
        mine = [f for f in frames if "/mtl/" in f.filename or "torchjd" in f.filename]
        f = (mine or frames)[-1]
        self.where.append(f"{what} at {f.filename.rsplit('/', 2)[-1]}:{f.lineno}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        tensors_in = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        from_device = any(self.is_device(a) for a in tensors_in)
        target = kwargs.get("device")
        to_host = target == _HOST
        if to_host:
            kwargs["device"] = _CPU
        if func in _READS and from_device:
            self._sync(func.overloadpacket.__name__)
        if func is _TO_COPY and to_host and from_device:
            self._sync("copy to the host")
        if func is _TO_COPY and target == _CPU and not from_device and not kwargs.get("non_blocking", False):
            self._sync("blocking copy to the device")
        out = func(*args, **kwargs)
        outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        if to_host:
            for o in outs:
                self.device.discard(_key(o))
        elif from_device or target == _CPU:
            for o in outs:
                self._mark(o)
            if func._schema.is_mutable:  # in-place / out= ops: the written argument now holds device data
                for a, arg in zip(args, func._schema.arguments, strict=False):
                    if arg.alias_info is None or not arg.alias_info.is_write:
                        continue
                    for x in a if isinstance(a, (list, tuple)) else [a]:
                        if isinstance(x, torch.Tensor):
                            self._mark(x)
        return out

    # ----------------------------------------------------- reads that do not dispatch on the CPU
    def __enter__(self):
        counter = self
        names = ("tolist", "numpy", "cpu", "to", "device")
        self._saved = {k: vars(torch.Tensor).get(k) for k in names}  # None: inherited, deleted on exit
        saved = {k: getattr(torch.Tensor, k) for k in names[:4]}

        def reader(name: str):
            def read(t, *a, **k):
                if counter._reading:  # the same call coming back through the torch-function mode
                    return saved[name](t, *a, **k)
                if counter.is_device(t):
                    counter._sync(name)
                counter._reading = True
                try:
                    return saved[name](t, *a, **k)
                finally:
                    counter._reading = False

            return read

        _tolist, _numpy = reader("tolist"), reader("numpy")

        def _cpu(t, *a, **k):
            if not counter.is_device(t):
                return t
            counter._sync("cpu")
            with _disable_current_modes():
                out = t.clone()  # a host copy: a new, unmarked storage
            counter.device.discard(_key(out))
            return out

        def _to(t, *a, **k):  # the string "cpu" names the host (a device's .device is torch.device("cpu"))
            a = tuple(_HOST if isinstance(x, str) and x == "cpu" else x for x in a)
            if isinstance(k.get("device"), str) and k["device"] == "cpu":
                k["device"] = _HOST
            target = k.get("device", next((x for x in a if isinstance(x, torch.device)), None))
            if target == _CPU and not counter.is_device(t):
                k["copy"] = True  # a host-to-device copy: make it dispatch (on the CPU it would not)
            return saved["to"](t, *a, **k)

        def _device(t):
            return torch._C.TensorBase.device.__get__(t) if counter.is_device(t) else _HOST

        for name, fn in (("tolist", _tolist), ("numpy", _numpy), ("cpu", _cpu), ("to", _to)):
            setattr(torch.Tensor, name, fn)
        torch.Tensor.device = property(_device)
        self._factories = _HostDefault()
        self._factories.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        self._factories.__exit__(*exc)
        for k, v in self._saved.items():
            if v is None:
                delattr(torch.Tensor, k)
            else:
                setattr(torch.Tensor, k, v)
        return super().__exit__(*exc)
