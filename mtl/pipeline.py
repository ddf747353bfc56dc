"""``train(cfg)`` and ``evaluate(cfg)``: everything the entry points do, testable in-process.

Nothing above this file imports Hydra except ``hydra.utils.instantiate`` here; the
``@hydra.main`` wrappers are ``train.py`` and ``eval.py``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig, OmegaConf

from mtl.adapters.lora import merge_lora
from mtl.adapters.report import parameter_counts, parameter_report
from mtl.backbones.routing_report import write_routing_report
from mtl.config_check import check_config
from mtl.control.run import apply_control
from mtl.data.datamodule import MTLDataModule
from mtl.guards import explain_oom
from mtl.loggers import code_version
from mtl.metrics.seism import MAX_DIST
from mtl.module import MTLModule
from mtl.objective import score
from mtl.report import write_results
from mtl.tasks import Task, build_tasks
from mtl.visualise import denormalise, log_pictures, prediction_panel, save_pictures

log = logging.getLogger(__name__)


def _container(node: Any) -> dict:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})


def job_config(cfg: DictConfig) -> dict:
    """The resolved config as a plain dict, without Hydra's own ``hydra`` node."""
    return OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)


def build_datamodule(cfg: DictConfig) -> MTLDataModule:
    """The data module of ``cfg.data`` (checks that the dataset provides every task)."""
    return instantiate(cfg.data, _convert_="all")


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
        optimizer=instantiate(cfg.optimizer),
        strategy=instantiate(cfg.strategy, _convert_="all"),
        scheduler=_container(cfg.get("scheduler")) or None,
        grad_clip=module_cfg.get("grad_clip"),
        no_decay_1d=module_cfg.get("no_decay_1d", True),
        log_images=module_cfg.get("log_images", True),
        baseline=(_container(cfg.get("baseline")) or {}).get("metrics"),
        accumulate_grad_batches=int((cfg.get("trainer") or {}).get("accumulate_grad_batches") or 1),
        nonfinite=_container(module_cfg.get("nonfinite")) or None,
    )


def dataset_key(cfg: DictConfig) -> str:
    """``nyud``, ``pascal_context`` or ``synthetic``, from the dataset class of ``cfg.data``."""
    target = str(cfg.data.get("dataset", {}).get("_target_", ""))
    if target.endswith("NYUDv2"):
        return "nyud"
    if target.endswith("PASCALContext"):
        return "pascal_context"
    return "synthetic"


def eval_metric_options(cfg: DictConfig, task: str) -> dict:
    """Keyword arguments of ``Task.eval_metric`` from ``cfg.eval.<task>``.

    The edge matching tolerance defaults to the dataset's (NYUD-v2 0.011, PASCAL-Context
    0.0075; synthetic scenes use NYUD-v2's), the worker count to min(4, CPUs).
    """
    opts = _container((cfg.get("eval") or {}).get(task))
    if task == "edge":
        if opts.get("max_dist") is None:
            opts["max_dist"] = MAX_DIST.get(dataset_key(cfg), MAX_DIST["nyud"])
        if opts.get("workers") is None:
            opts["workers"] = min(4, os.cpu_count() or 1)
    return opts


def use_eval_metrics(module: MTLModule, cfg: DictConfig) -> None:
    """Gives the test stage the evaluation protocol's metrics (exact SEISM odsF for edges)."""
    for t, task in module.tasks.items():
        module.metrics["test"][t] = task.eval_metric(**eval_metric_options(cfg, t))


def _instantiate_dict(cfg: DictConfig | None) -> list:
    return [
        instantiate(c, _convert_="all") for c in (cfg or {}).values() if c is not None and "_target_" in c
    ]


def build_trainer(cfg: DictConfig, **overrides) -> L.Trainer:
    """The Lightning trainer with the configured callbacks and loggers."""
    loggers = _instantiate_dict(cfg.get("logger"))
    callbacks = [
        c
        for c in _instantiate_dict(cfg.get("callbacks"))
        if loggers or not isinstance(c, LearningRateMonitor)  # it needs a logger to write to
    ]
    if "accumulate_grad_batches" in cfg.trainer:  # done by MTLModule (manual optimisation)
        overrides.setdefault("accumulate_grad_batches", 1)
    return instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, _convert_="all", **overrides
    )


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
    check_config(cfg)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    datamodule = build_datamodule(cfg)
    module = build_module(cfg, datamodule)
    log.info("parameters:\n%s", parameter_report(module.model))
    trainer = build_trainer(cfg)
    params = {g: c["trainable"] for g, c in parameter_counts(module.model).items()}
    code = code_version()
    for logger in trainer.loggers:
        logger.log_hyperparams({**job_config(cfg), "trainable_params": params, "code": code})
    if trainer.is_global_zero:  # the resolved config next to the run (.hydra/ holds the unresolved one)
        output_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create({**job_config(cfg), "code": code}), output_dir / "config.yaml")
    ckpt_path = _resolve_ckpt(cfg, output_dir)
    data, trainer_cfg = cfg.get("data") or {}, cfg.get("trainer") or {}
    with explain_oom(
        batch_size=data.get("batch_size"),
        input_size=data.get("input_size"),
        precision=trainer_cfg.get("precision"),
        devices=trainer_cfg.get("devices"),
    ):
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics = _to_float(trainer.callback_metrics)
    try:
        metrics["val/score"] = score(metrics, list(module.tasks))
    except KeyError as err:  # e.g. no validation ran (limit_val_batches=0)
        log.info("val/score not computed: %s", err)
    if cfg.get("test") and not trainer.fast_dev_run:
        best = getattr(trainer.checkpoint_callback, "best_model_path", "") or None
        use_eval_metrics(module, cfg)
        trainer.test(module, datamodule=datamodule, ckpt_path=best, weights_only=False)
        metrics.update(_to_float(trainer.callback_metrics))
    table = format_table(metrics, module.tasks, "val")
    log.info("validation metrics after training:\n%s", table)
    if not trainer.fast_dev_run:
        _write_results(output_dir, metrics, table, "metrics")
    return metrics, {"datamodule": datamodule, "module": module, "trainer": trainer}


