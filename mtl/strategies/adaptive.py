"""Adaptive loss weighting, one backward pass of a weighted loss per step.

- UW: Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene
  Geometry and Semantics", CVPR 2018.
- DWA: Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019.
- RLW: Lin et al., "Reasonable Effectiveness of Random Weighting: A Litmus Test for Multi-Task
  Learning", TMLR 2022.
- GLS: Chennupati et al., "MultiNet++: Multi-Stream Feature Aggregation and Geometric Loss
  Strategy for Multi-Task Learning", CVPR Workshops 2019.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from mtl.contracts import StepForward, StrategyHost
from mtl.strategies.base import Logs, Strategy
from mtl.strategies.grads import all_reduce_sum_, to_device


class _LossWeighting(Strategy):
    """One backward of ``Σ_t w_t L_t`` (+ the auxiliary loss) with weights from :meth:`weights`."""

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        """Task weights ``(k,)`` for the stacked losses ``(k,)`` (may carry a graph, e.g. UW)."""
        raise NotImplementedError

    def total(self, losses: torch.Tensor) -> torch.Tensor:
        return (self.weights(losses) * losses).sum()

    def backward(self, step: StepForward, *, module: StrategyHost, batch: dict) -> Logs:
        losses, extra = step.losses, step.aux
        stacked = torch.stack([loss.float() for loss in losses.values()])
        total = self.total(stacked)
        w = self.weights(stacked.detach()).detach()
        logs = self.diagnostics(losses, module, w)
        self.tick()
        module.manual_backward(total if extra is None else total + extra)
        logs.update({f"{t}/weight": v for t, v in zip(losses, w.unbind(0), strict=True)})  # no host sync
        return logs


class UncertaintyWeighting(_LossWeighting):
    """UW: ``L = Σ_t ½ exp(−s_t) L_t + ½ s_t`` with learnable ``s_t = log σ_t²``.

    The homoscedastic-uncertainty form for regression (Kendall et al., Eq. 7), used for every
    task as in LibMTL. ``s`` is a parameter of the strategy, so the model's optimiser learns it
    (no weight decay: it is 1-D) and checkpoints hold it.

    The paper released no code; ``init = -0.5`` (weight ``½e^{0.5} ≈ 0.82``) is where the
    implementations behind the field's UW numbers start (MTAN's NYUv2 code, lorenmt/mtan; LibMTL
    ``weighting/UW.py``).

    Args:
        init: initial ``s_t`` (−0.5 → weight ``½e^{0.5}``; 0 → weight ½).
        diagnostics_every: see :class:`Strategy`.
    """

    def __init__(self, *, init: float = -0.5, diagnostics_every: int = 0) -> None:
        super().__init__(diagnostics_every=diagnostics_every)
        self.init = float(init)
        self.log_vars = nn.Parameter(torch.zeros(0))

    def setup(self, *, tasks: Mapping, module: StrategyHost) -> None:
        super().setup(tasks=tasks, module=module)
        self.log_vars = nn.Parameter(torch.full((len(tasks),), self.init))

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        return 0.5 * torch.exp(-self.log_vars.to(losses.device))

    def total(self, losses: torch.Tensor) -> torch.Tensor:
        s = self.log_vars.to(losses.device)
        return (0.5 * torch.exp(-s) * losses + 0.5 * s).sum()


class DynamicWeightAverage(_LossWeighting):
    """DWA: ``w_t = K softmax_t(r_t / T)``, ``r_t = L̄_t(e−1) / L̄_t(e−2)`` from epoch-mean losses.

    Weights are 1 for the first two epochs. Epoch means are pooled over all ranks (sums and
    counts all-reduced), so every rank uses the same weights.

    Args:
        temperature: ``T`` (2 in the paper).
        diagnostics_every: see :class:`Strategy`.
    """

    def __init__(self, *, temperature: float = 2.0, diagnostics_every: int = 0) -> None:
        super().__init__(diagnostics_every=diagnostics_every)
        if temperature <= 0:
            raise ValueError(f"DWA temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.register_buffer("loss_sum", torch.zeros(0))
        self.register_buffer("count", torch.zeros(()))
        self.register_buffer("history", torch.zeros(0, 0))  # (2, k): the last two epoch means
        self.register_buffer("epochs", torch.zeros((), dtype=torch.long))

    def setup(self, *, tasks: Mapping, module: StrategyHost) -> None:
        super().setup(tasks=tasks, module=module)
        self.loss_sum = torch.zeros(len(tasks), dtype=torch.float64)
        self.history = torch.zeros(2, len(tasks), dtype=torch.float64)  # fixed shape: checkpoints load

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        k = losses.numel()
        ratio = self.history[1] / self.history[0].clamp_min(1e-12)
        w = (k * torch.softmax(ratio / self.temperature, dim=0)).to(losses.device, losses.dtype)
        # equal weights for the first two epochs, chosen on the device (no host sync per step)
        return torch.where(self.epochs.to(losses.device) < 2, torch.ones_like(w), w)

    def backward(self, step: StepForward, *, module: StrategyHost, batch: dict) -> Logs:
        stacked = torch.stack([loss.detach().double() for loss in step.losses.values()])
        self.loss_sum = self.loss_sum.to(stacked.device) + stacked
        self.count = self.count.to(stacked.device) + 1
        return super().backward(step, module=module, batch=batch)

    def epoch_end(self) -> None:
        if float(self.count) == 0:
            return
        sums = torch.cat([self.loss_sum, self.count.reshape(1).double()])
        all_reduce_sum_(sums)
        mean = (sums[:-1] / sums[-1]).to(self.history.device)
        self.history = torch.stack([self.history[1], mean])
        self.epochs += 1
        self.loss_sum = torch.zeros_like(self.loss_sum)
        self.count = torch.zeros_like(self.count)


class RandomLossWeighting(_LossWeighting):
    """RLW: ``w = softmax(ε)``, ``ε ~ N(0, I)`` drawn afresh every step.

    Draws come from a generator seeded by ``(seed, step)``, so every rank (and a resumed run)
    draws the same weights.

    Args:
        seed: base seed of the weight draws.
        diagnostics_every: see :class:`Strategy`.
    """

    def __init__(self, *, seed: int = 0, diagnostics_every: int = 0) -> None:
        super().__init__(diagnostics_every=diagnostics_every)
        self.seed = int(seed)
        self.register_buffer("draws", torch.zeros((), dtype=torch.long))
        self._draws: int | None = None  # the buffer's value on the host (read once, then mirrored)
        self._current: torch.Tensor | None = None

    def load_extra_state(self, state: dict) -> None:
        self._draws = None  # a checkpoint was loaded: read the buffer again

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        if self._current is None:
            if self._draws is None:
                self._draws = int(self.draws)
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self._draws)
            self._current = to_device(
                torch.softmax(torch.randn(losses.numel(), generator=gen), dim=0), losses
            )
        return self._current

    def backward(self, step: StepForward, *, module: StrategyHost, batch: dict) -> Logs:
        self._current = None
        logs = super().backward(step, module=module, batch=batch)
        self.draws += 1
        self._draws = None if self._draws is None else self._draws + 1
        return logs


class GeometricLoss(_LossWeighting):
    """GLS: ``L = (Π_t L_t)^{1/K}``, i.e. ``exp(mean_t log L_t)``.

    Its gradient is ``Σ_t L / (K L_t) ∇L_t``: the logged weights are ``L / (K L_t)``.

    Args:
        eps: losses are clamped to ``≥ eps`` before the logarithm.
        diagnostics_every: see :class:`Strategy`.
    """

    def __init__(self, *, eps: float = 1e-8, diagnostics_every: int = 0) -> None:
        super().__init__(diagnostics_every=diagnostics_every)
        self.eps = float(eps)

    def total(self, losses: torch.Tensor) -> torch.Tensor:
        return torch.exp(torch.log(losses.clamp_min(self.eps)).mean())

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        clamped = losses.clamp_min(self.eps)
        return self.total(clamped) / (clamped.numel() * clamped)
