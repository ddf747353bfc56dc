"""Initial weights of a run: their identity (a fingerprint kept in checkpoints) and loading them.

Merging methods assume the models were fine-tuned from the *same* initialisation θ0 (Ilharco et
al., "Editing Models with Task Arithmetic", ICLR 2023): task vectors τ_t = θ_t − θ0 are only
comparable then. The training callback :class:`~mtl.callbacks.InitFingerprint` (in
``configs/callbacks/default.yaml``) hashes every weight at the start of training with
:func:`state_fingerprint` and saves the hashes in the checkpoint, so ``merge.py`` can check
(:func:`stored_fingerprint`, :func:`first_mismatch`) that all checkpoints started from the same
θ0 and that the θ0 it merges against (rebuilt from the training config, or ``base_ckpt=``) is
that initialisation.

A run may start from another run's weights (the shared pretrained initialisation of merging):
the callback :class:`~mtl.callbacks.InitWeights` loads them with :func:`load_init_weights`, and
``merge.py`` finds its checkpoint in a run's config with :func:`init_weights_paths` to rebuild θ0.

A run may also start from a synthetic-pretrained backbone (``pretrained=synthetic``, written once by
``python -m mtl.pretrain``): the same callback then gets the ``pretrained`` group's description
(backbone config, recipe, cache folder) instead of a path; :func:`pretrained_source` names the cached
file (:func:`pretrained_recipe`: the backbone's architecture and the recipe, hashed into the name) and
:func:`load_init_weights` checks its recorded recipe, its fingerprint and every shape before it copies
the backbone's tensors (a LoRA-adapted layer's pretrained weight goes to ``<layer>.base``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mtl.checkpoint import read_checkpoint

#: the fingerprint callback's key in ``checkpoint["callbacks"]`` (Lightning uses the class name)
STATE_KEY = "InitFingerprint"
#: ``format`` of a file written by ``python -m mtl.pretrain``
PRETRAINED_FORMAT = "mtl-pretrained-backbone"
#: version of the pretraining procedure (bump when mtl.pretrain or the corpus changes what it computes)
PRETRAIN_VERSION = 1
#: where the backbone's weights sit in an :class:`~mtl.module.MTLModule`'s state dict
BACKBONE_PREFIX = "model.backbone."
#: backbone config keys that do not change the weights a pretraining produces (wrapper, adapter and
#: regularisation options); every other key (timm name, widths, depths, window, img_size, …) does
NON_ARCH_KEYS = frozenset({
    "_target_", "_partial_", "pretrained", "checkpoint_path", "out_indices", "grad_checkpointing", "norm",
    "tasks", "rank", "task_rank", "scale", "dropout", "shared_mode", "lora_merging", "drop_path_rate",
    "drop_rate", "attn_drop_rate", "proj_drop_rate", "train_patch_embed", "train_norms", "train_pos_bias",
    "train_merging",
})  # fmt: skip


def tensor_digest(t: torch.Tensor) -> str:
    """A short sha256 of a tensor's shape, dtype and values (exact, platform-independent for CPU)."""
    t = t.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{tuple(t.shape)}|{t.dtype}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:20]


