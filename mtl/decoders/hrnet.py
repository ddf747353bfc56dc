"""HRNet-style multi-scale task decoder, as MTLoRA uses it.

Agiza, Neseem & Reda, "MTLoRA", CVPR 2024, after the HRNet head of Wang et al., "Deep
High-Resolution Representation Learning for Visual Recognition", TPAMI 2020. The layers and
widths follow the authors' code (scale-lab/MTLoRA: ``Downsampler`` in ``models/swin_mtl.py``,
``HighResolutionHead`` in ``models/seg_hrnet.py``, ``DECODER_CHANNELS`` in ``config.py``), per
task:

1. each backbone level projected by a bias-free 1×1 convolution to ``channels`` (reference:
   ``[18, 36, 72, 144]``);
2. every level bilinearly upsampled (``align_corners=False``) to the finest level's size and
   concatenated (``270`` channels);
3. a 1×1 convolution *with* bias to ``expansion ×`` that width (``4 × 270 = 1080``), BatchNorm
   (momentum 0.1), ReLU.

The reference's last layer, a 1×1 convolution with bias from ``1080`` to the task's ``K``
outputs, is our task head (:class:`~mtl.heads.TaskHeads`), which then upsamples to the input size
as the reference's ``DecoderGroup`` does. Every module is task-specific (``per_task``). With
per-task backbone features (MTLoRA's task streams) the model runs the decoder once per stream.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mtl.contracts import Decoder, DecoderOutput

REFERENCE_CHANNELS = (18, 36, 72, 144)


class _TaskBranch(nn.Module):
    def __init__(self, in_channels: Sequence[int], channels: Sequence[int], expansion: int) -> None:
        super().__init__()
        self.proj = nn.ModuleList(
            [nn.Conv2d(c, w, 1, bias=False) for c, w in zip(in_channels, channels, strict=True)]
        )
        width = sum(channels)
        self.fuse = nn.Sequential(
            nn.Conv2d(width, expansion * width, 1), nn.BatchNorm2d(expansion * width), nn.ReLU(inplace=True)
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
        channels: 1×1 projection width per level (a list, one per level: the reference's
            ``[18, 36, 72, 144]``), or one width for every level.
        expansion: the fused width is ``expansion × sum(channels)`` (reference: 4).
    """

    def __init__(
        self,
        *,
        in_channels: Sequence[int],
        tasks: Sequence[str],
        channels: int | Sequence[int] = REFERENCE_CHANNELS,
        expansion: int = 4,
    ) -> None:
        super().__init__()
        widths = (
            [int(channels)] * len(in_channels) if isinstance(channels, int) else [int(c) for c in channels]
        )
        if len(widths) != len(in_channels):
            raise ValueError(
                f"HRNetDecoder channels {list(widths)} give one width per level; the backbone has "
                f"{len(in_channels)} levels ({list(in_channels)})"
            )
        if min(widths) < 1 or expansion < 1:
            raise ValueError(
                f"HRNetDecoder channels and expansion must be >= 1, got {widths} and {expansion}"
            )
        self.tasks = list(tasks)
        self.per_task = nn.ModuleDict({t: _TaskBranch(in_channels, widths, expansion) for t in self.tasks})
        self.out_channels = expansion * sum(widths)

    def forward(self, feats: Sequence[torch.Tensor], *, tasks: Sequence[str] | None = None) -> DecoderOutput:
        """Task → ``B × out_channels × h × w`` at the finest level's resolution (``tasks``: default all)."""
        return DecoderOutput(features={t: self.per_task[t](feats) for t in self.task_list(tasks)})
