"""``MultiTaskNet``: backbone → decoder → heads, a plain ``nn.Module``."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from mtl.backbones.task_passes import decode_passes
from mtl.heads import TaskHeads


class MultiTaskNet(nn.Module):
    """A shared backbone with a multi-task decoder and one head per task.

    Channel counts are never configured twice: the decoder is built from the backbone's
    ``feature_info`` and the heads from each task's ``out_channels``.

    Args:
        backbone: a module with ``forward(x) -> list[Tensor]`` and ``feature_info``.
        decoder: a partial decoder constructor, completed with ``in_channels`` and ``tasks``.
        tasks: task name → output channels of its prediction.
        tasks_at_inference: the tasks an eval-mode forward predicts when no ``task_subset`` is
            given (``None``: all). Only their backbone passes (task-conditioned backbones such as
            M³ViT), decoder branches and heads run; training always predicts every task.
    """

    def __init__(
        self,
        *,
        backbone: nn.Module,
        decoder: Callable[..., nn.Module],
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
        if hasattr(backbone, "forward_tasks") and list(backbone.tasks) != self.tasks:
            raise ValueError(
                f"backbone tasks {list(backbone.tasks)} differ from the model's tasks {self.tasks}"
            )
        self._passes: dict | None = None  # decoder state merged over a task-conditioned backbone's passes
        self.backbone = backbone
        in_channels = [f["channels"] for f in backbone.feature_info]
        self.decoder = decoder(in_channels=in_channels, tasks=self.tasks)
        self.heads = TaskHeads(in_channels=self.decoder.out_channels, out_channels=tasks)

    def forward(
        self, x: torch.Tensor, *, task_subset: Sequence[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """Returns task → raw prediction at the input resolution."""
        if task_subset is None and not self.training:
            task_subset = self.tasks_at_inference
        if hasattr(self.backbone, "forward_tasks"):  # task-conditioned (M³ViT): features per task
            tasks = list(task_subset or self.tasks)
            per_task = self.backbone.forward_tasks(x, tasks)
            task_feats, self._passes = decode_passes(self.decoder, per_task, tasks)
            return self.heads(task_feats, size=tuple(x.shape[-2:]))
        feats = self.backbone(x)
        task_feats = self.decoder(feats, task_subset=task_subset)
        return self.heads(task_feats, size=tuple(x.shape[-2:]))

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The shared representation every task reads (for representation-level "-UB" strategies).

        The backbone's feature maps, followed by the decoder's shared part when the decoder
        splits itself into ``encode(feats) -> list[Tensor]`` and ``decode(rep, task_subset=)``.
        ``decode(encode(x), size=x.shape[-2:])`` equals ``forward(x)``.
        """
        feats = self.backbone(x)
        split = getattr(self.decoder, "encode", None)
        return list(split(feats)) if callable(split) else list(feats)

    def decode(
        self, rep: Sequence[torch.Tensor], *, size: tuple[int, int], task_subset: Sequence[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """Task predictions at ``size`` from the representation returned by :meth:`encode`."""
        rep = list(rep)
        if callable(getattr(self.decoder, "decode", None)):
            task_feats = self.decoder.decode(rep, task_subset=task_subset)
        else:
            task_feats = self.decoder(rep, task_subset=task_subset)
        return self.heads(task_feats, size=size)

    def representation_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters below :meth:`encode`'s output: the backbone and the decoder's shared part."""
        if getattr(self.backbone, "task_conditioned", False):
            raise ValueError(
                f"the {type(self.backbone).__name__} backbone gives every task its own features, so there is "
                "no shared representation for rep_grad=true (representation-level '-UB' strategies); use the "
                "parameter-level variant (rep_grad=false) or one shared pass (model.backbone.task_groups)"
            )
        yield from self.backbone.parameters()
        if callable(getattr(self.decoder, "encode", None)):
            shared = getattr(self.decoder, "shared_parameters", None)
            if not callable(shared):
                raise ValueError(
                    f"decoder {type(self.decoder).__name__} has encode() but no shared_parameters()"
                )
            yield from shared()

    def aux_loss(self) -> torch.Tensor | None:
        """The backbone's and the decoder's auxiliary losses of the last forward pass (summed), if any."""
        fn = getattr(self.backbone, "aux_loss", None)
        parts = [fn() if callable(fn) else None]
        if self._passes is not None and hasattr(self.backbone, "forward_tasks"):
            parts.append(self._passes["aux"])
        else:
            fn = getattr(self.decoder, "aux_loss", None)
            parts.append(fn() if callable(fn) else None)
        parts = [p for p in parts if p is not None]
        return sum(parts[1:], parts[0]) if parts else None

    def intermediate_losses(self, tasks: Mapping, batch: dict) -> dict[str, torch.Tensor]:
        """Weighted losses of the decoder's intermediate task features (deep supervision), if any.

        A decoder opts in with ``intermediate_features() -> list[dict[task, B×D×h×w]]`` (from its
        last forward) and ``intermediate_weight``; each feature goes through the task's head.
        """
        fn = getattr(self.decoder, "intermediate_features", None)
        levels = fn() if callable(fn) else []
        if self._passes is not None and hasattr(self.backbone, "forward_tasks"):
            levels = self._passes["intermediate"]
        if not levels:
            return {}
        weight = float(getattr(self.decoder, "intermediate_weight", 1.0))
        size = tuple(batch["image"].shape[-2:])
        out: dict[str, torch.Tensor] = {}
        for feats in levels:
            for t, pred in self.heads({t: f for t, f in feats.items() if t in tasks}, size=size).items():
                out[t] = out.get(t, 0) + weight * tasks[t].loss(pred, batch)
        return out

    def validation_stats(self) -> dict[str, torch.Tensor]:
        """Backbone and decoder statistics gathered by eval-mode forwards since the last reset
        (e.g. M³ViT's expert usage, TaskExpert's gate means)."""
        stats = {}
        for part in (self.backbone, self.decoder):
            fn = getattr(part, "validation_stats", None)
            stats.update(fn() if callable(fn) else {})
        return stats

    def reset_validation_stats(self) -> None:
        for part in (self.backbone, self.decoder):
            fn = getattr(part, "reset_validation_stats", None)
            if callable(fn):
                fn()

    def visual_maps(self, index: int = 0, *, size: tuple[int, int]) -> dict:
        """Extra pictures of the decoder's last eval forward (e.g. gate maps), name → H×W×3 uint8."""
        fn = getattr(self.decoder, "visual_maps", None)
        return fn(index, size=size) if callable(fn) else {}

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """Parameters used only by ``task``: task-specific backbone adapters, its decoder branch, its head."""
        backbone_specific = getattr(self.backbone, "task_parameters", None)
        if callable(backbone_specific):
            yield from backbone_specific(task)
        per_task = getattr(self.decoder, "per_task", None)
        if per_task is not None and task in per_task:
            yield from per_task[task].parameters()
        yield from self.heads.heads[task].parameters()

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters every task depends on (backbone and shared decoder parts)."""
        specific = {id(p) for t in self.tasks for p in self.task_parameters(t)}
        for p in self.parameters():
            if id(p) not in specific:
                yield p
