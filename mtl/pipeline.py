"""``train(cfg)`` and ``evaluate(cfg)``: everything the entry points do, testable in-process.

Nothing above this file imports Hydra except ``hydra.utils.instantiate`` here; the
``@hydra.main`` wrappers are ``train.py`` and ``eval.py``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from mtl.baselines import METRICS_PROTOCOL
from mtl.callbacks import PeriodicCheckpoint
from mtl.checkpoint import checkpoint_step, read_checkpoint
from mtl.config_check import check_config
from mtl.data.base import DenseDataset, check_eval_split
from mtl.data.datamodule import MTLDataModule, dataset_class
from mtl.data.switch import dataset_switch_warning
from mtl.decoders.moe import write_gate_report
from mtl.eval_steps import EvalContext, EvalStep
from mtl.gpu import (
    ChannelsLast,
    GPUSettings,
    apply_backend_settings,
    compile_model,
    resolve_num_workers,
    resolve_photometric_on_device,
)
from mtl.guards import explain_oom
from mtl.loggers import code_version, quiet_libraries, resume_loggers
from mtl.model import MultiTaskNet
from mtl.module import MTLModule
from mtl.objective import score
from mtl.optim import with_fused
from mtl.params import parameter_counts, parameter_report
from mtl.progress import progress_bar_enabled
from mtl.report import write_results
from mtl.tasks import Task, build_tasks, task_class

log = logging.getLogger(__name__)

#: the evaluation steps of ``configs/eval.yaml``, for configs composed without them (``merge.py``'s
#: in-process evaluation starts from a training config)
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
DEFAULT_EVAL_STEPS = CONFIG_DIR / "eval_steps" / "default.yaml"
#: the parts of a training run's config that ``eval.py`` takes from the run (``eval.run_config``):
#: what decides the model's weights and what they are evaluated on
RUN_KEYS = ("model", "data", "task_options", "baselines")


def _container(node: Any) -> dict:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})


def job_config(cfg: DictConfig) -> dict:
    """The resolved config as a plain dict, without Hydra's own ``hydra`` node."""
    return OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)


def gpu_settings(cfg: DictConfig) -> GPUSettings:
    """The GPU knobs of ``cfg.gpu`` (``configs/gpu/``; absent: the defaults, the papers' fp32)."""
    return GPUSettings.from_config(_container(cfg.get("gpu")))


def setup_gpu(cfg: DictConfig) -> GPUSettings:
    """Applies the process-wide GPU knobs and sizes ``data.num_workers: auto`` to this node.

    Sets the matmul precision and cuDNN flags of ``cfg.gpu`` and replaces ``data.num_workers: auto``
    in ``cfg`` by ``min(8, CPUs per training process − 1)`` and ``data.photometric_on_device: auto``
    by whether training runs on a GPU (the saved config shows the values).
    """
    settings = gpu_settings(cfg)
    apply_backend_settings(settings)
    resolved = _auto_data_settings(cfg)
    if resolved:
        with open_dict(cfg):
            for key, value in resolved.items():
                cfg.data[key] = value
    return settings


def _auto_data_settings(cfg: DictConfig) -> dict[str, Any]:
    """``data.num_workers`` and ``data.photometric_on_device`` resolved for this node where set
    (``auto`` or a value, checked)."""
    data = cfg.get("data") or {}
    trainer_cfg = cfg.get("trainer") or {}
    accelerator = trainer_cfg.get("accelerator", "auto")
    out: dict[str, Any] = {}
    if data.get("num_workers") is not None:
        out["num_workers"] = resolve_num_workers(
            data.num_workers, devices=trainer_cfg.get("devices", 1), accelerator=accelerator
        )
    if data.get("photometric_on_device") is not None:
        out["photometric_on_device"] = resolve_photometric_on_device(
            data.photometric_on_device, fast_augment=bool(data.get("fast_augment")), accelerator=accelerator
        )
    return out


def build_datamodule(cfg: DictConfig, **overrides: Any) -> MTLDataModule:
    """The data module of ``cfg.data`` (checks that the dataset provides every task; ``num_workers``
    and ``photometric_on_device``: ``auto`` resolved for this node, see :func:`setup_gpu`);
    ``overrides``: constructor arguments that win over the config (e.g. ``eval_split``)."""
    overrides = {**_auto_data_settings(cfg), **overrides}
    return instantiate(cfg.data, _convert_="all", **overrides)


