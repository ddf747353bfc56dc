"""PUP: the progressive up-sampling head M³ViT puts on the last ViT block, one per task.

Zheng et al., "Rethinking Semantic Segmentation from a Sequence-to-Sequence Perspective with
Transformers" (SETR, CVPR 2021) introduced the progressive up-sampling ("PUP") decoder; Liang
et al., "M³ViT" (NeurIPS 2022) train every task with its own PUP head on the backbone's last
block (reference code: VITA-Group/M3ViT, ``models/vit_up_head.py``, ``VisionTransformerUpHead``
with ``num_conv: 4``, ``num_upsampe_layer: 4`` as in its ``configs/*/vit_moe/*.yml``).

Per task, on the tokens of one backbone level (the last by default):

* LayerNorm over the channels (``eps`` 1e-6; the head's own norm, the backbone's output is the
  raw block output);
* four blocks ``3 × 3`` conv (``C → 256`` then ``256 → 256``, with bias) → BatchNorm → ReLU, a
  bilinear ×2 up-sampling (``align_corners=False``) between consecutive blocks: stride 16 → 2.

The task's head (:class:`~mtl.heads.TaskHeads`: a ``1 × 1`` conv, then bilinear up-sampling to
the input size) completes the reference's ``conv_4`` and its last ×2 up-sampling: with an input
of 16·h × 16·w, resizing the stride-2 logits to the input size *is* the ×2 step. BatchNorm is
``nn.BatchNorm2d``; under DDP the trainer's ``sync_batchnorm`` flag (``trainer=ddp``) converts it
to ``SyncBatchNorm``, the reference's SyncBN.

Not included: the reference's auxiliary task-attention modules (``TamModule`` in its
``models/models.py``, training-only extra predictions from the PUP's intermediate maps of *all*
tasks). They need every task's decoder maps at once, while :class:`~mtl.model.MultiTaskNet` runs
the decoder once per backbone pass (one task per pass under M³ViT), and they predict through
their own classifiers, not the task heads (see the Fidelity page).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from mtl.contracts import Decoder, DecoderOutput


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of a ``B × C × H × W`` map (the tokens' LayerNorm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalises every position's ``C`` vector."""
        h = x.shape[-2]
        y = super().forward(rearrange(x, "b c h w -> b (h w) c"))
        return rearrange(y, "b (h w) c -> b c h w", h=h)


class PUPBranch(nn.Module):
    """One task's PUP head: LayerNorm, then ``num_convs`` × (conv 3×3 → BN → ReLU), ×2 between.

    Args:
        in_channels: channels ``C`` of the backbone level.
        channels: width of every conv block (256 in the reference).
        num_convs: conv blocks (4 in the reference: stride 16 → 2).
        norm: apply the LayerNorm first.
        norm_eps: the LayerNorm's epsilon.
    """

    def __init__(
        self, *, in_channels: int, channels: int, num_convs: int, norm: bool, norm_eps: float
    ) -> None:
        super().__init__()
        self.norm = ChannelLayerNorm(in_channels, eps=norm_eps) if norm else nn.Identity()
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(in_channels if i == 0 else channels, channels, 3, padding=1),
                nn.BatchNorm2d(channels),
                nn.ReLU(inplace=True),
            )
            for i in range(num_convs)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B × C × h × w`` → ``B × channels × h·2^(n−1) × w·2^(n−1)``."""
        x = self.norm(x)
        for i, block in enumerate(self.blocks):
            if i:
                size = (2 * x.shape[-2], 2 * x.shape[-1])
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            x = block(x)
        return x


class PUPDecoder(Decoder):
    """A PUP head per task on one backbone level (module docstring); nothing is shared.

    Args:
        in_channels: channels of each backbone level.
        tasks: task names.
        channels: width ``D`` of the conv blocks and of the task features (256 in the reference).
        num_convs: conv blocks per task (4: the features leave at stride ``s / 8``).
        in_index: the backbone level the heads read (``-1``: the last, the reference's block 12).
        norm: the head's LayerNorm on the tokens first (the reference's).
        norm_eps: its epsilon (1e-6).
    """

    def __init__(
        self,
        *,
        in_channels: Sequence[int],
        tasks: Sequence[str],
        channels: int = 256,
        num_convs: int = 4,
        in_index: int = -1,
        norm: bool = True,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        levels = len(in_channels)
        if not -levels <= in_index < levels:
            raise ValueError(
                f"PUPDecoder in_index={in_index} is not a level of the backbone's {levels} "
                f"(channels {list(in_channels)}); use -1 for the last"
            )
        if num_convs < 1 or channels < 1:
            raise ValueError(
                f"PUPDecoder needs num_convs >= 1 and channels >= 1, got {num_convs}, {channels}"
            )
        self.tasks = list(tasks)
        self.in_index = in_index % levels
        self.out_channels = int(channels)
        self.in_width = c = int(in_channels[self.in_index])
        self.per_task = nn.ModuleDict(
            {
                t: PUPBranch(
                    in_channels=c, channels=channels, num_convs=num_convs, norm=norm, norm_eps=norm_eps
                )
                for t in self.tasks
            }
        )

    def check_features(self, feature_info: Sequence[Mapping[str, int]]) -> None:
        """Refuses a backbone whose level ``in_index`` has another width than the heads were built for."""
        got = int(feature_info[self.in_index]["channels"])
        if got != self.in_width:
            raise ValueError(
                f"PUPDecoder built for {self.in_width} channels at level {self.in_index}, "
                f"the backbone gives {got}"
            )

    def forward(self, feats: Sequence[torch.Tensor], *, tasks: Sequence[str] | None = None) -> DecoderOutput:
        """Each requested task's PUP head on level ``in_index``: task → ``B × D × H/2 × W/2``."""
        x = feats[self.in_index]
        return DecoderOutput(features={t: self.per_task[t](x) for t in self.task_list(tasks)})
