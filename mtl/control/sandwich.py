"""Super-network training of a slimmable multi-task model: sandwich rule plus CI-KD.

Aich et al., "Efficient Controllable Multi-Task Architectures", ICCV 2023: every step trains
several width configurations of one super-network — the largest, the smallest and random
ones (the sandwich rule of Yu & Huang, "Universally Slimmable Networks", ICCV 2019) — and
Configuration-Invariant Knowledge Distillation (CI-KD) pulls the encoder features of every
sampled configuration to the largest configuration's (detached).

The CI-KD loss of one configuration is the mean over encoder levels of the mean squared
difference of the feature maps; it is exactly 0 for the largest configuration.
Gradients of all configurations accumulate into one optimiser step.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from mtl.contracts import StepForward, StrategyHost
from mtl.control.cost import WidthConfig, apply_config
from mtl.strategies.weighting import FixedWeights


def ci_kd_loss(feats: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over levels of ``MSE(feature, teacher feature.detach())``."""
    return torch.stack([F.mse_loss(f, t.detach()) for f, t in zip(feats, teacher, strict=True)]).mean()


class SandwichKD(FixedWeights):
    """Trains the largest, the smallest and ``n_random`` random width configurations per step.

    Args:
        widths: the width fractions of the encoder and of every decoder.
        n_random: random configurations per step besides the largest and the smallest.
        kd_weight: weight of the CI-KD loss of each non-largest configuration.
        seed: seed of the configuration sampler (each rank draws the same configurations).
        weights: per-task loss weights (default: the tasks' default weights).
        uniform: equal task weights.
    """

    def __init__(
        self,
        *,
        widths: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
        n_random: int = 2,
        kd_weight: float = 1.0,
        seed: int = 0,
        weights: Mapping[str, float] | None = None,
        uniform: bool = False,
    ) -> None:
        super().__init__(weights=weights, uniform=uniform)
        self.widths = sorted(float(w) for w in widths)
        if n_random < 0 or kd_weight < 0:
            raise ValueError(f"n_random and kd_weight must be >= 0, got {n_random}, {kd_weight}")
        self.n_random, self.kd_weight = int(n_random), float(kd_weight)
        self.rng = random.Random(seed)

    def uniform_config(self, width: float) -> WidthConfig:
        return WidthConfig(width, {t: width for t in self.task_names})

    def sample(self) -> WidthConfig:
        """A random configuration: encoder and each decoder width drawn from ``widths``."""
        return WidthConfig(
            self.rng.choice(self.widths), {t: self.rng.choice(self.widths) for t in self.task_names}
        )

    def _run(self, batch: dict, module, config: WidthConfig):
        apply_config(module.model, config)
        x = batch["image"]
        feats, backbone_out = module.model.encode_features(x)
        out = module.model.decode(feats, size=tuple(x.shape[-2:]), features=backbone_out)
        return feats, out, module.task_losses(out, batch)

    def forward(self, batch: dict, *, module: StrategyHost) -> StepForward:
        """The largest configuration's pass (its losses are the ones logged; its encoder features,
        ``step.rep``, are the CI-KD teacher)."""
        feats, out, losses = self._run(batch, module, self.uniform_config(self.widths[-1]))
        return StepForward(preds=out.preds, losses=losses, aux=out.aux_loss, rep=list(feats))

    def backward(
        self, step: StepForward, *, module: StrategyHost, batch: dict
    ) -> dict[str, float | torch.Tensor]:
        """The largest configuration's update, then the smallest's and ``n_random`` random ones with
        CI-KD; logs ``ci_kd``, their mean CI-KD loss, as a device tensor (no host read per step)."""
        if step.rep is None:
            raise ValueError("SandwichKD.backward needs the step of its forward (step.rep: the teacher)")
        teacher = [f.detach() for f in step.rep]
        total = self.combine(step.losses)
        module.manual_backward(total if step.aux is None else total + step.aux)
        configs = [self.uniform_config(self.widths[0])] + [self.sample() for _ in range(self.n_random)]
        kd_logs = []
        for config in configs:
            feats, _, sub_losses = self._run(batch, module, config)
            kd = ci_kd_loss(feats, teacher)
            module.manual_backward(self.combine(sub_losses) + self.kd_weight * kd)
            kd_logs.append(kd.detach())
        apply_config(module.model, self.uniform_config(self.widths[-1]))  # validation sees the full model
        return {"ci_kd": torch.stack(kd_logs).mean()}  # never empty: the smallest configuration
