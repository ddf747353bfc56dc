"""MTLoRA: task-agnostic and task-specific low-rank adaptation of a Swin backbone.

Agiza, Neseem & Reda, "MTLoRA: Low-Rank Adaptation Approach for Efficient Multi-Task
Learning", CVPR 2024; the computation follows the authors' released code (scale-lab/MTLoRA,
``models/lora.py``, ``models/swin_transformer_mtlora.py``, ``models/swin_mtl.py``) in the
configuration behind the paper's table (``configs/mtlora/tiny_448/mtlora_tiny_448_r64_scale4_pertask.yaml``,
shared mode ``matrix``):

- task-agnostic LoRA (TA-LoRA, rank ``r`` ∈ {16, 32, 64}) on ``qkv``, ``proj``, ``fc1``, ``fc2``
  of every Swin block: ``y = W x + b + s·B A dropout(x)``, ``s`` = 4.0 used as is, dropout 0.05;
- task-specific LoRA (TS-LoRA, rank 4) on ``proj``, ``fc1``, ``fc2`` of the last block of each
  stage (a *forked* layer). Attention is computed once, on the shared stream; a forked layer
  with shared input ``x`` and task input ``x_t`` gives the shared output ``W x + b + s·B A d``
  and, per task, ``W x + b + s·B_t A_t x_t`` — the frozen ``W`` applied to the *shared*
  stream, no TA-LoRA term on the task path, only the task's LoRA sees the task stream
  (:class:`TaskLoRALinear`, :func:`fork_swin_block`). At ``proj`` the task input is the shared
  attention output; ``d = dropout(x)`` is drawn once and the task LoRA reads the same dropped
  input. At ``fc1`` the task input is ``norm2`` of the task's residual stream after attention,
  at ``fc2`` the task's hidden activation; there, as in the reference, the task LoRA reads its
  input without dropout. Stochastic depth draws its mask per stream, as the reference's
  separate calls do;
- each task's stream then passes the stage's shared patch merging (timm places that merging
  at the start of the next stage; the last stage has none and, as in the reference, no final
  LayerNorm), giving per task 4 feature maps with the channels and strides of the merged
  tokens (Swin-T: 192, 384, 768, 768 at strides 8, 16, 32, 32) for the HRNet-style decoder
  (:mod:`mtl.decoders.hrnet`);
- frozen: the pretrained Linear weights (and their biases); trainable: LoRA, patch
  embedding, norms, relative position bias, patch merging, decoders (each switchable);
  stochastic depth 0.2;
- MTLoRA+ (``lora_merging=True``, the reference's ``DOWNSAMPLER_ENABLED``): TA-LoRA also on the
  patch-merging reduction, whose pretrained weight then stays frozen.

Options beside the reference's default (``shared_mode``): ``"matrixv2"`` (the reference's other
mode: the task path adds the TA-LoRA of the shared stream, ``W x + b + s·B A d + s·B_t A_t x_t``)
and ``"task_stream"``: each task's stream passes the whole adapted layer,
``W x_t + b + s·B A d_t + s·B_t A_t d_t`` (``d_t = dropout(x_t)``). The latter is this
project's earlier reading of the paper's text, kept to reproduce runs made with it; it is not
what the authors' code computes.

The backbone gives per-task features (:class:`~mtl.contracts.Features` of kind ``"per_task"``,
``{task: [4 × (B, C_l, H_l, W_l)]}``), forking only for the tasks asked for; any decoder takes them
(:class:`~mtl.model.MultiTaskNet` runs it once per task stream). The forked layers are not folded
by :func:`~mtl.adapters.lora.merge_lora`: their task outputs need the unadapted ``W``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Literal, TypeVar

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock, WindowAttention
from torch import nn
from torch.utils.checkpoint import checkpoint

from mtl.adapters.lora import inject_lora
from mtl.backbones import TimmBackbone
from mtl.contracts import Backbone, Features

TA_TARGETS = ("qkv", "proj", "fc1", "fc2")
TS_TARGETS = ("proj", "fc1", "fc2")
SharedMode = Literal["matrix", "matrixv2", "task_stream"]
SHARED_MODES: tuple[str, ...] = ("matrix", "matrixv2", "task_stream")
T = TypeVar("T")


class LowRankUpdate(nn.Module):
    """The low-rank branch ``s · B A x`` alone (A kaiming-uniform, B zero); the caller applies dropout.

    Args:
        in_features: input width.
        out_features: output width.
        rank: rank of ``B A``.
        scale: the factor ``s`` (used as is).
        device: device of the parameters (the adapted layer's); ``A`` is drawn on the host either way.
        dtype: dtype of the parameters (the adapted layer's).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        rank: int,
        scale: float,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.scale = float(scale)
        a = nn.init.kaiming_uniform_(torch.empty(rank, in_features), a=math.sqrt(5))
        self.lora_A = nn.Parameter(a.to(device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.linear(F.linear(x, self.lora_A), self.lora_B)


class TaskLoRALinear(nn.Module):
    """A forked layer: a frozen Linear with TA-LoRA (``shared``) and one TS-LoRA per task.

    Called as a module it gives the shared output ``W x + b + s·B A dropout(x)`` (so timm's own
    block code computes the shared stream); :meth:`fork` gives the shared and the task outputs.

    Args:
        base: the pretrained layer (frozen).
        tasks: task names.
        rank: TA-LoRA rank.
        task_rank: TS-LoRA rank.
        scale: LoRA scale (both kinds, as the reference's default per-task scale).
        dropout: dropout on the LoRA input.
        mode: how a task output is formed (module docstring): ``"matrix"`` (the reference's
            default), ``"matrixv2"`` or ``"task_stream"``.
    """

    def __init__(
        self,
        base: nn.Linear,
        *,
        tasks: Sequence[str],
        rank: int,
        task_rank: int,
        scale: float,
        dropout: float,
        mode: SharedMode = "matrix",
    ) -> None:
        super().__init__()
        if mode not in SHARED_MODES:
            raise ValueError(f"MTLoRA shared_mode must be one of {list(SHARED_MODES)}, got '{mode}'")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        dims = (base.in_features, base.out_features)
        like = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.shared = LowRankUpdate(*dims, rank=rank, scale=scale, **like)
        self.per_task = nn.ModuleDict(
            {t: LowRankUpdate(*dims, rank=task_rank, scale=scale, **like) for t in tasks}
        )
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The shared output ``W x + b + s·B A dropout(x)``."""
        return self.base(x) + self.shared(self.dropout(x))

    def fork(
        self,
        x: torch.Tensor,
        x_tasks: Mapping[str, torch.Tensor] | None,
        tasks: Sequence[str],
        *,
        shared: bool = True,
    ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """The shared output (``None`` unless ``shared``) and the output of each of ``tasks``.

        Args:
            x: the shared stream's input.
            x_tasks: task → the task stream's input; ``None``: the tasks read the shared input
                (the first forked layer of a block, ``proj``), with the same dropout mask.
            tasks: the tasks to compute.
            shared: compute the shared output too.
        """
        d = self.dropout(x)
        pre = self.base(x)
        ta = self.shared(d) if shared or self.mode != "matrix" else None
        outs: dict[str, torch.Tensor] = {}
        for t in tasks:
            ts = self.per_task[t]
            if self.mode == "task_stream" and x_tasks is not None:
                d_t = self.dropout(x_tasks[t])
                outs[t] = self.base(x_tasks[t]) + self.shared(d_t) + ts(d_t)
                continue
            y = ts(d if x_tasks is None else x_tasks[t])  # the reference: no dropout on a task input
            outs[t] = pre + y if self.mode == "matrix" else pre + ta + y
        return (pre + ta if shared else None), outs


def window_attention(block: SwinTransformerBlock, x: torch.Tensor) -> torch.Tensor:
    """(Shifted-)window self-attention of ``block`` on ``x`` (``B × H × W × C``, already
    normalised), *before* the output projection, back in the image layout.

    The windowing of timm's ``SwinTransformerBlock`` (cyclic shift, padding to whole windows,
    the shift mask, the reverse) with the attention of its ``WindowAttention`` (relative
    position bias); the projection is token-wise, so it is applied afterwards by the caller.
    """
    attn: WindowAttention = block.attn
    b, h, w, c = x.shape
    (wh, ww), (sh, sw) = block.window_size, block.shift_size
    if sh or sw:
        x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
    x = F.pad(x, (0, 0, 0, (ww - w % ww) % ww, 0, (wh - h % wh) % wh))
    hp, wp = x.shape[1:3]
    mask = block.get_attn_mask(x) if block.dynamic_mask else block.attn_mask
    windows = rearrange(x, "b (nh wh) (nw ww) c -> (b nh nw) (wh ww) c", wh=wh, ww=ww)
    q, k, v = rearrange(attn.qkv(windows), "n t (three h d) -> three n h t d", three=3, h=attn.num_heads)
    n_tok = wh * ww
    bias = attn.relative_position_bias_table[attn.relative_position_index.view(-1)]
    bias = rearrange(bias, "(i j) h -> 1 h i j", i=n_tok)
    if mask is not None:  # (nW, N, N): per window of each image, 0 or -100
        bias = rearrange(bias + mask[:, None].to(bias.dtype), "nw h i j -> 1 nw h i j")
        bias = bias.expand(windows.shape[0] // mask.shape[0], -1, -1, -1, -1).reshape(-1, *bias.shape[2:])
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=bias, dropout_p=attn.attn_drop.p if attn.training else 0.0, scale=attn.scale
    )
    out = rearrange(out, "(b nh nw) h (wh ww) d -> b (nh wh) (nw ww) (h d)", b=b, nh=hp // wh, wh=wh)
    out = out[:, :h, :w]
    return torch.roll(out, shifts=(sh, sw), dims=(1, 2)) if sh or sw else out


def fork_mlp(
    block: nn.Module,
    h: torch.Tensor,
    h_tasks: Mapping[str, torch.Tensor],
    tasks: Sequence[str],
    *,
    shared: bool,
    layer_scale: nn.Module | None = None,
) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """The MLP half of a forked block (``norm2``, forked ``fc1`` / ``fc2``, residual) on the shared
    stream ``h`` and the task streams ``h_tasks``; ``layer_scale``: ViT's ``ls2`` (Swin: none)."""
    mlp = block.mlp
    fc1: TaskLoRALinear = mlp.fc1
    fc2: TaskLoRALinear = mlp.fc2
    scale = layer_scale or nn.Identity()

    def hidden(y: torch.Tensor) -> torch.Tensor:
        return mlp.norm(mlp.drop1(mlp.act(y)))

    f, f_t = fc1.fork(block.norm2(h), {t: block.norm2(h_tasks[t]) for t in tasks}, tasks)
    o, o_t = fc2.fork(hidden(f), {t: hidden(f_t[t]) for t in tasks}, tasks, shared=shared)
    out_t = {t: h_tasks[t] + block.drop_path2(scale(mlp.drop2(o_t[t]))) for t in tasks}
    return (h + block.drop_path2(scale(mlp.drop2(o))) if shared else None), out_t


def fork_swin_block(
    block: SwinTransformerBlock, x: torch.Tensor, tasks: Sequence[str], *, shared: bool = True
) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """A Swin block whose ``proj``, ``fc1``, ``fc2`` are :class:`TaskLoRALinear`, on the shared
    stream ``x`` (``B × H × W × C``): the shared output (``None`` unless ``shared``) and each
    task's output. Attention runs once, on the shared stream."""
    proj: TaskLoRALinear = block.attn.proj
    a = window_attention(block, block.norm1(x))
    p, p_t = proj.fork(a, None, tasks)
    drop = block.attn.proj_drop
    h = x + block.drop_path1(drop(p))
    h_t = {t: x + block.drop_path1(drop(p_t[t])) for t in tasks}
    return fork_mlp(block, h, h_t, tasks, shared=shared)


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
    shared_mode: SharedMode = "matrix",
) -> None:
    """Freezes ``body``, turns ``proj``, ``fc1`` and ``fc2`` of each block in ``fork_blocks`` into
    :class:`TaskLoRALinear` layers and adds TA-LoRA to every other target Linear under ``blocks``."""
    for p in body.parameters():
        p.requires_grad_(False)
    for blk in fork_blocks:
        for parent, attr in ((blk.attn, "proj"), (blk.mlp, "fc1"), (blk.mlp, "fc2")):
            base = getattr(parent, attr)
            if not isinstance(base, nn.Linear):
                raise TypeError(f"MTLoRA forks nn.Linear layers; {attr} is a {type(base).__name__}")
            forked = TaskLoRALinear(
                base,
                tasks=tasks,
                rank=rank,
                task_rank=task_rank,
                scale=scale,
                dropout=dropout,
                mode=shared_mode,
            )
            setattr(parent, attr, forked.train(base.training))
    inject_lora(blocks, rank=rank, targets=TA_TARGETS, scale=scale, dropout=dropout)  # skips the forked ones


def set_trainable(body: nn.Module, *, patch_embed: bool, norms: bool, pos: bool, merging: bool) -> None:
    """LoRA factors always train; the patch embedding, norms, position embeddings / relative
    position bias and patch merging train when their flag is set; a LoRA-adapted layer's
    pretrained weight (``base``) and everything else stay frozen."""
    for pname, p in body.named_parameters():
        leaf = pname.split(".")
        if "lora_A" in leaf or "lora_B" in leaf:
            p.requires_grad_(True)
        elif "base" in leaf:
            continue
        elif (
            (patch_embed and leaf[0] == "patch_embed")
            or (norms and any(n.startswith("norm") for n in leaf[:-1]))
            or (pos and leaf[-1] in ("relative_position_bias_table", "pos_embed", "cls_token"))
            or (merging and "downsample" in leaf)
        ):
            p.requires_grad_(True)


def checkpoint_call(backbone: nn.Module, fn: Callable[..., T], *args, **kwargs) -> T:
    """``fn(*args, **kwargs)``, under activation checkpointing when ``backbone.grad_checkpointing`` is
    set and it trains with gradients (``torch.utils.checkpoint``, non-reentrant: the recomputation
    replays the same dropout and stochastic-depth masks, so the gradients are those without it)."""
    if backbone.grad_checkpointing and backbone.training and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)
    return fn(*args, **kwargs)


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
        tasks: task names (one TS-LoRA per task and forked layer).
        img_size: input ``(H, W)``.
        pretrained: load timm's pretrained weights before injecting the adapters.
        checkpoint_path: a local weight file instead of the hub's.
        rank: TA-LoRA rank ``r``.
        task_rank: TS-LoRA rank.
        scale: LoRA scale (both kinds).
        dropout: LoRA dropout (both kinds).
        shared_mode: the task path of a forked layer: ``"matrix"`` (the reference's default),
            ``"matrixv2"`` or ``"task_stream"`` (module docstring).
        lora_merging: MTLoRA+: TA-LoRA on the patch-merging reductions too (their pretrained
            weight then stays frozen).
        drop_path_rate: stochastic depth of the last block (linear in depth from 0), 0.2 as in
            the reference's configuration.
        train_patch_embed: keep the patch embedding trainable.
        train_norms: keep LayerNorms trainable.
        train_pos_bias: keep the relative position bias tables trainable.
        train_merging: keep the patch-merging layers trainable.
        grad_checkpointing: recompute every block (the forked ones with their task streams) in the
            backward pass instead of keeping its activations (:func:`checkpoint_call`).
        **kwargs: timm constructor arguments (``window_size``, ``embed_dim``, ``depths``, …).
    """

    kind = "per_task"
    # the shared LoRA of the last block's fc2 (in the reference's trainable count) reaches no loss:
    # no task reads the shared stream after the last fork
    leaves_parameters_unused = True

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
        shared_mode: SharedMode = "matrix",
        lora_merging: bool = False,
        drop_path_rate: float = 0.2,
        train_patch_embed: bool = True,
        train_norms: bool = True,
        train_pos_bias: bool = True,
        train_merging: bool = True,
        grad_checkpointing: bool = False,
        **kwargs,
    ) -> None:
        super().__init__()
        self.grad_checkpointing = bool(grad_checkpointing)
        body = TimmBackbone(
            name=name,
            img_size=img_size,
            pretrained=pretrained,
            checkpoint_path=checkpoint_path,
            norm=False,  # the reference has no LayerNorm after the last stage
            drop_path_rate=drop_path_rate,
            **kwargs,
        ).model
        if not isinstance(body, SwinTransformer):
            raise ValueError(f"MTLoRASwin needs a timm Swin (stages with blocks), got '{name}'")
        self.tasks = list(tasks)
        self.model = body
        adapt(body, body.layers, [stage.blocks[-1] for stage in body.layers], tasks=self.tasks, rank=rank,
              task_rank=task_rank, scale=scale, dropout=dropout, shared_mode=shared_mode)  # fmt: skip
        if lora_merging:
            inject_lora(body.layers, rank=rank, targets=("reduction",), scale=scale, dropout=dropout)
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
                x = checkpoint_call(self, blk, x)
            # the shared stream continues to the next stage; after the last one nothing reads it
            x, forks = checkpoint_call(self, fork_swin_block, stage.blocks[-1], x, tasks, shared=i + 1 < n)
            merge = body.layers[i + 1].downsample if i + 1 < n else nn.Identity()
            for t in tasks:
                feats[t].append(rearrange(merge(forks[t]), "b h w c -> b c h w").contiguous())
        return Features(per_task=feats)

    def forward(self, x: torch.Tensor, tasks: Sequence[str] | None = None) -> dict[str, list[torch.Tensor]]:
        """``{task: [feature map per stage]}`` (:meth:`features`)."""
        return self.features(x, tasks).per_task
