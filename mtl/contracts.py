"""The typed contracts between the parts: backbone → decoder → heads → tasks → strategy.

Every part talks to its neighbours through the objects and interfaces defined here, never by
probing attributes. One forward pass returns everything it produced (features, auxiliary losses,
intermediate predictions, statistics, maps for pictures) in an output object; no module keeps
state from one call for the next.

::

    Backbone.features(x, tasks)  -> Features          shared list, or task → list (declared: .kind)
    Decoder(feats, tasks=...)    -> DecoderOutput      task features + aux loss + intermediate + stats
    MultiTaskNet.run(x, tasks=)  -> ModelOutput        predictions at input size + the above, merged
    Task.loss / update_metric / …                      (mtl/tasks/base.py)
    Strategy.forward(batch, module=host) -> StepForward
    Strategy.backward(step, module=host, batch=...)    host: StrategyHost (what a strategy may use)

The abstract bases carry the defaults (no task-specific parameters, no encode/decode split), so a
new backbone or decoder implements only what it has.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Literal, Protocol, runtime_checkable

import torch
from torch import nn

if TYPE_CHECKING:  # typing only: no import cycle at run time
    from mtl.model import MultiTaskNet
    from mtl.tasks.base import Task

FeatureKind = Literal["shared", "per_task"]


# ----------------------------------------------------------------------------- backbone
@dataclass
class Features:
    """What a backbone gives for a subset of tasks.

    Exactly one of ``shared`` and ``per_task`` is set. ``per_task`` maps every requested task to
    its feature list; tasks served by the same backbone pass map to the *same list object*, so
    that the decoder runs once per pass (:meth:`groups`).

    Attributes:
        shared: feature maps every task reads, ``[B × C_l × H_l × W_l]`` per level.
        per_task: task → its own feature maps (task-conditioned backbones: MTLoRA, M³ViT).
        aux_loss: a loss of this forward to add to the update (e.g. expert load balancing).
        stats: per-forward statistics to average over an evaluation (name → scalar tensor).
    """

    shared: list[torch.Tensor] | None = None
    per_task: dict[str, list[torch.Tensor]] | None = None
    aux_loss: torch.Tensor | None = None
    stats: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.shared is None) == (self.per_task is None):
            raise ValueError("Features holds either shared feature maps or per-task ones (exactly one)")

    def groups(self, tasks: Sequence[str]) -> list[tuple[list[torch.Tensor], list[str]]]:
        """``(feature maps, tasks reading them)`` per distinct feature list, in task order."""
        if self.shared is not None:
            return [(self.shared, list(tasks))]
        missing = [t for t in tasks if t not in self.per_task]
        if missing:
            raise ValueError(
                f"backbone gave no features for task(s) {missing}; it gave {list(self.per_task)}"
            )
        groups: dict[int, tuple[list[torch.Tensor], list[str]]] = {}
        for t in tasks:
            groups.setdefault(id(self.per_task[t]), (self.per_task[t], []))[1].append(t)
        return list(groups.values())


class Backbone(nn.Module, ABC):
    """Base of every backbone.

    Attributes:
        feature_info: per level, ``{"channels": C_l, "stride": s_l}``.
        kind: ``"shared"`` (one feature list for all tasks) or ``"per_task"`` (task-conditioned:
            the features depend on the task, e.g. task-specific LoRA or per-task expert routing).
            Decoders work with both (the model runs the decoder once per distinct feature list);
            a representation-level strategy (``rep_grad``) needs ``"shared"``. A class attribute,
            or a property where the configuration decides (M³ViT's ``task_groups``).
        tasks: the tasks a task-conditioned backbone was built for (``None``: it serves any task).
    """

    kind: FeatureKind = "shared"
    leaves_parameters_unused: bool = False
    tasks: list[str] | None = None
    feature_info: list[dict[str, int]]

    @abstractmethod
    def features(self, x: torch.Tensor, tasks: Sequence[str]) -> Features:
        """The features ``tasks`` need, computing nothing for the other tasks."""

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """Parameters only ``task``'s loss trains (task-specific adapters, routers); default none."""
        return iter(())

    def finish_stats(self, means: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """An evaluation's statistics from the means of the per-forward :attr:`Features.stats`.

        ``means`` holds, per key, the batch-size-weighted mean over the evaluation (keys of other
        parts included: pass them through). Default: the means as they are; a backbone whose
        statistic is not a mean (e.g. an entropy of usage shares) derives it here.
        """
        return dict(means)


# ----------------------------------------------------------------------------- decoder
@dataclass
class DecoderOutput:
    """What one decoder forward produced.

    Attributes:
        features: task → ``B × D × h × w`` task feature (``D`` = the decoder's ``out_channels``).
        aux_loss: a loss of this forward (e.g. gate balancing), already weighted, or ``None``.
        intermediate: deep supervision: per earlier stage, task → feature of the same width,
            to go through the task's head and loss (weighted by ``intermediate_weight``).
        intermediate_weight: weight of the intermediate losses.
        stats: per-forward statistics to average over an evaluation (e.g. gate means).
        maps: task-keyed per-sample maps for pictures (e.g. ``gates_<task>`` → list of
            ``B × E × h × w`` gate maps per layer); filled in eval mode only.
    """

    features: dict[str, torch.Tensor]
    aux_loss: torch.Tensor | None = None
    intermediate: list[dict[str, torch.Tensor]] = field(default_factory=list)
    intermediate_weight: float = 1.0
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    maps: dict[str, list[torch.Tensor]] = field(default_factory=dict)


class Decoder(nn.Module, ABC):
    """Base of every decoder: ``__init__(*, in_channels, tasks, ...)``.

    Attributes:
        out_channels: width ``D`` of the task features (the heads' input).
        per_task: task → the decoder modules only that task uses (``None`` if fully shared).
        splits_representation: whether :meth:`encode` / :meth:`decode` split the decoder into a
            shared part and task-specific part (representation-level strategies use the split).
    """

    out_channels: int
    per_task: nn.ModuleDict | None
    splits_representation: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__()
        self.per_task = None  # a subclass assigns its ModuleDict (a class default would shadow it)

    @abstractmethod
    def forward(self, feats: Sequence[torch.Tensor], *, tasks: Sequence[str]) -> DecoderOutput:
        """Backbone features → the features of ``tasks`` (and only those)."""

    def task_list(self, tasks: Sequence[str] | None) -> list[str]:
        """``tasks`` (``None``: every task of :attr:`per_task`), checked against the decoder's tasks."""
        known = list(self.per_task or ())
        tasks = known if tasks is None else list(tasks)
        unknown = [t for t in tasks if t not in known]
        if unknown:
            raise ValueError(f"{type(self).__name__}: unknown task(s) {unknown}; the decoder has {known}")
        return tasks

    def encode(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The shared part (default: the identity)."""
        return list(feats)

    def decode(self, rep: Sequence[torch.Tensor], *, tasks: Sequence[str]) -> DecoderOutput:
        """The task-specific part on :meth:`encode`'s output (default: the whole decoder)."""
        return self(rep, tasks=tasks)

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters of :meth:`encode` (default: none, the identity)."""
        return iter(())

    def check_features(self, feature_info: Sequence[Mapping[str, int]]) -> None:
        """Raises ``ValueError`` saying why this decoder cannot take features described by
        ``feature_info`` (per level ``{"channels", "stride"}``); default: it takes any."""

    def finish_stats(self, means: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """An evaluation's statistics from the means of the per-forward :attr:`DecoderOutput.stats`
        (see :meth:`Backbone.finish_stats`); default: the means as they are."""
        return dict(means)

    def picture_maps(
        self, maps: Mapping[str, list[torch.Tensor]], index: int, *, size: tuple[int, int]
    ) -> dict:
        """Pictures (name → ``H × W × 3`` uint8) of sample ``index`` of :attr:`DecoderOutput.maps`."""
        return {}


# ----------------------------------------------------------------------------- model
@dataclass
class ModelOutput:
    """One forward of :class:`~mtl.model.MultiTaskNet`.

    Attributes:
        preds: task → raw prediction ``B × K_t × H × W`` at the input resolution.
        aux_loss: the backbone's and decoder's auxiliary losses summed (``None`` if none).
        intermediate: task → list of raw intermediate predictions at the input resolution,
            each paired with its weight in :attr:`intermediate_weight`.
        intermediate_weight: weight of each intermediate loss.
        stats: backbone and decoder statistics of this forward (name → scalar tensor).
        maps: the decoder's per-sample maps for pictures (see :class:`DecoderOutput`).
    """

    preds: dict[str, torch.Tensor]
    aux_loss: torch.Tensor | None = None
    intermediate: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    intermediate_weight: float = 1.0
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    maps: dict[str, list[torch.Tensor]] = field(default_factory=dict)


# ----------------------------------------------------------------------------- strategy
@dataclass
class StepForward:
    """The training forward of one step, handed from ``Strategy.forward`` to ``Strategy.backward``.

    Attributes:
        preds: task → raw prediction.
        losses: task → unweighted scalar loss (graph attached; intermediate supervision included).
        aux: the model's auxiliary loss, added unweighted to the update, or ``None``.
        rep: representation-level strategies only: the shared representation (graph attached to
            the encoder) and ``rep_in``, its detached leaves the decoder was run on.
    """

    preds: dict[str, torch.Tensor]
    losses: dict[str, torch.Tensor]
    aux: torch.Tensor | None = None
    rep: list[torch.Tensor] | None = None
    rep_in: list[torch.Tensor] | None = None


@runtime_checkable
class StrategyHost(Protocol):
    """What a strategy may use of the module that trains (``MTLModule``, or a test's stand-in).

    Attributes:
        model: the network (``run``, ``encode``/``decode``, ``shared_parameters``,
            ``task_parameters(t)``, ``representation_parameters``).
        tasks: task name → :class:`~mtl.tasks.base.Task`.
    """

    model: MultiTaskNet
    tasks: Mapping[str, Task]

    def task_losses(self, out: ModelOutput, batch: dict) -> dict[str, torch.Tensor]:
        """Unweighted loss per predicted task (plus intermediate supervision while training)."""
        ...

    def manual_backward(self, loss: torch.Tensor) -> None:
        """Backward through the precision plugin (scaled under fp16; DDP averages it)."""
        ...

    def grad_scale(self) -> float:
        """The fp16 loss scale ``.grad`` is at (1.0 otherwise)."""
        ...
