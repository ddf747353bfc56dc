"""MTLoRA: task-agnostic and task-specific low-rank adaptation of a Swin backbone.

Agiza, Neseem & Reda, "MTLoRA: Low-Rank Adaptation Approach for Efficient Multi-Task
Learning", CVPR 2024; facts from the paper and scale-lab/MTLoRA:

- task-agnostic LoRA (TA-LoRA, rank ``r`` ∈ {16, 32, 64}) on ``qkv``, ``proj``, ``fc1``, ``fc2``
  of every Swin block; ``y = W x + s·B A x``, ``s`` = 4.0 used as is, dropout 0.05;
- task-specific LoRA (TS-LoRA, rank 4) only in the last block of each of the 4 stages, on
  ``proj``, ``fc1``, ``fc2``: there the token stream forks per task — each task's stream runs
  the block with its own TS-LoRA added to the TA-LoRA, the shared stream (TA-LoRA only)
  continues to the next stage;
- each task's stream then passes the stage's shared patch merging (timm places that merging
  at the start of the next stage; the last stage has none), giving per task 4 feature maps
  with the channels and strides of the merged tokens (Swin-T: 192, 384, 768, 768 at strides
  8, 16, 32, 32) for an HRNet-style decoder (:mod:`mtl.decoders.hrnet`);
- frozen: the pretrained Linear weights (and their biases); trainable: LoRA, patch
  embedding, norms, relative position bias, patch merging, decoders (each switchable).

The backbone gives per-task features (:class:`~mtl.contracts.Features` of kind ``"per_task"``,
``{task: [4 × (B, C_l, H_l, W_l)]}``), forking only for the tasks asked for; any decoder takes them
(:class:`~mtl.model.MultiTaskNet` runs it once per task stream).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.models.swin_transformer import SwinTransformer
from torch import nn

from mtl.adapters.lora import LoRALinear, inject_lora
from mtl.backbones import TimmBackbone
from mtl.contracts import Backbone, Features

TA_TARGETS = ("qkv", "proj", "fc1", "fc2")
TS_TARGETS = ("proj", "fc1", "fc2")


class LowRankUpdate(nn.Module):
    """The low-rank branch ``s · B A dropout(x)`` alone (A kaiming-uniform, B zero).

    Args:
        in_features: input width.
        out_features: output width.
        rank: rank of ``B A``.
        scale: the factor ``s`` (used as is).
        dropout: dropout on the input.
    """

    def __init__(
        self, in_features: int, out_features: int, *, rank: int, scale: float, dropout: float
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"task-specific LoRA rank must be >= 1, got {rank}")
        self.scale = float(scale)
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)


class TaskLoRALinear(nn.Module):
    """A TA-LoRA layer plus one TS-LoRA low-rank update per task, selected by :attr:`active`.

    ``active = None`` gives the shared output ``W x + s·B A x``; ``active = t`` adds
    ``s·B_t A_t x``.

    Args:
        shared: the layer's :class:`LoRALinear` (TA-LoRA).
        tasks: task names.
        rank: TS-LoRA rank.
        scale: TS-LoRA scale.
        dropout: TS-LoRA input dropout.
    """

    def __init__(self, shared: LoRALinear, *, tasks: Sequence[str], rank: int, scale: float, dropout: float):
        super().__init__()
        self.shared = shared
        dims = (shared.in_features, shared.out_features)
        self.per_task = nn.ModuleDict(
            {t: LowRankUpdate(*dims, rank=rank, scale=scale, dropout=dropout) for t in tasks}
        )
        self.active: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.shared(x)
        return y if self.active is None else y + self.per_task[self.active](x)


def adapt(
    body: nn.Module,
    blocks: nn.Module,
    fork_blocks: Sequence[nn.Module],
    *,
    tasks: Sequence[str],
    rank: int,
    task_rank: int,
    scale: float,
    dropout: float,
) -> None:
    """Freezes ``body``, adds TA-LoRA to every target Linear under ``blocks`` and TS-LoRA to
    ``proj``, ``fc1`` and ``fc2`` of each block in ``fork_blocks``."""
    for p in body.parameters():
        p.requires_grad_(False)
    inject_lora(blocks, rank=rank, targets=TA_TARGETS, scale=scale, dropout=dropout)
    for blk in fork_blocks:
        for parent, attr in ((blk.attn, "proj"), (blk.mlp, "fc1"), (blk.mlp, "fc2")):
            shared = getattr(parent, attr)
            setattr(
                parent,
                attr,
                TaskLoRALinear(shared, tasks=tasks, rank=task_rank, scale=scale, dropout=dropout),
            )


def set_trainable(body: nn.Module, *, patch_embed: bool, norms: bool, pos: bool, merging: bool) -> None:
    """LoRA factors always train; the patch embedding, norms, position embeddings / relative
    position bias and patch merging train when their flag is set; everything else stays frozen."""
    for pname, p in body.named_parameters():
        leaf = pname.split(".")
        if "lora_A" in leaf or "lora_B" in leaf:
            p.requires_grad_(True)
        elif (
            (patch_embed and leaf[0] == "patch_embed")
            or (norms and any(n.startswith("norm") for n in leaf[:-1]))
            or (pos and leaf[-1] in ("relative_position_bias_table", "pos_embed", "cls_token"))
            or (merging and "downsample" in leaf)
        ):
            p.requires_grad_(True)


def set_active(block: nn.Module, task: str | None) -> None:
    """Selects the TS-LoRA of ``task`` (``None``: the shared stream) in every layer of ``block``."""
    for m in block.modules():
        if isinstance(m, TaskLoRALinear):
            m.active = task


def check_tasks(backbone: Backbone, tasks: Sequence[str] | None) -> list[str]:
    """``tasks`` (default: all the backbone's), each one the backbone has a TS-LoRA for."""
    tasks = list(backbone.tasks if tasks is None else tasks)
    unknown = [t for t in tasks if t not in backbone.tasks]
    if unknown:
        raise ValueError(
            f"{type(backbone).__name__} has no TS-LoRA for task(s) {unknown}; its tasks are {backbone.tasks}"
        )
    return tasks


def task_lora_parameters(model: nn.Module, task: str) -> Iterator[nn.Parameter]:
    """The TS-LoRA parameters of ``task`` under ``model``."""
    for m in model.modules():
        if isinstance(m, TaskLoRALinear):
            yield from m.per_task[task].parameters()


class MTLoRASwin(Backbone):
    """A timm Swin with MTLoRA adapters, returning per-task multi-scale features.

    Args:
        name: timm Swin name (``swin_tiny_patch4_window7_224``, …).
        tasks: task names (one TS-LoRA per task and adapted layer).
        img_size: input ``(H, W)``.
        pretrained: load timm's pretrained weights before injecting the adapters.
        checkpoint_path: a local weight file instead of the hub's.
        rank: TA-LoRA rank ``r``.
        task_rank: TS-LoRA rank.
        scale: LoRA scale (both kinds).
        dropout: LoRA dropout (both kinds).
        train_patch_embed: keep the patch embedding trainable.
        train_norms: keep LayerNorms trainable.
        train_pos_bias: keep the relative position bias tables trainable.
        train_merging: keep the patch-merging layers trainable.
        **kwargs: timm constructor arguments (``window_size``, ``embed_dim``, ``depths``, …).
    """

    kind = "per_task"

    def __init__(
        self,
        *,
        name: str,
        tasks: Sequence[str],
        img_size: Sequence[int] | None = None,
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        rank: int = 64,
        task_rank: int = 4,
        scale: float = 4.0,
        dropout: float = 0.05,
        train_patch_embed: bool = True,
        train_norms: bool = True,
        train_pos_bias: bool = True,
        train_merging: bool = True,
        **kwargs,
    ) -> None:
        super().__init__()
        body = TimmBackbone(
            name=name,
            img_size=img_size,
            pretrained=pretrained,
            checkpoint_path=checkpoint_path,
            norm=True,
            **kwargs,
        ).model  # the timm model, final norm kept
        if not isinstance(body, SwinTransformer):
            raise ValueError(f"MTLoRASwin needs a timm Swin (stages with blocks), got '{name}'")
        self.tasks = list(tasks)
        self.model = body
        adapt(body, body.layers, [stage.blocks[-1] for stage in body.layers], tasks=self.tasks, rank=rank,
              task_rank=task_rank, scale=scale, dropout=dropout)  # fmt: skip
        set_trainable(
            body, patch_embed=train_patch_embed, norms=train_norms, pos=train_pos_bias, merging=train_merging
        )
        chans = [int(body.feature_info[i]["num_chs"]) for i in range(len(body.layers))]
        strides = [int(body.feature_info[i]["reduction"]) for i in range(len(body.layers))]
        # after the next stage's patch merging: channels and stride of the merged tokens
        self.feature_info = [
            {"channels": chans[min(i + 1, len(chans) - 1)], "stride": strides[min(i + 1, len(strides) - 1)]}
            for i in range(len(chans))
        ]

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """The TS-LoRA parameters of ``task`` (what only that task's loss trains)."""
        return task_lora_parameters(self.model, task)

    def features(self, x: torch.Tensor, tasks: Sequence[str] | None = None) -> Features:
        """Per task of ``tasks`` (default: all), its feature map per stage (NCHW); only those tasks fork."""
        tasks = check_tasks(self, tasks)
        body, n = self.model, len(self.model.layers)
        x = body.patch_embed(x)  # (B, H, W, C)
        feats: dict[str, list[torch.Tensor]] = {t: [] for t in tasks}
        for i, stage in enumerate(body.layers):
            x = stage.downsample(x)
            for blk in stage.blocks[:-1]:
                x = blk(x)
            last = stage.blocks[-1]
            forks = {}
            for t in tasks:
                set_active(last, t)
                forks[t] = last(x)
            set_active(last, None)
            if i + 1 < n:
                x = last(x)  # the shared stream continues (after the last stage nothing reads it)
            merge = body.layers[i + 1].downsample if i + 1 < n else body.norm
            for t in tasks:
                feats[t].append(rearrange(merge(forks[t]), "b h w c -> b c h w").contiguous())
        return Features(per_task=feats)

    def forward(self, x: torch.Tensor, tasks: Sequence[str] | None = None) -> dict[str, list[torch.Tensor]]:
        """``{task: [feature map per stage]}`` (:meth:`features`)."""
        return self.features(x, tasks).per_task
