"""A second device on a CPU-only machine, for tests that catch device mixing.

On a GPU, a tensor created without ``device=`` lives on the CPU and an operator that meets it
together with the data (on the GPU) raises, or silently copies. A CPU-only test machine has one
device, so that bug cannot show there. :class:`SecondDevice` makes ``meta`` play the GPU:

* inside the mode, a ``meta`` tensor put there with :meth:`SecondDevice.put` (or moved there with
  ``.to("meta")`` while the mode is active) carries a value: a CPU "shadow" tensor on which every
  operator really runs, so the numbers can be compared with a CPU run;
* an operator whose tensor arguments lie on both the CPU and ``meta`` raises
  :class:`DeviceMixError` — also for 0-dim CPU tensors, which CUDA accepts as scalars, because
  the project's rule is that tensors are created on the device of the data they meet;
* explicit transfers (``.to(device)``, ``.cpu()``, ``copy_`` between devices) are allowed and
  recorded in :attr:`SecondDevice.transfers` (``"meta->cpu"`` / ``"cpu->meta"``), and reading a
  value to the host (``.item()``, ``int(t)``, ``bool(t)``, ``float(t)``, ``torch.equal``) in
  :attr:`SecondDevice.reads`;
* ``meta`` tensors without a value (a module moved with ``module.to("meta")`` outside the mode)
  run on ``meta`` itself, as plain meta tensors do; an operator that meets valued and valueless
  ``meta`` tensors raises.

A test therefore fails on today's code when a metric, a loss or a decoder creates a tensor on the
CPU next to device data, e.g. ``torch.searchsorted(hist, torch.tensor(k))``.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

aten = torch.ops.aten
DEVICE = "meta"

_READS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default}


class DeviceMixError(AssertionError):
    """An operator met tensors on two devices."""


def _is_meta(x: object) -> bool:
    return isinstance(x, torch.Tensor) and x.device.type == DEVICE


class _HostData(TorchFunctionMode):
    """``torch.tensor(data, device="meta")`` keeps no value (meta tensors are never written):
    build it on the host and copy it, as CUDA does."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        to_device = kwargs.get("device") is not None and torch.device(kwargs["device"]).type == DEVICE
        if func in (torch.tensor, torch.as_tensor) and to_device:
            if not torch.is_tensor(args[0] if args else kwargs.get("data")):
                return func(*args, **{**kwargs, "device": "cpu"}).to(DEVICE)
        if func is torch.Tensor.new_tensor and _is_meta(args[0]) and not torch.is_tensor(args[1]):
            dtype = kwargs.get("dtype") or args[0].dtype
            return torch.tensor(args[1], dtype=dtype).to(DEVICE)
        return func(*args, **kwargs)


