"""MTLoRA for plain ViTs: task-specific LoRA in the last block before each tap.

Agiza, Neseem & Reda, "MTLoRA", CVPR 2024, define MTLoRA on Swin (:mod:`mtl.adapters.mtlora`);
this is our transfer to a ViT (Dosovitskiy et al., ICLR 2021), where the "stages" are the
spans between tapped blocks: TA-LoRA on ``qkv``, ``proj``, ``fc1``, ``fc2`` of every block; at
each tapped block the token stream forks — each task runs that block with its own TS-LoRA
(on ``proj``, ``fc1``, ``fc2``) and its output, without prefix tokens, becomes the task's
feature map at that level (stride 16); the shared stream (TA-LoRA only) continues. A ViT has
no patch merging, so nothing follows the fork. Trainable besides LoRA (each switchable): the
patch embedding, norms, position embedding and class token.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from einops import rearrange
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from mtl.adapters.mtlora import adapt, check_tasks, set_active, set_trainable, task_lora_parameters
from mtl.backbones.timm_backbone import TimmBackbone, vit_tokens
from mtl.contracts import Backbone, Features


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
        train_patch_embed: keep the patch embedding trainable.
        train_norms: keep LayerNorms trainable.
        train_pos_embed: keep the position embedding and class token trainable.
        **kwargs: timm constructor arguments (``embed_dim``, ``depth``, ``num_heads``, …).
    """

    kind = "per_task"

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
        train_patch_embed: bool = True,
        train_norms: bool = True,
        train_pos_embed: bool = True,
        **kwargs,
    ) -> None:
        super().__init__()
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
        adapt(body, body.blocks, [body.blocks[i] for i in self.taps], tasks=self.tasks, rank=rank,
              task_rank=task_rank, scale=scale, dropout=dropout)  # fmt: skip
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
            if i in self.taps:
                for t in tasks:
                    set_active(blk, t)
                    y = blk(x)[:, n_prefix:]
                    feats[t].append(rearrange(y, "b (h w) c -> b c h w", h=h, w=w).contiguous())
                set_active(blk, None)
            if i < last:
                x = blk(x)  # the shared stream continues (after the last tap nothing reads it)
        return Features(per_task=feats)

    def forward(self, x: torch.Tensor, tasks: Sequence[str] | None = None) -> dict[str, list[torch.Tensor]]:
        """``{task: [feature map per tap]}`` (:meth:`features`)."""
        return self.features(x, tasks).per_task
