"""A timm backbone returning multi-level NCHW feature maps.

Uses timm's ``forward_intermediates`` (ViT: Dosovitskiy et al., ICLR 2021; Swin: Liu et al.,
ICCV 2021), so any timm model that implements it works: plain ViTs give one feature map
per tapped block (all at stride 16), hierarchical models one per stage.

Backbones that run a timm ViT block by block (M³ViT, MTLoRA-ViT) start from
:func:`vit_tokens`: the patch and position embeddings through public timm pieces only
(``timm.layers.resample_abs_pos_embed``), not timm's private ``_pos_embed``;
``tests/models/test_backbones.py`` pins it against timm's own ``forward_features``.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Sequence
from pathlib import Path

import timm
import torch
from einops import rearrange
from timm.layers import resample_abs_pos_embed
from torch import nn

from mtl.contracts import Backbone, Features

log = logging.getLogger(__name__)


def _check_model_name(name: str) -> None:
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=8, cutoff=0.5)
    hint = f" Close matches: {close}." if close else ""
    raise ValueError(
        f"backbone '{name}' is not a timm model.{hint} "
        "All valid names: python -c 'import timm; print(timm.list_models())'"
    )


def _check_img_size(name: str, img_size: Sequence[int], strides: list[int]) -> None:
    """The input must fill whole patches; stages beyond the patch stride pad (Swin) and round up."""
    patch, deepest = min(strides), max(strides)
    if any(int(s) % patch for s in img_size):
        raise ValueError(
            f"backbone '{name}' img_size {list(img_size)} must be a multiple of its patch stride {patch} "
            "in both dimensions (pad the input, e.g. data.pad_to)"
        )
    if any(int(s) % deepest for s in img_size):
        log.warning(
            "backbone '%s' img_size %s is not a multiple of its largest stride %d: deeper stages are "
            "padded and their maps rounded up (448×576 and 512×512 are multiples of 32)",
            name,
            list(img_size),
            deepest,
        )


def vit_tokens(vit: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Images → the token sequence a timm ``VisionTransformer``'s first block reads.

    Patch embedding, class/register tokens, absolute position embedding (resampled to the grid
    when the model has ``dynamic_img_size``), patch dropout and the pre-norm: what timm's
    ``forward_features`` does before its blocks, from the model's public attributes.

    Args:
        vit: a timm ``VisionTransformer``.
        x: images ``B × 3 × H × W``.

    Returns:
        Tokens ``B × (P + h·w) × C`` (``P`` prefix tokens first) and the patch grid ``(h, w)``.
    """
    z = vit.patch_embed(x)
    h, w = vit.patch_embed.dynamic_feat_size(tuple(x.shape[-2:]))
    if z.ndim == 4:  # dynamic_img_size: B × h × w × C
        z = rearrange(z, "b h w c -> b (h w) c")
    prefix = [t.expand(z.shape[0], -1, -1) for t in (vit.cls_token, vit.reg_token) if t is not None]
    pos = vit.pos_embed
    if pos is not None and vit.dynamic_img_size:
        pos = resample_abs_pos_embed(
            pos,
            new_size=(h, w),
            old_size=vit.patch_embed.grid_size,
            num_prefix_tokens=0 if vit.no_embed_class else vit.num_prefix_tokens,
        )
    if pos is not None and vit.no_embed_class:
        z = z + pos  # the position embedding has no entries for the prefix tokens
    z = torch.cat([*prefix, z], dim=1) if prefix else z
    if pos is not None and not vit.no_embed_class:
        z = z + pos
    z = vit.pos_drop(z)
    return vit.norm_pre(vit.patch_drop(z)), (h, w)


class TimmBackbone(Backbone):
    """Wraps a timm model as a multi-level feature extractor.

    Args:
        name: timm model name, e.g. ``vit_base_patch16_384`` or ``swin_tiny_patch4_window7_224``.
        out_indices: blocks (ViT) or stages (Swin, CNNs) to tap; ``None`` taps the last 4.
            Negative values count from the end.
        img_size: input resolution ``(H, W)`` for models with fixed-size position
            embeddings or windows; it must be a multiple of the patch size (ViT 16, Swin 4) and
            should be one of the largest stride (Swin 32; otherwise a warning). ViT: pretrained
            absolute position embeddings (e.g. 24 × 24 of a ``*_384`` model) are resampled
            bicubically to ``H/16 × W/16`` when the weights are loaded, from the hub or from
            ``checkpoint_path`` alike (448 × 576 → 28 × 36, 512 × 512 → 32 × 32).
            Swin: the pretrained window (7 for T/S ``*_224``, 12 for B ``*_384``) and its
            relative-position tables are kept; stages whose map is not a multiple of the window
            are padded inside each block, and a window larger than a stage's map shrinks to it.
        pretrained: load timm's pretrained weights (from the local hub cache or the hub).
        checkpoint_path: a local weight file loaded instead of the hub's (implies pretrained).
        grad_checkpointing: trade compute for memory in the backbone's blocks.
        norm: apply the model's final norm to the intermediates.
        **kwargs: passed to ``timm.create_model`` (e.g. ``embed_dim``, ``depths``,
            ``window_size``, ``drop_path_rate``).
    """

    def __init__(
        self,
        *,
        name: str,
        out_indices: Sequence[int] | None = None,
        img_size: Sequence[int] | None = None,
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        grad_checkpointing: bool = False,
        norm: bool = False,
        **kwargs,
    ) -> None:
        super().__init__()
        _check_model_name(name)
        if img_size is not None:
            kwargs["img_size"] = tuple(int(s) for s in img_size)
        if checkpoint_path is not None:
            path = Path(checkpoint_path).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"backbone checkpoint_path '{path}' does not exist")
            kwargs["pretrained_cfg_overlay"] = {"file": str(path)}
            pretrained = True
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
        if img_size is not None:
            _check_img_size(name, img_size, [int(f["reduction"]) for f in model.feature_info])
        if not hasattr(model, "forward_intermediates"):
            raise ValueError(f"timm model '{name}' has no forward_intermediates(); pick a ViT, Swin or CNN")
        n_levels = len(model.feature_info)
        idx = list(range(n_levels))[-4:] if out_indices is None else list(out_indices)
        idx = [i % n_levels if -n_levels <= i < n_levels else i for i in idx]
        bad = [i for i in idx if not 0 <= i < n_levels]
        if bad:
            raise ValueError(f"out_indices {bad} out of range for '{name}' ({n_levels} levels)")
        self.out_indices = idx
        # a list of indices: timm drops every block after the last tap (an int n would mean "the last n")
        model.prune_intermediate_layers(indices=idx, prune_norm=not norm, prune_head=True)
        if grad_checkpointing:
            model.set_grad_checkpointing(True)
        self.model = model
        self.name = name
        self.norm = norm
        self.feature_info = [
            {
                "channels": int(model.feature_info[i]["num_chs"]),
                "stride": int(model.feature_info[i]["reduction"]),
            }
            for i in idx
        ]

    @property
    def channels(self) -> list[int]:
        """Channels of each returned level."""
        return [f["channels"] for f in self.feature_info]

    def features(self, x: torch.Tensor, tasks: Sequence[str]) -> Features:
        """The tapped feature maps, shared by every task."""
        return Features(shared=self(x))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Returns the tapped feature maps, each ``B × C_l × H/s_l × W/s_l``."""
        return self.model.forward_intermediates(
            x, indices=self.out_indices, norm=self.norm, intermediates_only=True, output_fmt="NCHW"
        )