def build_module(cfg: DictConfig, datamodule: MTLDataModule) -> MTLModule:
    """Tasks, model, strategy and optimiser of ``cfg``, assembled into an :class:`MTLModule`."""
    tasks = build_tasks(
        list(cfg.data.tasks),
        num_classes=datamodule.num_classes,
        options=_container(cfg.get("task_options")),
    )
    model = instantiate(cfg.model, tasks={t: task.out_channels for t, task in tasks.items()}, _convert_="all")
    module_cfg = cfg.get("module") or {}
    return MTLModule(
        model=model,
        tasks=tasks,
        optimizer=with_fused(instantiate(cfg.optimizer), gpu_settings(cfg).fused_optimizer),
        strategy=instantiate(cfg.strategy, _convert_="all"),
        scheduler=_container(cfg.get("scheduler")) or None,
        grad_clip=module_cfg.get("grad_clip"),
        no_decay_1d=module_cfg.get("no_decay_1d", True),
        log_images=module_cfg.get("log_images", True),
        baseline=baseline_metrics(cfg),
        accumulate_grad_batches=int((cfg.get("trainer") or {}).get("accumulate_grad_batches") or 1),
        nonfinite=_container(module_cfg.get("nonfinite")) or None,
    )


def baseline_metrics(cfg: DictConfig) -> dict | None:
    """The single-task reference metrics of ``baselines=<name>`` (``cfg.baselines.metrics``).

    A file measured with other metric definitions (its ``protocol``, 1 when absent, differs from
    :data:`mtl.baselines.METRICS_PROTOCOL`) is still used, with a warning naming it.

    Baseline files and run configs written before the group's package was renamed hold them
    under ``baseline``: still read (with a warning) so that their Δm does not silently vanish.
    """
    node = cfg.get("baselines")
    if node is None and cfg.get("baseline") is not None:
        log.warning(
            "config key 'baseline' (a baseline file with '# @package baseline') is read as 'baselines'; "
            "change the file's first line to '# @package baselines'"
        )
        node = cfg.get("baseline")
    node = _container(node) or {}
    protocol = node.get("protocol", 1)
    if node.get("metrics") and protocol != METRICS_PROTOCOL:
        log.warning(
            "baseline '%s' was measured with metric protocol %s, this code computes protocol %s "
            "(mtl.baselines.METRICS_PROTOCOL): its Δm mixes metric definitions; re-measure the baseline "
            "(python train.py -m experiment=<single-task experiment> task=<each task>)",
            node.get("name", "?"),
            protocol,
            METRICS_PROTOCOL,
        )
    return node.get("metrics")


def config_dataset_class(cfg: DictConfig) -> type[DenseDataset]:
    """The dataset class of ``cfg.data.dataset`` (imported, not built)."""
    target = (cfg.data.get("dataset") or {}).get("_target_")
    if target is None:
        raise ValueError("data.dataset has no _target_ (the import path of a DenseDataset subclass)")
    return dataset_class(get_class(str(target)))


def dataset_key(cfg: DictConfig) -> str:
    """The dataset's key (``nyud``, ``pascal_context``, ``synthetic``, …), declared by its class."""
    return config_dataset_class(cfg).KEY


def eval_metric_options(cfg: DictConfig, task: str) -> dict:
    """Keyword arguments of ``Task.eval_metric`` from ``cfg.eval.<task>``.

    Options that are absent or ``None`` take the task's defaults for the dataset
    (:meth:`~mtl.tasks.Task.eval_metric_defaults`: for edges, the dataset's matching tolerance,
    NYUD-v2 0.011, PASCAL-Context 0.0075, synthetic scenes NYUD-v2's, and min(4, CPUs) workers).
    """
    opts = _container((cfg.get("eval") or {}).get(task))
    cls = task_class(task, _container(cfg.get("task_options")).get(task))
    for key, value in cls.eval_metric_defaults(config_dataset_class(cfg)).items():
        if opts.get(key) is None:
            opts[key] = value
    return opts


def use_eval_metrics(module: MTLModule, cfg: DictConfig) -> None:
    """Gives the test stage the evaluation protocol's metrics (exact SEISM odsF for edges)."""
    for t, task in module.tasks.items():
        module.metrics["test"][t] = task.eval_metric(**eval_metric_options(cfg, t))


def build_eval_steps(cfg: DictConfig) -> list[EvalStep]:
    """The evaluation steps of ``cfg.eval_steps`` (name → ``_target_`` and options), in order.

    A config without an ``eval_steps`` key gets ``configs/eval_steps/default.yaml``'s (their
    options default when the keys they read, e.g. ``adapter.merge``, are absent); ``eval_steps=none``
    runs none; a ``null`` entry is skipped.

    Raises:
        ValueError: an entry has no ``_target_``.
        TypeError: an entry is not an :class:`~mtl.eval_steps.EvalStep`.
    """
    if "eval_steps" not in cfg:
        cfg = cfg.copy()  # the defaults' interpolations (${eval.pictures}, …) resolve against cfg
        with open_dict(cfg):
            cfg.eval_steps = OmegaConf.load(DEFAULT_EVAL_STEPS)
    steps = []
    for name, node in (cfg.eval_steps or {}).items():
        if node is None:
            continue
        if "_target_" not in node:
            raise ValueError(f"eval_steps.{name} needs a _target_ (an mtl.eval_steps.EvalStep class)")
        step = instantiate(node, _convert_="all")
        if not isinstance(step, EvalStep):
            raise TypeError(
                f"eval_steps.{name}: {node._target_} is a {type(step).__name__}, expected an "
                "mtl.eval_steps.EvalStep (before_test / after_test hooks)"
            )
        steps.append(step)
    return steps


