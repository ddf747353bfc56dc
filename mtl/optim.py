"""Optimiser parameter groups and learning-rate schedules (per step, with linear warm-up).

Poly decay ``(1 − t/T)^power`` is the schedule of the multi-task dense-prediction recipes
(ATRC, InvPT, TaskExpert); cosine with warm-up is MTLoRA's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

SCHEDULES = ("poly", "cosine", "constant")


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
    """Takes the gradients accumulated so far out of ``.grad`` (a strategy then writes fresh ones)."""
    stash = {}
    for p in params:
        if p.grad is not None:
            stash[p] = p.grad
            p.grad = None
    return stash


def restore_grads(stash: Mapping[torch.nn.Parameter, torch.Tensor]) -> None:
    """Adds the stashed gradients back: ``.grad`` then holds the sum over the micro-batches."""
    for p, g in stash.items():
        p.grad = g if p.grad is None else p.grad.add_(g)
