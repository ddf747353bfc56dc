"""``MultiTaskNet``: backbone → decoder → heads, a plain ``nn.Module``."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from mtl.heads import TaskHeads


class MultiTaskNet(nn.Module):
    """A shared backbone with a multi-task decoder and one head per task.

    Channel counts are never configured twice: the decoder is built from the backbone's
    ``feature_info`` and the heads from each task's ``out_channels``.

    Args:
        backbone: a module with ``forward(x) -> list[Tensor]`` and ``feature_info``.
        decoder: a partial decoder constructor, completed with ``in_channels`` and ``tasks``.
        tasks: task name → output channels of its prediction.
    """

    def __init__(
        self,
        *,
        backbone: nn.Module,
        decoder: Callable[..., nn.Module],
        tasks: Mapping[str, int],
    ) -> None:
        super().__init__()
        self.tasks = list(tasks)
        self.backbone = backbone
        in_channels = [f["channels"] for f in backbone.feature_info]
        self.decoder = decoder(in_channels=in_channels, tasks=self.tasks)
        self.heads = TaskHeads(in_channels=self.decoder.out_channels, out_channels=tasks)

    def forward(
        self, x: torch.Tensor, *, task_subset: Sequence[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """Returns task → raw prediction at the input resolution."""
        feats = self.backbone(x)
        task_feats = self.decoder(feats, task_subset=task_subset)
        return self.heads(task_feats, size=tuple(x.shape[-2:]))

    def aux_loss(self) -> torch.Tensor | None:
        """The decoder's auxiliary loss of the last forward pass, if it has one."""
        fn = getattr(self.decoder, "aux_loss", None)
        return fn() if callable(fn) else None

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """Parameters used only by ``task``: its decoder branch and its head."""
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
