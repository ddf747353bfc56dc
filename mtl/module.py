"""``MTLModule``: the only LightningModule. Steps, strategy-driven updates, metrics, logging.

Optimisation is manual so that every strategy (one weighted backward, per-task gradients,
SAM-style double passes) owns its backward pass while Lightning still handles devices,
precision scaling and DDP gradient synchronisation (via ``manual_backward``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping

import lightning as L
import torch
from torch import nn

from mtl.checkpoint import gather_rng_states, restore_rank_rng_state
from mtl.contracts import ModelOutput
from mtl.guards import NonFiniteLossError, nonfinite_message, nonfinite_tasks, stop_message
from mtl.metrics.delta_m import delta_m
from mtl.model import MultiTaskNet
from mtl.optim import build_scheduler, param_groups, restore_grads, stash_grads
from mtl.strategies import FixedWeights, Strategy
from mtl.tasks import Task
from mtl.visualise import log_images

STAGES = ("val", "test")


class StatMeans:
    """Batch-size-weighted means of per-forward model statistics over an evaluation.

    Plain tensors (not buffers): neither saved in checkpoints nor moved by ``.to()``.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count: dict[str, int] = {}

    @torch.no_grad()
    def update(self, stats: Mapping[str, torch.Tensor], n: int) -> None:
        """Adds one forward's statistics (batch means) of ``n`` samples."""
        for k, v in stats.items():
            self.sums[k] = self.sums.get(k, 0) + v.detach().float() * n
            self.count[k] = self.count.get(k, 0) + n

    def compute(self) -> dict[str, torch.Tensor]:
        """Key → mean over the samples seen since the last reset."""
        return {k: total / self.count[k] for k, total in self.sums.items()}


