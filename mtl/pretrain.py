"""Synthetic pretraining of the small backbones, cached once and reused: ``python -m mtl.pretrain``.

    python -m mtl.pretrain backbone=swin_mini              # 128 px, the recipe of configs/pretrained/
    python -m mtl.pretrain backbone=vit_tiny resolution=64  # another img_size is another checkpoint
    python -m mtl.pretrain backbone=swin_mini steps=20 corpus_length=64 resolution=16   # a tiny one
    python train.py experiment=synthetic_baseline pretrained=synthetic                  # uses it

The methods of the framework (TaskExpert, MTLoRA, model merging, M³ViT) are made for a pretrained
backbone. This trains ``model/backbone=<name>`` on :class:`~mtl.data.synthetic.corpus.SyntheticCorpus`
(render streams disjoint from every evaluation split, four scene distributions) with the objective
``multitask``: supervised on all six synthetic tasks (semseg, human_parts, saliency, normals,
depth, edge) through the multi-head decoder, whose decoder and heads are thrown away afterwards.
Exact labels cost nothing here, and the same supervision makes a stronger start in a CPU budget
than a self-supervised objective (masked-image modelling needs far more steps to pay off); the
corpus's scenes, camera motions and clutter levels are not those of the evaluation scenes.

The backbone's state is written atomically to ``<cache>/<timm name>_<H>x<W>_<hash>.pt`` (cache:
``cache_dir=``, ``$MTL_PRETRAINED_DIR`` or ``~/.cache/mtl/pretrained``), never inside the
repository, with its full recipe (backbone architecture and every option, hashed into the name),
the code version, the date and a fingerprint of every tensor; a ``.json`` next to it holds the same
record for reading. A second run with the same recipe finds it and reuses it ("found, reusing");
``force=true`` retrains. ``pretrained=synthetic`` (configs/pretrained/) loads it into any experiment.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import OmegaConf

from mtl.initial_weights import (
    PRETRAINED_FORMAT,
    backbone_arch,
    check_pretrained,
    pretrained_file,
    pretrained_recipe,
    state_fingerprint,
)

log = logging.getLogger(__name__)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
#: the recipe's defaults (``pretrained.recipe``), shared with ``pretrained=synthetic``
RECIPE_FILE = CONFIGS / "pretrained" / "synthetic.yaml"
#: command-line options besides the recipe's keys and ``backbone.<key>``
OPTIONS = ("backbone", "resolution", "cache_dir", "force", "dry_run")
OBJECTIVES = ("multitask",)


def default_recipe() -> dict[str, Any]:
    """``pretrained.recipe`` of configs/pretrained/synthetic.yaml."""
    return OmegaConf.to_container(OmegaConf.load(RECIPE_FILE).pretrained.recipe)


def _size(resolution: int | str | Sequence[int]) -> tuple[int, int]:
    if isinstance(resolution, str):
        parts = resolution.lower().replace("x", ",").strip("[]").split(",")
        resolution = [int(p) for p in parts if p.strip()]
    if isinstance(resolution, int):
        resolution = (resolution, resolution)
    size = tuple(int(v) for v in resolution)
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(f"resolution must be N, HxW or [H,W] with positive sizes, got {resolution!r}")
    return size  # type: ignore[return-value]


def _value(v: Any) -> str:
    """A value as a Hydra / command-line override writes it."""
    if isinstance(v, list | tuple):
        return "[" + ",".join(_value(x) for x in v) + "]"
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


def train_overrides(
    backbone: str, size: tuple[int, int], recipe: Mapping[str, Any], backbone_overrides: Mapping[str, Any]
) -> list[str]:
    """The ``train.py`` overrides of a pretraining run (no validation, no checkpoints, no loggers)."""
    h, w = size
    return [
        "experiment=synthetic_baseline",
        "model=multihead",
        f"model/backbone={backbone}",
        "pretrained=none",
        "logger=none",
        f"data.tasks={_value(list(recipe['tasks']))}",
        "data.dataset._target_=mtl.data.synthetic.corpus.SyntheticCorpus",
        f"data.dataset.resolution=[{h},{w}]",
        f"data.dataset.length={int(recipe['corpus_length'])}",
        f"data.dataset.seed={int(recipe['corpus_seed'])}",
        f"data.batch_size={int(recipe['batch_size'])}",
        f"model.decoder.channels={int(recipe['decoder_channels'])}",
        f"optimizer.lr={float(recipe['lr'])}",
        f"scheduler.warmup_steps={int(recipe['warmup_steps'])}",
        f"seed={int(recipe['seed'])}",
        f"trainer.max_steps={int(recipe['steps'])}",
        "trainer.max_epochs=-1",
        "++trainer.limit_val_batches=0",
        "++trainer.num_sanity_val_steps=0",
        "++trainer.enable_checkpointing=false",
        "~callbacks.model_checkpoint",
        "~callbacks.periodic_checkpoint",
        "~callbacks.lr_monitor",
        "test=false",
        "module.log_images=false",
        "extras.print_config=false",
        *(f"++model.backbone.{k}={_value(v)}" for k, v in backbone_overrides.items()),
    ]


def pretrain_command(recipe: Mapping[str, Any], cache_dir: str | Path | None = None) -> str:
    """The ``python -m mtl.pretrain`` command that writes the checkpoint of a full recipe
    (:func:`~mtl.initial_weights.pretrained_recipe`): the closest backbone option of
    configs/model/backbone/ plus ``backbone.<key>=`` for what differs, and the non-default options."""
    arch = dict(recipe["backbone"])
    size = arch.pop("img_size", None)
    best: tuple[int, str, list[str]] | None = None
    for file in sorted((CONFIGS / "model" / "backbone").glob("*.yaml")):
        node = OmegaConf.load(file)
        if "defaults" in node or not str(node.get("_target_", "")).endswith("TimmBackbone"):
            continue
        own = {k: v for k, v in backbone_arch({**OmegaConf.to_container(node), "img_size": None}).items()
               if k != "img_size"}  # fmt: skip
        if own.get("name") != arch.get("name") or any(k not in arch for k in own):
            continue  # another model, or one setting a key the recipe leaves at timm's default
        extra = [f"backbone.{k}={_value(v)}" for k, v in sorted(arch.items()) if own.get(k) != v]
        if best is None or len(extra) < best[0]:
            best = (len(extra), file.stem, extra)
    if best is None:
        return f"(no option of configs/model/backbone/ builds the timm model '{arch.get('name')}')"
    args = [f"backbone={best[1]}", *best[2]]
    if size:
        args.append(f"resolution={size[0]}x{size[1]}")
    defaults = default_recipe()
    args += [
        f"{k}={_value(v)}"
        for k, v in recipe.items()
        if k not in ("version", "backbone") and defaults.get(k) != v
    ]
    if cache_dir:
        args.append(f"cache_dir={cache_dir}")
    return "python -m mtl.pretrain " + " ".join(args)


def missing_pretrained_message(path: Path, recipe: Mapping[str, Any]) -> str:
    """What ``pretrained=synthetic`` says when the checkpoint of its recipe is not in the cache."""
    cache = None if os.environ.get("MTL_PRETRAINED_DIR") == str(path.parent) else path.parent
    return (
        f"pretrained=synthetic: no pretrained checkpoint for this backbone and recipe at '{path}'. "
        f"Make it once (about 45 CPU-minutes at 128 px with the default recipe; docs/pretraining.md):\n"
        f"    {pretrain_command(recipe, cache)}\n"
        "or train from the backbone's own initialisation with pretrained=none."
    )


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if path.suffix == ".json":
            tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
        else:
            torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@dataclass(frozen=True)
class Plan:
    """What a pretraining is: its checkpoint, full recipe and ``train.py`` overrides."""

    path: Path
    recipe: dict[str, Any]
    overrides: list[str]
    cache_dir: Path | None


def plan(
    backbone: str = "swin_mini",
    *,
    resolution: int | str | Sequence[int] = 128,
    recipe: Mapping[str, Any] | None = None,
    backbone_overrides: Mapping[str, Any] | None = None,
    cache_dir: str | Path | None = None,
) -> Plan:
    """The checkpoint a pretraining writes, without training (arguments as :func:`pretrain`).

    Raises:
        ValueError: an unknown recipe key or objective.
    """
    defaults = default_recipe()
    unknown = sorted(set(recipe or {}) - set(defaults))
    if unknown:
        raise ValueError(
            f"mtl.pretrain: unknown recipe option(s) {unknown}; valid: {sorted(defaults)} and {OPTIONS}"
        )
    options = {**defaults, **dict(recipe or {})}
    if options["objective"] not in OBJECTIVES:
        raise ValueError(f"mtl.pretrain: objective must be one of {OBJECTIVES}, got {options['objective']!r}")
    folder = Path(cache_dir).expanduser() if cache_dir else None
    overrides = train_overrides(backbone, _size(resolution), options, dict(backbone_overrides or {}))
    from mtl.pipeline import compose_train_config

    probe = compose_train_config(overrides, Path(os.devnull))
    full = pretrained_recipe(probe.model.backbone, options)
    return Plan(pretrained_file(full, folder), full, overrides, folder)


def pretrain(
    backbone: str = "swin_mini",
    *,
    resolution: int | str | Sequence[int] = 128,
    recipe: Mapping[str, Any] | None = None,
    backbone_overrides: Mapping[str, Any] | None = None,
    cache_dir: str | Path | None = None,
    force: bool = False,
) -> Path:
    """Pretrains ``model/backbone=<backbone>`` (or finds it in the cache) and returns its checkpoint.

    Args:
        backbone: an option of configs/model/backbone/ (``swin_mini``, ``vit_tiny``, …).
        resolution: the corpus's and the backbone's ``img_size`` (N, ``"HxW"`` or ``[H, W]``).
        recipe: options that replace the defaults (``pretrained.recipe`` of
            configs/pretrained/synthetic.yaml).
        backbone_overrides: ``model.backbone.<key>`` values (e.g. a smaller ``embed_dim``).
        cache_dir: the cache folder (default :func:`~mtl.initial_weights.default_cache_dir`).
        force: retrain even when the checkpoint exists.

    Raises:
        ValueError: an unknown recipe key or objective; a cached file that fails its checks.
    """
    p = plan(backbone, resolution=resolution, recipe=recipe, backbone_overrides=backbone_overrides,
             cache_dir=cache_dir)  # fmt: skip
    path = p.path
    if path.is_file() and not force:
        check_pretrained(torch.load(path, map_location="cpu", weights_only=True), path, p.recipe)
        log.info("found, reusing %s", path)
        return path

    from mtl.loggers import code_version
    from mtl.pipeline import compose_train_config, train

    path.parent.mkdir(parents=True, exist_ok=True)
    work = path.with_name(f".{path.stem}.work")
    shutil.rmtree(work, ignore_errors=True)
    cfg = compose_train_config(p.overrides, work)
    log.info("pretraining %s into %s; recipe %s", backbone, path, p.recipe)
    code = code_version()  # the code that trains (the tree may change during a long run)
    t0 = time.perf_counter()
    metrics, objects = train(cfg)
    seconds = time.perf_counter() - t0
    state = {
        k: v.detach().to("cpu").clone() for k, v in objects["module"].model.backbone.state_dict().items()
    }
    record = {
        "format": PRETRAINED_FORMAT,
        "recipe": p.recipe,
        "command": pretrain_command(p.recipe, p.cache_dir),
        "code": code,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(seconds, 1),
        "device": str(next(objects["module"].parameters()).device),
        "train_losses": {k: round(v, 5) for k, v in metrics.items() if k.startswith("train/")},
        "fingerprint": state_fingerprint(state),
    }
    _save_atomic(record, path.with_suffix(".json"))
    _save_atomic({**record, "state_dict": state}, path)
    shutil.rmtree(work, ignore_errors=True)
    log.info("pretrained in %.0f s: %s", seconds, path)
    return path


def parse_args(argv: Sequence[str]) -> dict[str, Any]:
    """``key=value`` arguments → :func:`pretrain` keyword arguments (values parsed as YAML)."""
    kwargs: dict[str, Any] = {"recipe": {}, "backbone_overrides": {}}
    defaults = default_recipe()
    for arg in argv:
        key, sep, raw = arg.partition("=")
        if not sep:
            raise SystemExit(f"mtl.pretrain: arguments are key=value, got {arg!r} (see --help)")
        value = yaml.safe_load(raw)
        if key in OPTIONS:
            kwargs[key] = value
        elif key.startswith("backbone."):
            kwargs["backbone_overrides"][key.removeprefix("backbone.")] = value
        elif key in defaults:
            kwargs["recipe"][key] = value
        else:
            raise SystemExit(
                f"mtl.pretrain: unknown option {key!r}; options: {list(OPTIONS)}, backbone.<key>, "
                f"and the recipe's {sorted(defaults)}"
            )
    return kwargs


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        where = RECIPE_FILE.relative_to(CONFIGS.parent)
        print(f"recipe defaults ({where}):\n{yaml.safe_dump(default_recipe())}")
        return
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s")
    kwargs = parse_args(argv)
    if kwargs.pop("dry_run", False):  # the checkpoint and recipe, no training
        kwargs.pop("force", None)
        p = plan(**kwargs)
        print(f"{p.path} ({'exists' if p.path.is_file() else 'missing'})\n{yaml.safe_dump(p.recipe)}")
        return
    print(pretrain(**kwargs))


if __name__ == "__main__":
    main()
