"""``merge_checkpoints``: single-task checkpoints → one multi-task checkpoint (what merge.py runs).

1. Open every checkpoint (memory-mapped) with its training config; build the merged model
   (the first run's config, ``data.tasks`` = the union) and split its weights into shared ones
   (backbone, shared decoder: merged) and per-task ones (decoder branch, head: copied from the
   checkpoint that trained that task).
2. Verify: disjoint tasks, same architecture (first mismatching key named), same model config,
   same initialisation (stored fingerprints, :mod:`mtl.initial_weights`).
3. θ0 (:func:`initial_weights`): ``base_ckpt`` where given, else the initial model rebuilt from
   the training config exactly as ``train`` built it (pretrained backbone file or timm weights,
   seeded initialisation of the rest, then the :class:`~mtl.callbacks.InitWeights`
   checkpoint if the run had one), checked against the stored fingerprint.
4. Merge the shared float parameters with the method; average the shared float buffers
   (BatchNorm statistics); write a normal checkpoint that ``eval.py`` evaluates.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from mtl.backbones.timm_backbone import upgrade_token_keys
from mtl.initial_weights import first_mismatch, init_weights_paths, load_init_weights, state_fingerprint
from mtl.merging.base import MergeMethod
from mtl.merging.io import (
    Run,
    backbone_source,
    check_disjoint_tasks,
    check_runs,
    key_owners,
    load_checkpoint,
    load_run,
    normalise_base_state,
)
from mtl.pipeline import build_datamodule, build_module

log = logging.getLogger(__name__)


def merged_config(runs: Sequence[Run], output_dir: Path) -> DictConfig:
    """The first run's config with ``data.tasks`` = the union of all runs' tasks (in run order)."""
    cfg = OmegaConf.create(OmegaConf.to_container(runs[0].cfg, resolve=False))
    cfg.paths.output_dir = str(output_dir)  # the training run's `${hydra:…}` paths do not resolve here
    cfg.paths.work_dir = os.getcwd()
    tasks = [t for r in runs for t in r.tasks]
    cfg.data.tasks = tasks
    if "task" in cfg:  # the single-task experiments' own key
        cfg.task = "+".join(tasks)
    return cfg


def rebuild_initial_state(cfg: DictConfig) -> dict[str, torch.Tensor]:
    """The module's weights at the start of training, rebuilt as ``mtl.pipeline.train`` builds them."""
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    module = build_module(cfg, build_datamodule(cfg))
    for path in init_weights_paths(cfg.get("callbacks")):  # what the InitWeights callback loaded
        load_init_weights(module, path)
    return module.state_dict()


def initial_weights(
    runs: Sequence[Run], shared: Sequence[str], base_ckpt: str | None, output_dir: Path
) -> dict[str, torch.Tensor]:
    """θ0 of the shared keys (see the module docstring); ``ValueError`` when it cannot be had.

    Without a stored fingerprint the rebuilt θ0 cannot be verified, so a from-scratch backbone
    then needs ``base_ckpt``.
    """
    fingerprint = next((r.fingerprint for r in runs if r.fingerprint), None)
    base: dict[str, torch.Tensor] = {}
    if base_ckpt:
        raw = load_checkpoint(base_ckpt)
        for nested in ("state_dict", "model"):  # a Lightning checkpoint, or a {"model": …} file
            if isinstance(raw.get(nested), Mapping):
                raw = raw[nested]
                break
        base = {k: v for k, v in normalise_base_state(raw, shared).items() if k in set(shared)}
    missing = [k for k in shared if k not in base]
    if missing:
        source = backbone_source(runs[0].cfg)
        if fingerprint is None and not source["pretrained"]:
            raise ValueError(
                f"θ0 unknown: the backbone of {runs[0].path} was trained from scratch "
                f"(pretrained=false, no checkpoint_path) and the checkpoints store no initial-weight "
                f"fingerprint; give base_ckpt=<file with the initial weights> ('{missing[0]}' is needed)"
            )
        cfg = OmegaConf.create(OmegaConf.to_container(runs[0].cfg, resolve=False))
        cfg.paths.output_dir, cfg.paths.work_dir = str(output_dir), os.getcwd()
        rebuilt = rebuild_initial_state(cfg)
        base.update({k: rebuilt[k] for k in missing})
    if fingerprint is not None:
        bad = first_mismatch(state_fingerprint({k: base[k] for k in shared}), fingerprint, list(shared))
        if bad:
            origin = "base_ckpt" if base_ckpt and bad not in missing else "the rebuilt initial model"
            raise ValueError(
                f"θ0 mismatch: '{bad}' of {origin} is not the initial weight the checkpoints were trained "
                "from (stored fingerprint); give base_ckpt=<the initial weights>"
            )
    else:
        warnings.warn(
            "no stored initial-weight fingerprint: θ0 taken from the backbone's pretrained source and "
            "the seeded initialisation, unverified",
            stacklevel=2,
        )
    return base


