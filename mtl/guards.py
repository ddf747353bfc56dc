"""Training guards: non-finite losses, gradients and predictions, and out-of-memory errors, reported
so a user can act on them.

A non-finite loss names the task(s), the step and the batch; a non-finite gradient (finite losses,
e.g. an exploding learning rate) names the first parameters that hold it. The policy skips such a
batch (no optimiser step, no scheduler step; under DDP every rank skips together) up to
``max_skips`` times over the run; the next one saves the last finite state as ``last.ckpt`` and
stops with :class:`NonFiniteLossError`. Non-finite weights are never saved
(:class:`~mtl.checkpoint.AtomicCheckpointIO`). Non-finite predictions at evaluation are counted per
task (:class:`NonFiniteCount`), logged as ``{stage}/{task}/nonfinite`` and warned about; the task
metrics then follow the field's evaluators (a NaN prediction makes a mean NaN), they never crash.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn
from torchmetrics import Metric

_ADVICE = (
    "lower optimizer.lr, clip gradients (module.grad_clip=1.0), train in fp32 (trainer.precision=32) "
    "or bf16 instead of fp16, or check the data (python -m mtl.data.check <root> --dataset <name>)"
)


class NonFiniteLossError(RuntimeError):
    """Training stopped on a non-finite loss after the configured number of skipped batches."""


def nonfinite_tasks(losses: Mapping[str, torch.Tensor], aux: torch.Tensor | None = None) -> list[str]:
    """Names of the tasks (and ``aux_loss``) whose loss is NaN or ±inf on any rank.

    One host sync per call (the step's only one with the plain strategies): the flags are computed
    and all-reduced on the device and read once.
    """
    names = list(losses) + (["aux_loss"] if aux is not None else [])
    values = [*losses.values(), *([aux] if aux is not None else [])]
    device = values[0].device if values else torch.device("cpu")
    bad = torch.stack([~torch.isfinite(v.detach().float()).all() for v in values]).to(device, torch.float32)
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # every rank takes the same decision
    return [n for n, b in zip(names, bad.tolist(), strict=True) if b > 0]


def grad_norm(params: Sequence[nn.Parameter]) -> torch.Tensor:
    """The global L2 norm of the parameters' gradients, on their device (no host read): NaN/inf when
    any gradient holds NaN/inf. Zero when no parameter has a gradient."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=params[0].device if params else None)
    return torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=None)


def nonfinite_grads(named: Sequence[tuple[str, nn.Parameter]], limit: int = 4) -> list[str]:
    """Names of (at most ``limit``) parameters whose gradient holds NaN/inf (one host read)."""
    with_grad = [(n, p.grad) for n, p in named if p.grad is not None]
    if not with_grad:
        return []
    flags = torch.stack([~torch.isfinite(g).all() for _, g in with_grad]).tolist()
    return [n for (n, _), bad in zip(with_grad, flags, strict=True) if bad][:limit]


def nonfinite_message(tasks: Sequence[str], *, step: int, epoch: int, batch_idx: int) -> str:
    return f"non-finite loss in {', '.join(tasks)} at step {step} (epoch {epoch}, batch {batch_idx})"


def grad_message(params: Sequence[str], *, step: int, epoch: int, batch_idx: int) -> str:
    return (
        f"non-finite gradient (finite losses) at step {step} (epoch {epoch}, batch {batch_idx}), "
        f"e.g. in {', '.join(params) or '?'}"
    )


def stop_message(base: str, *, max_skips: int, ckpt: str | None) -> str:
    """The stop's message; ``ckpt``: where the last good state is, ``None`` when no finite state
    was ever saved (the weights diverged before the first checkpoint)."""
    saved = (
        f"the last state with finite weights is saved at {ckpt} (resume with ckpt_path=last; after a "
        "diverging learning rate it may already be poor: compare its validation metrics with best.ckpt's)"
        if ckpt
        else "no checkpoint was saved: the weights diverged before the first one (non-finite "
        "weights are never saved)"
    )
    return (
        f"{base}: {max_skips} batch(es) with non-finite losses or gradients were skipped already "
        f"(module.nonfinite.max_skips={max_skips}); {saved}. Try: {_ADVICE}."
    )


def oom_message(
    err: BaseException,
    *,
    batch_size: int | None,
    input_size: Sequence[int] | None,
    precision: str | int | None,
    devices: str | int | None,
) -> str:
    """What ran out of memory and which knobs lower it."""
    size = "×".join(str(s) for s in input_size) if input_size else "?"
    first_line = str(err).splitlines()[0] if str(err) else repr(err)
    return (
        f"out of memory with data.batch_size={batch_size} per device at {size} px, "
        f"trainer.precision={precision}, trainer.devices={devices}. To fit: lower data.batch_size and "
        "raise trainer.accumulate_grad_batches to keep the effective batch, use "
        "trainer.precision=bf16-mixed, turn on gradient checkpointing "
        "(++model.backbone.grad_checkpointing=true), lower data.input_size / data.resize, or spread the "
        f"batch over more GPUs (trainer=ddp). Original error: {first_line}"
    )


@contextlib.contextmanager
def explain_oom(**context) -> Iterator[None]:
    """Re-raises an out-of-memory error with :func:`oom_message` (same exception type)."""
    try:
        yield
    except torch.OutOfMemoryError as err:
        raise torch.OutOfMemoryError(oom_message(err, **context)) from err


class NonFiniteCount(Metric):
    """How many prediction values of a task were NaN/inf over an evaluation (sum states: exact
    under DDP). ``compute()`` returns ``{"nonfinite": count}``, kept beside the task's metrics."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("nonfinite", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor) -> None:
        """Adds a batch's raw prediction (any shape)."""
        self.nonfinite += (~torch.isfinite(pred.detach())).sum()
        self.total += pred.numel()

    def compute(self) -> dict[str, torch.Tensor]:
        return {"nonfinite": self.nonfinite, "values": self.total}
