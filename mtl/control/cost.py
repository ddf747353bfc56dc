"""Cost of a width configuration: FLOPs (``torch.utils.flop_counter``) and active parameters.

Aich et al., "Efficient Controllable Multi-Task Architectures", ICCV 2023, control the
compute of a slimmable multi-task model by its encoder and decoder widths; the search needs
the cost of every configuration, measured once and cached.

A configuration is ``WidthConfig(encoder=w_e, decoders={task: w_t})``. FLOPs count one
forward pass of one image at the given input size (multiply-adds counted as 2 FLOPs, as
``FlopCounterMode`` does); active parameters are those the configuration's forward touches.
Both add up over the encoder and the task decoders, so :class:`CostModel` counts each part once
and sums (a few counts, not one forward per configuration).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mtl.backbones.slimmable_vit import SlimmableAttention, SlimmableMlp, SlimmableViT
from mtl.decoders.slimmable import SlimmableConv2d, SlimmableDecoder, SwitchableBatchNorm2d, active

if TYPE_CHECKING:
    from mtl.model import MultiTaskNet


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


def active_parameters(model: nn.Module, only: Iterable[nn.Parameter] | None = None) -> int:
    """Parameters used at the model's current widths (the sliced part of every slimmable layer).

    A slimmable convolution's input width is the one of its last call, so run the forward at the
    widths first. ``only``: count just these parameters (a slimmable layer counts when its weight is
    among them), e.g. :meth:`~mtl.model.MultiTaskNet.task_parameters` of one task.
    """
    keep = None if only is None else {id(p) for p in only}
    total = 0
    slim_params: set[int] = set()
    for m in model.modules():
        if isinstance(m, SlimmableAttention):
            slim_params.update(id(p) for p in (*m.qkv.parameters(), *m.proj.parameters()))
            if keep is not None and id(m.qkv.weight) not in keep:
                continue
            h, d, c = m.active_heads(), m.head_dim, m.qkv.in_features
            total += 3 * h * d * c + (3 * h * d if m.qkv.bias is not None else 0)
            total += c * h * d + (c if m.proj.bias is not None else 0)
        elif isinstance(m, SlimmableMlp):
            slim_params.update(id(p) for p in (*m.fc1.parameters(), *m.fc2.parameters()))
            if keep is not None and id(m.fc1.weight) not in keep:
                continue
            n, c = m.active_hidden(), m.fc1.in_features
            total += (
                n * c + (n if m.fc1.bias is not None else 0) + c * n + (c if m.fc2.bias is not None else 0)
            )
        elif isinstance(m, SlimmableConv2d):
            slim_params.update(id(p) for p in m.parameters())
            if keep is not None and id(m.weight) not in keep:
                continue
            cin = m.in_channels if m.last_in is None else m.last_in
            cout = active(m.width, m.out_channels) if m.slim_out else m.out_channels
            k = m.kernel_size[0] * m.kernel_size[1]
            total += cout * cin * k + (cout if m.bias is not None else 0)
        elif isinstance(m, SwitchableBatchNorm2d):
            slim_params.update(id(p) for p in m.parameters())
            bn = m.bn[m.widths.index(m.width)]
            if keep is not None and id(bn.weight) not in keep:
                continue
            total += sum(p.numel() for p in bn.parameters())
    return total + sum(
        p.numel() for p in model.parameters() if id(p) not in slim_params and (keep is None or id(p) in keep)
    )


def count_forward(model: MultiTaskNet, config: WidthConfig, input_size: Sequence[int]) -> tuple[int, int]:
    """``(FLOPs, active parameters)`` of one whole forward pass of one image at ``config``.

    The reference :class:`CostModel` is checked against (one count per configuration: slow for a
    search over hundreds of them). Leaves the model at ``config``'s widths.
    """
    was_training = model.training
    model.eval()
    apply_config(model, config)
    x = torch.zeros(1, 3, *input_size, device=next(model.parameters()).device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, task_subset=list(config.decoders))
    model.train(was_training)
    return counter.get_total_flops(), active_parameters(model)


class CostModel:
    """FLOPs and active parameters of every width configuration of one slimmable model.

    Costs add up over the parts of a configuration: the encoder at its width (the backbone and the
    decoder's shared part), then each task's decoder branch and head at the task's width. So the
    parts are counted once, when the model is built — each encoder width once, and each task's
    decoder once per width and per shape of the encoder features it reads (the slimmable ViT's
    features have the same shape at every width: once) — and a configuration's cost is their sum:
    ``|W| + T·|W|`` counts instead of one forward per configuration (``|W|^(T+1)``). The sum equals
    :func:`count_forward` of the configuration exactly (``tests/control/test_search_speed.py``).
    Counting leaves the model at full width.

    Args:
        model: a :class:`~mtl.model.MultiTaskNet` with a slimmable backbone and decoder.
        input_size: ``(H, W)`` of the image the cost refers to.
    """

    def __init__(self, model: MultiTaskNet, input_size: Sequence[int]) -> None:
        if not isinstance(model.backbone, SlimmableViT) or not isinstance(model.decoder, SlimmableDecoder):
            raise TypeError(
                "CostModel needs a slimmable model (model=slimmable): got backbone "
                f"{type(model.backbone).__name__}, decoder {type(model.decoder).__name__}"
            )
        self.model, self.input_size = model, tuple(int(s) for s in input_size)
        self.encoder_widths = list(model.backbone.widths)
        self.decoder_widths = list(model.decoder.widths)
        self.tasks = list(model.tasks)
        self._cache: dict[tuple, tuple[float, int]] = {}
        # encoder width → (FLOPs, active parameters, shape of the features the decoders read)
        self._encoder: dict[float, tuple[int, int, tuple]] = {}
        # (feature shape, task, decoder width) → (FLOPs, active parameters)
        self._decoder: dict[tuple[tuple, str, float], tuple[int, int]] = {}
        self.counts = 0  # forward parts counted
        self._count_parts()

    @torch.no_grad()
    def _count_parts(self) -> None:
        model, size = self.model, self.input_size
        was_training = model.training
        model.eval()
        shared = list(model.shared_parameters())
        own = {t: list(model.task_parameters(t)) for t in self.tasks}
        x = torch.zeros(1, 3, *size, device=next(model.parameters()).device)
        for e in self.encoder_widths:
            model.backbone.set_width(e)
            with FlopCounterMode(display=False) as counter:
                rep, feats = model.encode_features(x)
            shape = tuple(tuple(r.shape) for r in rep)
            self._encoder[e] = (counter.get_total_flops(), active_parameters(model, shared), shape)
            self.counts += 1
            for t in self.tasks:
                for d in self.decoder_widths:
                    if (shape, t, d) in self._decoder:
                        continue
                    model.decoder.set_widths({t: d})
                    with FlopCounterMode(display=False) as counter:
                        model.decode(rep, size=size, tasks=[t], features=feats)
                    params = active_parameters(model, own[t])
                    self._decoder[(shape, t, d)] = (counter.get_total_flops(), params)
                    self.counts += 1
        apply_config(model, WidthConfig(1.0, dict.fromkeys(self.tasks, 1.0)))
        model.train(was_training)

    def flops(self, config: WidthConfig) -> int:
        """FLOPs of one image's forward pass at ``config`` (an integer: the sum of its parts)."""
        return self._parts(config)[0]

    def _parts(self, config: WidthConfig) -> tuple[int, int]:
        if config.encoder not in self._encoder:
            raise ValueError(f"encoder width {config.encoder} is not one of {self.encoder_widths}")
        flops, params, shape = self._encoder[config.encoder]
        for t, d in config.decoders.items():
            if (shape, t, d) not in self._decoder:
                raise ValueError(
                    f"no decoder width {d} for task {t!r}: tasks {self.tasks}, widths {self.decoder_widths}"
                )
            f, p = self._decoder[(shape, t, d)]
            flops, params = flops + f, params + p
        return flops, params

    def __call__(self, config: WidthConfig) -> tuple[float, int]:
        """``(GFLOPs, active parameters)`` of ``config`` for one image."""
        key = config.key()
        if key not in self._cache:
            flops, params = self._parts(config)
            self._cache[key] = (flops / 1e9, params)
        return self._cache[key]

    def cheapest(self) -> tuple[WidthConfig, float]:
        """The cheapest configuration of every task (each part at its cheapest width) and its GFLOPs."""
        best: tuple[WidthConfig, float] | None = None
        for e in self.encoder_widths:
            shape = self._encoder[e][2]
            decoders = {
                t: min(self.decoder_widths, key=lambda d, task=t: self._decoder[(shape, task, d)][0])
                for t in self.tasks
            }
            config = WidthConfig(e, decoders)
            if best is None or self(config)[0] < best[1]:
                best = (config, self(config)[0])
        assert best is not None  # a slimmable model has at least one width
        return best
