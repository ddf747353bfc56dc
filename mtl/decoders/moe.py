"""Mixture-of-experts primitives for dense decoders: batched experts, gates, gate statistics, gate pictures.

The dense (soft) gating follows Jacobs et al., "Adaptive Mixtures of Local Experts" (Neural
Computation 1991) and the per-task gates of MMoE (Ma et al., KDD 2018); top-k gating and the
importance-balancing loss follow Shazeer et al., "Outrageously Large Neural Networks" (ICLR 2017).
Used by :mod:`mtl.decoders.taskexpert`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


class ChannelNorm(nn.Module):
    """LayerNorm over the channels of an NCHW map (the token-wise LayerNorm of a ViT, on a map).

    Args:
        channels: number of channels.
    """

    def __init__(self, *, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        tokens = rearrange(x, "b c h w -> b (h w) c")  # (B, N, C)
        return rearrange(self.norm(tokens), "b (h w) c -> b c h w", h=h, w=w)


class BatchedExperts(nn.Module):
    """``num_experts`` independent two-layer expert networks evaluated in one pass.

    Expert ``j`` is ``conv_k(C → hidden) → GELU → conv_1(hidden → D)``; with ``kernel=1`` it is a
    per-pixel MLP (the token MLP of a transformer). All experts' first layers are one convolution
    with ``num_experts · hidden`` outputs and their second layers one grouped convolution, which is
    exactly ``num_experts`` separate networks (no weight is shared between experts).

    Args:
        in_channels: channels ``C`` of the input map.
        out_channels: channels ``D`` of every expert's output.
        num_experts: number of experts ``N``.
        hidden: hidden width of each expert.
        kernel: spatial kernel of the first layer (1: per-pixel MLP, 3: local context).
    """

    def __init__(
        self, *, in_channels: int, out_channels: int, num_experts: int, hidden: int, kernel: int = 1
    ) -> None:
        super().__init__()
        if num_experts < 1 or hidden < 1 or kernel not in (1, 3):
            raise ValueError(
                "experts need num_experts ≥ 1, hidden ≥ 1 and kernel 1 or 3; "
                f"got num_experts={num_experts}, hidden={hidden}, kernel={kernel}"
            )
        self.num_experts = num_experts
        self.fc1 = nn.Conv2d(in_channels, num_experts * hidden, kernel, padding=kernel // 2)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(num_experts * hidden, num_experts * out_channels, 1, groups=num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B × C × h × w`` → ``B × N × D × h × w`` (one task-generic feature per expert)."""
        y = self.fc2(self.act(self.fc1(x)))
        return rearrange(y, "b (n d) h w -> b n d h w", n=self.num_experts)


def gate_weights(logits: torch.Tensor, *, top_k: int | None = None) -> torch.Tensor:
    """Per-pixel gate weights from logits ``B × E × h × w``: a softmax over the ``E`` experts.

    With ``top_k`` only the ``k`` largest logits of each pixel are kept (the others get weight 0),
    as in Shazeer et al.'s noisy top-k gating without the noise. Weights sum to 1 per pixel.
    """
    if top_k is not None and top_k < logits.shape[1]:
        kth = logits.topk(top_k, dim=1).values[:, -1:]  # (B, 1, h, w)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits.softmax(dim=1)


def balance_loss(gates: torch.Tensor) -> torch.Tensor:
    """Importance-balancing loss ``E · Σ_j p̄_j² − 1`` of gates ``B × E × h × w``.

    ``p̄_j`` is expert ``j``'s mean weight over the batch and pixels: 0 when every expert carries
    the same share, ``E − 1`` when one expert takes everything (Shazeer et al.'s CV² up to scale).
    """
    mean = gates.mean(dim=(0, 2, 3))  # (E,)
    return gates.shape[1] * (mean * mean).sum() - 1.0


def gate_entropy(gates: torch.Tensor) -> torch.Tensor:
    """Mean per-pixel entropy of gates ``B × E × h × w``, normalised by ``log E`` (1 = uniform)."""
    ent = -(gates * gates.clamp_min(1e-12).log()).sum(dim=1)
    return ent.mean() / math.log(gates.shape[1]) if gates.shape[1] > 1 else ent.mean() * 0


def gate_stats(task: str, layer: int, gates: torch.Tensor, expert_names: Sequence[str] | None) -> dict:
    """``gates/<task>/layer<i>/entropy`` (:func:`gate_entropy`) and, with ``expert_names``, each
    expert's mean weight ``gates/<task>/layer<i>/<expert>`` of gates ``B × E × h × w`` (detached, fp32).

    Batch means: averaged over an evaluation with the batch sizes as weights they give the
    evaluation's mean weights and entropy.
    """
    with torch.no_grad():
        g = gates.detach().float()
        prefix = f"gates/{task}/layer{layer}"
        out = {f"{prefix}/entropy": gate_entropy(g)}
        if expert_names is not None:
            out.update(
                {f"{prefix}/{name}": v for name, v in zip(expert_names, g.mean(dim=(0, 2, 3)), strict=True)}
            )
    return out


def _palette(n: int) -> np.ndarray:
    """``n`` well-separated RGB colours (golden-angle hues), ``n × 3`` uint8."""
    hues = (np.arange(n) * 0.618033988749895) % 1.0
    k = (np.array([5.0, 3.0, 1.0])[None] + hues[:, None] * 6) % 6
    rgb = 1 - np.clip(np.minimum(k, 4 - k), 0, 1) * 0.85
    return (rgb * 255).astype(np.uint8)


def gate_picture(layers: Sequence[torch.Tensor], *, size: tuple[int, int], memory: bool) -> np.ndarray:
    """A picture of one sample's per-pixel gates at every layer, ``H' × W' × 3`` uint8.

    Top row, one panel per layer: the dominant expert of each pixel (one colour per expert, the
    memory expert white), darker where its weight is low. Bottom row (with ``memory``): the
    memory expert's weight, black 0 → white 1. Panels are resized (nearest) to ``size``.

    Args:
        layers: per layer, gates ``E × h × w`` of one sample (the memory expert last).
        size: ``(H, W)`` of each panel.
        memory: whether the last expert is the memory.
    """
    n = layers[0].shape[0]
    colours = _palette(n)
    if memory:
        colours[-1] = 255
    top, bottom = [], []
    for g in layers:
        g = F.interpolate(g[None].float().cpu(), size=size, mode="nearest")[0]  # (E, H, W)
        weight, idx = g.max(dim=0)
        shade = (0.35 + 0.65 * weight).numpy()[..., None]
        top.append((colours[idx.numpy()] * shade).astype(np.uint8))
        if memory:
            grey = (g[-1].numpy() * 255).round().astype(np.uint8)
            bottom.append(np.repeat(grey[..., None], 3, axis=2))
    sep = np.full((size[0], 2, 3), 128, np.uint8)
    rows = [np.concatenate([p for panel in top for p in (panel, sep)][:-1], axis=1)]
    if memory:
        rows.append(np.concatenate([p for panel in bottom for p in (panel, sep)][:-1], axis=1))
    return np.concatenate(rows, axis=0)