def _first_images(datamodule: Any, n: int) -> torch.Tensor:
    datamodule.setup("validate")
    out, seen = [], 0
    for batch in datamodule.val_dataloader():
        out.append(batch["image"])
        seen += batch["image"].shape[0]
        if seen >= n:
            break
    return torch.cat(out)[:n]


def checkpoint_list(value: Any, key: str = "ckpts") -> list[str]:
    """The checkpoint paths of ``merge.py ckpts=…``: a list (``ckpts=[a.ckpt,b.ckpt]``), one path
    (``ckpts=a.ckpt``) or a comma-separated string (``ckpts='a.ckpt,b.ckpt'``).

    Raises:
        TypeError: anything else (a number, a mapping, a list holding non-strings).
        ValueError: no path at all.
    """
    expected = "a checkpoint path, 'a.ckpt,b.ckpt' or a list [a.ckpt,b.ckpt]"
    if isinstance(value, (str, Path)):
        items = str(value).split(",")
    elif isinstance(value, (list, tuple, ListConfig)):
        bad = [v for v in value if not isinstance(v, (str, Path))]
        if bad:
            raise TypeError(f"{key}: every entry must be a path, got {bad[0]!r}; expected {expected}")
        items = [str(v) for v in value]
    else:
        raise TypeError(f"{key} must be {expected}, got {type(value).__name__} {value!r}")
    paths = [p.strip() for p in items if p.strip()]
    if not paths:
        raise ValueError(f"{key} is empty: expected {expected}")
    return paths


