"""Optimiser parameter groups and learning-rate schedules (per step, with linear warm-up).

Poly decay ``(1 − t/T)^power`` is the schedule of the multi-task dense-prediction recipes
(ATRC, InvPT, TaskExpert); cosine with warm-up is MTLoRA's.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

SCHEDULES = ("poly", "cosine", "constant")


def _params(groups: Iterable[Any]) -> list[torch.Tensor]:
    out = []
    for g in groups:
        out.extend(g["params"] if isinstance(g, Mapping) else [g])
    return out


def fused_choice(
    optimizer: Callable[..., torch.optim.Optimizer], params: Iterable[Any], fused: bool | str
) -> bool | None:
    """The ``fused`` option :func:`build_optimizer` passes (``None``: none, PyTorch's default).

    ``auto``: ``True`` when ``optimizer`` has fused kernels and every parameter is a floating-point
    tensor on a CUDA device; ``True``: ``True``; ``False``: ``None``.

    Raises:
        ValueError: ``fused=True`` for an optimiser without a ``fused`` option.
    """
    has_fused = "fused" in inspect.signature(optimizer).parameters
    if fused is True:
        if not has_fused:
            raise ValueError(
                f"gpu.fused_optimizer=true but {optimizer.__qualname__} has no fused kernels "
                "(Adam, AdamW and SGD have them); use gpu.fused_optimizer=auto or false"
            )
        return True
    if fused == "auto" and has_fused:
        tensors = _params(params)
        if tensors and all(p.is_cuda and p.is_floating_point() for p in tensors):
            return True
    return None


def build_optimizer(
    params: Iterable[Any],
    *,
    optimizer: Callable[..., torch.optim.Optimizer],
    fused: bool | str = "auto",
    **kwargs,
) -> torch.optim.Optimizer:
    """``optimizer(params, **kwargs)`` with PyTorch's fused kernels where ``fused`` asks for them.

    Fused kernels do the same fp32 arithmetic as the default (foreach) ones in fewer launches;
    under fp16 they unscale the gradients inside ``step()``; :class:`~mtl.module.MTLModule` clips
    before ``step()``, on the gradients at the loss scale with the threshold times the scale, which
    works for fused and foreach optimisers alike.

    Args:
        params: parameters or parameter groups.
        optimizer: the optimiser class (``torch.optim.AdamW``, ``Adam``, ``SGD``, …).
        fused: ``auto``, ``True`` or ``False`` (:func:`fused_choice`; PyTorch also has CPU kernels
            for Adam, AdamW and SGD). A ``fused`` in ``kwargs`` (``optimizer.fused`` in the config) wins.
        **kwargs: the optimiser's options (``lr``, ``weight_decay``, …).
    """
    params = list(params)
    if "fused" not in kwargs:
        choice = fused_choice(optimizer, params, fused)
        if choice is not None:
            kwargs["fused"] = choice
    return optimizer(params, **kwargs)


def with_fused(factory: Callable[..., torch.optim.Optimizer], fused: bool | str) -> functools.partial:
    """The partial optimiser constructor ``factory`` (``functools.partial(torch.optim.AdamW, lr=…)``,
    as Hydra's ``_partial_: true`` builds it) going through :func:`build_optimizer`.

    The result keeps the options in ``.keywords`` (``weight_decay`` is read from there).

    Raises:
        TypeError: ``factory`` is not a partial of an optimiser class.
    """
    if not (isinstance(factory, functools.partial) and isinstance(factory.func, type) and not factory.args):
        raise TypeError(
            f"the optimizer config must build a partial optimiser class (_partial_: true), got {factory!r}"
        )
    return functools.partial(build_optimizer, optimizer=factory.func, fused=fused, **factory.keywords)


def param_groups(model: nn.Module, weight_decay: float, no_decay_1d: bool = True) -> list[dict]:
    """Splits parameters into decayed weights and non-decayed biases / norm parameters.

    Args:
        model: the module whose trainable parameters are grouped.
        weight_decay: decay of the first group.
        no_decay_1d: put 1-D parameters (biases, norms, position scalars) in a group without decay.
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if no_decay_1d and p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def lr_lambda(
    name: str,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    warmup_start: float = 1e-3,
    power: float = 0.9,
    min_ratio: float = 0.0,
) -> Callable[[int], float]:
    """Multiplier of the base learning rate at a given optimiser step.

    Args:
        name: ``poly``, ``cosine`` or ``constant``.
        total_steps: steps of the whole run (warm-up included).
        warmup_steps: linear warm-up steps from ``warmup_start`` × lr to lr.
        warmup_start: initial multiplier of the warm-up.
        power: exponent of the poly schedule.
        min_ratio: final multiplier of the decay.
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule '{name}'; valid: {list(SCHEDULES)}")
    total = max(int(total_steps), 1)
    warm = max(min(int(warmup_steps), total - 1), 0)

    def f(step: int) -> float:
        if step < warm:
            return warmup_start + (1.0 - warmup_start) * step / warm
        t = min((step - warm) / max(total - warm, 1), 1.0)
        if name == "poly":
            decay = (1.0 - t) ** power
        elif name == "cosine":
            decay = 0.5 * (1.0 + math.cos(math.pi * t))
        else:
            decay = 1.0
        return min_ratio + (1.0 - min_ratio) * decay

    return f


def build_scheduler(
    optimizer: torch.optim.Optimizer, *, total_steps: int, name: str = "poly", **kwargs
) -> LambdaLR:
    """A per-step ``LambdaLR`` following :func:`lr_lambda`."""
    return LambdaLR(optimizer, lr_lambda(name, total_steps=total_steps, **kwargs))


def stash_grads(params: Iterable[torch.nn.Parameter]) -> dict[torch.nn.Parameter, torch.Tensor]:
    """Takes the gradients accumulated so far out of ``.grad`` (a strategy then writes fresh ones).

    A gradient that is a view of a larger buffer (a strategy's flat gradient vector, a DDP bucket
    with ``gradient_as_bucket_view``) is copied: the next backward writes that buffer again.
    """
    stash = {}
    for p in params:
        if p.grad is not None:
            stash[p] = p.grad if p.grad._base is None else p.grad.clone()
            p.grad = None
    return stash


def restore_grads(stash: Mapping[torch.nn.Parameter, torch.Tensor]) -> None:
    """Adds the stashed gradients back: ``.grad`` then holds the sum over the micro-batches."""
    for p, g in stash.items():
        p.grad = g if p.grad is None else p.grad.add_(g)
