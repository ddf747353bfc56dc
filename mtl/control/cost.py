"""Cost of a width configuration: FLOPs (``torch.utils.flop_counter``) and active parameters.

Aich et al., "Efficient Controllable Multi-Task Architectures", ICCV 2023, control the
compute of a slimmable multi-task model by its encoder and decoder widths; the search needs
the cost of every configuration, measured once and cached.

A configuration is ``WidthConfig(encoder=w_e, decoders={task: w_t})``. FLOPs count one
forward pass of one image at the given input size (multiply-adds counted as 2 FLOPs, as
``FlopCounterMode`` does); active parameters are those the configuration's forward touches.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mtl.backbones.slimmable_vit import SlimmableAttention, SlimmableMlp
from mtl.decoders.slimmable import SlimmableConv2d, SwitchableBatchNorm2d, active


@dataclass(frozen=True)
class WidthConfig:
    """Encoder width and one decoder width per task (fractions of the full widths)."""

    encoder: float
    decoders: Mapping[str, float] = field(default_factory=dict)

    def key(self) -> tuple:
        return (self.encoder, tuple(sorted(self.decoders.items())))


def apply_config(model: nn.Module, config: WidthConfig) -> None:
    """Sets the widths of a :class:`~mtl.model.MultiTaskNet` with slimmable parts."""
    model.backbone.set_width(config.encoder)
    model.decoder.set_widths(dict(config.decoders))


def active_parameters(model: nn.Module) -> int:
    """Parameters used at the model's current widths (the sliced part of every slimmable layer)."""
    total = 0
    slim_params: set[int] = set()
    for m in model.modules():
        if isinstance(m, SlimmableAttention):
            h, d, c = m.active_heads(), m.head_dim, m.qkv.in_features
            total += 3 * h * d * c + (3 * h * d if m.qkv.bias is not None else 0)
            total += c * h * d + (c if m.proj.bias is not None else 0)
            slim_params.update(id(p) for p in (*m.qkv.parameters(), *m.proj.parameters()))
        elif isinstance(m, SlimmableMlp):
            n, c = m.active_hidden(), m.fc1.in_features
            total += (
                n * c + (n if m.fc1.bias is not None else 0) + c * n + (c if m.fc2.bias is not None else 0)
            )
            slim_params.update(id(p) for p in (*m.fc1.parameters(), *m.fc2.parameters()))
        elif isinstance(m, SlimmableConv2d):
            cin = m.in_channels if m.last_in is None else m.last_in
            cout = active(m.width, m.out_channels) if m.slim_out else m.out_channels
            k = m.kernel_size[0] * m.kernel_size[1]
            total += cout * cin * k + (cout if m.bias is not None else 0)
            slim_params.update(id(p) for p in m.parameters())
        elif isinstance(m, SwitchableBatchNorm2d):
            bn = m.bn[m.widths.index(m.width)]
            total += sum(p.numel() for p in bn.parameters())
            slim_params.update(id(p) for p in m.parameters())
    return total + sum(p.numel() for p in model.parameters() if id(p) not in slim_params)


class CostModel:
    """Cached FLOPs and active parameters of width configurations of one model.

    Args:
        model: a :class:`~mtl.model.MultiTaskNet` with a slimmable backbone and decoder.
        input_size: ``(H, W)`` of the image the cost refers to.
    """

    def __init__(self, model: nn.Module, input_size: Sequence[int]) -> None:
        self.model, self.input_size = model, tuple(int(s) for s in input_size)
        self._cache: dict[tuple, tuple[float, int]] = {}

    @torch.no_grad()
    def __call__(self, config: WidthConfig) -> tuple[float, int]:
        """``(GFLOPs, active parameters)`` of ``config`` for one image."""
        key = config.key()
        if key not in self._cache:
            was_training = self.model.training
            self.model.eval()
            apply_config(self.model, config)
            x = torch.zeros(1, 3, *self.input_size, device=next(self.model.parameters()).device)
            with FlopCounterMode(display=False) as counter:
                self.model(x)
            self._cache[key] = (counter.get_total_flops() / 1e9, active_parameters(self.model))
            self.model.train(was_training)
        return self._cache[key]