def _instantiate_dict(cfg: DictConfig | None) -> list:
    return [
        instantiate(c, _convert_="all") for c in (cfg or {}).values() if c is not None and "_target_" in c
    ]


def ddp_trainer_config(trainer_cfg: DictConfig, model: MultiTaskNet | None) -> DictConfig:
    """``trainer_cfg`` with DDP's unused-parameter search on when the backbone leaves trainable
    parameters unused by design (:attr:`~mtl.contracts.Backbone.leaves_parameters_unused`); DDP
    otherwise stops at the second step ("parameters that were not used in producing the loss")."""
    if model is None or not model.backbone.leaves_parameters_unused:
        return trainer_cfg
    strategy = trainer_cfg.get("strategy")
    out = trainer_cfg.copy()
    if isinstance(strategy, DictConfig) and str(strategy.get("_target_", "")).endswith("DDPStrategy"):
        if not strategy.get("find_unused_parameters"):
            name = type(model.backbone).__name__
            log.info("%s leaves parameters unused: DDP find_unused_parameters=true", name)
            out.strategy.find_unused_parameters = True
    elif strategy == "ddp":
        out.strategy = "ddp_find_unused_parameters_true"
    return out


def build_trainer(cfg: DictConfig, *, model: MultiTaskNet | None = None, **overrides) -> L.Trainer:
    """The Lightning trainer with the configured callbacks and loggers.

    ``gpu.channels_last`` adds :class:`~mtl.gpu.ChannelsLast` (gradient clipping is the module's own,
    so it works with fused optimisers under fp16 too).
    ``model``: DDP searches for unused parameters when its backbone needs it (:func:`ddp_trainer_config`).
    Lightning's model summary is off (``train`` logs the parameter table by group) unless
    ``trainer.enable_model_summary`` is set (``+trainer.enable_model_summary=true``).
    """
    loggers = _instantiate_dict(cfg.get("logger"))
    callbacks = [
        c
        for c in _instantiate_dict(cfg.get("callbacks"))
        if loggers or not isinstance(c, LearningRateMonitor)  # it needs a logger to write to
    ]
    if gpu_settings(cfg).channels_last:
        callbacks.append(ChannelsLast())
    # last.ckpt after ModelCheckpoint's best.ckpt: it then holds the best-model bookkeeping of the
    # validation it follows (Lightning runs checkpoint callbacks last, in list order)
    callbacks.sort(key=lambda c: isinstance(c, PeriodicCheckpoint))
    if "accumulate_grad_batches" in cfg.trainer:  # done by MTLModule (manual optimisation)
        overrides.setdefault("accumulate_grad_batches", 1)
    if "enable_progress_bar" not in cfg.trainer:  # log lines replace the bar when stdout is a file
        overrides.setdefault("enable_progress_bar", progress_bar_enabled(callbacks))
    if "enable_model_summary" not in cfg.trainer:
        # train() logs the parameter table by group; Lightning's summary would add a second table
        # with a FLOPs column of zeros (it measures FLOPs only on an example_input_array)
        overrides.setdefault("enable_model_summary", False)
    trainer = instantiate(
        ddp_trainer_config(cfg.trainer, model),
        callbacks=callbacks,
        logger=loggers or False,
        _convert_="all",
        **overrides,
    )
    return trainer


def _to_float(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in sorted(metrics.items()) if torch.as_tensor(v).numel() == 1}


def format_table(metrics: dict[str, float], tasks: dict[str, Task], stage: str) -> str:
    """A Markdown table: one row per task, its metrics as ``name=value``; main metric first."""
    rows = ["| task | main metric | all metrics |", "|---|---|---|"]
    for t, task in tasks.items():
        prefix = f"{stage}/{t}/"
        vals = {
            k[len(prefix) :]: v
            for k, v in metrics.items()
            if k.startswith(prefix) and not k.endswith("/loss")
        }
        main = vals.get(task.main_metric)
        arrow = "↑" if task.higher_is_better else "↓"
        main_s = f"{task.main_metric}{arrow} {main:.4f}" if main is not None else "—"
        others = ", ".join(f"{k}={v:.4f}" for k, v in vals.items() if not k.startswith("iou_"))
        rows.append(f"| {t} | {main_s} | {others} |")
    return "\n".join(rows)