def merge_checkpoints(
    *,
    ckpts: Sequence[str] | str,
    method: MergeMethod,
    output_dir: str | Path,
    base_ckpt: str | None = None,
    output: str | Path | None = None,
) -> tuple[Path, DictConfig]:
    """Merges ``ckpts`` with ``method``; returns the merged checkpoint's path and config.

    Args:
        ckpts: checkpoints of ``train.py`` (one or more tasks each, disjoint): a list, one path or
            a comma-separated string (:func:`checkpoint_list`).
        method: a :class:`~mtl.merging.base.MergeMethod`.
        output_dir: the run folder (the merged config's ``paths.output_dir``).
        base_ckpt: the initial weights θ0 (a Lightning checkpoint, a model state dict or a timm
            backbone file); default: rebuilt from the training config.
        output: the merged checkpoint file (default ``<output_dir>/checkpoints/merged.ckpt``).
    """
    ckpts = checkpoint_list(ckpts)
    output_dir = Path(output_dir)
    runs = [load_run(p) for p in ckpts]
    check_disjoint_tasks(runs)  # before the model of the union is built (it refuses repeated tasks)
    cfg = merged_config(runs, output_dir)
    datamodule = build_datamodule(cfg)
    module = build_module(cfg, datamodule)
    shared, owner = key_owners(module)
    keys = set(module.state_dict())
    for run in runs:  # checkpoints written before the ViT's tokens moved into a called child
        run.state = upgrade_token_keys(run.state, keys)
        run.fingerprint = upgrade_token_keys(run.fingerprint, keys) if run.fingerprint else run.fingerprint
    check_runs(runs, shared)
    params = {f"model.{n}" for n, _ in module.model.named_parameters()}
    float_params = [k for k in shared if k in params]
    state = module.state_dict()
    run_of = {t: r for r in runs for t in r.tasks}
    for k, t in owner.items():
        src = run_of[t].state
        if k not in src or src[k].shape != state[k].shape:
            got = tuple(src[k].shape) if k in src else "missing"
            raise ValueError(
                f"architecture mismatch at '{k}' of task '{t}' in {run_of[t].path}: {got}, "
                f"the merged model has {tuple(state[k].shape)}"
            )
        state[k] = src[k].clone()
    for k in shared:
        if k in params:
            continue
        vals = [r.state[k] for r in runs]
        state[k] = (
            torch.stack([v.float() for v in vals]).mean(0).to(vals[0].dtype)
            if vals[0].is_floating_point()
            else vals[0].clone()
        )
    module.load_state_dict(state)
    base = initial_weights(runs, shared, base_ckpt, output_dir) if method.needs_base else None
    context = {
        "module": module,
        "tasks_of": [r.tasks for r in runs],
        "shared_keys": shared,
        "images": _first_images(datamodule, getattr(method, "images", 0))
        if hasattr(method, "images")
        else None,
    }
    # written into the module's own (detached) tensors: ``state`` shares their storage
    merged = method.merge(
        base=base, states=[r.state for r in runs], keys=float_params, context=context, out=state
    )
    for k in float_params:
        if merged[k] is not state[k]:  # methods that return their own tensors (AdaMerging)
            state[k].copy_(merged[k].detach())
    info = {
        **method.describe(),
        "ckpts": [str(r.path) for r in runs],
        "tasks": {str(r.path): r.tasks for r in runs},
        "base_ckpt": base_ckpt,
        "merged_keys": len(float_params),
        "init_fingerprint": {k: v for k, v in (runs[0].fingerprint or {}).items() if k in set(shared)},
    }
    path = Path(output) if output else output_dir / "checkpoints" / "merged.ckpt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "state_dict": state,
            "config": OmegaConf.to_container(cfg, resolve=True),
            "merge": info,
            "epoch": 0,
            "global_step": 0,
            "pytorch-lightning_version": L.__version__,
        },
        path,
    )
    log.info(
        "merged %d shared tensors of %d checkpoints with %s → %s",
        len(float_params),
        len(runs),
        info["method"],
        path,
    )
    return path, cfg


def evaluate_merged(ckpt_path: Path, cfg: DictConfig, eval_cfg: Mapping | None, output_dir: Path) -> dict:
    """Evaluates a merged checkpoint in-process, exactly as ``eval.py`` does (``mtl.pipeline.evaluate``)."""
    from mtl.pipeline import evaluate

    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    cfg.ckpt_path = str(ckpt_path)
    cfg.paths.output_dir = str(output_dir)
    cfg.callbacks, cfg.logger = {}, {}
    cfg.eval = OmegaConf.create(dict(eval_cfg or {}))
    metrics, _ = evaluate(cfg)
    return metrics


def eval_command(ckpts: Sequence[str], merged: Path, cfg: DictConfig) -> str:
    """The ``eval.py`` command line for a merged checkpoint: the first run's overrides, the union of
    the tasks, the checkpoint (the overrides come from ``<run>/.hydra/overrides.yaml`` when present)."""
    overrides_file = Path(ckpts[0]).expanduser().resolve().parent.parent / ".hydra" / "overrides.yaml"
    skip = ("task=", "data.tasks=", "ckpt_path=", "test=", "hydra.", "+data.tasks=")
    overrides = [
        str(o)
        for o in (OmegaConf.load(overrides_file) if overrides_file.is_file() else [])
        if not str(o).startswith(skip)
    ]
    tasks = ",".join(cfg.data.tasks)
    return " ".join(["python eval.py", *overrides, f"data.tasks=[{tasks}]", f"ckpt_path={merged}"])
