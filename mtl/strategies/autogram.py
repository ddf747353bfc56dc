"""The Gramian-only mode's fast path: the ``k × k`` Gramian from torchjd's ``autogram.Engine``.

The engine hooks every module that owns trainable parameters directly; in the backward of the
stacked task objectives (one pass, batched over the ``k`` tasks with ``vmap``) each hooked module
turns its output's ``k`` cotangents into the ``k × n_module`` Jacobian of its own parameters and
adds that block's Gramian, so only one module's block is ever in memory, and the step costs the
forward, that batched pass and the update's backward instead of ``k(k+1)/2 + 1`` passes
(:mod:`mtl.strategies.gramian_only`). The engine runs without a batch dimension (the task losses
are batch means, not per-sample losses), which handles BatchNorm exactly: a module's Jacobian
comes from autograd through the recorded graph, its forward is not re-run.

It sees only the parameters of modules that are *called*. So it is used where the model allows it
and the polarised passes are kept otherwise, with a one-line message saying why
(:func:`autogram_refusal`):

- a shared module that owns parameters directly *and* has submodules with parameters is hooked
  as one block (its ``k × n_module`` Jacobian in memory at once), which is fine for a small one
  (Swin's window attention and its relative position table) but refused above
  :data:`MAX_BLOCK` of the shared parameters (a timm ``VisionTransformer`` built directly owns
  ``cls_token`` / ``pos_embed`` besides its blocks: the block would be the ``k × n`` buffer again;
  :class:`~mtl.backbones.TimmBackbone` moves them into a called child, so the project's ViTs pass);
- a module holding shared and task-specific parameters directly;
- DDP (more than one process): the union's Gramian needs every pair of ranks' gradients, which
  per-rank module Jacobians cannot give; today's passes average each gradient over the ranks;
- at the first step the engine's Gramian is compared with the polarised one (that step uses the
  latter): a difference beyond ``1e-4`` of the largest diagonal entry (a parameter used without
  its module being called, an in-place operation, a module the engine cannot differentiate) or an
  error of the engine switches the mode off for the run.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence

import torch
from torch import nn
from torchjd.autogram import Engine

#: the largest share of the shared parameters that one hooked block (a module owning parameters directly
#: besides its submodules', e.g. Swin's attention with its relative position table) may hold
MAX_BLOCK = 0.25
#: relative tolerance of the first step's cross-check (of the largest diagonal entry)
CHECK_RTOL = 1e-4
#: torch's warning when ``vmap`` loops over an op without a batching rule (e.g. the fused attention's
#: backward: correct, and still one pass of the rest of the network)
VMAP_FALLBACK = "There is a performance drop because we have not yet implemented the batching rule"
#: the ops over which ``vmap`` looped (one call per task) in this process's engine passes, from those
#: warnings (``benchmarks/strategies.py`` prints them: on a GPU they decide whether the fused attention
#: or the plain one is faster in this mode)
LOOPED_OPS: set[str] = set()


def _trainable(module: nn.Module, *, recurse: bool) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters(recurse=recurse) if p.requires_grad]


def engine_modules(model: nn.Module, shared: Sequence[nn.Parameter]) -> list[nn.Module] | str:
    """The largest submodules of ``model`` whose trainable parameters are all shared and that together
    hold every shared parameter, or the reason (a string) why ``model`` does not split that way or
    would be hooked in a block holding over :data:`MAX_BLOCK` of them."""
    shared_ids = {id(p) for p in shared}
    n_shared = sum(p.numel() for p in shared)
    out: list[nn.Module] = []

    def visit(name: str, module: nn.Module) -> str | None:
        params = _trainable(module, recurse=True)
        if not params or not any(id(p) in shared_ids for _, p in params):
            return None
        direct = _trainable(module, recurse=False)
        children = [(n, c) for n, c in module.named_children() if _trainable(c, recurse=True)]
        if direct and children and sum(p.numel() for _, p in params) > MAX_BLOCK * n_shared:
            own = ", ".join(n for n, _ in direct[:4])
            return (
                f"module '{name or 'model'}' ({type(module).__name__}) owns parameters directly ({own}) "
                f"besides its submodules' and holds over {MAX_BLOCK:.0%} of the shared parameters "
                "(autogram would take it as one k × n block)"
            )
        if all(id(p) in shared_ids for _, p in params):
            out.append(module)
            return None
        if direct:
            return (
                f"module '{name or 'model'}' ({type(module).__name__}) holds shared and task-specific "
                "parameters directly"
            )
        for child_name, child in children:
            reason = visit(f"{name}.{child_name}" if name else child_name, child)
            if reason is not None:
                return reason
        return None

    reason = visit("", model)
    return reason if reason is not None else out


def autogram_refusal(model: nn.Module, shared: Sequence[nn.Parameter], world: int) -> str | None:
    """Why the autogram engine cannot give the union's Gramian of ``shared`` for ``model`` (``None``:
    it can, subject to the first step's cross-check)."""
    if world > 1:
        return (
            f"DDP with {world} processes (the union's Gramian needs cross-rank products of module "
            "Jacobians; the polarised passes average each gradient over the ranks)"
        )
    if not shared:
        return "no trainable shared parameters"
    found = engine_modules(model, shared)
    return found if isinstance(found, str) else None


def make_engine(model: nn.Module, shared: Sequence[nn.Parameter]) -> Engine:
    """An engine hooked on the shared modules of ``model`` (create it before the forward; its hooks
    are removed when it is dropped)."""
    found = engine_modules(model, shared)
    if isinstance(found, str):
        raise ValueError(f"autogram: {found}")
    return Engine(*found, batch_dim=None)


def engine_gramian(engine: Engine, objectives: Sequence[torch.Tensor], scale: float) -> torch.Tensor:
    """The ``k × k`` Gramian (float64, unscaled) of the shared parameters' gradients of
    ``objectives``, differentiated at the loss scale ``scale`` (fp16); keeps the graph."""
    stacked = torch.stack([o.float() for o in objectives]) * scale
    with warnings.catch_warnings(record=True) as caught:  # vmap loops where an op has no batching rule
        warnings.filterwarnings("always", message=VMAP_FALLBACK, category=UserWarning)
        gramian = engine.compute_gramian(stacked)
    for w in caught:
        text = str(w.message)
        if VMAP_FALLBACK not in text:  # every other warning goes on
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        elif found := re.search(r"batching rule for (\S+?)\.?\s", text):
            LOOPED_OPS.add(found.group(1))
    return gramian.to(torch.float64) / scale**2


def gramians_agree(fast: torch.Tensor, exact: torch.Tensor) -> bool:
    """Whether the engine's Gramian equals the polarised one up to :data:`CHECK_RTOL` of the
    largest diagonal entry (one host sync; run once, at the first step)."""
    bound = CHECK_RTOL * exact.diagonal().abs().max().clamp_min(1e-30)
    return bool(((fast - exact).abs() <= bound).all())
