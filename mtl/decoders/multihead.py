"""Multi-head baseline decoder: shared multi-level fusion, then one small head per task.

The "multi-task baseline" of the dense-prediction literature (Vandenhende et al., TPAMI
2021): every backbone level is projected to ``channels``, upsampled to the finest level and
fused (summed, as in an FPN's top-down merge, then a ``3 × 3`` block); each task refines
the shared map with its own convolutional block.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mtl.contracts import Decoder, DecoderOutput


def conv_bn_relu(cin: int, cout: int, k: int = 3) -> nn.Sequential:
    """``k × k`` convolution, BatchNorm, ReLU."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True)
    )


class MultiHeadDecoder(Decoder):
    """Shared fusion of all backbone levels plus a task-specific block per task.

    Args:
        in_channels: channels of each backbone level.
        tasks: task names.
        channels: width ``D`` of the fused and task features.
        task_blocks: number of ``3 × 3`` conv blocks in each task's branch.
    """

    splits_representation = True

    def __init__(
        self,
        *,
        in_channels: Sequence[int],
        tasks: Sequence[str],
        channels: int = 64,
        task_blocks: int = 1,
    ) -> None:
        super().__init__()
        self.tasks = list(tasks)
        self.out_channels = channels
        self.lateral = nn.ModuleList(conv_bn_relu(c, channels, 1) for c in in_channels)
        self.fuse = conv_bn_relu(channels, channels, 3)
        self.per_task = nn.ModuleDict(
            {t: nn.Sequential(*(conv_bn_relu(channels, channels) for _ in range(task_blocks))) for t in tasks}
        )

    def encode(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The shared part: all levels fused at the finest resolution, ``[B × D × h × w]``."""
        size = max((f.shape[-2:] for f in feats), key=lambda s: s[0] * s[1])
        maps = [
            F.interpolate(lat(f), size=size, mode="bilinear", align_corners=False)
            if f.shape[-2:] != size
            else lat(f)
            for lat, f in zip(self.lateral, feats, strict=True)
        ]
        return [self.fuse(torch.stack(maps).sum(dim=0))]

    def decode(self, rep: Sequence[torch.Tensor], *, tasks: Sequence[str] | None = None) -> DecoderOutput:
        """The task-specific part: each requested task's branch on the fused map."""
        (shared,) = rep
        return DecoderOutput(features={t: self.per_task[t](shared) for t in self.task_list(tasks)})

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of :meth:`encode` (the lateral projections and the fusion block)."""
        yield from self.lateral.parameters()
        yield from self.fuse.parameters()

    def forward(self, feats: Sequence[torch.Tensor], *, tasks: Sequence[str] | None = None) -> DecoderOutput:
        """Fuses the levels at the finest resolution and runs the requested task branches."""
        return self.decode(self.encode(feats), tasks=tasks)
