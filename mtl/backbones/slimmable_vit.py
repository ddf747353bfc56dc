"""A width-switchable ViT: attention heads and MLP hidden width chosen at run time.

The slimmable encoder of Aich et al., "Efficient Controllable Multi-Task Architectures",
ICCV 2023 (after Yu et al., "Slimmable Neural Networks", ICLR 2019), on a timm ViT
(Dosovitskiy et al., ICLR 2021). At width ``w`` every block uses its first
``max(1, round(w · heads))`` attention heads and first ``round(w · hidden)`` MLP hidden units;
the embedding width — and so every LayerNorm — is unchanged, which keeps the norms correct at
every width without switchable statistics. At ``w = 1`` the block computes exactly what the
timm block computes (the parameters are the timm ones, so pretrained weights load as usual).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from mtl.backbones.timm_backbone import TimmBackbone


def _check_width(width: float) -> float:
    if not 0.0 < width <= 1.0:
        raise ValueError(f"width must be in (0, 1], got {width}")
    return float(width)


class SlimmableAttention(nn.Module):
    """timm ``Attention`` (no q/k norm) restricted to its first heads.

    Args:
        attn: the timm attention module whose ``qkv`` and ``proj`` are reused.
    """

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        if not isinstance(attn.q_norm, nn.Identity) or not isinstance(
            getattr(attn, "norm", nn.Identity()), nn.Identity
        ):
            raise ValueError("SlimmableAttention supports ViT attention without q/k/attention norms")
        self.qkv, self.proj, self.attn_drop, self.proj_drop = (
            attn.qkv,
            attn.proj,
            attn.attn_drop,
            attn.proj_drop,
        )
        self.num_heads, self.head_dim = attn.num_heads, attn.head_dim
        self.width = 1.0

    def active_heads(self) -> int:
        return max(1, round(self.width * self.num_heads))

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        h, d = self.active_heads(), self.head_dim
        w = self.qkv.weight.view(3, self.num_heads, d, -1)[:, :h].reshape(3 * h * d, -1)
        b = self.qkv.bias.view(3, self.num_heads, d)[:, :h].reshape(-1) if self.qkv.bias is not None else None
        q, k, v = rearrange(F.linear(x, w, b), "b n (three h d) -> three b h n d", three=3, h=h)
        drop = self.attn_drop.p if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=drop, is_causal=is_causal)
        y = rearrange(y, "b h n d -> b n (h d)")
        return self.proj_drop(F.linear(y, self.proj.weight[:, : h * d], self.proj.bias))


class SlimmableMlp(nn.Module):
    """timm ``Mlp`` restricted to its first hidden units.

    Args:
        mlp: the timm MLP whose ``fc1``, ``act`` and ``fc2`` are reused.
    """

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        if not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
            raise ValueError("SlimmableMlp supports timm Mlp without a hidden norm")
        self.fc1, self.act, self.drop1, self.fc2, self.drop2 = mlp.fc1, mlp.act, mlp.drop1, mlp.fc2, mlp.drop2
        self.width = 1.0

    def active_hidden(self) -> int:
        return max(1, round(self.width * self.fc1.out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.active_hidden()
        bias = self.fc1.bias[:n] if self.fc1.bias is not None else None
        x = self.drop1(self.act(F.linear(x, self.fc1.weight[:n], bias)))
        return self.drop2(F.linear(x, self.fc2.weight[:, :n], self.fc2.bias))


class SlimmableViT(TimmBackbone):
    """A :class:`TimmBackbone` ViT whose attention heads and MLP widths switch at run time.

    Args:
        widths: the width fractions the model is trained for (the largest must be 1.0).
        **kwargs: :class:`TimmBackbone` arguments (a timm ``vit_*`` name, taps, ``img_size``, …).
    """

    def __init__(self, *, widths: Sequence[float] = (0.25, 0.5, 0.75, 1.0), **kwargs) -> None:
        super().__init__(**kwargs)
        self.widths = sorted(_check_width(w) for w in widths)
        if self.widths[-1] != 1.0:
            raise ValueError(f"widths must include 1.0 (the full model), got {list(widths)}")
        if not isinstance(self.model, VisionTransformer):
            raise ValueError(f"SlimmableViT needs a timm ViT with .blocks, got '{self.name}'")
        for blk in self.model.blocks:
            blk.attn = SlimmableAttention(blk.attn)
            blk.mlp = SlimmableMlp(blk.mlp)

    @property
    def width(self) -> float:
        return next(m.width for m in self.modules() if isinstance(m, SlimmableAttention))

    def set_width(self, width: float) -> None:
        """Uses the first ``width`` of every block's heads and MLP hidden units."""
        width = _check_width(width)
        for m in self.modules():
            if isinstance(m, (SlimmableAttention, SlimmableMlp)):
                m.width = width
