"""A timm backbone returning multi-level NCHW feature maps.

Uses timm's ``forward_intermediates`` (ViT: Dosovitskiy et al., ICLR 2021; Swin: Liu et al.,
ICCV 2021), so any timm model that implements it works: plain ViTs give one feature map
per tapped block (all at stride 16), hierarchical models one per stage.

Backbones that run a timm ViT block by block (M³ViT, MTLoRA-ViT) start from
:func:`vit_tokens`: the patch and position embeddings through public timm pieces only
(``timm.layers.resample_abs_pos_embed``), not timm's private ``_pos_embed``;
``tests/models/test_backbones.py`` pins it against timm's own ``forward_features``.

A timm ``VisionTransformer`` owns its class / register tokens and absolute position embedding
directly, beside its blocks, and uses them without calling a module. :class:`TimmBackbone` moves
them into a child, :class:`ViTPrefixTokens`, that its forward calls (:class:`TokenOwningViT`),
so that every parameter is owned by a module that is called: torchjd's autogram engine (the
Gramian-only mode, :mod:`mtl.strategies.autogram`) then hooks it per layer. Their state-dict keys
become ``prefix_tokens.{cls_token,reg_token,pos_embed}``; timm's keys (``cls_token``, …, as in
pretrained files and checkpoints written before) still load.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from einops import rearrange
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
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


#: the parameters a timm ``VisionTransformer`` owns directly (moved into :class:`ViTPrefixTokens`)
TOKEN_NAMES = ("cls_token", "reg_token", "pos_embed")


def _prefix_and_position(
    z: torch.Tensor,
    *,
    cls_token: torch.Tensor | None,
    reg_token: torch.Tensor | None,
    pos_embed: torch.Tensor | None,
    grid_size: tuple[int, int],
    dynamic_img_size: bool,
    no_embed_class: bool,
    num_prefix_tokens: int,
) -> torch.Tensor:
    """Patch tokens ``B × N × C`` (``B × h × w × C`` with ``dynamic_img_size``) → the prefix tokens
    followed by them, plus the absolute position embedding (resampled to ``h × w`` when dynamic):
    timm's ``VisionTransformer._pos_embed`` without its dropout."""
    grid = (int(z.shape[1]), int(z.shape[2])) if z.ndim == 4 else grid_size
    if z.ndim == 4:  # dynamic_img_size: B × h × w × C
        z = rearrange(z, "b h w c -> b (h w) c")
    prefix = [t.expand(z.shape[0], -1, -1) for t in (cls_token, reg_token) if t is not None]
    pos = pos_embed
    if pos is not None and dynamic_img_size:
        pos = resample_abs_pos_embed(
            pos,
            new_size=grid,
            old_size=grid_size,
            num_prefix_tokens=0 if no_embed_class else num_prefix_tokens,
        )
    if pos is not None and no_embed_class:
        z = z + pos  # the position embedding has no entries for the prefix tokens
    z = torch.cat([*prefix, z], dim=1) if prefix else z
    if pos is not None and not no_embed_class:
        z = z + pos
    return z


class ViTPrefixTokens(nn.Module):
    """Owns a timm ``VisionTransformer``'s class / register tokens and absolute position embedding
    (taken from it, same tensors) and applies them to the patch tokens (:func:`_prefix_and_position`).

    Args:
        vit: the ViT; its ``cls_token``, ``reg_token`` and ``pos_embed`` are removed from it.
    """

    def __init__(self, vit: VisionTransformer) -> None:
        super().__init__()
        taken = {"cls_token": vit.cls_token, "reg_token": vit.reg_token, "pos_embed": vit.pos_embed}
        for name, value in taken.items():
            delattr(vit, name)
            self.register_parameter(name, value)
        self.grid_size = tuple(int(s) for s in vit.patch_embed.grid_size)
        self.dynamic_img_size = bool(vit.dynamic_img_size)
        self.no_embed_class = bool(vit.no_embed_class)
        self.num_prefix_tokens = int(vit.num_prefix_tokens)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Patch tokens (``B × N × C``, or ``B × h × w × C`` when dynamic) → ``B × (P + N) × C``."""
        return _prefix_and_position(
            z,
            cls_token=self.cls_token,
            reg_token=self.reg_token,
            pos_embed=self.pos_embed,
            grid_size=self.grid_size,
            dynamic_img_size=self.dynamic_img_size,
            no_embed_class=self.no_embed_class,
            num_prefix_tokens=self.num_prefix_tokens,
        )


def _owned_token_key(prefix: str, name: str) -> str:
    """Where timm's token ``<prefix><name>`` lives in :class:`TokenOwningViT`."""
    return f"{prefix}prefix_tokens.{name}"


