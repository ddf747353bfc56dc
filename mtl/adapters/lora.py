"""Low-rank adaptation of Linear layers, injectable by name into any timm backbone.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022; the
task-agnostic modules of Agiza et al., "MTLoRA: Low-Rank Adaptation Approach for Efficient
Multi-Task Learning", CVPR 2024: ``y = W x + s · B A x`` with ``A`` kaiming-uniform, ``B`` zero
(so an adapted model starts equal to its base), the scale ``s`` used as given (MTLoRA: 4.0,
not divided by the rank) and dropout 0.05 on the LoRA input.

The wrapped layer keeps the base ``nn.Linear`` as ``.base`` (frozen by default), so
pretrained weights load into the base before injection, and :func:`merge_lora` folds every
``s · B A`` into ``W`` for deployment (and :func:`unmerge_lora` takes it out again);
:class:`MergeLoRA` does it in ``eval.py`` (``adapter.merge=true``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import torch
from torch import nn

from mtl.eval_steps import EvalContext, EvalStep

log = logging.getLogger(__name__)

DEFAULT_TARGETS = ("qkv", "proj", "fc1", "fc2")
"""timm's stable names of the attention and MLP Linear layers of ViT and Swin blocks."""


class LoRALinear(nn.Module):
    """A Linear layer plus a trainable low-rank update.

    Args:
        base: the layer to adapt (its weight and bias are frozen when ``freeze_base``).
        rank: rank ``r`` of ``B A`` (``A``: r × in, ``B``: out × r).
        scale: the factor ``s`` (used as is).
        dropout: dropout probability on the LoRA branch's input.
        freeze_base: stop gradients to the base weight and bias.
    """

    def __init__(
        self,
        base: nn.Linear,
        *,
        rank: int,
        scale: float = 4.0,
        dropout: float = 0.05,
        freeze_base: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps nn.Linear, got {type(base).__name__}")
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        self.rank, self.scale = int(rank), float(scale)
        # drawn on the host (the same values wherever the base lives), then on the base's device and dtype
        a = nn.init.kaiming_uniform_(torch.empty(rank, base.in_features), a=math.sqrt(5))  # nn.Linear's
        like = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(a.to(**like))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **like))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        if freeze_base:
            for p in base.parameters():
                p.requires_grad_(False)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The base weight (timm code that reads ``.weight`` keeps working)."""
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def delta(self) -> torch.Tensor:
        """The dense update ``s · B A`` (out × in)."""
        return self.scale * (self.lora_B @ self.lora_A)

    def lora(self, x: torch.Tensor) -> torch.Tensor:
        """The low-rank branch alone: ``s · B A dropout(x)``."""
        return self.scale * nn.functional.linear(
            nn.functional.linear(self.dropout(x), self.lora_A), self.lora_B
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        return y if self.merged else y + self.lora(x)

    @torch.no_grad()
    def merge(self) -> None:
        """Folds ``s · B A`` into the base weight (inference; idempotent)."""
        if not self.merged:
            self.base.weight.add_(self.delta().to(self.base.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Takes the update out of the base weight again (idempotent)."""
        if self.merged:
            self.base.weight.sub_(self.delta().to(self.base.weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        shape = f"in={self.in_features}, out={self.out_features}"
        return f"{shape}, rank={self.rank}, scale={self.scale}, merged={self.merged}"


def inject_lora(
    model: nn.Module,
    *,
    rank: int,
    targets: Iterable[str] = DEFAULT_TARGETS,
    scale: float = 4.0,
    dropout: float = 0.05,
    freeze_base: bool = True,
    skip: Iterable[str] = (),
) -> list[str]:
    """Replaces every ``nn.Linear`` whose attribute name is in ``targets`` by a :class:`LoRALinear`.

    Args:
        model: the module to adapt in place (e.g. a timm ViT or Swin).
        rank: LoRA rank.
        targets: attribute names of the Linear layers to adapt.
        scale: LoRA scale.
        dropout: LoRA dropout.
        freeze_base: freeze the adapted layers' base weights.
        skip: qualified names (``layers.3.blocks.1.mlp.fc2``) to leave alone.

    Returns:
        The qualified names of the adapted layers.

    Raises:
        ValueError: if no layer matches ``targets``.
    """
    targets, skip = set(targets), set(skip)
    found = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in targets and name not in skip
    ]
    if not found:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(
            f"inject_lora: no nn.Linear named {sorted(targets)}; the model's Linear names are {names}"
        )
    for name, mod in found:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        new = LoRALinear(mod, rank=rank, scale=scale, dropout=dropout, freeze_base=freeze_base)
        setattr(parent, attr, new.train(mod.training))  # keep the model's train/eval mode
    return [name for name, _ in found]


def lora_modules(model: nn.Module) -> list[LoRALinear]:
    """Every :class:`LoRALinear` in ``model``."""
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def merge_lora(model: nn.Module) -> int:
    """Folds every LoRA update into its base weight; returns how many layers were merged."""
    mods = lora_modules(model)
    for m in mods:
        m.merge()
    return len(mods)


def unmerge_lora(model: nn.Module) -> int:
    """Undoes :func:`merge_lora`; returns how many layers were unmerged."""
    mods = lora_modules(model)
    for m in mods:
        m.unmerge()
    return len(mods)


class MergeLoRA(EvalStep):
    """Evaluation step: folds every LoRA update into its base weight before the test pass.

    The evaluated model is then the deployment form (no LoRA branch at inference); reports
    ``{"merged": n}`` under ``ctx.reports["lora_merge"]``.

    Args:
        enabled: merge (``adapter.merge`` in ``configs/eval.yaml``).
    """

    def __init__(self, *, enabled: bool = False) -> None:
        self.enabled = bool(enabled)

    def before_test(self, ctx: EvalContext) -> None:
        if not self.enabled:
            return
        n_merged = merge_lora(ctx.module.model)
        log.info("folded %d LoRA layers into their base weights (adapter.merge=true)", n_merged)
        ctx.reports["lora_merge"] = {"merged": n_merged}
