"""Training guards: non-finite losses and out-of-memory errors, reported so a user can act on them.

A non-finite loss names the task(s), the step and the batch. The policy skips such a batch (no
update; under DDP every rank skips together) up to ``max_skips`` times over the run; the next one
saves the last good state as ``last.ckpt`` and stops with :class:`NonFiniteLossError`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import torch

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


def nonfinite_message(tasks: Sequence[str], *, step: int, epoch: int, batch_idx: int) -> str:
    return f"non-finite loss in {', '.join(tasks)} at step {step} (epoch {epoch}, batch {batch_idx})"


def stop_message(base: str, *, max_skips: int, ckpt: str | None) -> str:
    """The stop's message; ``ckpt``: where the last good state is, ``None`` when no finite state
    was ever saved (the weights diverged before the first checkpoint)."""
    saved = (
        f"the last good state is saved at {ckpt} (resume with ckpt_path=last)"
        if ckpt
        else "no checkpoint was saved: the weights diverged before the first one (non-finite "
        "weights are never saved)"
    )
    return (
        f"{base}: {max_skips} batch(es) with non-finite losses were skipped already "
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