def _timm_token_keys(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Load-state-dict pre-hook: timm's ``cls_token`` / ``reg_token`` / ``pos_embed`` keys (pretrained
    files, checkpoints written before :class:`ViTPrefixTokens`) → ``prefix_tokens.*``."""
    for name in TOKEN_NAMES:
        old, new = prefix + name, _owned_token_key(prefix, name)
        if old in state_dict and new not in state_dict:
            state_dict[new] = state_dict.pop(old)


def upgrade_token_keys(state: Mapping[str, Any], expected: Collection[str]) -> dict[str, Any]:
    """``state`` with every ``<…>.{cls_token,reg_token,pos_embed}`` key renamed to
    ``<…>.prefix_tokens.<name>`` where ``expected`` (the keys of the model it goes into) has the new
    name and not the old one: a state dict or fingerprint written before :class:`ViTPrefixTokens`,
    read by code that compares keys instead of loading through the module (model merging)."""
    out = {}
    for key, value in state.items():
        head, dot, name = key.rpartition(".")
        new = _owned_token_key(head + dot, name)
        renamed = name in TOKEN_NAMES and key not in expected and new in expected and new not in state
        out[new if renamed else key] = value
    return out


class TokenOwningViT(VisionTransformer):
    """timm's ``VisionTransformer`` whose tokens and position embedding are owned by a child that
    its forward calls (``prefix_tokens``, a :class:`ViTPrefixTokens`); ``cls_token``, ``reg_token``
    and ``pos_embed`` read and assign through to it. Made by :meth:`adopt` from a built ViT."""

    prefix_tokens: ViTPrefixTokens

    @classmethod
    def adopt(cls, vit: VisionTransformer) -> TokenOwningViT:
        """Turns ``vit`` (exactly a ``VisionTransformer``, weights loaded) into one, in place."""
        if type(vit) is not VisionTransformer:
            raise TypeError(
                f"TokenOwningViT.adopt: expected a timm VisionTransformer, got {type(vit).__name__}"
            )
        holder = ViTPrefixTokens(vit)
        vit.__class__ = cls
        vit.prefix_tokens = holder
        vit.register_load_state_dict_pre_hook(_timm_token_keys)
        return vit

    def set_input_size(self, *args, **kwargs) -> None:
        """timm's (resamples ``pos_embed`` through to the child), then the child's grid follows."""
        super().set_input_size(*args, **kwargs)
        self.prefix_tokens.grid_size = tuple(int(s) for s in self.patch_embed.grid_size)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:  # what timm's forward calls
        return self.pos_drop(self.prefix_tokens(x))

    @property
    def cls_token(self) -> nn.Parameter | None:
        return self.prefix_tokens.cls_token

    @property
    def reg_token(self) -> nn.Parameter | None:
        return self.prefix_tokens.reg_token

    @property
    def pos_embed(self) -> nn.Parameter | None:
        return self.prefix_tokens.pos_embed

    def __setattr__(self, name: str, value) -> None:
        if name in TOKEN_NAMES and "prefix_tokens" in self._modules:
            setattr(self._modules["prefix_tokens"], name, value)
        else:
            super().__setattr__(name, value)


def vit_tokens(vit: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Images → the token sequence a timm ``VisionTransformer``'s first block reads.

    Patch embedding, class/register tokens, absolute position embedding (resampled to the grid
    when the model has ``dynamic_img_size``), patch dropout and the pre-norm: what timm's
    ``forward_features`` does before its blocks, from the model's public attributes (a
    :class:`TokenOwningViT` through its ``prefix_tokens``, so that module is called).

    Args:
        vit: a timm ``VisionTransformer``.
        x: images ``B × 3 × H × W``.

    Returns:
        Tokens ``B × (P + h·w) × C`` (``P`` prefix tokens first) and the patch grid ``(h, w)``.
    """
    z = vit.patch_embed(x)
    h, w = vit.patch_embed.dynamic_feat_size(tuple(x.shape[-2:]))
    if isinstance(vit, TokenOwningViT):
        z = vit.prefix_tokens(z)
    else:
        z = _prefix_and_position(
            z,
            cls_token=vit.cls_token,
            reg_token=vit.reg_token,
            pos_embed=vit.pos_embed,
            grid_size=vit.patch_embed.grid_size,
            dynamic_img_size=vit.dynamic_img_size,
            no_embed_class=vit.no_embed_class,
            num_prefix_tokens=vit.num_prefix_tokens,
        )
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
        if type(model) is VisionTransformer:  # tokens owned by a called module (module docstring)
            model = TokenOwningViT.adopt(model)
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
