"""``train(cfg)`` and ``evaluate(cfg)``: everything the entry points do, testable in-process.

Nothing above this file imports Hydra except ``hydra.utils.instantiate`` here; the
``@hydra.main`` wrappers are ``train.py`` and ``eval.py``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig, OmegaConf, open_dict

from mtl.baselines import METRICS_PROTOCOL
from mtl.callbacks import PeriodicCheckpoint
from mtl.checkpoint import checkpoint_step, read_checkpoint
from mtl.config_check import check_config
from mtl.data.base import DenseDataset, check_eval_split
from mtl.data.datamodule import MTLDataModule, dataset_class
from mtl.data.switch import dataset_switch_warning
from mtl.eval_steps import EvalContext, EvalStep
from mtl.gpu import (
    ChannelsLast,
    GPUSettings,
    apply_backend_settings,
    compile_model,
    resolve_num_workers,
    use_scaled_clipping,
)
from mtl.guards import explain_oom
from mtl.loggers import code_version, resume_loggers
from mtl.model import MultiTaskNet
from mtl.module import MTLModule
from mtl.objective import score
from mtl.optim import with_fused
from mtl.params import parameter_counts, parameter_report
from mtl.report import write_results
from mtl.tasks import Task, build_tasks, task_class

log = logging.getLogger(__name__)

#: the evaluation steps of ``configs/eval.yaml``, for configs composed without them (``merge.py``'s
#: in-process evaluation starts from a training config)
DEFAULT_EVAL_STEPS = Path(__file__).resolve().parents[1] / "configs" / "eval_steps" / "default.yaml"


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
    in ``cfg`` by ``min(8, CPUs per training process − 1)`` (the saved config shows the number).
    """
    settings = gpu_settings(cfg)
    apply_backend_settings(settings)
    if (cfg.get("data") or {}).get("num_workers") is not None:
        with open_dict(cfg):
            cfg.data.num_workers = _num_workers(cfg)
    return settings


def _num_workers(cfg: DictConfig) -> int:
    trainer_cfg = cfg.get("trainer") or {}
    return resolve_num_workers(
        cfg.data.num_workers,
        devices=trainer_cfg.get("devices", 1),
        accelerator=trainer_cfg.get("accelerator"),
    )


def build_datamodule(cfg: DictConfig, **overrides: Any) -> MTLDataModule:
    """The data module of ``cfg.data`` (checks that the dataset provides every task; ``num_workers:
    auto`` sized to the node, see :func:`setup_gpu`); ``overrides``: constructor arguments that win
    over the config (e.g. ``eval_split``)."""
    if cfg.data.get("num_workers") == "auto":
        overrides = {"num_workers": _num_workers(cfg), **overrides}
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

    ``gpu.channels_last`` adds :class:`~mtl.gpu.ChannelsLast`; fp16 mixed precision gets the precision
    plugin that clips gradients for fused optimisers too (:class:`~mtl.gpu.ScaledClipMixedPrecision`).
    ``model``: DDP searches for unused parameters when its backbone needs it (:func:`ddp_trainer_config`).
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
    trainer = instantiate(
        ddp_trainer_config(cfg.trainer, model),
        callbacks=callbacks,
        logger=loggers or False,
        _convert_="all",
        **overrides,
    )
    use_scaled_clipping(trainer)
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
    settings = setup_gpu(cfg)
    check_config(cfg)
    note = dataset_switch_warning(cfg)
    if note is not None:
        log.warning(note)
    output_dir = Path(cfg.paths.output_dir)
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
        OmegaConf.save(OmegaConf.create({**job_config(cfg), "code": code}), output_dir / "config.yaml")
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
        trainer.test(module, datamodule=datamodule, ckpt_path=best, weights_only=True)
        metrics.update(_to_float(trainer.callback_metrics))
    table = format_table(metrics, module.tasks, "val")
    log.info("validation metrics after training:\n%s", table)
    if not trainer.fast_dev_run and trainer.is_global_zero:  # every rank holds the same synced metrics
        _write_results(output_dir, metrics, table, "metrics")
    return metrics, {"datamodule": datamodule, "module": module, "trainer": trainer}


def evaluate(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Evaluates ``cfg.ckpt_path`` on ``eval.split`` (default ``val``: NYUD-v2's and PASCAL-Context's
    published numbers are on their val splits; the synthetic scenes also have an independent
    ``test`` split) with the published protocols.

    Writes ``results.json``, ``results.csv`` and ``results.md`` (see :mod:`mtl.report`); the
    evaluation steps of ``cfg.eval_steps`` (:mod:`mtl.eval_steps`: LoRA merging, control,
    routing report, prediction pictures, …) run before and after the test pass. Under DDP every
    rank evaluates its share of the split (each image once, :class:`~mtl.data.datamodule.EvalShardSampler`),
    the metrics are summed over the ranks, and rank 0 alone writes files.

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
    setup_gpu(cfg)
    check_config(cfg)
    eval_cfg = cfg.get("eval") or {}
    split = check_eval_split(cfg.data.dataset._target_, eval_cfg.get("split") or "val")
    steps = build_eval_steps(cfg)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg, eval_split=split)
    module = build_module(cfg, datamodule)
    missing, unexpected = module.load_state_dict(state["state_dict"], strict=False)
    # the strategy's training state (UW's log-variances, DWA's history, …) does not affect evaluation
    missing = [k for k in missing if not k.startswith("strategy.")]
    unexpected = [k for k in unexpected if not k.startswith("strategy.")]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint '{ckpt_path}' does not match the configured model: missing keys {missing[:5]}…, "
            f"unexpected keys {unexpected[:5]}… (same experiment/model overrides as in training?)"
        )
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
    ctx.trainer.test(module, datamodule=datamodule)
    metrics = ctx.metrics = _to_float(ctx.trainer.callback_metrics)
    name = eval_cfg.get("name") or Path(ckpt_path).resolve().parent.parent.name
    if ctx.is_global_zero:
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
            },
        )
        print(table)
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