class MTLModule(L.LightningModule):
    """Trains and evaluates a :class:`MultiTaskNet` on a set of tasks.

    Args:
        model: the network.
        tasks: task name → :class:`Task` (same order as the model's tasks).
        optimizer: partial optimiser constructor taking parameter groups.
        strategy: the optimisation strategy (default: the field's fixed loss weights).
        scheduler: keyword arguments of :func:`mtl.optim.build_scheduler` (``name``,
            ``warmup_steps``, ``power``, …) or ``None`` for a constant learning rate.
        grad_clip: max global gradient norm (``None`` or 0 disables clipping).
        no_decay_1d: exclude biases and norm parameters from weight decay.
        log_images: log ground-truth/prediction pictures of the first validation batch.
        baseline: single-task reference metrics ``{task}/{metric}`` (``configs/baselines/``);
            when given, ``{stage}/delta_m`` (percent, positive = better) is logged at every
            validation / test epoch end.
        accumulate_grad_batches: micro-batches per optimiser step (``trainer.accumulate_grad_batches``
            is read by the pipeline; Lightning's own flag does not apply to manual optimisation).
            The strategy runs on every micro-batch and the step takes the mean of their updates:
            for loss weighting this is the gradient of the large batch.
        nonfinite: ``{"max_skips": K}``: skip up to K batches with a NaN/inf loss over the run,
            then save ``last.ckpt`` and stop (0: stop at the first).
    """

    def __init__(
        self,
        *,
        model: MultiTaskNet,
        tasks: Mapping[str, Task],
        optimizer: Callable[..., torch.optim.Optimizer],
        strategy: Strategy | None = None,
        scheduler: Mapping | None = None,
        grad_clip: float | None = None,
        no_decay_1d: bool = True,
        log_images: bool = True,
        baseline: Mapping[str, float] | None = None,
        accumulate_grad_batches: int = 1,
        nonfinite: Mapping | None = None,
    ) -> None:
        super().__init__()
        if list(tasks) != list(model.tasks):
            raise ValueError(f"tasks {list(tasks)} differ from the model's tasks {model.tasks}")
        self.automatic_optimization = False
        self.model = model
        self.tasks = dict(tasks)
        self.strategy = strategy if strategy is not None else FixedWeights()
        self.strategy.setup(tasks=self.tasks, module=self)
        self.optimizer_fn = optimizer
        self.scheduler_cfg = dict(scheduler) if scheduler else None
        self.grad_clip = grad_clip
        self.no_decay_1d = no_decay_1d
        self.log_images_enabled = log_images
        self.baseline = {str(k): float(v) for k, v in baseline.items()} if baseline else None
        for t, task in self.tasks.items() if self.baseline else ():
            if not any(f"{t}/{m}" in self.baseline for m in task.delta_m_metrics):
                wanted = [f"{t}/{m}" for m in task.delta_m_metrics]
                raise ValueError(f"baseline has none of {wanted}; it holds {sorted(self.baseline)}")
        if int(accumulate_grad_batches) < 1:
            raise ValueError(f"trainer.accumulate_grad_batches must be >= 1, got {accumulate_grad_batches}")
        self.accumulate = int(accumulate_grad_batches)
        self._micro = 0  # micro-batches accumulated towards the next optimiser step
        nonfinite = dict(nonfinite or {})
        unknown = set(nonfinite) - {"max_skips"}
        if unknown or int(nonfinite.get("max_skips", 10)) < 0:
            raise ValueError(f"module.nonfinite expects {{max_skips: int >= 0}}, got {nonfinite}")
        self.max_skips = int(nonfinite.get("max_skips", 10))
        self.skipped = 0
        self._resume_rng: list | None = None
        self.metrics = nn.ModuleDict(
            {s: nn.ModuleDict({t: task.metric() for t, task in self.tasks.items()}) for s in STAGES}
        )
        self.model_stats = {s: StatMeans() for s in STAGES}

    def forward(self, x: torch.Tensor, **kwargs) -> dict[str, torch.Tensor]:
        return self.model(x, **kwargs)

    def task_losses(self, out: ModelOutput, batch: dict) -> dict[str, torch.Tensor]:
        """Unweighted loss of every predicted task of ``out`` (``model.run`` / ``model.decode``): while
        training plus the intermediate supervision of ``out.intermediate`` (weighted by
        ``out.intermediate_weight``); an eval forward may predict a subset (``model.tasks_at_inference``)."""
        losses = {t: task.loss(out.preds[t], batch) for t, task in self.tasks.items() if t in out.preds}
        if self.training:
            for t, levels in out.intermediate.items():
                if t not in losses or not levels:
                    continue
                extra = 0
                for pred in levels:
                    extra = extra + out.intermediate_weight * self.tasks[t].loss(pred, batch)
                losses[t] = losses[t] + extra
        return losses

    def weighted_total(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Σ default_weight · loss: the strategy-independent total used for logging and selection."""
        return sum(self.tasks[t].default_weight * loss.detach() for t, loss in losses.items())

    # ---------------------------------------------------------------- training
    def grad_scale(self) -> float:
        """The fp16 gradient scaler's current scale (1.0 for fp32 / bf16): ``.grad`` is at this scale."""
        trainer = self._trainer
        scaler = getattr(trainer.precision_plugin, "scaler", None) if trainer is not None else None
        if scaler is None or not scaler.is_enabled():
            return 1.0
        scaler.scale(torch.zeros((), device=self.device))  # creates the scale lazily (unscale_ needs it)
        return float(scaler.get_scale())

    def _step_boundary(self, batch_idx: int) -> tuple[bool, bool]:
        """Whether this micro-batch starts / ends an accumulation group."""
        if self.accumulate == 1:
            return True, True
        last = (batch_idx + 1) % self.accumulate == 0 or bool(getattr(self.trainer, "is_last_batch", False))
        return self._micro == 0, last

    def _skip_nonfinite(self, losses: Mapping[str, torch.Tensor], aux, batch_idx: int) -> bool:
        bad = nonfinite_tasks(losses, aux)
        if not bad:
            return False
        msg = nonfinite_message(bad, step=self.global_step, epoch=self.current_epoch, batch_idx=batch_idx)
        if self.skipped >= self.max_skips:
            ckpt = self._save_last_good()
            raise NonFiniteLossError(stop_message(msg, max_skips=self.max_skips, ckpt=ckpt))
        self.skipped += 1
        warnings.warn(f"{msg}: batch skipped ({self.skipped}/{self.max_skips})", stacklevel=1)
        self.log("train/skipped_batches", float(self.skipped))
        return True

    def _save_last_good(self) -> str:
        cb = getattr(self.trainer, "checkpoint_callback", None)
        folder = getattr(cb, "dirpath", None) or f"{self.trainer.default_root_dir}/checkpoints"
        path = f"{folder}/last.ckpt"
        self.trainer.save_checkpoint(path)
        return path

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        opt = self.optimizers()
        self.strategy.start_epoch(self.current_epoch)
        first, last = self._step_boundary(batch_idx)
        if first:
            opt.zero_grad(set_to_none=True)
        step = self.strategy.forward(batch, module=self)
        losses, aux = step.losses, step.aux
        if self._skip_nonfinite(losses, aux, batch_idx):
            if not (last and self._micro > 0):
                return None
            logs = {}  # the group's last micro-batch is bad: step with the ones accumulated
        else:
            stash = stash_grads(self.parameters()) if not first else {}
            logs = self.strategy.backward(step, module=self, batch=batch)
            restore_grads(stash)
            self._micro += 1
        if not last:
            return self.weighted_total(losses)
        if self._micro > 1:  # mean of the micro-batch updates
            for p in self.parameters():
                if p.grad is not None:
                    p.grad.div_(self._micro)
        self._micro = 0
        if self.grad_clip:
            # .grad is still at the fp16 loss scale here (the scaler unscales inside opt.step()):
            # clipping the scaled gradients to grad_clip·scale is clipping the true ones to grad_clip.
            clip = self.grad_clip * self.grad_scale()
            self.clip_gradients(opt, gradient_clip_val=clip, gradient_clip_algorithm="norm")
        opt.step()  # fp16: unscale, skip on inf/nan, update the scale
        self.strategy.after_step(batch, module=self, losses=losses)
        sched = self.lr_schedulers()
        if sched is not None:
            sched.step()
        bs = batch["image"].shape[0]
        for t, loss in losses.items():
            self.log(f"train/{t}/loss", loss.detach(), prog_bar=True, batch_size=bs)
        if aux is not None:
            self.log("train/aux_loss", aux.detach(), batch_size=bs)
        total = self.weighted_total(losses)
        self.log("train/loss", total, batch_size=bs)
        for k, v in logs.items():  # grad/... diagnostics → train/grad/..., the rest → train/strategy/...
            self.log(f"train/{k}" if k.startswith("grad/") else f"train/strategy/{k}", v, batch_size=bs)
        return total

    # -------------------------------------------------------------- evaluation
    def _eval_step(self, stage: str, batch: dict, batch_idx: int) -> ModelOutput:
        """Losses, metrics and model statistics of one batch; returns the model's output (callbacks
        get it as ``outputs``, e.g. :class:`~mtl.callbacks.GateMapWriter` reads its maps)."""
        out = self.model.run(batch["image"])
        preds = out.preds
        losses = self.task_losses(out, batch)
        bs = batch["image"].shape[0]
        self.model_stats[stage].update(out.stats, bs)
        for t, loss in losses.items():
            self.log(f"{stage}/{t}/loss", loss, batch_size=bs, sync_dist=True)
            metric = self.metrics[stage][t]
            self.tasks[t].update_metric(metric, preds[t], batch)
        self.log(
            f"{stage}/loss",
            self.weighted_total(losses),
            batch_size=bs,
            sync_dist=True,
            prog_bar=True,
        )
        if batch_idx == 0 and self.log_images_enabled and not self.trainer.sanity_checking:
            pictures = {t: task.visualise(preds[t], batch) for t, task in self.tasks.items() if t in preds}
            size = tuple(batch["image"].shape[-2:])
            pictures.update(self.model.picture_maps(out.maps, 0, size=size))  # e.g. TaskExpert's gates
            log_images(self.loggers, stage, pictures, step=self.global_step)
        return out

    def _eval_epoch_end(self, stage: str) -> None:
        values: dict[str, float] = {}
        for t, metric in self.metrics[stage].items():
            if not metric.update_called:
                continue
            for k, v in metric.compute().items():
                values[f"{stage}/{t}/{k}"] = float(v)
                if k.startswith("iou_") and stage == "val":  # per-class IoU: in eval.py's test results
                    continue
                self.log(
                    f"{stage}/{t}/{k}",
                    v,
                    sync_dist=False,
                    prog_bar=(k == self.tasks[t].main_metric),
                )
            metric.reset()
        if self.baseline and len(values):
            try:
                dm = delta_m(values, self.baseline, self.tasks, stage=stage)
            except ValueError as err:  # e.g. a baseline with only the approximate edge F, tested with odsF
                warnings.warn(f"{stage}/delta_m not logged: {err}", stacklevel=1)
            else:
                self.log(f"{stage}/delta_m", dm, sync_dist=False)

    def validation_step(self, batch: dict, batch_idx: int) -> ModelOutput:
        return self._eval_step("val", batch, batch_idx)

    def on_validation_epoch_start(self) -> None:
        self.model_stats["val"].reset()

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")
        self._log_model_stats("val")

    def _log_model_stats(self, stage: str) -> None:
        """The model's statistics over the evaluation (e.g. TaskExpert's gate means, M³ViT's expert
        usage) as ``{stage}/<key>``: the batch-weighted means of ``ModelOutput.stats``, finished by
        the model (:meth:`~mtl.model.MultiTaskNet.finish_stats`)."""
        means = self.model_stats[stage].compute()
        for k, v in self.model.finish_stats(means).items() if means else ():
            self.log(f"{stage}/{k}", v, sync_dist=True)
        self.model_stats[stage].reset()

    def test_step(self, batch: dict, batch_idx: int) -> ModelOutput:
        return self._eval_step("test", batch, batch_idx)

    def on_test_epoch_start(self) -> None:
        self.model_stats["test"].reset()

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")
        self._log_model_stats("test")

    # ------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Adds every rank's RNG states and the skipped-batch count (exact resume)."""
        checkpoint["rng_states"] = gather_rng_states()
        checkpoint["nonfinite_skipped"] = self.skipped

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.strategy.materialise_buffers(checkpoint.get("state_dict", {}), prefix="strategy.")
        self._resume_rng = checkpoint.get("rng_states")
        self.skipped = int(checkpoint.get("nonfinite_skipped", 0))

    def on_train_start(self) -> None:
        # after the loaders exist, right before the first resumed batch: the random stream continues
        if self._resume_rng:
            restore_rank_rng_state(self._resume_rng)
            self._resume_rng = None

    # ------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ValueError("no trainable parameters")
        wd = getattr(self.optimizer_fn, "keywords", {}).get("weight_decay", 0.0)
        optimizer = self.optimizer_fn(param_groups(self, wd, self.no_decay_1d))
        if self.scheduler_cfg is None:
            return optimizer
        total = int(self.trainer.estimated_stepping_batches)  # batches (Lightning's accumulation is 1)
        if self.accumulate > 1:  # optimiser steps
            trainer = self.trainer
            by_epochs = float("inf")
            if trainer.max_epochs not in (None, -1):
                by_epochs = math.ceil(trainer.num_training_batches / self.accumulate) * trainer.max_epochs
            total = int(min(by_epochs, trainer.max_steps if trainer.max_steps > 0 else float("inf")))
        scheduler = build_scheduler(optimizer, total_steps=total, **self.scheduler_cfg)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }
