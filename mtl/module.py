"""``MTLModule``: the only LightningModule. Steps, strategy-driven updates, metrics, logging.

Optimisation is manual so that every strategy (one weighted backward, per-task gradients,
SAM-style double passes) owns its backward pass while Lightning still handles devices,
precision scaling and DDP gradient synchronisation (via ``manual_backward``).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import ParallelStrategy
from torch import nn

from mtl.callbacks import last_checkpoint_path
from mtl.checkpoint import NonFiniteCheckpointError, gather_rng_states, restore_rank_rng_state, seed_rank_rng
from mtl.contracts import ModelOutput
from mtl.guards import (
    NonFiniteCount,
    NonFiniteLossError,
    grad_message,
    grad_norm,
    nonfinite_grads,
    nonfinite_message,
    nonfinite_tasks,
    stop_message,
)
from mtl.metrics.delta_m import delta_m
from mtl.model import MultiTaskNet
from mtl.objective import score
from mtl.optim import build_scheduler, param_groups, restore_grads, stash_grads
from mtl.strategies import FixedWeights, Strategy
from mtl.tasks import Task
from mtl.visualise import log_images

STAGES = ("val", "test")


class StatMeans:
    """Batch-size-weighted means of per-forward values (losses, model statistics) over an evaluation.

    Under DDP the means are over every rank's samples: :meth:`compute` sums the sums and the
    counts over the ranks (one all-reduce), so ranks with shares of different sizes (an unpadded
    split, :class:`~mtl.data.datamodule.EvalShardSampler`) give the one-process mean exactly.
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

    def compute(self, device: torch.device | None = None) -> dict[str, torch.Tensor]:
        """Key → mean over the samples seen since the last reset, by every rank.

        Args:
            device: where the ranks' sums are reduced (the module's: NCCL reduces device tensors
                only); default: that of the first sum.
        """
        dist = torch.distributed
        if not self.sums or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return {k: total / self.count[k] for k, total in self.sums.items()}
        keys = sorted(self.sums)  # the same on every rank: each rank evaluates at least one batch
        device = device if device is not None else self.sums[keys[0]].device
        sums = [torch.as_tensor(self.sums[k]) for k in keys]
        flat = torch.cat([t.reshape(-1).to(device, torch.float64) for t in sums])
        counts = torch.tensor([self.count[k] for k in keys], dtype=torch.float64, device=device)
        flat = torch.cat([flat, counts])
        dist.all_reduce(flat)
        totals = flat[: -len(keys)].split([t.numel() for t in sums])
        return {
            k: (total / flat[-len(keys) + i]).view_as(ref).to(ref.dtype)
            for i, (k, total, ref) in enumerate(zip(keys, totals, sums, strict=True))
        }


