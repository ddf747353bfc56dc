"""The strategy contract.

A strategy receives the per-task losses of a training step and performs the backward
pass(es), leaving the final gradient in every parameter's ``.grad``; the module then clips
and steps the optimiser. Strategies are ``nn.Module`` s so that any learnable weights or
running histories they keep are saved in, and restored from, checkpoints.

Loss-weighting strategies need one backward of a weighted sum; gradient-aggregation
strategies need per-task gradients of the shared parameters (or of the shared
representation). Both must stay correct under DDP and mixed precision: always call
``module.manual_backward`` (never ``loss.backward()``) so Lightning applies precision
scaling and DDP gradient synchronisation.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


class Strategy(nn.Module):
    """Base class of every optimisation strategy."""

    def setup(self, *, tasks: Mapping, module: nn.Module) -> None:
        """Called once before training with the task objects and the LightningModule."""
        self.task_names = list(tasks)
        self.task_objects = dict(tasks)

    def backward(
        self, losses: Mapping[str, torch.Tensor], *, module, extra: torch.Tensor | None = None
    ) -> dict[str, float]:
        """Runs the backward pass(es) for one step.

        Args:
            losses: task → unweighted scalar loss (graphs attached).
            module: the ``MTLModule``; use ``module.manual_backward`` and
                ``module.model.shared_parameters()`` / ``task_parameters(t)``.
            extra: an auxiliary loss of the model (e.g. gate balancing) added unweighted
                to the update, or ``None``.

        Returns:
            Scalars to log under ``train/strategy/<name>`` (e.g. the task weights).
        """
        raise NotImplementedError(f"{type(self).__name__} must implement backward()")
