"""HRNet-style multi-scale task decoder, as MTLoRA uses it.

Agiza, Neseem & Reda, "MTLoRA", CVPR 2024, after the HRNet head of Wang et al., "Deep
High-Resolution Representation Learning for Visual Recognition", TPAMI 2020: per task, each
of the backbone's feature levels is projected by a 1×1 convolution, all are upsampled to the
finest level's resolution and concatenated, then a 1×1 convolution, BatchNorm and ReLU give
the task feature (the last 1×1 convolution to the task's outputs is the task head,
:mod:`mtl.heads`).

Every module is task-specific (``per_task``). With per-task backbone features (MTLoRA's task
streams) the model runs the decoder once per stream.

Choice (not fixed by the paper text we hold): the projection width per level, ``channels``
(default 64, so the task feature has ``4 × 64`` channels); MTLoRA's exact width is unknown.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mtl.contracts import Decoder, DecoderOutput


class _TaskBranch(nn.Module):
    def __init__(self, in_channels: Sequence[int], channels: int) -> None:
        super().__init__()
        self.proj = nn.ModuleList([nn.Conv2d(c, channels, 1) for c in in_channels])
        width = channels * len(in_channels)
        self.fuse = nn.Sequential(
            nn.Conv2d(width, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        size = max((f.shape[-2:] for f in feats), key=lambda s: s[0] * s[1])
        ups = [
            F.interpolate(p(f), size=size, mode="bilinear", align_corners=False)
            if f.shape[-2:] != size
            else p(f)
            for p, f in zip(self.proj, feats, strict=True)
        ]
        return self.fuse(torch.cat(ups, dim=1))


class HRNetDecoder(Decoder):
    """Per-task HRNet-style fusion of multi-scale features.

    Args:
        in_channels: channels of each feature level (from the backbone's ``feature_info``).
        tasks: task names.
        channels: 1×1 projection width of each level.
    """

    def __init__(self, *, in_channels: Sequence[int], tasks: Sequence[str], channels: int = 64) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"HRNetDecoder channels must be >= 1, got {channels}")
        self.tasks = list(tasks)
        self.per_task = nn.ModuleDict({t: _TaskBranch(in_channels, channels) for t in self.tasks})
        self.out_channels = channels * len(in_channels)

    def forward(self, feats: Sequence[torch.Tensor], *, tasks: Sequence[str] | None = None) -> DecoderOutput:
        """Task → ``B × out_channels × h × w`` at the finest level's resolution (``tasks``: default all)."""
        return DecoderOutput(features={t: self.per_task[t](feats) for t in self.task_list(tasks)})