def _resolve_ckpt(cfg: DictConfig, output_dir: Path) -> str | None:
    ckpt = cfg.get("ckpt_path")
    if ckpt is None:
        return None
    if ckpt == "last":
        path = output_dir / "checkpoints" / "last.ckpt"
    else:
        path = Path(str(ckpt)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path '{path}' does not exist")
    return str(path)


def hydra_choices(cfg: DictConfig) -> dict[str, Any]:
    """The config groups chosen (Hydra's ``runtime.choices``, e.g. ``experiment``, ``recipe``): from
    ``cfg.hydra`` when the config was composed with it, else from the running Hydra app; empty without
    either."""
    if "hydra" in cfg:
        return dict(OmegaConf.to_container(OmegaConf.select(cfg, "hydra.runtime.choices") or {}))
    from hydra.core.hydra_config import HydraConfig

    return dict(HydraConfig.get().runtime.choices) if HydraConfig.initialized() else {}


def job_overrides(cfg: DictConfig) -> list[str]:
    """The command-line overrides of this job (Hydra's ``overrides.task``): from ``cfg.hydra`` when the
    config was composed with it, else from the running Hydra app; empty without either."""
    if "hydra" in cfg:
        return [str(o) for o in OmegaConf.select(cfg, "hydra.overrides.task") or []]
    from hydra.core.hydra_config import HydraConfig

    return [str(o) for o in HydraConfig.get().overrides.task] if HydraConfig.initialized() else []


def _short(target: Any) -> str:
    return str(target or "?").rpartition(".")[2]


def run_summary(cfg: DictConfig, output_dir: Path, choices: Mapping[str, Any] | None = None) -> str:
    """What is run on what, in a few lines: run folder, experiment, model (backbone, decoder), data
    (dataset, tasks, input size), recipe and strategy, device and precision.

    ``choices``: the config groups chosen (default: :func:`hydra_choices`).
    """
    choices = hydra_choices(cfg) if choices is None else choices
    model = cfg.get("model") or {}
    backbone, decoder = model.get("backbone") or {}, model.get("decoder") or {}
    origin = "pretrained" if backbone.get("pretrained") or backbone.get("checkpoint_path") else "from scratch"
    name = f" {backbone.get('name')}" if backbone.get("name") else ""
    channels = f" ({decoder.get('channels')} channels)" if decoder.get("channels") is not None else ""
    data = cfg.get("data") or {}
    dataset = _short((data.get("dataset") or {}).get("_target_"))
    size = "×".join(str(v) for v in data.get("input_size") or [])
    trainer = cfg.get("trainer") or {}
    accelerator = str(trainer.get("accelerator", "auto"))
    if accelerator == "auto":
        accelerator = f"auto → {'cuda' if torch.cuda.is_available() else 'cpu'}"
    lines = [
        f"run folder: {output_dir}",
        f"experiment: {choices.get('experiment') or '—'} · recipe: {choices.get('recipe') or '—'} · "
        f"strategy: {_short((cfg.get('strategy') or {}).get('_target_'))}",
        f"model: {_short(model.get('_target_'))} · backbone: {_short(backbone.get('_target_'))}{name} "
        f"({origin}) · decoder: {_short(decoder.get('_target_'))}{channels}",
        f"data: {dataset} · tasks: {', '.join(data.get('tasks') or [])} · input {size}",
        f"device: {accelerator}, devices {trainer.get('devices', 1)}, precision {trainer.get('precision')}",
    ]
    return "\n".join(lines)


def run_choices(ckpt_path: str | Path) -> dict[str, Any]:
    """The config groups a run chose (``experiment``, ``recipe``, …), from its
    ``<run>/.hydra/hydra.yaml`` for ``<run>/checkpoints/x.ckpt``; empty when there is none."""
    path = Path(ckpt_path).expanduser().resolve().parent.parent / ".hydra" / "hydra.yaml"
    if not path.is_file():
        return {}
    choices = OmegaConf.select(OmegaConf.load(path), "hydra.runtime.choices")
    return dict(OmegaConf.to_container(choices)) if isinstance(choices, DictConfig) else {}


def find_run_config(
    ckpt_path: str | Path, state: Mapping[str, Any], setting: Any = "auto"
) -> tuple[DictConfig, str] | None:
    """The config a checkpoint was trained with, and where it was found (``eval.run_config``).

    Args:
        ckpt_path: the checkpoint file.
        state: its contents (a merged checkpoint of ``merge.py`` holds its ``config``).
        setting: ``"auto"``: the config inside the checkpoint, else ``<run>/.hydra/config.yaml``
            (Hydra's composition: interpolations such as ``${paths.data_dir}`` kept), else
            ``<run>/config.yaml`` (train's resolved copy), where ``<run>/checkpoints/`` holds the
            checkpoint; a path: that config file; ``None`` or ``false``: none.

    Returns:
        The config and its source, or ``None`` when there is none.

    Raises:
        FileNotFoundError: ``setting`` names a file that does not exist.
        ValueError: that file is not a training config (no ``model`` and ``data``).
    """
    if setting is None or setting is False:
        return None
    if setting != "auto":
        path = Path(str(setting)).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"eval.run_config='{path}' does not exist: give a run's config.yaml (or .hydra/config.yaml), "
                "auto (the checkpoint's run) or null (this command line alone)"
            )
        cfg = OmegaConf.load(path)
        if not isinstance(cfg, DictConfig) or "model" not in cfg or "data" not in cfg:
            raise ValueError(
                f"eval.run_config='{path}' is not a training config (it has no 'model' and 'data'): give "
                "<run>/config.yaml of the run that wrote the checkpoint"
            )
        return cfg, str(path)
    inside = state.get("config")
    if isinstance(inside, Mapping) and "model" in inside and "data" in inside:
        return OmegaConf.create(dict(inside)), f"{ckpt_path} (the config inside the checkpoint)"
    folder = Path(ckpt_path).expanduser().resolve().parent
    if folder.name != "checkpoints":  # not in a run folder: no neighbour's config is taken for its own
        return None
    for path in (folder.parent / ".hydra" / "config.yaml", folder.parent / "config.yaml"):
        if path.is_file():
            cfg = OmegaConf.load(path)
            if isinstance(cfg, DictConfig) and "model" in cfg and "data" in cfg:
                return cfg, str(path)
    return None


