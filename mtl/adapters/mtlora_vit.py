"""MTLoRA for plain ViTs: task-specific LoRA in the tapped blocks.

Agiza, Neseem & Reda, "MTLoRA", CVPR 2024, define MTLoRA on Swin (:mod:`mtl.adapters.mtlora`,
after the authors' code scale-lab/MTLoRA); this is our transfer to a ViT (Dosovitskiy et al.,
ICLR 2021), where the "stages" are the spans between tapped blocks: TA-LoRA on ``qkv``,
``proj``, ``fc1``, ``fc2`` of every block; at each tapped block the token stream forks with the
reference's rule (:func:`~mtl.adapters.mtlora.fork_mlp`, :class:`~mtl.adapters.mtlora.TaskLoRALinear`):
attention once on the shared stream, each forked layer giving a task ``W x + b + s·B_t A_t x_t``
(``shared_mode`` offers the same variants as the Swin backbone). The task's block output,
without prefix tokens, becomes its feature map at that level (stride 16); the shared stream
continues. A ViT has no patch merging, so nothing follows the fork. Trainable besides LoRA
(each switchable): the patch embedding, norms, position embedding and class token.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from mtl.adapters.mtlora import (
    SharedMode,
    TaskLoRALinear,
    adapt,
    check_tasks,
    checkpoint_call,
    fork_mlp,
    set_trainable,
    task_lora_parameters,
)
from mtl.backbones.timm_backbone import TimmBackbone, vit_tokens
from mtl.contracts import Backbone, Features


def vit_attention(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """timm ``Attention`` on ``x`` (``B × N × C``, already normalised) *before* the output
    projection (q/k norms, the optional output norm and gate included)."""
    gate = attn.gate(x).sigmoid() if attn.gate is not None else None
    q, k, v = rearrange(attn.qkv(x), "b n (three h d) -> three b h n d", three=3, h=attn.num_heads)
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = F.scaled_dot_product_attention(
        q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0, scale=attn.scale
    )
    out = attn.norm(rearrange(out, "b h n d -> b n (h d)"))
    return out * gate if gate is not None else out


def fork_vit_block(
    block: Block, x: torch.Tensor, tasks: Sequence[str], *, shared: bool = True
) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """A ViT block whose ``proj``, ``fc1``, ``fc2`` are forked, on the shared tokens ``x``: the
    shared output (``None`` unless ``shared``) and each task's output; attention runs once."""
    proj: TaskLoRALinear = block.attn.proj
    p, p_t = proj.fork(vit_attention(block.attn, block.norm1(x)), None, tasks)
    drop = block.attn.proj_drop
    h = x + block.drop_path1(block.ls1(drop(p)))
    h_t = {t: x + block.drop_path1(block.ls1(drop(p_t[t]))) for t in tasks}
    return fork_mlp(block, h, h_t, tasks, shared=shared, layer_scale=block.ls2)


class MTLoRAViT(Backbone):
    """A timm ViT with MTLoRA adapters, returning ``{task: [feature map per tap]}``.

    Args:
        name: timm ViT name (``vit_base_patch16_384``, …).
        tasks: task names.
        out_indices: tapped blocks (0-based; e.g. ``[2, 5, 8, 11]`` for ViT-B).
        img_size: input ``(H, W)``.
        pretrained: load timm's pretrained weights before injecting the adapters.
        checkpoint_path: a local weight file instead of the hub's.
        rank: TA-LoRA rank.
        task_rank: TS-LoRA rank.
        scale: LoRA scale.
        dropout: LoRA dropout.
        shared_mode: the task path of a forked layer (``"matrix"``, ``"matrixv2"``, ``"task_stream"``,
            see :mod:`mtl.adapters.mtlora`).
        train_patch_embed: keep the patch embedding trainable.
        train_norms: keep LayerNorms trainable.
        train_pos_embed: keep the position embedding and class token trainable.
        grad_checkpointing: recompute every block (the forked ones with their task streams) in the
            backward pass instead of keeping its activations.
        **kwargs: timm constructor arguments (``embed_dim``, ``depth``, ``num_heads``, …).
    """

    kind = "per_task"
    # the shared stream after the last tapped block's fork (its fc2 LoRA, later blocks) reaches no loss
    leaves_parameters_unused = True

    def __init__(
        self,
        *,
        name: str,
        tasks: Sequence[str],
        out_indices: Sequence[int],
        img_size: Sequence[int] | None = None,
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        rank: int = 64,
        task_rank: int = 4,
        scale: float = 4.0,
        dropout: float = 0.05,
        shared_mode: SharedMode = "matrix",
        train_patch_embed: bool = True,
        train_norms: bool = True,
        train_pos_embed: bool = True,
        grad_checkpointing: bool = False,
        **kwargs,
    ) -> None:
        super().__init__()
        self.grad_checkpointing = bool(grad_checkpointing)
        wrapper = TimmBackbone(
            name=name, img_size=img_size, pretrained=pretrained, checkpoint_path=checkpoint_path,
            out_indices=out_indices, **kwargs,
        )  # fmt: skip
        body = wrapper.model
        if not isinstance(body, VisionTransformer):
            raise ValueError(f"MTLoRAViT needs a timm VisionTransformer, got '{name}'")
        self.tasks = list(tasks)
        self.model = body
        self.taps = list(wrapper.out_indices)
        odd = [
            i
            for i in self.taps
            if type(body.blocks[i]) is not Block or type(body.blocks[i].attn) is not Attention
        ]
        if odd:
            raise ValueError(
                f"MTLoRAViT forks timm's pre-norm Block with Attention; blocks {odd} of '{name}' differ"
            )
        adapt(body, body.blocks, [body.blocks[i] for i in self.taps], tasks=self.tasks, rank=rank,
              task_rank=task_rank, scale=scale, dropout=dropout, shared_mode=shared_mode)  # fmt: skip
        set_trainable(
            body, patch_embed=train_patch_embed, norms=train_norms, pos=train_pos_embed, merging=False
        )
        self.feature_info = wrapper.feature_info

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """The TS-LoRA parameters of ``task``."""
        return task_lora_parameters(self.model, task)

    def features(self, x: torch.Tensor, tasks: Sequence[str] | None = None) -> Features:
        """Per task of ``tasks`` (default: all), its feature map per tap (NCHW, stride 16); only
        those tasks fork."""
        tasks = check_tasks(self, tasks)
        body = self.model
        x, (h, w) = vit_tokens(body, x)  # (B, P + N, C)
        feats: dict[str, list[torch.Tensor]] = {t: [] for t in tasks}
        n_prefix, last = body.num_prefix_tokens, max(self.taps)
        for i, blk in enumerate(body.blocks[: last + 1]):
            if i in self.taps:  # the shared stream continues after every tap but the last
                x, forks = checkpoint_call(self, fork_vit_block, blk, x, tasks, shared=i < last)
                for t in tasks:
                    y = forks[t][:, n_prefix:]
                    feats[t].append(rearrange(y, "b (h w) c -> b c h w", h=h, w=w).contiguous())
            else:
                x = checkpoint_call(self, blk, x)
        return Features(per_task=feats)

    def forward(self, x: torch.Tensor, tasks: Sequence[str] | None = None) -> dict[str, list[torch.Tensor]]:
        """``{task: [feature map per tap]}`` (:meth:`features`)."""
        return self.features(x, tasks).per_task
