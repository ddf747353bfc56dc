"""The contract of a merging method and its parameter-by-parameter loop.

A method turns the shared weights of T fine-tuned models θ_1 … θ_T and their common
initialisation θ0 into one set of weights. Methods built on task vectors τ_t = θ_t − θ0
(Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023) implement
:meth:`MergeMethod.merge_tensor` for one parameter; :meth:`MergeMethod.merge` calls it key by
key over memory-mapped checkpoints, so what is resident at any time is the merged output, θ0
and the T copies of *one* parameter (never T full models). Methods that need statistics over
whole task vectors (TIES' global top-k threshold) compute them in :meth:`MergeMethod.prepare`,
one task vector at a time. Methods that learn from data (AdaMerging) override :meth:`merge`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

import torch


class MergeMethod(ABC):
    """Base class of the merging methods.

    Attributes:
        needs_base: the method reads θ0 (task-vector methods); plain averaging does not.
    """

    needs_base: bool = True

    def prepare(
        self,
        *,
        base: Mapping[str, torch.Tensor] | None,
        states: Sequence[Mapping[str, torch.Tensor]],
        keys: Sequence[str],
    ) -> None:
        """Statistics over whole task vectors, before the per-parameter loop (default: none)."""
        return None

    @abstractmethod
    def merge_tensor(
        self, key: str, base: torch.Tensor | None, thetas: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """The merged value of one parameter.

        Args:
            key: its state-dict key.
            base: θ0 of it (``None`` when :attr:`needs_base` is false).
            thetas: its fine-tuned values, one per model (read-only, possibly memory-mapped).
        """

    def merge(
        self,
        *,
        base: Mapping[str, torch.Tensor] | None,
        states: Sequence[Mapping[str, torch.Tensor]],
        keys: Sequence[str],
        context: Mapping[str, Any] | None = None,
        out: MutableMapping[str, torch.Tensor] | None = None,
    ) -> MutableMapping[str, torch.Tensor]:
        """Merged weights of ``keys``; ``states[t][key]`` is model t's value, ``base[key]`` θ0's.

        ``context`` carries what data-driven methods need (the merged module, the data, which
        tasks each state serves); the per-parameter methods ignore it. With ``out`` (e.g. the
        merged module's own state dict) each result is copied into ``out[key]`` as soon as it is
        computed, so no second full model is allocated for the output.
        """
        self.prepare(base=base, states=states, keys=keys)
        result: MutableMapping[str, torch.Tensor] = out if out is not None else {}
        for k in keys:
            thetas = [s[k] for s in states]
            b = base[k] if base is not None and self.needs_base else None
            merged = self.merge_tensor(k, b, thetas)
            if out is not None:
                out[k].copy_(merged)
            else:
                result[k] = merged.to(thetas[0].dtype)
        return result

    def describe(self) -> dict[str, Any]:
        """Name and hyper-parameters, stored in the merged checkpoint."""
        return {
            "method": type(self).__name__,
            **{k: v for k, v in vars(self).items() if not k.startswith("_")},
        }


def task_vector(base: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """τ = θ − θ0 in float32 (a new tensor; the checkpoint's stays untouched)."""
    return theta.float() - base.float()


def check_fraction(name: str, value: float, *, low_open: bool = False) -> float:
    """``value`` as a float in [0, 1] ((0, 1] with ``low_open``), else a ``ValueError`` naming ``name``."""
    v = float(value)
    if not (0.0 < v <= 1.0 if low_open else 0.0 <= v <= 1.0):
        interval = "(0, 1]" if low_open else "[0, 1]"
        raise ValueError(f"{name} must be in {interval}, got {value}")
    return v


def check_lam(lam: float, name: str = "method.lam (task-vector scaling λ)") -> float:
    """The task-vector scaling λ, which must be positive (``name`` is the key the error names)."""
    if not float(lam) > 0:
        raise ValueError(f"{name} must be > 0, got {lam}")
    return float(lam)
