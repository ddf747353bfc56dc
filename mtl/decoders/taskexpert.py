"""TaskExpert: memorial mixture-of-experts decoder.

Ye & Xu, "TaskExpert: Dynamically Assembling Multi-Task Representations with Memorial
Mixture-of-Experts", ICCV 2023. The authors never released code; this implements the paper's
description:

* at every tapped backbone layer a *memorial MoE* module decomposes the layer's feature into
  ``num_experts`` task-generic features with expert networks;
* per task, a gating network assembles a task-specific feature **per sample and per pixel** as a
  convex combination of those experts plus the task's slot of a multi-task feature memory, read as
  one more expert;
* the assembled feature is written into the task's memory slot at every tapped layer;
* after the last tapped layer the memory feeds each task's prediction head.

Choices the paper leaves open, all constructor arguments (defaults and the reason for each):

* ``num_experts = 8`` (not stated): twice the task count of NYUD-v2, enough for specialised
  task-generic spaces; cost and parameters grow linearly, so it is a cheap knob to sweep.
* Expert shape: a two-layer network ``conv_k(C → expert_hidden) → GELU → conv_1(→ channels)``,
  ``expert_kernel = 1`` (a per-pixel MLP, the transformer's own token MLP, so each expert is a
  learned re-projection of the backbone feature space), ``expert_hidden = channels``. Experts are
  separate per tapped layer (each layer's feature space differs) and shared by all tasks.
* Gates: a per-task, per-layer ``1 × 1`` conv (a linear map per pixel, the classic MoE/MMoE gate)
  on the layer-normalised backbone feature (``gate_input="feature"``; ``"feature_memory"`` also
  gives it the task's memory read), followed by a softmax over experts + memory, so weights sum to
  1 per pixel (``top_k=None``: dense; an integer keeps the k largest). Gate weights start at zero:
  uniform gates at initialisation, so every expert gets the same gradient at first.
* Memory: one ``channels``-wide map per task at the finest tapped resolution. Initialised by a
  per-task ``1 × 1`` projection of the first tapped feature (``memory_init="feature"``: the memory
  read at the first layer already carries the sample; ``"learned"``: a per-task constant;
  ``"zeros"``). Read through a per-task LayerNorm (``memory_norm``), resampled to the layer's
  resolution. Update rule ``memory_update="add"``: ``m ← m + f`` (a residual stream across
  layers: every layer's contribution and gradient path is kept; ``"ema"``: ``m ← (1−α)m + αf``
  with ``memory_momentum = α``; ``"replace"``: ``m ← f``).
* Balancing loss: ``balance_weight = 0`` (off). Dense softmax gates give every expert a gradient
  in proportion to its weight, so the dead-expert problem that balancing losses fix in sparse
  top-k routing does not arise, and the paper mentions none. With ``top_k`` set, use ~0.01.
* Prediction: the final memory slot → ``final_blocks`` task-specific ``3 × 3`` conv blocks → the
  shared head contract (a ``1 × 1`` conv per task and upsampling, :mod:`mtl.heads`).
* Intermediate supervision (``intermediate_supervision=False``): when on, every earlier layer's
  assembled task feature is also passed through the task's head and supervised with the task's
  loss, scaled by ``intermediate_weight`` (deep supervision as in InvPT's multi-scale losses).

``use_memory=False`` gives the paper's "without memory" ablation: gates over the experts only and
the last layer's assembled features as output.

On a pyramid backbone the memory lives at the finest tap: a coarser layer reads it area-averaged
(each coarse pixel sees the mean of the memory pixels it covers) and writes its feature upsampled
bilinearly.

Options for ablations, off by default (the successor MLoRE, Yang et al., "Multi-Task Dense
Prediction via Mixture of Low-Rank Experts", CVPR 2024, released code for what TaskExpert leaves
open): ``gate_mode="image"`` (one gate per sample, from the spatially pooled input, as MLoRE's
routers) or ``"static"`` (learned per-task logits, no input: a static mixture);
``expert_activation="none"`` (linear low-rank experts of rank ``expert_hidden``, as MLoRE's);
``fusion="layer_softmax"`` (MLoRE's final decoding: a per-pixel softmax over every layer's
assembled features instead of the final memory).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mtl.contracts import Decoder, DecoderOutput
from mtl.decoders.moe import (
    GATE_TABLE_FILE,
    BatchedExperts,
    ChannelNorm,
    balance_loss,
    gate_figure,
    gate_stats,
    gate_weights,
    write_gate_report,
)
from mtl.decoders.multihead import conv_bn_relu
from mtl.eval_steps import EvalContext, EvalStep

log = logging.getLogger(__name__)

CHOICES = {
    "gate_input": ("feature", "feature_memory"),
    "gate_mode": ("pixel", "image", "static"),
    "fusion": ("memory", "layer_softmax"),
    "expert_activation": ("gelu", "none"),
    "memory_init": ("feature", "learned", "zeros"),
    "memory_update": ("add", "ema", "replace"),
}


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``x`` resampled to ``size``: area averaging where it shrinks (every source pixel counts: a
    memory read at a coarser tap is the mean of the pixels it covers), bilinear where it grows."""
    size = tuple(size)
    h, w = x.shape[-2:]
    if (h, w) == size:
        return x
    if size[0] <= h and size[1] <= w:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class StaticGate(nn.Module):
    """Gate logits that do not depend on the input: one learned vector per task and layer (a static
    mixture, the baseline of the paper's claim that dynamic gating helps). Zero-initialised: uniform.

    Args:
        num_gates: experts (+ the memory).
    """

    def __init__(self, *, num_gates: int) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(num_gates))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B × C × h × w`` (only its shape is used) → logits ``B × E × h × w``."""
        b, _, h, w = x.shape
        # computed, not a view of the parameter: under no_grad a view of a leaf still requires grad
        # without a grad_fn, which autograd hooks on module outputs (FLOP counting) refuse
        return self.logits.clone().view(1, -1, 1, 1).expand(b, -1, h, w)


class LayerFusion(nn.Module):
    """MLoRE's final decoding (Yang et al., CVPR 2024, ``task_mask``): per pixel, a softmax over the
    tapped layers of one task's assembled features, predicted from all of them by
    ``conv_1(L·D → D) → BN → GELU → conv_3(D → L)``; the output is the weighted sum.

    Args:
        channels: width ``D`` of the task features.
        num_layers: tapped layers ``L``.
    """

    def __init__(self, *, channels: int, num_layers: int) -> None:
        super().__init__()
        self.weights = nn.Sequential(
            nn.Conv2d(num_layers * channels, channels, 1),
            nn.BatchNorm2d(channels),
            nn.GELU(),
            nn.Conv2d(channels, num_layers, 3, padding=1),
        )

    def forward(self, layers: Sequence[torch.Tensor]) -> torch.Tensor:
        """``L`` maps ``B × D × h × w`` (one resolution) → their per-pixel softmax-weighted sum."""
        weights = self.weights(torch.cat(list(layers), dim=1)).softmax(dim=1)  # (B, L, h, w)
        return torch.einsum("lbdhw,blhw->bdhw", torch.stack(list(layers)), weights)


class TaskBranch(nn.Module):
    """Everything task-specific: a gate per layer, the memory initialiser and read norm, the final
    fusion (``fusion="layer_softmax"``), the output block."""

    def __init__(
        self,
        *,
        in_channels: Sequence[int],
        channels: int,
        gate_out: int,
        gate_input: str,
        gate_mode: str,
        use_memory: bool,
        memory_init: str,
        memory_norm: bool,
        fusion: str,
        final_blocks: int,
    ) -> None:
        super().__init__()
        extra = channels if gate_input == "feature_memory" and use_memory else 0
        if gate_mode == "static":
            self.gates = nn.ModuleList(StaticGate(num_gates=gate_out) for _ in in_channels)
        else:
            self.gates = nn.ModuleList(nn.Conv2d(c + extra, gate_out, 1) for c in in_channels)
            for g in self.gates:
                nn.init.zeros_(g.weight)
                nn.init.zeros_(g.bias)
        self.memory_proj = (
            nn.Conv2d(in_channels[0], channels, 1) if use_memory and memory_init == "feature" else None
        )
        self.memory_slot = (
            nn.Parameter(torch.randn(channels) * 0.02) if use_memory and memory_init == "learned" else None
        )
        self.read_norm = ChannelNorm(channels=channels) if use_memory and memory_norm else nn.Identity()
        self.fusion = (
            LayerFusion(channels=channels, num_layers=len(in_channels)) if fusion == "layer_softmax" else None
        )
        self.out = nn.Sequential(*(conv_bn_relu(channels, channels) for _ in range(final_blocks)))


class TaskExpertDecoder(Decoder):
    """Memorial mixture-of-experts decoder (TaskExpert). See the module docstring for every choice.

    Args:
        in_channels: channels of each tapped backbone layer (one memorial MoE module per layer).
        tasks: task names.
        channels: width ``D`` of expert outputs, memory slots and task features.
        num_experts: experts per layer (the memory is one more).
        expert_hidden: hidden width of each expert (default ``channels``).
        expert_kernel: 1 (per-pixel MLP experts) or 3 (3 × 3 first layer).
        expert_activation: ``"gelu"`` (two-layer MLP experts) or ``"none"`` (linear low-rank experts of
            rank ``expert_hidden``, MLoRE's ``LoraBlock``).
        gate_input: ``"feature"`` or ``"feature_memory"`` (also the task's memory read).
        gate_mode: ``"pixel"`` (a gate per pixel), ``"image"`` (one per sample, from the spatial mean
            of the gate input, as MLoRE's routers) or ``"static"`` (learned logits per task and layer,
            no input).
        top_k: keep the k largest gate logits per pixel (``None``: dense softmax).
        use_memory: the multi-task feature memory (False: the paper's ablation without it).
        memory_init: ``"feature"``, ``"learned"`` or ``"zeros"``.
        memory_update: ``"add"``, ``"ema"`` or ``"replace"``.
        memory_momentum: ``α`` of the ``"ema"`` update.
        memory_norm: LayerNorm the memory slot before reading it.
        fusion: what feeds the output block: ``"memory"`` (the final memory slot; without memory the
            last layer's assembled features) or ``"layer_softmax"`` (MLoRE's per-pixel softmax over
            every layer's assembled features, :class:`LayerFusion`).
        final_blocks: task-specific 3 × 3 conv blocks on the final memory.
        balance_weight: weight of the importance-balancing aux loss (0: off).
        intermediate_supervision: supervise every earlier layer's assembled features too.
        intermediate_weight: weight of each intermediate loss relative to the final one.
        log_gate_means: report the mean weight of every expert (not only the entropy) in the
            eval-mode :attr:`~mtl.contracts.DecoderOutput.stats`.
    """

    def __init__(
        self,
        *,
        in_channels: Sequence[int],
        tasks: Sequence[str],
        channels: int = 256,
        num_experts: int = 8,
        expert_hidden: int | None = None,
        expert_kernel: int = 1,
        expert_activation: str = "gelu",
        gate_input: str = "feature",
        gate_mode: str = "pixel",
        top_k: int | None = None,
        use_memory: bool = True,
        memory_init: str = "feature",
        memory_update: str = "add",
        memory_momentum: float = 0.5,
        memory_norm: bool = True,
        fusion: str = "memory",
        final_blocks: int = 1,
        balance_weight: float = 0.0,
        intermediate_supervision: bool = False,
        intermediate_weight: float = 1.0,
        log_gate_means: bool = True,
    ) -> None:
        super().__init__()
        given = {
            "gate_input": gate_input,
            "gate_mode": gate_mode,
            "fusion": fusion,
            "expert_activation": expert_activation,
            "memory_init": memory_init,
            "memory_update": memory_update,
        }
        for key, value in given.items():
            if value not in CHOICES[key]:
                raise ValueError(f"TaskExpertDecoder {key}={value!r}; expected one of {CHOICES[key]}")
        if gate_mode == "static" and gate_input != "feature":
            raise ValueError(
                f"TaskExpertDecoder gate_input={gate_input!r} with gate_mode='static': static gates read no "
                "input; set gate_input=feature or another gate_mode (pixel, image)"
            )
        n_gates = num_experts + int(use_memory)
        if top_k is not None and not 1 <= top_k <= n_gates:
            raise ValueError(
                f"TaskExpertDecoder top_k={top_k}; expected 1..{n_gates} (experts + memory) or null"
            )
        if not 0.0 < memory_momentum <= 1.0:
            raise ValueError(f"TaskExpertDecoder memory_momentum={memory_momentum}; expected 0 < α ≤ 1")
        if not in_channels or not tasks:
            raise ValueError(f"TaskExpertDecoder needs ≥ 1 tapped layer and task; got {in_channels}, {tasks}")
        self.tasks = list(tasks)
        self.in_channels = [int(c) for c in in_channels]
        self.out_channels = channels
        self.num_experts = num_experts
        self.top_k = top_k
        self.gate_input = gate_input
        self.gate_mode = gate_mode
        self.fusion = fusion
        self.use_memory = use_memory
        self.memory_init = memory_init
        self.memory_update = memory_update
        self.memory_momentum = memory_momentum
        self.balance_weight = balance_weight
        self.intermediate_supervision = intermediate_supervision
        self.intermediate_weight = intermediate_weight
        self.log_gate_means = log_gate_means
        self.expert_names = [f"expert{j}" for j in range(num_experts)] + (["memory"] if use_memory else [])
        self.in_norm = nn.ModuleList(ChannelNorm(channels=c) for c in in_channels)
        self.experts = nn.ModuleList(
            BatchedExperts(
                in_channels=c,
                out_channels=channels,
                num_experts=num_experts,
                hidden=expert_hidden or channels,
                kernel=expert_kernel,
                activation=expert_activation == "gelu",
            )
            for c in in_channels
        )
        self.per_task = nn.ModuleDict(
            {
                t: TaskBranch(
                    in_channels=in_channels,
                    channels=channels,
                    gate_out=n_gates,
                    gate_input=gate_input,
                    gate_mode=gate_mode,
                    use_memory=use_memory,
                    memory_init=memory_init,
                    memory_norm=memory_norm,
                    fusion=fusion,
                    final_blocks=final_blocks,
                )
                for t in self.tasks
            }
        )

    def _init_memory(self, task: str, first: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        branch = self.per_task[task]
        b = first.shape[0]
        if self.memory_init == "feature":
            return _resize(branch.memory_proj(first), size)
        if self.memory_init == "learned":
            return branch.memory_slot.view(1, -1, 1, 1).expand(b, -1, *size)
        return first.new_zeros(b, self.out_channels, *size)

    def _write(self, memory: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
        feature = _resize(feature, memory.shape[-2:])
        if self.memory_update == "add":
            return memory + feature
        if self.memory_update == "ema":
            return (1.0 - self.memory_momentum) * memory + self.memory_momentum * feature
        return feature

    def check_features(self, feature_info: Sequence[Mapping[str, int]]) -> None:
        """The backbone must tap as many levels, of the same widths, as the decoder was built for."""
        widths = self.in_channels
        given = [int(f["channels"]) for f in feature_info]
        if given != widths:
            raise ValueError(
                f"TaskExpertDecoder built for {len(widths)} tapped layers of {widths} channels; the backbone "
                f"gives {len(given)} of {given} (its out_indices decide the taps)"
            )

    def forward(self, feats: Sequence[torch.Tensor], *, tasks: Sequence[str] | None = None) -> DecoderOutput:
        """Tapped features (``B × C_l × h_l × w_l``) → task → ``B × D × h × w`` at the finest tap.

        Training: the balancing loss (``balance_weight > 0``) and the earlier layers' assembled
        features (``intermediate_supervision``); eval: gate statistics and the gates of every
        layer (``maps["gates_<task>"]``, for :meth:`picture_maps`).
        """
        if len(feats) != len(self.experts):
            raise ValueError(
                f"TaskExpertDecoder built for {len(self.experts)} tapped layers, got {len(feats)} maps"
            )
        tasks = self.task_list(tasks)
        size = max((f.shape[-2:] for f in feats), key=lambda s: s[0] * s[1])  # the memory's resolution
        xs = [norm(f) for norm, f in zip(self.in_norm, feats, strict=True)]
        memory = {t: self._init_memory(t, xs[0], size) for t in tasks} if self.use_memory else {}
        assembled: dict[str, torch.Tensor] = {}
        per_layer: dict[str, list[torch.Tensor]] = {}
        aux, intermediate, record = [], [], not self.training
        stats: dict[str, torch.Tensor] = {}
        maps: dict[str, list[torch.Tensor]] = {f"gates_{t}": [] for t in tasks} if record else {}
        means = self.expert_names if self.log_gate_means else None
        mix_memory = self.gate_input == "feature_memory" and self.use_memory
        for layer, x in enumerate(xs):
            experts = self.experts[layer](x)  # (B, N, D, h, w)
            for t in tasks:
                branch = self.per_task[t]
                read = branch.read_norm(_resize(memory[t], x.shape[-2:])) if self.use_memory else None
                gate_in = torch.cat([x, read], dim=1) if mix_memory else x
                if self.gate_mode == "image":  # one gate per sample, broadcast over the pixels
                    logits = branch.gates[layer](gate_in.mean(dim=(2, 3), keepdim=True)).expand(
                        -1, -1, *x.shape[-2:]
                    )
                else:
                    logits = branch.gates[layer](gate_in)
                gates = gate_weights(logits, top_k=self.top_k)  # (B, E, h, w)
                f = torch.einsum("bndhw,bnhw->bdhw", experts, gates[:, : self.num_experts])
                if read is not None:
                    f = f + gates[:, self.num_experts :] * read
                assembled[t] = f
                if self.fusion == "layer_softmax":
                    per_layer.setdefault(t, []).append(_resize(f, size))
                if self.use_memory:
                    memory[t] = self._write(memory[t], f)
                if self.training and self.balance_weight > 0:
                    aux.append(balance_loss(gates))
                if record:
                    stats.update(gate_stats(t, layer, gates, means))
                    maps[f"gates_{t}"].append(gates.detach())
            if self.training and self.intermediate_supervision and layer < len(xs) - 1:
                intermediate.append(dict(assembled))
        if self.fusion == "layer_softmax":
            final = {t: self.per_task[t].fusion(per_layer[t]) for t in tasks}
        elif self.use_memory:
            final = memory
        else:
            final = {t: _resize(assembled[t], size) for t in tasks}
        return DecoderOutput(
            features={t: self.per_task[t].out(final[t]) for t in tasks},
            aux_loss=self.balance_weight * torch.stack(aux).mean() if aux else None,
            intermediate=intermediate,
            intermediate_weight=self.intermediate_weight,
            stats=stats,
            maps=maps,
        )

    def picture_maps(
        self, maps: Mapping[str, list[torch.Tensor]], index: int, *, size: tuple[int, int]
    ) -> dict[str, np.ndarray]:
        """``gates_<task>`` pictures of sample ``index`` of an eval output's maps: every layer's gates
        with the layer names and a legend of the experts' colours (:func:`gate_figure`)."""
        return {
            name: gate_figure(
                [g[index] for g in layers],
                size=size,
                memory=self.use_memory,
                expert_names=self.expert_names,
                title=f"gates of {name.removeprefix('gates_')}",
            )
            for name, layers in maps.items()
            if name.startswith("gates_") and layers
        }


class GateReport(EvalStep):
    """Evaluation step: the gate statistics of the test pass, in short on the console, in full in a file.

    The test metrics hold a mean weight per task × layer × expert (and a gate entropy per task ×
    layer): 160 values for 4 tasks, 4 layers and 9 experts. This writes all of them to
    ``<output_dir>/gates.md`` (:func:`~mtl.decoders.moe.gate_table`) and logs at most
    ``max_lines`` lines: per task its top experts and the mean entropy, and the file's path
    (``ctx.reports["gates"]``). Models without gate statistics get nothing. Rank 0 writes.

    Args:
        max_lines: console lines at most (``eval_steps.gate_report.max_lines``).
    """

    def __init__(self, *, max_lines: int = 10) -> None:
        if max_lines < 2:
            raise ValueError(
                f"eval_steps.gate_report.max_lines must be >= 2 (a summary and the file), got {max_lines}"
            )
        self.max_lines = int(max_lines)

    def after_test(self, ctx: EvalContext) -> None:
        if not ctx.is_global_zero:
            return
        lines = write_gate_report(ctx.metrics, ctx.output_dir, "test", max_lines=self.max_lines)
        if lines:
            log.info("%s", "\n".join(lines))
            ctx.reports["gates"] = str(ctx.output_dir / GATE_TABLE_FILE)
