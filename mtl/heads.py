"""Per-task prediction heads: task feature → ``B × K_t × H × W`` at input resolution."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn


class TaskHeads(nn.Module):
    """A ``1 × 1`` convolution per task followed by bilinear upsampling to the input size.

    Args:
        in_channels: channels of the decoder's task features.
        out_channels: task name → output channels.
    """

    def __init__(self, *, in_channels: int, out_channels: Mapping[str, int]) -> None:
        super().__init__()
        self.heads = nn.ModuleDict({t: nn.Conv2d(in_channels, c, 1) for t, c in out_channels.items()})

    def forward(self, feats: Mapping[str, torch.Tensor], size: tuple[int, int]) -> dict[str, torch.Tensor]:
        """Predicts every task present in ``feats``."""
        out = {}
        for task, f in feats.items():
            y = self.heads[task](f)
            out[task] = (
                F.interpolate(y, size=size, mode="bilinear", align_corners=False)
                if y.shape[-2:] != size
                else y
            )
        return out