def evaluate(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Evaluates ``cfg.ckpt_path`` on the validation split with the published protocols.

    Writes ``results.json``, ``results.csv`` and ``results.md`` (see :mod:`mtl.report`) and
    ``pictures/sample_<i>.png`` panels for ``cfg.eval.pictures`` samples, which are also sent
    to the configured loggers.

    Returns:
        The test metrics (``test/{task}/{metric}``, ``test/delta_m`` with a baseline) and the
        objects built.
    """
    output_dir = Path(cfg.paths.output_dir)
    ckpt_path = _resolve_ckpt(cfg, output_dir)
    if ckpt_path is None:
        raise ValueError("evaluate needs ckpt_path=<checkpoint file>")
    check_config(cfg)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg)
    module = build_module(cfg, datamodule)
    state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    missing, unexpected = module.load_state_dict(state["state_dict"], strict=False)
    # the strategy's training state (UW's log-variances, DWA's history, …) does not affect evaluation
    missing = [k for k in missing if not k.startswith("strategy.")]
    unexpected = [k for k in unexpected if not k.startswith("strategy.")]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint '{ckpt_path}' does not match the configured model: missing keys {missing[:5]}…, "
            f"unexpected keys {unexpected[:5]}… (same experiment/model overrides as in training?)"
        )
    if (cfg.get("adapter") or {}).get("merge"):
        n_merged = merge_lora(module.model)
        log.info("folded %d LoRA layers into their base weights (adapter.merge=true)", n_merged)
    control = _container(cfg.get("control"))
    control_report = apply_control(control, module, datamodule, list(cfg.data.input_size), output_dir)
    use_eval_metrics(module, cfg)
    trainer = build_trainer(cfg)
    trainer.test(module, datamodule=datamodule)
    metrics = _to_float(trainer.callback_metrics)
    eval_cfg = cfg.get("eval") or {}
    name = eval_cfg.get("name") or Path(ckpt_path).resolve().parent.parent.name
    table = write_results(
        output_dir,
        metrics,
        module.tasks,
        stage="test",
        name=name,
        dataset=dataset_key(cfg),
        headline=bool(eval_cfg.get("headline", True)),
    )
    print(table)
    # task-conditioned MoE backbones (M³ViT): expert shares, routing matrix, GFLOPs of the evaluated tasks
    write_routing_report(module.model, output_dir, input_size=tuple(cfg.data.input_size))
    n_pics = int(eval_cfg.get("pictures", 0))
    if n_pics:
        panels = prediction_panels(module, datamodule, n_pics)
        for key, img in panels.items():
            save_pictures({key: img}, output_dir / "pictures")
        log_pictures(trainer.loggers, {f"eval/{k}": v for k, v in panels.items()}, step=0)
    objects = {"datamodule": datamodule, "module": module, "trainer": trainer, "control": control_report}
    return metrics, objects


def prediction_panels(module: MTLModule, datamodule: MTLDataModule, n: int) -> dict[str, Any]:
    """``sample_<i>`` → panel (image | prediction | ground truth per task) of the first ``n``
    validation samples."""
    module.eval()
    panels: dict[str, Any] = {}
    with torch.no_grad():
        for batch in datamodule.test_dataloader():
            preds = module(batch["image"])
            for i in range(batch["image"].shape[0]):
                if len(panels) == n:
                    return panels
                one = {k: v[i : i + 1] if torch.is_tensor(v) else v for k, v in batch.items()}
                rows = {
                    t: (
                        task._to_rgb(task.postprocess(preds[t][i : i + 1].float())[0].cpu()),
                        task._to_rgb(task.target_for_display(one).cpu()),
                    )
                    for t, task in module.tasks.items()
                    if t in preds  # model.tasks_at_inference: the evaluated subset
                }
                panels[f"sample_{len(panels):03d}"] = prediction_panel(denormalise(one["image"][0]), rows)
    return panels