def _override_targets(overrides: Sequence[str]) -> list[tuple[str, bool]]:
    """``(dotted key, deletes)`` of each command-line override; a config group override (``model=…``,
    ``model/decoder=…``) gives its package (``model``, ``model.decoder``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    targets = []
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = override.key_or_group
        if (CONFIG_DIR / key).is_dir():
            key = override.package or key.replace("/", ".")
        targets.append((key, override.is_delete()))
    return targets


def _copy_node(src: DictConfig, dst: DictConfig, key: str, delete: bool) -> bool:
    """Copies ``src``'s node at ``key`` into ``dst`` (interpolations kept); ``delete``: removes it from
    ``dst``. Returns whether anything was copied or removed."""
    parent_key, _, leaf = key.rpartition(".")
    if delete:
        parent = OmegaConf.select(dst, parent_key) if parent_key else dst
        if isinstance(parent, DictConfig) and leaf in parent:
            with open_dict(parent):
                del parent[leaf]
            return True
        return False
    node = OmegaConf.select(src, key, default="<absent>", throw_on_missing=False)
    if isinstance(node, str) and node == "<absent>":
        return False
    if isinstance(node, (DictConfig, ListConfig)):
        node = OmegaConf.to_container(node, resolve=False)
    with open_dict(dst):
        OmegaConf.update(dst, key, node, merge=False, force_add=True)
    return True


def eval_config(
    cfg: DictConfig, ckpt_path: str | Path, state: Mapping[str, Any], overrides: Sequence[str]
) -> tuple[DictConfig, str | None]:
    """The config ``eval.py`` evaluates ``ckpt_path`` with: the run's own config for :data:`RUN_KEYS`
    (model, data, task options, baselines), then this job's command-line ``overrides``.

    The run's config (:func:`find_run_config`, setting ``eval.run_config``) is taken first; the
    command-line overrides (plain keys, ``+``/``++``/``~`` keys and config groups such as
    ``model/decoder=…`` or ``data=…``) are then copied from the composed ``cfg`` into it, so that an
    explicit override always wins; the run's parts are resolved in that context (``${task}`` of a
    single-task run, ``${paths.data_dir}`` with this job's ``paths.*`` overrides) and replace
    ``cfg``'s. Everything else (``eval.*``, ``trainer``, ``gpu``, ``eval_steps``, …) stays this
    job's. An ``experiment=`` override composes this job's other parts; the model and data still come
    from the run unless named.

    Returns:
        The config to evaluate with and the run config's source (``None``: no run config found or
        ``eval.run_config=null``; then ``cfg`` as composed).
    """
    setting = (cfg.get("eval") or {}).get("run_config")
    found = find_run_config(ckpt_path, state, setting)
    if found is None:
        if setting == "auto":
            log.warning(
                "no training config for %s (none inside it, and it is not in a run folder's checkpoints/ "
                "next to config.yaml or .hydra/config.yaml): evaluating with this command line's config; "
                "give the training's experiment and model/data overrides, or eval.run_config=<the run's "
                "config.yaml>",
                ckpt_path,
            )
        return cfg, None
    run_cfg, source = found
    ctx = OmegaConf.create(OmegaConf.to_container(run_cfg, resolve=False))
    applied = []
    for (key, delete), text in zip(_override_targets(overrides), overrides, strict=True):
        if key.split(".")[0] in ("hydra", "experiment"):
            continue
        if _copy_node(cfg, ctx, key, delete) and key.split(".")[0] in RUN_KEYS:
            applied.append(text)
    out = cfg.copy()
    with open_dict(out):
        for key in RUN_KEYS:
            if key not in ctx:
                continue
            try:
                node = ctx[key]
                out[key] = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
            except OmegaConfBaseException as err:  # an interpolation the run's config cannot resolve
                raise ValueError(
                    f"the run's config {source}: '{key}' does not resolve ({type(err).__name__}: {err}); "
                    "give the missing key on the command line, or eval.run_config=null with the training's "
                    "overrides"
                ) from err
    kept = [k for k in RUN_KEYS if k in ctx]
    log.info(
        "config: %s of the run's %s, then the command line (%s)",
        ", ".join(kept),
        source,
        " ".join(applied) or "no overrides of them",
    )
    if any(str(o).startswith("experiment=") for o in overrides):
        log.info(
            "experiment=… sets this evaluation's other settings; the model and data are the run's "
            "(name model.…, data.… or model=/data= on the command line to change them)"
        )
    return out, source


def check_weights_fit(
    module: MTLModule, weights: Mapping[str, torch.Tensor], ckpt_path: str, config_source: str | None
) -> None:
    """Raises ``ValueError`` when ``weights`` do not fit ``module``: missing or unexpected keys and
    shape mismatches, the first of each named with both shapes, and what to do.

    The strategy's training state (``strategy.…``: UW's log-variances, DWA's history) is not
    compared: it does not affect evaluation.
    """
    own = {k: v for k, v in module.state_dict().items() if not k.startswith("strategy.")}
    weights = {k: v for k, v in weights.items() if not k.startswith("strategy.")}
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(weights[k].shape)}, model {tuple(own[k].shape)}"
        for k in own
        if k in weights and tuple(weights[k].shape) != tuple(own[k].shape)
    ]
    if not (missing or unexpected or shapes):
        return
    problems = [
        f"{len(items)} {what} ({'; '.join(items[:3])}{'; …' if len(items) > 3 else ''})"
        for items, what in (
            (shapes, "shape mismatches"),
            (missing, "keys missing in the checkpoint"),
            (unexpected, "unexpected keys in the checkpoint"),
        )
        if items
    ]
    if config_source is None:
        hint = (
            "no training config was found for it: keep the checkpoint in its run folder "
            "(<run>/checkpoints/, next to <run>/config.yaml) and give only ckpt_path=, or give "
            "eval.run_config=<the run's config.yaml>, or retype the training's model/data overrides"
        )
    else:
        hint = (
            f"the model was built from {config_source} and this command line: drop the command-line "
            "overrides of model.*, data.tasks or task_options that differ from the training's, or give "
            "eval.run_config=<the config.yaml of the run that wrote this checkpoint>"
        )
    raise ValueError(
        f"checkpoint '{ckpt_path}' does not match the configured model: {'; '.join(problems)}. {hint}"
    )


def _write_results(output_dir: Path, metrics: dict[str, float], table: str, stem: str) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / f"{stem}.json").write_text(json.dumps(metrics, indent=2))
    (output_dir / f"{stem}.md").write_text(table + "\n")


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Trains the configured experiment.

    Returns:
        The final validation metrics (``{stage}/{task}/{metric}``) and the objects built
        (``datamodule``, ``module``, ``trainer``).
    """
    quiet_libraries()
    settings = setup_gpu(cfg)
    check_config(cfg)
    note = dataset_switch_warning(cfg)
    if note is not None:
        log.warning(note)
    output_dir = Path(cfg.paths.output_dir)
    log.info("training\n%s", run_summary(cfg, output_dir))
    # the checkpoint to resume from is read (and its errors raised) before anything is built
    ckpt_path = _resolve_ckpt(cfg, output_dir)
    resume_step = checkpoint_step(ckpt_path) if ckpt_path else None
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg)
    module = build_module(cfg, datamodule)
    compile_model(module.model, settings.compile)
    log.info("parameters:\n%s", parameter_report(module.model))
    trainer = build_trainer(cfg, model=module.model)
    resume_loggers(trainer.loggers, resume_step)  # a resumed run continues the loggers' histories
    params = {g: c["trainable"] for g, c in parameter_counts(module.model).items()}
    code = code_version()
    for logger in trainer.loggers:
        logger.log_hyperparams({**job_config(cfg), "trainable_params": params, "code": code})
    if trainer.is_global_zero:  # the resolved config next to the run (.hydra/ holds the unresolved one)
        output_dir.mkdir(parents=True, exist_ok=True)
        saved = {**job_config(cfg), "code": code, "metrics_protocol": METRICS_PROTOCOL}
        OmegaConf.save(OmegaConf.create(saved), output_dir / "config.yaml")
    data, trainer_cfg = cfg.get("data") or {}, cfg.get("trainer") or {}
    with explain_oom(
        batch_size=data.get("batch_size"),
        input_size=data.get("input_size"),
        precision=trainer_cfg.get("precision"),
        devices=trainer_cfg.get("devices"),
    ):
        # the run's own checkpoints hold tensors and plain types only: never unpickle objects
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    metrics = _to_float(trainer.callback_metrics)
    try:
        metrics["val/score"] = score(metrics, module.tasks)
    except KeyError as err:  # e.g. no validation ran (limit_val_batches=0)
        log.info("val/score not computed: %s", err)
    if cfg.get("test") and not trainer.fast_dev_run:
        best = getattr(trainer.checkpoint_callback, "best_model_path", "") or None
        use_eval_metrics(module, cfg)
        # verbose=False: Lightning's table would list every logged value (160 gate rows for TaskExpert)
        trainer.test(module, datamodule=datamodule, ckpt_path=best, weights_only=True, verbose=False)
        metrics.update(_to_float(trainer.callback_metrics))
        for line in write_gate_report(metrics, output_dir, "test") if trainer.is_global_zero else ():
            log.info("%s", line)
    table = format_table(metrics, module.tasks, "val")
    log.info("validation metrics after training:\n%s", table)
    if not trainer.fast_dev_run and trainer.is_global_zero:  # every rank holds the same synced metrics
        _write_results(output_dir, metrics, table, "metrics")
    if trainer.is_global_zero:
        log.info("%s", outputs_summary(output_dir, trainer, metrics))
    return metrics, {"datamodule": datamodule, "module": module, "trainer": trainer}


