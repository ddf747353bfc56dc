"""Pluggable evaluation steps: what ``eval.py`` does around the test pass besides the metrics.

:func:`mtl.pipeline.evaluate` loads the checkpoint, builds the trainer, then, for the steps
listed under ``eval_steps`` in the config (``configs/eval_steps/default.yaml``), in order::

    step.before_test(ctx)    for every step   may change the model (fold LoRA, pick a sub-network)
    trainer.test(...)                          metrics → ctx.metrics, results.{json,csv,md}
    step.after_test(ctx)     for every step   reports and pictures of the evaluated model

Under DDP every rank runs every hook (a step may need all ranks, e.g. to sum what each saw of the
split); only rank 0 writes files (``ctx.is_global_zero``).

Each feature owns its step next to its code, configured by the keys users already set::

    mtl.adapters.lora.MergeLoRA                   adapter.merge: fold LoRA into the base weights
    mtl.control.run.Control                       control.*: slimmable sub-network or sweep
    mtl.backbones.routing_report.RoutingReport    expert use of routing backbones (M³ViT)
    mtl.decoders.taskexpert.GateReport            gate statistics: gates.md, a short console summary
    mtl.visualise.PredictionPictures              eval.pictures: labelled prediction panels

A new step subclasses :class:`EvalStep`, implements one or both hooks and is added from the
command line (``+eval_steps.mine._target_=my_pkg.MyStep``); ``eval_steps.pictures=null``
removes one and ``eval_steps=none`` all. A step keeps what it reports in
``ctx.reports[<its name>]``; ``evaluate`` returns that dictionary with the objects it built.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # typing only: no import cycle at run time
    import lightning as L

    from mtl.data.datamodule import MTLDataModule
    from mtl.module import MTLModule


@dataclass
class EvalContext:
    """What an evaluation step may read and write.

    Attributes:
        cfg: the whole job config (read-only by convention; a step takes its options as
            constructor arguments, this is for steps that need more).
        module: the module with the checkpoint's weights (``module.model``, ``module.tasks``).
        datamodule: the data of the evaluation.
        trainer: the trainer of the test pass (``trainer.loggers`` take pictures).
        output_dir: where the evaluation writes its files.
        input_size: ``(H, W)`` of the evaluated images.
        metrics: the test metrics (``test/{task}/{metric}``), filled before :meth:`EvalStep.after_test`.
        reports: step name → what the step reports (returned by ``evaluate``).
    """

    cfg: Mapping[str, Any]
    module: MTLModule
    datamodule: MTLDataModule
    trainer: L.Trainer
    output_dir: Path
    input_size: tuple[int, int]
    metrics: dict[str, float] = field(default_factory=dict)
    reports: dict[str, Any] = field(default_factory=dict)

    @property
    def is_global_zero(self) -> bool:
        """Whether this process writes the files (rank 0 under DDP; the only process otherwise).

        Every rank runs every step (a step may need all of them for a collective, e.g. summing
        the routing counts of their shares of the split); only rank 0 writes files.
        """
        return self.trainer.is_global_zero


class EvalStep:
    """Base of every evaluation step: both hooks do nothing by default, a step overrides what it has.

    ``evaluate`` accepts only instances of this class (a config entry naming anything else is
    refused before the checkpoint is evaluated).
    """

    def before_test(self, ctx: EvalContext) -> None:
        """Runs after the checkpoint is loaded, before the test pass (may change the model)."""

    def after_test(self, ctx: EvalContext) -> None:
        """Runs after the test pass, ``ctx.metrics`` filled and the results written."""
