"""Mixture-of-experts primitives for dense decoders: batched experts, gates, gate statistics, gate pictures.

Gate statistics of an evaluation (``{stage}/gates/<task>/layer<i>/<expert>``) are many (tasks ×
layers × experts); :func:`write_gate_report` writes all of them to ``gates.md`` and gives a short
console summary (:func:`gate_summary`).

The dense (soft) gating follows Jacobs et al., "Adaptive Mixtures of Local Experts" (Neural
Computation 1991) and the per-task gates of MMoE (Ma et al., KDD 2018); top-k gating and the
importance-balancing loss follow Shazeer et al., "Outrageously Large Neural Networks" (ICLR 2017).
Used by :mod:`mtl.decoders.taskexpert`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from mtl import drawing


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
    per-pixel MLP (the token MLP of a transformer). Without the activation (``activation=False``) it
    is a linear low-rank map of rank ``hidden``, as MLoRE's experts (Yang et al., CVPR 2024). All
    experts' first layers are one convolution with ``num_experts · hidden`` outputs and their second
    layers one grouped convolution, which is exactly ``num_experts`` separate networks (no weight is
    shared between experts).

    Args:
        in_channels: channels ``C`` of the input map.
        out_channels: channels ``D`` of every expert's output.
        num_experts: number of experts ``N``.
        hidden: hidden width of each expert.
        kernel: spatial kernel of the first layer (1: per-pixel MLP, 3: local context).
        activation: GELU between the two layers (False: low-rank linear experts).
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        num_experts: int,
        hidden: int,
        kernel: int = 1,
        activation: bool = True,
    ) -> None:
        super().__init__()
        if num_experts < 1 or hidden < 1 or kernel not in (1, 3):
            raise ValueError(
                "experts need num_experts ≥ 1, hidden ≥ 1 and kernel 1 or 3; "
                f"got num_experts={num_experts}, hidden={hidden}, kernel={kernel}"
            )
        self.num_experts = num_experts
        self.fc1 = nn.Conv2d(in_channels, num_experts * hidden, kernel, padding=kernel // 2)
        self.act = nn.GELU() if activation else nn.Identity()
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


def _gate_panels(
    layers: Sequence[torch.Tensor], *, size: tuple[int, int], memory: bool
) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """Per layer, the dominant-expert panel and (with ``memory``) the memory-weight panel of
    :func:`gate_picture`, and the experts' colours ``E × 3`` uint8."""
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
    return top, bottom, colours


def gate_picture(layers: Sequence[torch.Tensor], *, size: tuple[int, int], memory: bool) -> np.ndarray:
    """A picture of one sample's per-pixel gates at every layer, ``H' × W' × 3`` uint8 (no labels;
    :func:`gate_figure` adds them).

    Top row, one panel per layer: the dominant expert of each pixel (one colour per expert, the
    memory expert white), darker where its weight is low. Bottom row (with ``memory``): the
    memory expert's weight, black 0 → white 1. Panels are resized (nearest) to ``size``.

    Args:
        layers: per layer, gates ``E × h × w`` of one sample (the memory expert last).
        size: ``(H, W)`` of each panel.
        memory: whether the last expert is the memory.
    """
    top, bottom, _ = _gate_panels(layers, size=size, memory=memory)
    sep = np.full((size[0], 2, 3), 128, np.uint8)
    rows = [np.concatenate([p for panel in top for p in (panel, sep)][:-1], axis=1)]
    if memory:
        rows.append(np.concatenate([p for panel in bottom for p in (panel, sep)][:-1], axis=1))
    return np.concatenate(rows, axis=0)