def outputs_summary(output_dir: Path, trainer: L.Trainer, metrics: Mapping[str, float]) -> str:
    """Where a training run's outputs are: run folder, checkpoints (the best one with its monitored
    value), metrics files, and the command that evaluates the best checkpoint."""
    callback = trainer.checkpoint_callback
    best = (
        Path(callback.best_model_path)
        if isinstance(callback, ModelCheckpoint) and callback.best_model_path
        else None
    )
    lines = [f"run folder: {output_dir}"]
    if best is not None:
        score = callback.best_model_score
        value = f" {float(score):.4g}" if score is not None else ""
        extreme = "lowest" if callback.mode == "min" else "highest"
        lines.append(f"best checkpoint: {best} ({callback.monitor}{value}, the {extreme})")
    ckpt_dir = output_dir / "checkpoints"
    others = sorted(p for p in ckpt_dir.glob("*.ckpt") if best is None or p.resolve() != best.resolve())
    lines += [f"checkpoint: {p}" for p in others]
    if (output_dir / "metrics.json").is_file():
        lines.append(f"metrics: {output_dir / 'metrics.md'} (.json)")
    target = best or next(iter(others), None)
    if target is not None:
        lines.append(f"evaluate it: python eval.py ckpt_path={target}")
    return "\n".join(lines)


