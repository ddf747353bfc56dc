"""A new decoder: each task concatenates every backbone level at the finest resolution."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mtl.contracts import Decoder, DecoderOutput


class ConcatDecoder(Decoder):
    """Per task: all levels upsampled to the finest, concatenated, ``1 × 1`` then ``3 × 3`` conv.

    Everything is task-specific (``per_task``), so the strategies treat no decoder weight as shared.

    Args:
        in_channels: channels of each backbone level (given by the model).
        tasks: task names (given by the model).
        channels: width of the task features (the heads' input).
    """

    def __init__(self, *, in_channels: Sequence[int], tasks: Sequence[str], channels: int = 32) -> None:
        super().__init__()
        self.out_channels = channels
        self.per_task = nn.ModuleDict(
            {
                t: nn.Sequential(
                    nn.Conv2d(sum(in_channels), channels, 1, bias=False),
                    nn.BatchNorm2d(channels),
                    nn.ReLU(inplace=True),
                    nn.Conv2d(channels, channels, 3, padding=1),
                )
                for t in tasks
            }
        )

    def forward(self, feats: Sequence[torch.Tensor], *, tasks: Sequence[str] | None = None) -> DecoderOutput:
        size = feats[0].shape[-2:]  # the finest level comes first
        x = torch.cat([F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in feats], 1)
        return DecoderOutput(features={t: self.per_task[t](x) for t in self.task_list(tasks)})
