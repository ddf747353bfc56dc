"""``MultiTaskNet``: backbone → decoder → heads, a plain ``nn.Module``.

The parts talk through :mod:`mtl.contracts`: the backbone gives :class:`~mtl.contracts.Features`
for the requested tasks (one shared list, or per task), the decoder runs once per distinct
feature list (:meth:`~mtl.contracts.Features.groups`) and returns a
:class:`~mtl.contracts.DecoderOutput`, the heads predict at the input resolution. One call
returns everything it produced in a :class:`~mtl.contracts.ModelOutput`; nothing is kept on the
modules for a later call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from mtl.contracts import Backbone, Decoder, DecoderOutput, Features, ModelOutput
from mtl.heads import TaskHeads


def merge_passes(outputs: Sequence[DecoderOutput]) -> DecoderOutput:
    """The decoder outputs of several backbone passes read as one multi-task output.

    Task features, intermediate features (level by level), statistics and maps are joined per
    task; the auxiliary losses are averaged over the passes that have one (one pass: its own).
    """
    if len(outputs) == 1:
        return outputs[0]
    aux = [o.aux_loss for o in outputs if o.aux_loss is not None]
    intermediate: list[dict[str, torch.Tensor]] = []
    merged = DecoderOutput(
        features={}, aux_loss=torch.stack(aux).mean() if aux else None, intermediate=intermediate
    )
    for o in outputs:
        merged.features.update(o.features)
        for level, feats in enumerate(o.intermediate):
            if level == len(intermediate):
                intermediate.append({})
            intermediate[level].update(feats)
        merged.intermediate_weight = o.intermediate_weight
        merged.stats.update(o.stats)
        merged.maps.update(o.maps)
    return merged


class MultiTaskNet(nn.Module):
    """A backbone with a multi-task decoder and one head per task.

    Channel counts are never configured twice: the decoder is built from the backbone's
    ``feature_info`` and the heads from each task's ``out_channels``. Any decoder takes any
    backbone's features, shared or per task (the decoder then runs once per task stream);
    :meth:`~mtl.contracts.Decoder.check_features` refuses, at construction, features it cannot take.

    Args:
        backbone: a :class:`~mtl.contracts.Backbone`.
        decoder: a partial :class:`~mtl.contracts.Decoder` constructor, completed with
            ``in_channels`` and ``tasks``.
        tasks: task name → output channels of its prediction.
        tasks_at_inference: the tasks an eval-mode forward predicts when no tasks are given
            (``None``: all). Only their backbone passes or streams (task-conditioned backbones:
            M³ViT, MTLoRA), decoder branches and heads run; training always predicts every task.
    """

    def __init__(
        self,
        *,
        backbone: Backbone,
        decoder: Callable[..., Decoder],
        tasks: Mapping[str, int],
        tasks_at_inference: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.tasks = list(tasks)
        unknown = [t for t in tasks_at_inference or () if t not in self.tasks]
        if unknown:
            raise ValueError(
                f"model.tasks_at_inference has unknown task(s) {unknown}; the tasks are {self.tasks}"
            )
        self.tasks_at_inference = list(tasks_at_inference) if tasks_at_inference else None
        if not isinstance(backbone, Backbone):
            raise TypeError(
                f"model.backbone must be an mtl.contracts.Backbone (features(x, tasks) -> Features), "
                f"got {type(backbone).__name__}"
            )
        if backbone.tasks is not None and list(backbone.tasks) != self.tasks:
            raise ValueError(
                f"backbone tasks {list(backbone.tasks)} differ from the model's tasks {self.tasks}"
            )
        self.backbone = backbone
        in_channels = [f["channels"] for f in backbone.feature_info]
        self.decoder = decoder(in_channels=in_channels, tasks=self.tasks)
        if not isinstance(self.decoder, Decoder):
            raise TypeError(
                f"model.decoder must build an mtl.contracts.Decoder (forward(feats, tasks=) -> "
                f"DecoderOutput), got {type(self.decoder).__name__}"
            )
        self.decoder.check_features(backbone.feature_info)
        self.heads = TaskHeads(in_channels=self.decoder.out_channels, out_channels=tasks)

    def _task_list(self, tasks: Sequence[str] | None) -> list[str]:
        if tasks is None:
            tasks = self.tasks if self.training else (self.tasks_at_inference or self.tasks)
        unknown = [t for t in tasks if t not in self.tasks]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; the model's tasks are {self.tasks}")
        return list(tasks)

    # ------------------------------------------------------------------ forward
    def run(self, x: torch.Tensor, *, tasks: Sequence[str] | None = None) -> ModelOutput:
        """One forward: the predictions of ``tasks`` at the input resolution and all it produced.

        Args:
            x: images ``B × 3 × H × W``.
            tasks: the tasks to predict (``None``: every task while training, ``tasks_at_inference``
                in eval mode). Only what they need runs.
        """
        tasks = self._task_list(tasks)
        feats = self.backbone.features(x, tasks)
        out = merge_passes([self.decoder(f, tasks=group) for f, group in feats.groups(tasks)])
        return self._output(out, feats, size=tuple(x.shape[-2:]), tasks=tasks)

    def forward(
        self, x: torch.Tensor, *, task_subset: Sequence[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """Task → raw prediction at the input resolution (``run(x, tasks=task_subset).preds``)."""
        return self.run(x, tasks=task_subset).preds

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The shared representation every task reads (for representation-level "-UB" strategies).

        The backbone's shared feature maps, followed by the decoder's shared part when it splits
        itself (``decoder.splits_representation``). ``decode(encode(x), size=x.shape[-2:]).preds``
        equals ``forward(x)``. The backbone's auxiliary loss is left out; :meth:`encode_features`
        keeps it.
        """
        return self.encode_features(x)[0]

    def encode_features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], Features]:
        """:meth:`encode` and the backbone's :class:`~mtl.contracts.Features` (its aux loss, stats)."""
        if self.backbone.kind != "shared":
            raise ValueError(self._no_shared_representation())
        feats = self.backbone.features(x, self.tasks)
        return self.decoder.encode(feats.shared), feats

    def decode(
        self,
        rep: Sequence[torch.Tensor],
        *,
        size: tuple[int, int],
        tasks: Sequence[str] | None = None,
        features: Features | None = None,
    ) -> ModelOutput:
        """Predictions of ``tasks`` at ``size`` from the representation :meth:`encode` returned.

        Args:
            rep: :meth:`encode`'s output (or leaves standing for it).
            size: ``(H, W)`` of the predictions.
            tasks: as in :meth:`run`.
            features: the backbone output of :meth:`encode_features`: its aux loss and statistics
                join the output (``None``: the decoder's only).
        """
        tasks = self._task_list(tasks)
        out = self.decoder.decode(list(rep), tasks=tasks)
        return self._output(out, features, size=tuple(size), tasks=tasks)

    def _output(
        self, out: DecoderOutput, feats: Features | None, *, size: tuple[int, int], tasks: Sequence[str]
    ) -> ModelOutput:
        parts = [p for p in (feats.aux_loss if feats else None, out.aux_loss) if p is not None]
        intermediate: dict[str, list[torch.Tensor]] = {}
        for level in out.intermediate:
            for t, pred in self.heads({t: level[t] for t in tasks if t in level}, size=size).items():
                intermediate.setdefault(t, []).append(pred)
        return ModelOutput(
            preds=self.heads({t: out.features[t] for t in tasks}, size=size),
            aux_loss=sum(parts[1:], parts[0]) if parts else None,
            intermediate=intermediate,
            intermediate_weight=float(out.intermediate_weight),
            stats={**(feats.stats if feats else {}), **out.stats},
            maps=out.maps,
        )

    # ------------------------------------------------------------------ evaluation helpers
    def finish_stats(self, means: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """An evaluation's statistics from the batch-weighted means of :attr:`ModelOutput.stats`
        (the backbone's and the decoder's :meth:`~mtl.contracts.Backbone.finish_stats`)."""
        return self.decoder.finish_stats(self.backbone.finish_stats(means))

    def picture_maps(
        self, maps: Mapping[str, list[torch.Tensor]], index: int = 0, *, size: tuple[int, int]
    ) -> dict:
        """Pictures (name → ``H × W × 3`` uint8) of sample ``index`` of :attr:`ModelOutput.maps`
        (e.g. TaskExpert's gate maps); empty for decoders without any."""
        return self.decoder.picture_maps(maps, index, size=size)

    # ------------------------------------------------------------------ parameter groups
    def _no_shared_representation(self) -> str:
        return (
            f"the {type(self.backbone).__name__} backbone gives every task its own features (kind "
            f"'{self.backbone.kind}'), so there is no shared representation for rep_grad=true "
            "(representation-level '-UB' strategies); use the parameter-level variant (rep_grad=false) "
            "or one shared pass (model.backbone.task_groups)"
        )

    def representation_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters below :meth:`encode`'s output: the backbone and the decoder's shared part."""
        if self.backbone.kind != "shared":
            raise ValueError(self._no_shared_representation())
        yield from self.backbone.parameters()
        yield from self.decoder.shared_parameters()

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """Parameters used only by ``task``: task-specific backbone adapters, its decoder branch, its head."""
        yield from self.backbone.task_parameters(task)
        if self.decoder.per_task is not None and task in self.decoder.per_task:
            yield from self.decoder.per_task[task].parameters()
        yield from self.heads.heads[task].parameters()

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters every task depends on (backbone and shared decoder parts)."""
        specific = {id(p) for t in self.tasks for p in self.task_parameters(t)}
        for p in self.parameters():
            if id(p) not in specific:
                yield p