def state_fingerprint(state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """``key → digest`` of every tensor of a state dict."""
    return {k: tensor_digest(v) for k, v in state.items() if torch.is_tensor(v)}


def first_mismatch(a: Mapping[str, str], b: Mapping[str, str], keys: list[str]) -> str | None:
    """The first of ``keys`` whose digest differs (or is missing) between ``a`` and ``b``."""
    return next((k for k in keys if a.get(k) is None or a.get(k) != b.get(k)), None)


def stored_fingerprint(checkpoint: Mapping[str, Any]) -> dict[str, str] | None:
    """The fingerprint :class:`~mtl.callbacks.InitFingerprint` stored in a checkpoint, or ``None``."""
    for key, value in (checkpoint.get("callbacks") or {}).items():
        if str(key).startswith(STATE_KEY) and isinstance(value, Mapping) and value.get("fingerprint"):
            return dict(value["fingerprint"])
    merged = checkpoint.get("merge") or {}
    return dict(merged["init_fingerprint"]) if merged.get("init_fingerprint") else None


def _plain(node: Any) -> Any:
    """A config node (DictConfig, ListConfig, tuple) as plain dicts and lists, interpolations resolved."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(node, DictConfig | ListConfig):
        return OmegaConf.to_container(node, resolve=True)
    if isinstance(node, Mapping):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list | tuple):
        return [_plain(v) for v in node]
    return node


def backbone_arch(backbone: Mapping) -> dict[str, Any]:
    """What of a ``model.backbone`` config decides its pretrained weights (without :data:`NON_ARCH_KEYS`).

    ``mtlora_swin_mini`` and ``swin_mini`` at one ``img_size`` have the same architecture: MTLoRA
    adapts the pretrained Swin it wraps.
    """
    arch = {k: v for k, v in sorted(_plain(backbone).items()) if k not in NON_ARCH_KEYS}
    if arch.get("img_size") is not None:
        arch["img_size"] = [int(v) for v in arch["img_size"]]
    if not arch.get("name"):
        raise ValueError(f"pretrained: the backbone config names no timm model ('name'): {arch}")
    return arch


def pretrained_recipe(backbone: Mapping, recipe: Mapping) -> dict[str, Any]:
    """The full recipe of a pretrained checkpoint: procedure version, backbone architecture, options."""
    return {"version": PRETRAIN_VERSION, "backbone": backbone_arch(backbone), **_plain(recipe)}


def recipe_key(recipe: Mapping) -> str:
    """A short hash of a full recipe (:func:`pretrained_recipe`): its checkpoint's name."""
    return hashlib.sha256(json.dumps(_plain(recipe), sort_keys=True).encode()).hexdigest()[:12]


def default_cache_dir() -> Path:
    """``$MTL_PRETRAINED_DIR``, else ``$XDG_CACHE_HOME/mtl/pretrained`` (``~/.cache/mtl/pretrained``)."""
    if os.environ.get("MTL_PRETRAINED_DIR"):
        return Path(os.environ["MTL_PRETRAINED_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "mtl" / "pretrained"


def pretrained_file(recipe: Mapping, cache_dir: str | Path | None = None) -> Path:
    """The cached checkpoint of a full recipe: ``<cache>/<timm name>_<H>x<W>_<hash>.pt``."""
    arch = recipe["backbone"]
    size = "x".join(str(v) for v in arch.get("img_size") or []) or "any"
    folder = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return folder / f"{arch['name']}_{size}_{recipe_key(recipe)}.pt"


def pretrained_source(spec: Mapping) -> tuple[Path, dict[str, Any]]:
    """The cached file and full recipe of a ``pretrained`` spec (``backbone``, ``recipe``, ``cache_dir``)."""
    spec = _plain(spec)
    missing = [k for k in ("backbone", "recipe") if not spec.get(k)]
    if missing:
        raise ValueError(
            f"InitWeights(pretrained=…): the spec lacks {missing}; configs/pretrained/synthetic.yaml"
        )
    recipe = pretrained_recipe(spec["backbone"], spec["recipe"])
    return pretrained_file(recipe, spec.get("cache_dir")), recipe


def _diff(a: Any, b: Any, path: str = "") -> list[str]:
    """The dotted keys where two plain trees differ, with both values."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _diff(a.get(k), b.get(k), f"{path}{k}.")]
    return [] if a == b else [f"{path.rstrip('.')}: file {a!r}, run {b!r}"]


def _backbone_key(key: str, own: Mapping[str, torch.Tensor]) -> str | None:
    """The module key of a backbone tensor: ``model.backbone.<key>``, or ``…<layer>.base.<leaf>``
    where the layer is LoRA-adapted (:mod:`mtl.adapters`)."""
    direct = BACKBONE_PREFIX + key
    if direct in own:
        return direct
    head, _, leaf = direct.rpartition(".")
    return f"{head}.base.{leaf}" if f"{head}.base.{leaf}" in own else None


def check_pretrained(
    ckpt: Mapping[str, Any], path: Path, expected: Mapping | None
) -> dict[str, torch.Tensor]:
    """The state of a ``mtl.pretrain`` file after its checks: recorded recipe = ``expected`` (when
    given) and every tensor = its recorded fingerprint. ``ValueError`` naming the file and keys."""
    redo = "delete it and run `python -m mtl.pretrain` again (the command is in docs/pretraining.md)"
    if expected is not None:
        diff = _diff(_plain(ckpt.get("recipe") or {}), _plain(expected))
        if diff:
            raise ValueError(
                f"pretrained checkpoint '{path}' was made with another recipe or backbone than this run's "
                f"model.backbone and pretrained.recipe:\n  " + "\n  ".join(diff[:8]) + f"\n({redo})"
            )
    state = dict(ckpt["state_dict"])
    recorded = ckpt.get("fingerprint") or {}
    bad = first_mismatch(state_fingerprint(state), recorded, sorted(set(state) | set(recorded)))
    if bad:
        raise ValueError(
            f"pretrained checkpoint '{path}': tensor '{bad}' does not match its recorded fingerprint "
            f"(damaged or edited file; {redo})"
        )
    return state


def _load_pretrained(
    module: torch.nn.Module, path: Path, ckpt: Mapping, expected: Mapping | None
) -> list[str]:
    """Copies a ``mtl.pretrain`` backbone into ``module`` (every tensor, every shape checked)."""
    state = check_pretrained(ckpt, path, expected)
    own = module.state_dict()
    backbone = module.get_submodule(BACKBONE_PREFIX.rstrip("."))
    body = dict(backbone.named_children()).get("model", backbone)  # the timm model a wrapper holds
    where = (
        f"'{path}' (backbone {(ckpt.get('recipe') or {}).get('backbone')}) does not fit the model's "
        f"{type(backbone).__name__} of a timm {type(body).__name__}"
    )
    fits: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        target = _backbone_key(key, own)
        if target is None:
            raise ValueError(f"pretrained checkpoint {where}: its '{key}' has no "
                             f"counterpart under '{BACKBONE_PREFIX}' (another backbone type?)")  # fmt: skip
        if own[target].shape != value.shape:
            raise ValueError(
                f"pretrained checkpoint {where}: '{key}' is {list(value.shape)} "
                f"in the file, '{target}' is {list(own[target].shape)} in the model (another architecture "
                "or img_size)"
            )
        fits[target] = value
    adapters = ("lora_A", "lora_B")
    left = [
        k
        for k in own
        if k.startswith(BACKBONE_PREFIX) and k not in fits and not set(adapters) & set(k.split("."))
    ]
    if left:
        raise ValueError(
            f"pretrained checkpoint {where}: the model's '{left[0]}' (and "
            f"{len(left) - 1} more backbone tensors) is not in the file"
        )
    module.load_state_dict(fits, strict=False)
    return sorted(fits)


def load_init_weights(
    module: torch.nn.Module, path: str | Path, *, expected: Mapping | None = None
) -> tuple[list[str], list[str]]:
    """Copies every tensor of ``path`` whose key and shape match ``module.state_dict()``.

    A ``python -m mtl.pretrain`` file goes into the backbone instead: its recipe (``expected``, when
    given), fingerprint and every shape are checked, and all its tensors must fit.

    Args:
        module: the :class:`~mtl.module.MTLModule` (keys ``model.…``).
        path: a Lightning checkpoint of ``train.py``, a plain state dict with the same keys, or a
            pretrained backbone of ``mtl.pretrain``.
        expected: the full recipe the pretrained file must record (:func:`pretrained_recipe`).

    Returns:
        The keys loaded and the module's keys left at their initialisation.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: no key of the file fits the module; a pretrained file that does not fit or fails
            its checks.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"init_weights path '{path}' does not exist")
    ckpt = read_checkpoint(path, mmap=True, expected="a checkpoint of train.py or a state dict file")
    if ckpt.get("format") == PRETRAINED_FORMAT:
        loaded = _load_pretrained(module, path, ckpt, expected)
        return loaded, sorted(k for k in module.state_dict() if k not in set(loaded))
    state = ckpt["state_dict"] if isinstance(ckpt.get("state_dict"), Mapping) else ckpt
    own = module.state_dict()
    fits = {k: v for k, v in state.items() if k in own and torch.is_tensor(v) and v.shape == own[k].shape}
    if not fits:
        raise ValueError(f"init_weights: no tensor of '{path}' matches the model's keys and shapes")
    module.load_state_dict(fits, strict=False)
    return sorted(fits), sorted(k for k in own if k not in fits)


def init_weights_sources(callbacks: Mapping | None) -> list[tuple[str, dict[str, Any] | None]]:
    """``(path, expected recipe or None)`` of every :class:`~mtl.callbacks.InitWeights` entry of a
    ``callbacks`` config node: its ``path``, or the cached checkpoint its ``pretrained`` spec names.

    Entries are recognised by their ``_target_``'s class name, so configs saved before the callback
    moved (``mtl.merging.init_weights.InitWeights``) still count.
    """
    out: list[tuple[str, dict[str, Any] | None]] = []
    for c in (callbacks or {}).values():
        if not (isinstance(c, Mapping) and str(c.get("_target_", "")).endswith("InitWeights")):
            continue
        if c.get("pretrained") is not None:
            path, recipe = pretrained_source(c["pretrained"])
            out.append((str(path), recipe))
        else:
            out.append((str(c["path"]), None))
    return out


def init_weights_paths(callbacks: Mapping | None) -> list[str]:
    """The file of every :class:`~mtl.callbacks.InitWeights` entry (:func:`init_weights_sources`)."""
    return [path for path, _ in init_weights_sources(callbacks)]