def evaluate(
    cfg: DictConfig, overrides: Sequence[str] | None = None
) -> tuple[dict[str, float], dict[str, Any]]:
    """Evaluates ``cfg.ckpt_path`` on ``eval.split`` (default ``val``: NYUD-v2's and PASCAL-Context's
    published numbers are on their val splits; the synthetic scenes also have an independent
    ``test`` split) with the published protocols.

    Writes ``results.json``, ``results.csv`` and ``results.md`` (see :mod:`mtl.report`); the
    evaluation steps of ``cfg.eval_steps`` (:mod:`mtl.eval_steps`: LoRA merging, control,
    routing report, prediction pictures, …) run before and after the test pass. Under DDP every
    rank evaluates its share of the split (each image once, :class:`~mtl.data.datamodule.EvalShardSampler`),
    the metrics are summed over the ranks, and rank 0 alone writes files.

    The model, data, task options and baselines are the checkpoint's run's (:func:`eval_config`,
    ``eval.run_config``), with the job's command-line ``overrides`` winning (default: Hydra's
    ``overrides.task``, :func:`job_overrides`). ``results.config.yaml`` holds the config used and
    ``results.provenance.json`` the checkpoint, split, dataset, tasks, code version and configs.

    Raises:
        ValueError: the checkpoint does not fit the model (missing or unexpected keys, shape
            mismatches: the first ones named, with both shapes).

    Returns:
        The test metrics (``test/{task}/{metric}``, ``test/delta_m`` with a baseline) and the
        objects built (``datamodule``, ``module``, ``trainer``, ``reports``: step name → report,
        and ``control``: the control step's report, empty when none ran).
    """
    output_dir = Path(cfg.paths.output_dir)
    ckpt_path = _resolve_ckpt(cfg, output_dir)
    if ckpt_path is None:
        raise ValueError("evaluate needs ckpt_path=<checkpoint file>")
    # read before anything is built: a wrong file fails at once, naming it
    # weights_only unless the user vouches for a file holding other Python objects (ckpt_trusted=true)
    state = read_checkpoint(ckpt_path, weights_only=not cfg.get("ckpt_trusted", False))
    if "state_dict" not in state:
        raise ValueError(
            f"checkpoint '{ckpt_path}' has no 'state_dict' (keys: {sorted(state)[:6]}): expected a "
            "checkpoint of train.py or merge.py"
        )
    quiet_libraries()
    overrides = job_overrides(cfg) if overrides is None else list(overrides)
    cfg, config_source = eval_config(cfg, ckpt_path, state, overrides)
    setup_gpu(cfg)
    check_config(cfg)
    eval_cfg = cfg.get("eval") or {}
    split = check_eval_split(cfg.data.dataset._target_, eval_cfg.get("split") or "val")
    choices = run_choices(ckpt_path) if config_source else None  # the run's experiment, not eval's
    log.info("evaluating %s on the %s split\n%s", ckpt_path, split, run_summary(cfg, output_dir, choices))
    steps = build_eval_steps(cfg)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg, eval_split=split)
    module = build_module(cfg, datamodule)
    # the strategy's training state (UW's log-variances, DWA's history, …) does not affect evaluation
    weights = {k: v for k, v in state["state_dict"].items() if not k.startswith("strategy.")}
    check_weights_fit(module, weights, ckpt_path, config_source)
    module.load_state_dict(weights, strict=False)
    ctx = EvalContext(
        cfg=cfg,
        module=module,
        datamodule=datamodule,
        trainer=build_trainer(cfg),
        output_dir=output_dir,
        input_size=tuple(cfg.data.input_size),
    )
    for step in steps:
        step.before_test(ctx)
    use_eval_metrics(module, cfg)
    ctx.trainer.test(module, datamodule=datamodule, verbose=False)  # the results table is logged below
    metrics = ctx.metrics = _to_float(ctx.trainer.callback_metrics)
    merge = state.get("merge") or {}  # merge.py's record: its run folder's name says nothing of the model
    default_name = (
        f"merged ({merge.get('method')})" if merge else Path(ckpt_path).resolve().parent.parent.name
    )
    name = eval_cfg.get("name") or default_name
    config_file = output_dir / "results.config.yaml"
    if ctx.is_global_zero:
        output_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(job_config(cfg)), config_file)
        table = write_results(
            output_dir,
            metrics,
            module.tasks,
            stage="test",
            name=name,
            dataset=dataset_key(cfg),
            headline=bool(eval_cfg.get("headline", True)),
            provenance={
                "checkpoint": str(Path(ckpt_path).resolve()),
                "split": split,
                "dataset": dataset_key(cfg),
                "tasks": list(cfg.data.tasks),
                "code": code_version(),
                "metrics_protocol": METRICS_PROTOCOL,
                "config": str(config_file),
                "run_config": config_source,
                "overrides": overrides,
            },
        )
        log.info("results (%s split):\n%s", split, table)
        log.info(
            "results: %s (and results.json, .csv); provenance: %s; config used: %s",
            output_dir / "results.md",
            output_dir / "results.provenance.json",
            config_file,
        )
    for step in steps:
        step.after_test(ctx)
    objects = {
        "datamodule": datamodule,
        "module": module,
        "trainer": ctx.trainer,
        "reports": ctx.reports,
        "control": ctx.reports.get("control", {}),
    }
    return metrics, objects


def compose_train_config(overrides: list[str], output_dir: Path, config_name: str = "train") -> Any:
    """``configs/<config_name>.yaml`` (``train`` or ``eval``) composed with ``overrides``, its outputs in
    ``output_dir``, as ``train.py`` / ``eval.py`` compose it (the Hydra config included and set, so that
    code reading ``HydraConfig`` works)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    configs = Path(__file__).resolve().parents[1] / "configs"
    with initialize_config_dir(version_base="1.3", config_dir=str(configs)):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.log_dir = str(output_dir / "logs")
        cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig().set_config(cfg)
    return cfg
