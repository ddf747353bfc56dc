"""The strategy contract.

A strategy turns the per-task losses of a training step into one parameter update. It sees the
module that trains only through :class:`~mtl.contracts.StrategyHost` (``model``, ``tasks``,
``task_losses(out, batch)``, ``manual_backward``, ``grad_scale``). Per step the module calls,
in this order::

    step = strategy.forward(batch, module=module)         # StepForward: preds, losses, aux (, rep)
    logs = strategy.backward(step, module=module, batch=batch)
    # module: gradient clipping, optimiser step (with the fp16 scaler's unscale/skip)
    strategy.after_step(batch, module=module, losses=step.losses)   # e.g. FAMO's look-ahead
    strategy.epoch_end()                                  # after each training epoch, e.g. DWA

Everything ``backward`` needs of the forward travels in the :class:`~mtl.contracts.StepForward`
(representation-level strategies put the shared representation in ``step.rep`` / ``step.rep_in``):
no tensor of one step is kept on the strategy for the next call. Caches allocated once and
reused (flat gradient buffers, parameter lists) are fine.

``epoch_end`` runs at the first step of the next epoch (``start_epoch``), from the epoch number
the strategy itself keeps in its checkpointed state: a run resumed anywhere, even from a
checkpoint written after an epoch's last batch, closes every epoch exactly once.

``backward`` leaves the final gradient in every trainable parameter's ``.grad`` **at the
precision plugin's loss scale** (``module.grad_scale()``, 1 except under fp16), exactly as
``module.manual_backward`` does; the module then unscales, clips and steps (the scaler skips
the step on inf/nan). Strategies that need per-task gradients unscale them before aggregating.

Rules every strategy keeps:

- Task-specific parameters (``module.model.task_parameters(t)``) get their own task's
  gradient; shared parameters get the strategy's direction.
- Under DDP the update equals the single-process update on the union of the ranks' batches:
  one-backward strategies use ``module.manual_backward`` (DDP averages it); multi-pass
  strategies compute gradients with ``torch.autograd.grad`` (no DDP hook fires), average the
  per-task gradients over the ranks *before* aggregating (``mtl.strategies.grads``), and
  produce one synchronised result.
- Strategies are ``nn.Module`` s so that learnable weights and running histories are
  checkpointed. State that must be identical on every rank is kept as buffers and updated
  from all-reduced quantities. No method of ``nn.Module`` is overridden with another meaning
  (a strategy is a child of the module: ``module.apply(fn)`` must keep working).

Returned logs are scalars: 0-dim device tensors for what is logged every step (task weights), so
that logging costs no host sync (the step's values are not read on the host), Python numbers for
values already on the host; keys starting with ``grad/`` are logged under ``train/grad/...``
(per-task gradient norms, pairwise cosines, conflicting pairs, aggregation weights, every
``diagnostics_every`` steps), the others under ``train/strategy/...``.

Host syncs: a strategy reads device values on the host only where it must decide on the host
(a finite check, the ``k × k`` solvers of the gradient aggregators: one copy of the Gramian per
step); counters kept as buffers are mirrored on the host (``tests/strategies/test_ddp_comm.py``
bounds the syncs of each strategy's step).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from mtl.contracts import StepForward, StrategyHost
from mtl.strategies.grads import all_reduce_mean_, gramian_stats, task_grads, trainable

if TYPE_CHECKING:
    from mtl.tasks.base import Task

#: what ``Strategy.backward`` returns: log key → a Python number or a 0-dim (device) tensor
Logs = dict[str, float | torch.Tensor]


class Strategy(nn.Module):
    """Base class of every optimisation strategy.

    Args:
        diagnostics_every: every N optimiser steps, log per-task gradient norms, pairwise
            cosines and the number of conflicting pairs of the shared parameters' per-task
            gradients (0 disables). One-backward strategies pay ``k`` extra backward passes on
            those steps; per-task-gradient strategies get them for free from their Gramian.
    """

    #: whether the strategy needs per-task gradients of the shared parameters.
    needs_task_grads: bool = False

    def __init__(self, *, diagnostics_every: int = 0) -> None:
        super().__init__()
        if diagnostics_every < 0:
            raise ValueError(f"strategy diagnostics_every must be >= 0, got {diagnostics_every}")
        self.diagnostics_every = int(diagnostics_every)
        self.steps = 0
        self.epoch = -1  # the training epoch of the last step (see start_epoch)
        self.task_names: list[str] = []

    def setup(self, *, tasks: Mapping[str, Task], module: StrategyHost) -> None:
        """Called once before training with the task objects and the module that trains."""
        self.task_names = list(tasks)
        if self.needs_task_grads:
            frozen = not trainable(module.model.backbone.parameters())
            if frozen or not trainable(module.model.shared_parameters()):
                raise ValueError(
                    f"strategy {type(self).__name__} needs per-task gradients of the shared parameters, "
                    "but the backbone is frozen entirely (no trainable parameter): there is no shared "
                    "encoder to balance; unfreeze part of it (e.g. LoRA adapters, the last blocks) or use "
                    "a loss-weighting strategy (e.g. strategy=ew)"
                )

    def forward(self, batch: dict, *, module: StrategyHost) -> StepForward:
        """The training forward pass: predictions, unweighted task losses, auxiliary loss."""
        out = module.model.run(batch["image"])
        return StepForward(preds=out.preds, losses=module.task_losses(out, batch), aux=out.aux_loss)

    def backward(self, step: StepForward, *, module: StrategyHost, batch: dict) -> Logs:
        """Runs the backward pass(es) for one step.

        Args:
            step: what :meth:`forward` returned: ``step.losses`` (task → unweighted scalar loss,
                graphs attached), ``step.aux`` (an auxiliary loss of the model, e.g. gate
                balancing, added unweighted to the update, or ``None``) and, for
                representation-level strategies, ``step.rep`` / ``step.rep_in``.
            module: the module that trains (``manual_backward``, ``grad_scale()``,
                ``model.shared_parameters()`` / ``task_parameters(t)``, ``task_losses``).
            batch: the batch (strategies that re-evaluate the losses, e.g. SAM, need it).

        Returns:
            Scalars to log (see the module docstring for the key convention).
        """
        raise NotImplementedError(f"{type(self).__name__} must implement backward()")

    def after_step(self, batch: dict, *, module: StrategyHost, losses: Mapping[str, torch.Tensor]) -> None:
        """Called after the optimiser step (default: nothing)."""

    def start_epoch(self, epoch: int) -> None:
        """Called by the module before every training step; closes the previous epoch once."""
        if self.epoch >= 0 and epoch != self.epoch:
            self.epoch_end()
        self.epoch = int(epoch)

    def epoch_end(self) -> None:
        """Called at the end of every training epoch (default: nothing)."""

    # -------------------------------------------------------------- checkpoints
    def get_extra_state(self) -> dict:
        """Training state that is not a parameter or buffer (saved in checkpoints for exact resume)."""
        return {"steps": self.steps, "epoch": self.epoch, **self.extra_state()}

    def set_extra_state(self, state: dict) -> None:
        self.steps = int(state.get("steps", 0))
        self.epoch = int(state.get("epoch", -1))
        self.load_extra_state(state)

    def materialise_buffers(self, state_dict: Mapping[str, torch.Tensor], prefix: str) -> None:
        """Gives buffers that are still ``None`` (created lazily, e.g. torchjd's GradVac EMA) the
        saved tensor's shape, so that a checkpoint loads strictly into a fresh strategy."""
        for name, mod in self.named_modules():
            for key, buf in list(mod._buffers.items()):
                full = f"{prefix}{name + '.' if name else ''}{key}"
                if buf is None and full in state_dict:
                    mod._buffers[key] = torch.empty_like(state_dict[full])

    def extra_state(self) -> dict:
        """Subclasses: further state to checkpoint (tensors, numbers, NumPy arrays)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        """Subclasses: restore what :meth:`extra_state` returned."""

    # ------------------------------------------------------------------ helpers
    def diagnose_now(self) -> bool:
        """Whether this step logs gradient diagnostics (call once per step, before ``tick``)."""
        return self.diagnostics_every > 0 and self.steps % self.diagnostics_every == 0

    def tick(self) -> None:
        self.steps += 1

    def shared_gramian(self, losses: Mapping[str, torch.Tensor], module: StrategyHost) -> torch.Tensor:
        """Gramian of the rank-averaged per-task gradients of the shared parameters (diagnostics).

        Costs one backward pass per task; ``.grad`` is not touched.
        """
        shared = trainable(module.model.shared_parameters())
        rows = []
        for loss in losses.values():
            g = task_grads(loss.float(), shared)
            rows.append(torch.cat([x.reshape(-1) for x in g]))
        jac = all_reduce_mean_(torch.stack(rows))
        return jac @ jac.T

    def diagnostics(
        self, losses: Mapping[str, torch.Tensor], module: StrategyHost, weights: torch.Tensor | None = None
    ) -> Logs:
        """Gradient diagnostics for one-backward strategies, on the steps that log them."""
        if not self.diagnose_now():
            return {}
        return gramian_stats(self.shared_gramian(losses, module), list(losses), weights)
