"""Width-switchable task decoders: slimmable convolutions and switchable BatchNorm.

Aich et al., "Efficient Controllable Multi-Task Architectures", ICCV 2023: every task decoder
is slimmable, so a task's importance is set by its decoder width. Layers after Yu et al.,
"Slimmable Neural Networks", ICLR 2019: a convolution uses its first ``round(w · C_out)``
filters over however many input channels arrive; BatchNorm keeps one set of statistics and
affine parameters per width (a width's statistics are not those of another), which keeps
normalisation correct at every width.

Each task branch: every backbone level → 1×1 slimmable projection to the task's active
width, upsampled to the finest level and summed → 3×3 slimmable conv, switchable BN, ReLU →
1×1 conv from the active width back to the fixed ``channels`` the head reads. Everything is
task-specific (``per_task``); the encoder's width is the backbone's (:mod:`mtl.backbones.slimmable_vit`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mtl.contracts import Decoder, DecoderOutput


def active(width: float, channels: int) -> int:
    """Channels in use at ``width``: ``max(1, round(width · channels))``."""
    return max(1, round(width * channels))


class SlimmableConv2d(nn.Conv2d):
    """A convolution using its first ``active(width, out_channels)`` filters.

    The input may carry fewer than ``in_channels`` channels: the first ones are used.
    """

    width: float = 1.0
    slim_out: bool = True
    last_in: int | None = None  # input channels of the last call (for the cost model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cin = self.last_in = x.shape[1]
        cout = active(self.width, self.out_channels) if self.slim_out else self.out_channels
        weight = self.weight[:cout, :cin]
        bias = self.bias[:cout] if self.bias is not None else None
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)


class SwitchableBatchNorm2d(nn.Module):
    """One BatchNorm per configured width, each sized for its active channels.

    Args:
        channels: channels at full width.
        widths: the configured width fractions.
    """

    def __init__(self, channels: int, widths: Sequence[float]) -> None:
        super().__init__()
        self.widths = list(widths)
        self.bn = nn.ModuleList(nn.BatchNorm2d(active(w, channels)) for w in self.widths)
        self.width = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.width not in self.widths:
            raise ValueError(f"width {self.width} is not one of the trained widths {self.widths}")
        return self.bn[self.widths.index(self.width)](x)


class _SlimBranch(nn.Module):
    def __init__(self, in_channels: Sequence[int], channels: int, widths: Sequence[float]) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(SlimmableConv2d(c, channels, 1) for c in in_channels)
        self.conv = SlimmableConv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = SwitchableBatchNorm2d(channels, widths)
        self.out = SlimmableConv2d(channels, channels, 1)
        self.out.slim_out = False  # the head reads a fixed width

    def set_width(self, width: float) -> None:
        for m in self.modules():
            if isinstance(m, (SlimmableConv2d, SwitchableBatchNorm2d)):
                m.width = width

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        size = max((f.shape[-2:] for f in feats), key=lambda s: s[0] * s[1])
        x = sum(
            F.interpolate(lat(f), size=size, mode="bilinear", align_corners=False)
            if f.shape[-2:] != size
            else lat(f)
            for lat, f in zip(self.lateral, feats, strict=True)
        )
        return self.out(F.relu(self.bn(self.conv(x))))


class SlimmableDecoder(Decoder):
    """A slimmable branch per task; :meth:`set_widths` picks each task's width.

    Args:
        in_channels: channels of each backbone level (at the encoder's full width).
        tasks: task names.
        channels: full width of each branch (and the fixed width the heads read).
        widths: the width fractions trained (must include 1.0).
    """

    def __init__(
        self,
        *,
        in_channels: Sequence[int],
        tasks: Sequence[str],
        channels: int = 64,
        widths: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
    ) -> None:
        super().__init__()
        self.tasks, self.widths = list(tasks), sorted(float(w) for w in widths)
        if self.widths[-1] != 1.0 or self.widths[0] <= 0:
            raise ValueError(f"widths must lie in (0, 1] and include 1.0, got {list(widths)}")
        self.per_task = nn.ModuleDict(
            {t: _SlimBranch(in_channels, channels, self.widths) for t in self.tasks}
        )
        self.out_channels = channels

    def set_widths(self, widths: Mapping[str, float]) -> None:
        """Sets each named task's decoder width (a trained width)."""
        for t, w in widths.items():
            if t not in self.per_task:
                raise KeyError(f"no decoder for task {t!r}; tasks are {self.tasks}")
            if float(w) not in self.widths:
                raise ValueError(f"decoder width {w} for {t!r} is not one of {self.widths}")
            self.per_task[t].set_width(float(w))

    def forward(self, feats: Sequence[torch.Tensor], *, tasks: Sequence[str] | None = None) -> DecoderOutput:
        """Each requested task's branch at its width (``tasks``: default all)."""
        return DecoderOutput(features={t: self.per_task[t](feats) for t in self.task_list(tasks)})