def gate_figure(
    layers: Sequence[torch.Tensor],
    *,
    size: tuple[int, int],
    memory: bool,
    expert_names: Sequence[str],
    title: str,
    gap: int = 4,
) -> np.ndarray:
    """:func:`gate_picture` with labels, ``H' × W' × 3`` uint8: a title band, ``layer <i>`` over each
    column, the row names on the left and a legend below (expert → colour, the shading, and the
    memory weight's grey scale).

    Args:
        layers: per layer, gates ``E × h × w`` of one sample (the memory expert last).
        size: ``(H, W)`` of each panel.
        memory: whether the last expert is the memory.
        expert_names: the ``E`` experts' names, in gate order.
        title: the first line (e.g. ``"gates of depth"``).
        gap: white separator width in pixels.
    """
    if len(expert_names) != layers[0].shape[0]:
        raise ValueError(
            f"gate_figure: {len(expert_names)} expert names {list(expert_names)} for gates of "
            f"{layers[0].shape[0]} experts"
        )
    top, bottom, colours = _gate_panels(layers, size=size, memory=memory)
    h, w = size
    fs = drawing.font_size(h)
    lh = drawing.line_height(fs)
    names = ["dominant expert", *(["memory weight"] if memory else [])]
    label_w = max(drawing.text_width(t, fs) for t in names) + 2 * fs
    headers = [
        drawing.text_block([f"layer {i}"], fs, width=w, height=lh, align="center") for i in range(len(top))
    ]
    grid = [drawing.hstack([drawing.blank(lh, label_w), *headers], gap=gap)]
    for name, panels in zip(names, (top, bottom), strict=False):
        label = drawing.text_block([name], fs, width=label_w, height=h, valign="middle")
        grid.append(drawing.hstack([label, *panels], gap=gap))
    body = drawing.vstack(grid, gap=gap)
    width = body.shape[1]
    items = [(tuple(int(c) for c in colours[j]), e) for j, e in enumerate(expert_names)]
    key = drawing.swatch_legend(items, fs, height=lh * max(1, -(-len(items) // max(1, width // (8 * fs)))))
    legend = [
        drawing.text_block(["experts (colour of the dominant one; darker: lower weight)"], fs),
        key,
    ]
    if memory:
        bar_len = max(4 * fs, min(w, width // 3))
        legend.append(
            drawing.labelled_horizontal_bar(drawing.grey, "memory weight", "0", "1", fs, length=bar_len)
        )
    title_band = drawing.text_block([title], fs, width=width, height=lh, align="center")
    return drawing.vstack([title_band, body, *legend], gap=gap)


#: file of :func:`write_gate_report`: every gate mean of an evaluation, one row per task and layer
GATE_TABLE_FILE = "gates.md"


def _gate_means(metrics: Mapping[str, float], stage: str) -> dict[str, dict[int, dict[str, float]]]:
    """task → layer → expert (or ``entropy``) → value, from ``{stage}/gates/<task>/layer<i>/<key>``."""
    prefix = f"{stage}/gates/"
    out: dict[str, dict[int, dict[str, float]]] = {}
    for key, value in metrics.items():
        if not key.startswith(prefix):
            continue
        parts = key[len(prefix) :].split("/")
        if len(parts) != 3 or not parts[1].startswith("layer") or not parts[1][5:].isdigit():
            continue
        task, layer, name = parts[0], int(parts[1][5:]), parts[2]
        out.setdefault(task, {}).setdefault(layer, {})[name] = float(value)
    return out


def gate_table(metrics: Mapping[str, float], stage: str = "test") -> str:
    """Every gate statistic of an evaluation as Markdown: one row per task and layer, the gate
    entropy (1 = uniform) and each expert's mean weight (:func:`gate_stats`); empty without any."""
    means = _gate_means(metrics, stage)
    if not means:
        return ""
    experts = list(
        dict.fromkeys(k for t in means.values() for row in t.values() for k in row if k != "entropy")
    )
    lines = [
        "| task | layer | entropy | " + " | ".join(experts) + " |",
        "|---|---|---|" + "---|" * len(experts),
    ]
    for task, layers in means.items():
        for layer in sorted(layers):
            row = layers[layer]
            cells = [f"{row[e]:.4f}" if e in row else "—" for e in ["entropy", *experts]]
            lines.append(f"| {task} | {layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gate_summary(
    metrics: Mapping[str, float], stage: str = "test", *, top: int = 3, max_lines: int = 10
) -> list[str]:
    """A few console lines on the gates: per task its ``top`` experts by mean weight over the layers
    and the mean gate entropy; at most ``max_lines`` lines (the tasks that do not fit are counted).

    The full statistics (every task × layer × expert) are :func:`gate_table`.
    """
    means = _gate_means(metrics, stage)
    if not means:
        return []
    n_layers = max(len(layers) for layers in means.values())
    lines = [f"gate means ({stage}, averaged over {n_layers} layers): top {top} experts per task, entropy"]
    width = max(len(t) for t in means)
    tasks = list(means)
    room = max_lines - 1
    shown = tasks if len(tasks) <= room else tasks[: room - 1]
    for task in shown:
        layers = means[task].values()
        names = list(dict.fromkeys(k for row in layers for k in row if k != "entropy"))
        avg = {e: sum(row.get(e, 0.0) for row in layers) / len(layers) for e in names}
        best = sorted(avg, key=avg.__getitem__, reverse=True)[:top]
        entropy = [row["entropy"] for row in layers if "entropy" in row]
        ent = f"entropy {sum(entropy) / len(entropy):.2f}" if entropy else ""
        lines.append(
            f"  {task:<{width}}  " + ", ".join(f"{e} {avg[e]:.2f}" for e in best) + f"  {ent}".rstrip()
        )
    if len(shown) < len(tasks):
        lines.append(f"  … {len(tasks) - len(shown)} more tasks")
    return lines


def write_gate_report(
    metrics: Mapping[str, float], output_dir: Path, stage: str = "test", *, max_lines: int = 10
) -> list[str]:
    """Writes :func:`gate_table` to ``<output_dir>/gates.md`` and returns :func:`gate_summary` with a
    last line naming the file (at most ``max_lines`` lines in all); nothing without gate statistics."""
    table = gate_table(metrics, stage)
    if not table:
        return []
    path = Path(output_dir) / GATE_TABLE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# Gate statistics ({stage})\n\n{table}\n")
    return [*gate_summary(metrics, stage, max_lines=max_lines - 1), f"  every task × layer × expert: {path}"]