class SecondDevice(TorchDispatchMode):
    """``meta`` as a second device with values (module docstring)::

        with SecondDevice() as dev:
            pred, target = dev.put(pred), dev.put(target)
            metric = metric.to("meta")
            out = metric.compute()
            value = dev.get(out["mean"])

    Attributes:
        transfers: ``"<op>: meta->cpu"`` / ``"<op>: cpu->meta"`` for every explicit copy.
        reads: the operators that read a device value on the host.
        ops: count of the operators run on the device.
    """

    def __init__(self) -> None:
        super().__init__()
        # (storage, offset, shape, stride, dtype) → (the storage, kept alive so that its address is
        # not reused, and the value): aliases made without an operator (``nn.Parameter(t)``,
        # ``p.data = t``) share the storage, hence the value
        self._values: dict[tuple, tuple[torch.UntypedStorage, torch.Tensor]] = {}
        self.transfers: list[str] = []
        self.reads: list[str] = []
        self.ops: Counter[str] = Counter()

    def __enter__(self) -> SecondDevice:
        self._host_data = _HostData()
        self._host_data.__enter__()
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        self._host_data.__exit__(*exc)

    # ------------------------------------------------------------------ values in and out
    @staticmethod
    def _key(t: torch.Tensor) -> tuple:
        return (t.untyped_storage()._cdata, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)

    def has_value(self, t: torch.Tensor) -> bool:
        return _is_meta(t) and self._key(t) in self._values

    def _set(self, meta: torch.Tensor, value: torch.Tensor) -> None:
        self._values[self._key(meta)] = (meta.untyped_storage(), value)

    def _wrap(self, value: torch.Tensor) -> torch.Tensor:
        meta = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=DEVICE)
        self._set(meta, value)
        return meta

    def put(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` (a CPU tensor) on the second device, as a new leaf tensor."""
        if value.device.type != "cpu":
            raise ValueError(f"put takes a CPU tensor, got one on {value.device}")
        meta = self._wrap(value.detach().clone())
        return meta.requires_grad_(value.requires_grad)

    def get(self, meta: torch.Tensor) -> torch.Tensor:
        """The value of a device tensor (a CPU tensor; not recorded as a transfer)."""
        if not _is_meta(meta):
            raise DeviceMixError(f"expected a tensor on the device ({DEVICE}), got one on {meta.device}")
        if not self.has_value(meta):
            raise KeyError(f"this {DEVICE} tensor {tuple(meta.shape)} carries no value")
        return self._values[self._key(meta)][1].detach()

    def _value(self, func, x: object) -> object:
        if not _is_meta(x):
            return x
        try:
            return self._values[self._key(x)][1]
        except KeyError:
            raise DeviceMixError(
                f"{func}: a {DEVICE} tensor {tuple(x.shape)} without a value met one with a value "
                "(a tensor moved to the device outside the mode)"
            ) from None

    # ------------------------------------------------------------------ dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        tensors = [x for x in flat if isinstance(x, torch.Tensor)]
        devices = {t.device.type for t in tensors}
        dst = kwargs.get("device")
        to_device = dst is not None and torch.device(dst).type == DEVICE
        if func is aten._to_copy.default:
            return self._to_copy(func, args, kwargs)
        if func is aten.copy_.default and devices == {"cpu", DEVICE}:
            return self._copy(func, args, kwargs)
        if DEVICE not in devices and not to_device:
            return func(*args, **kwargs)  # host work
        if devices - {DEVICE}:
            where = ", ".join(f"{tuple(t.shape)}@{t.device.type}" for t in tensors)
            raise DeviceMixError(f"{func} got tensors on two devices: {where}")
        metas = [t for t in tensors if _is_meta(t)]
        valued = [self.has_value(t) for t in metas]
        if metas and not any(valued):
            return func(*args, **kwargs)  # plain meta tensors: shapes only
        self.ops[str(func.overloadpacket.__name__)] += 1
        if func in _READS:
            self.reads.append(str(func))
        return self._run(func, args, kwargs, dst_device=to_device)

    def _run(self, func, args, kwargs, *, dst_device: bool):
        cpu_args, cpu_kwargs = tree_map(lambda x: self._value(func, x), (args, kwargs))
        if dst_device:
            cpu_kwargs = {**cpu_kwargs, "device": torch.device("cpu")}
        out = func(*cpu_args, **cpu_kwargs)
        inputs = {id(self._value(func, t)): t for t in tree_flatten((args, kwargs))[0] if _is_meta(t)}
        if func.is_view:  # a real meta view of the meta input, so that autograd sees a view
            meta_out = func(*args, **kwargs)
            flat_meta, _ = tree_flatten(meta_out)
            flat_cpu, _ = tree_flatten(out)
            for m, c in zip(flat_meta, flat_cpu, strict=True):
                if isinstance(m, torch.Tensor):
                    self._set(m, c)
            return meta_out
        flat_out, spec = tree_flatten(out)
        mapped = [
            (inputs[id(o)] if id(o) in inputs else self._wrap(o)) if isinstance(o, torch.Tensor) else o
            for o in flat_out
        ]
        return tree_unflatten(mapped, spec)

    def _to_copy(self, func, args, kwargs):
        (src,) = args
        dst = torch.device(kwargs["device"]) if kwargs.get("device") is not None else src.device
        if src.device.type == "cpu" and dst.type == "cpu":
            return func(*args, **kwargs)
        cpu_kwargs = {**kwargs, "device": torch.device("cpu")}
        if src.device.type == DEVICE and dst.type == DEVICE:
            if not self.has_value(src):
                return func(*args, **kwargs)
            return self._wrap(func(self._value(func, src), **cpu_kwargs))
        if src.device.type == DEVICE:  # device → host
            self.transfers.append(f"{func}: {DEVICE}->cpu")
            return func(self._value(func, src), **cpu_kwargs)
        self.transfers.append(f"{func}: cpu->{DEVICE}")  # host → device
        return self._wrap(func(src, **cpu_kwargs))

    def _copy(self, func, args, kwargs):
        dst, src = args[0], args[1]
        direction = f"cpu->{DEVICE}" if _is_meta(dst) else f"{DEVICE}->cpu"
        self.transfers.append(f"{func}: {direction}")
        self._value(func, dst).copy_(self._value(func, src))
        return dst