class MTLModule(L.LightningModule):
    """Trains and evaluates a :class:`MultiTaskNet` on a set of tasks.

    Args:
        model: the network.
        tasks: task name → :class:`Task` (same order as the model's tasks).
        optimizer: partial optimiser constructor taking parameter groups.
        strategy: the optimisation strategy (default: the field's fixed loss weights).
        scheduler: keyword arguments of :func:`mtl.optim.build_scheduler` (``name``,
            ``warmup_steps``, ``power``, …) or ``None`` for a constant learning rate.
        grad_clip: max global gradient norm (``None`` or 0 disables clipping; negative is refused).
        no_decay_1d: exclude biases and norm parameters from weight decay.
        log_images: log ground-truth/prediction pictures of the first validation batch.
        baseline: single-task reference metrics ``{task}/{metric}`` (``configs/baselines/``);
            when given, ``{stage}/delta_m`` (percent, positive = better) is logged at every
            validation / test epoch end.
        accumulate_grad_batches: micro-batches per optimiser step (``trainer.accumulate_grad_batches``
            is read by the pipeline; Lightning's own flag does not apply to manual optimisation).
            The strategy runs on every micro-batch and the step takes the mean of their updates:
            for loss weighting this is the gradient of the large batch. Under DDP the micro-batches
            before the last of a group skip DDP's gradient all-reduce (``no_sync``): one all-reduce
            per optimiser step.
        nonfinite: ``{"max_skips": K, "check_grads": bool}``: skip up to K batches with a NaN/inf
            loss over the run, then save ``last.ckpt`` and stop (0: stop at the first). With
            ``check_grads`` (default) a batch whose losses are finite but whose gradients are not
            is skipped too (no optimiser or scheduler step; same budget): one host read of the
            global gradient norm per optimiser step, which clipping computes anyway. Under fp16
            the gradient scaler skips such steps itself and this check is off.
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
        if grad_clip is not None and not grad_clip >= 0:
            raise ValueError(
                f"module.grad_clip = {grad_clip}: the max gradient norm must be > 0 to clip, or null / 0 "
                "for no clipping"
            )
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
        self._stash: dict[nn.Parameter, torch.Tensor] = {}  # their gradients during a strategy's backward
        nonfinite = dict(nonfinite or {})
        unknown = set(nonfinite) - {"max_skips", "check_grads"}
        if unknown or int(nonfinite.get("max_skips", 10)) < 0:
            raise ValueError(
                f"module.nonfinite expects {{max_skips: int >= 0, check_grads: bool}}, got {nonfinite}"
            )
        self.max_skips = int(nonfinite.get("max_skips", 10))
        self.check_grads = bool(nonfinite.get("check_grads", True))
        self.skipped = 0
        self._progress_at: int | None = None  # global step of the last progress-bar values
        self._resume_rng: list | None = None
        self.metrics = nn.ModuleDict(
            {s: nn.ModuleDict({t: task.metric() for t, task in self.tasks.items()}) for s in STAGES}
        )
        self.pred_checks = nn.ModuleDict(
            {s: nn.ModuleDict({t: NonFiniteCount() for t in self.tasks}) for s in STAGES}
        )
        self.model_stats = {s: StatMeans() for s in STAGES}
        self.loss_means = {s: StatMeans() for s in STAGES}  # exact over the ranks' unequal shares

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
    def _scaler(self) -> torch.amp.GradScaler | None:
        """The fp16 gradient scaler when one is on."""
        trainer = self._trainer
        scaler = getattr(trainer.precision_plugin, "scaler", None) if trainer is not None else None
        return scaler if scaler is not None and scaler.is_enabled() else None

    def grad_scale(self) -> float:
        """The fp16 gradient scaler's current scale (1.0 for fp32 / bf16): ``.grad`` is at this scale."""
        scaler = self._scaler()
        if scaler is None:
            return 1.0
        scaler.scale(torch.zeros((), device=self.device))  # creates the scale lazily (unscale_ needs it)
        return float(scaler.get_scale())

    def _step_boundary(self, batch_idx: int) -> tuple[bool, bool]:
        """Whether this micro-batch starts / ends an accumulation group."""
        if self.accumulate == 1:
            return True, True
        last = (batch_idx + 1) % self.accumulate == 0 or bool(getattr(self.trainer, "is_last_batch", False))
        return self._micro == 0, last

    def _grad_sync(self, sync: bool) -> contextlib.AbstractContextManager:
        """DDP's ``no_sync`` unless ``sync``: a micro-batch before the last of an accumulation group
        adds its gradient to ``.grad`` locally; the last one's backward all-reduces the sum once.

        Multi-pass strategies (``torch.autograd.grad``) fire no DDP hook and reduce per-task
        gradients themselves on every micro-batch; for them this changes nothing.
        """
        strategy = self._trainer.strategy if self._trainer is not None else None
        if sync or not isinstance(strategy, ParallelStrategy):
            return contextlib.nullcontext()
        return strategy.block_backward_sync()

    def manual_backward(self, loss: torch.Tensor, *args, **kwargs) -> None:
        """``LightningModule.manual_backward`` after putting the earlier micro-batches' gradients back
        into ``.grad`` (see :meth:`training_step`): the backward adds to them, and on the group's
        last micro-batch DDP averages their sum over the ranks."""
        if self._stash:
            restore_grads(self._stash)
            self._stash = {}
        super().manual_backward(loss, *args, **kwargs)

    def _sync_accumulated_grads(self) -> None:
        """Averages ``.grad`` over the DDP ranks: the accumulation group's last micro-batch was
        skipped (non-finite, on every rank), so no backward all-reduced the ``no_sync`` micro-batches."""
        dist = torch.distributed
        if self.accumulate == 1 or not (dist.is_available() and dist.is_initialized()):
            return
        world = dist.get_world_size()
        for p in self.parameters():
            if p.grad is not None and world > 1:
                dist.all_reduce(p.grad)
                p.grad.div_(world)

    def _skip_nonfinite(self, losses: Mapping[str, torch.Tensor], aux, batch_idx: int) -> bool:
        bad = nonfinite_tasks(losses, aux)
        if not bad:
            return False
        at = {"step": self.global_step, "epoch": self.current_epoch, "batch_idx": batch_idx}
        self._skip(nonfinite_message(bad, **at))
        return True

    def _skip(self, msg: str) -> None:
        """Counts a skipped batch and warns, or saves the last finite state and stops at the limit."""
        if self.skipped >= self.max_skips:
            ckpt = self._save_last_good()
            raise NonFiniteLossError(stop_message(msg, max_skips=self.max_skips, ckpt=ckpt))
        self.skipped += 1
        warnings.warn(f"{msg}: batch skipped ({self.skipped}/{self.max_skips})", stacklevel=1)
        self.log("train/skipped_batches", torch.tensor(float(self.skipped)))  # a host value: no copy

    def _clip_and_check(self, batch_idx: int) -> bool:
        """Clips the gradients to ``grad_clip`` and checks that they are finite (``check_grads``).

        One global norm serves both (``torch.nn.utils.clip_grad_norm_``'s own two steps, so the
        clipped gradients are the same). Returns whether the optimiser may step: ``False`` when a
        gradient holds NaN/inf (the batch is skipped like one with a non-finite loss). Under fp16
        ``.grad`` is still at the loss scale here (the scaler unscales inside ``opt.step()``):
        clipping the scaled gradients to ``grad_clip·scale`` is clipping the true ones to
        ``grad_clip``, and the scaler skips non-finite steps itself.
        """
        scaler = self._scaler()
        check = self.check_grads and scaler is None
        if not (check or self.grad_clip):
            return True
        params = [p for p in self.parameters() if p.grad is not None]
        norm = grad_norm(params)
        if self.grad_clip:
            torch.nn.utils.clip_grads_with_norm_(params, self.grad_clip * self.grad_scale(), norm)
        # DDP: the gradients are all-reduced already, every rank reads the same norm and decides alike
        if not check or bool(torch.isfinite(norm)):  # the step's one host read of the check
            return True
        bad = nonfinite_grads(list(self.named_parameters()))
        self.optimizers().zero_grad(set_to_none=True)
        at = {"step": self.global_step, "epoch": self.current_epoch, "batch_idx": batch_idx}
        self._skip(grad_message(bad, **at))
        return False

    def _save_last_good(self) -> str | None:
        path = str(last_checkpoint_path(self.trainer))
        try:
            self.trainer.save_checkpoint(path)
        except NonFiniteCheckpointError as err:  # the weights are poisoned too: keep the earlier file
            warnings.warn(str(err), stacklevel=1)
            if Path(path).is_file():
                return f"{path} (an earlier save: the current weights are not finite and were not saved)"
            return None
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
            self._sync_accumulated_grads()
        else:
            # earlier micro-batches' gradients: back in .grad before a manual_backward (autograd adds
            # to them, DDP's all-reduce of the group's last micro-batch covers them), or after the
            # strategy wrote its own (per-task gradient strategies overwrite .grad)
            self._stash = stash_grads(self.parameters()) if not first else {}
            with self._grad_sync(last):
                logs = self.strategy.backward(step, module=self, batch=batch)
            restore_grads(self._stash)
            self._stash = {}
            self._micro += 1
        if not last:
            return self.weighted_total(losses)
        if self._micro > 1:  # mean of the micro-batch updates
            for p in self.parameters():
                if p.grad is not None:
                    p.grad.div_(self._micro)
        self._micro = 0
        if not self._clip_and_check(batch_idx):
            return None
        opt.step()  # fp16: unscale, skip on inf/nan, update the scale
        self.strategy.after_step(batch, module=self, losses=losses)
        sched = self.lr_schedulers()
        if sched is not None:
            sched.step()
        return self._log_train(losses, aux, logs, batch_size=batch["image"].shape[0])

    def _log_train(
        self,
        losses: Mapping[str, torch.Tensor],
        aux: torch.Tensor | None,
        logs: Mapping[str, torch.Tensor | float],
        *,
        batch_size: int,
    ) -> torch.Tensor:
        """Logs a training step without a host sync; returns the weighted total loss.

        Losses are logged as device tensors (the loggers read them every ``trainer.log_every_n_steps``
        steps), the strategy's Python numbers as host tensors (a number would become a device
        tensor: a blocking host-to-device copy). Lightning reads every ``prog_bar`` value with
        ``.item()`` after every batch, so the progress bar gets the per-task losses as host values
        (``<task>/loss``), copied in one transfer every ``log_every_n_steps`` steps.
        """
        bs = batch_size
        for t, loss in losses.items():
            self.log(f"train/{t}/loss", loss.detach(), batch_size=bs)
        if aux is not None:
            self.log("train/aux_loss", aux.detach(), batch_size=bs)
        total = self.weighted_total(losses)
        self.log("train/loss", total, batch_size=bs)
        for k, v in logs.items():  # grad/... diagnostics → train/grad/..., the rest → train/strategy/...
            v = v if isinstance(v, torch.Tensor) else torch.tensor(float(v))
            self.log(f"train/{k}" if k.startswith("grad/") else f"train/strategy/{k}", v, batch_size=bs)
        if losses and self._progress_due():
            shown = torch.stack([loss.detach().float() for loss in losses.values()]).cpu()  # one sync
            for t, v in zip(losses, shown, strict=True):
                self.log(f"{t}/loss", v, prog_bar=True, logger=False, batch_size=bs)
        return total

    def _progress_due(self) -> bool:
        """Whether this step refreshes the progress bar: the first, then every ``log_every_n_steps``."""
        every = self._trainer.log_every_n_steps if self._trainer is not None else 1
        if self._progress_at is not None and self.global_step - self._progress_at < every:
            return False
        self._progress_at = self.global_step
        return True

    # -------------------------------------------------------------- evaluation
    def _eval_step(self, stage: str, batch: dict, batch_idx: int) -> ModelOutput:
        """Losses, metrics and model statistics of one batch; returns the model's output (callbacks
        get it as ``outputs``, e.g. :class:`~mtl.callbacks.GateMapWriter` reads its maps)."""
        out = self.model.run(batch["image"])
        preds = out.preds
        losses = self.task_losses(out, batch)
        bs = batch["image"].shape[0]
        self.model_stats[stage].update(out.stats, bs)
        self.loss_means[stage].update(
            {**{f"{t}/loss": loss for t, loss in losses.items()}, "loss": self.weighted_total(losses)}, bs
        )
        for t in losses:
            self.pred_checks[stage][t].update(preds[t])
            self.tasks[t].update_metric(self.metrics[stage][t], preds[t], batch)
        if batch_idx == 0 and self.log_images_enabled and not self.trainer.sanity_checking:
            pictures = {t: task.visualise(preds[t], batch) for t, task in self.tasks.items() if t in preds}
            size = tuple(batch["image"].shape[-2:])
            pictures.update(self.model.picture_maps(out.maps, 0, size=size))  # e.g. TaskExpert's gates
            log_images(self.loggers, stage, pictures, step=self.global_step)
        return out

    def _eval_epoch_end(self, stage: str) -> None:
        # batch-size-weighted mean losses over every rank's images (Lightning's own mean reduction
        # of a logged value rounds the halved batch count down when the ranks' shares differ)
        for k, v in self.loss_means[stage].compute(self.device).items():
            self.log(f"{stage}/{k}", v, sync_dist=False, prog_bar=(k == "loss"))
        self.loss_means[stage].reset()
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
        self._report_nonfinite(stage)
        if self.baseline and len(values):
            try:
                dm = delta_m(values, self.baseline, self.tasks, stage=stage)
            except ValueError as err:  # e.g. a baseline with only the approximate edge F, tested with odsF
                warnings.warn(f"{stage}/delta_m not logged: {err}", stacklevel=1)
            else:
                self.log(f"{stage}/delta_m", dm, sync_dist=False)
        if values:
            try:  # a weight-free checkpoint monitor for sweeps over loss weights (hparams_search=optuna)
                self.log(f"{stage}/score", score(values, self.tasks, stage=stage), sync_dist=False)
            except KeyError:  # a task without any of its score metrics
                pass

    def _report_nonfinite(self, stage: str) -> None:
        """Logs ``{stage}/{task}/nonfinite`` (NaN/inf prediction values) and warns when any."""
        for t, check in self.pred_checks[stage].items():
            if not check.update_called:
                continue
            counts = check.compute()
            check.reset()
            n, total = int(counts["nonfinite"]), int(counts["values"])  # one read per task and epoch
            self.log(f"{stage}/{t}/nonfinite", float(n), sync_dist=False)
            if n:
                warnings.warn(
                    f"{stage}: {n} of {total} {t} prediction values ({100 * n / total:.3g} %) are NaN/inf; "
                    f"the {t} metrics follow the field's evaluator on them (a mean over them is NaN). "
                    "The weights have likely diverged: see the README, 'Failures and recovery'",
                    stacklevel=1,
                )

    def validation_step(self, batch: dict, batch_idx: int) -> ModelOutput:
        return self._eval_step("val", batch, batch_idx)

    def on_validation_epoch_start(self) -> None:
        self.model_stats["val"].reset()
        self.loss_means["val"].reset()

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")
        self._log_model_stats("val")

    def _log_model_stats(self, stage: str) -> None:
        """The model's statistics over the evaluation (e.g. TaskExpert's gate means, M³ViT's expert
        usage) as ``{stage}/<key>``: the batch-weighted means of ``ModelOutput.stats``, finished by
        the model (:meth:`~mtl.model.MultiTaskNet.finish_stats`)."""
        means = self.model_stats[stage].compute(self.device)  # over every rank's samples
        for k, v in self.model.finish_stats(means).items() if means else ():
            self.log(f"{stage}/{k}", v, sync_dist=False)
        self.model_stats[stage].reset()

    def test_step(self, batch: dict, batch_idx: int) -> ModelOutput:
        return self._eval_step("test", batch, batch_idx)

    def on_test_epoch_start(self) -> None:
        self.model_stats["test"].reset()
        self.loss_means["test"].reset()

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
        # after the loaders exist, right before the first batch: a resumed run continues every rank's
        # random stream; a new one gives each DDP rank its own (dropout, stochastic depth, router noise)
        rank, world = self.global_rank, self._trainer.world_size if self._trainer is not None else 1
        if self._resume_rng:
            restore_rank_rng_state(self._resume_rng, rank=rank, world_size=world)
            self._resume_rng = None
        else:
            seed_rank_rng(rank)

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
