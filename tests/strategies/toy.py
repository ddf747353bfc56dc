"""A tiny two-layer multi-task model and a stand-in for ``MTLModule`` for hand-checkable tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn


class ToyTask:
    """Squared error of a scalar prediction (mean over the batch)."""

    def __init__(self, name: str, default_weight: float = 1.0) -> None:
        self.name, self.default_weight = name, default_weight

    def loss(self, pred: torch.Tensor, batch: dict) -> torch.Tensor:
        return ((pred.squeeze(-1) - batch[self.name]) ** 2).mean()


class ToyNet(nn.Module):
    """``z = tanh(W x)`` shared, one linear head per task; exposes the MultiTaskNet API."""

    def __init__(self, k: int = 2, d_in: int = 4, d_rep: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tasks = [f"t{i}" for i in range(k)]
        self.enc = nn.Linear(d_in, d_rep)
        self.heads = nn.ModuleDict({t: nn.Linear(d_rep, 1) for t in self.tasks})

    def encode(self, x):
        return [torch.tanh(self.enc(x))]

    def decode(self, rep, *, size=None, task_subset=None):
        return {t: self.heads[t](rep[0]) for t in (task_subset or self.tasks)}

    def forward(self, x, *, task_subset=None):
        return self.decode(self.encode(x), task_subset=task_subset)

    def shared_parameters(self):
        yield from self.enc.parameters()

    representation_parameters = shared_parameters

    def task_parameters(self, t):
        yield from self.heads[t].parameters()

    def aux_loss(self):
        return None


class ToyModule:
    """Stands in for ``MTLModule``: ``model``, ``task_losses``, ``manual_backward``, ``grad_scale``."""

    def __init__(self, model: nn.Module, scale: float = 1.0, tasks: dict | None = None) -> None:
        self.model = model
        self.tasks = tasks if tasks is not None else {t: ToyTask(t) for t in model.tasks}
        self.scale = scale

    def __call__(self, x, **kwargs):
        return self.model(x, **kwargs)

    def task_losses(self, preds, batch):
        return {t: task.loss(preds[t], batch) for t, task in self.tasks.items()}

    def manual_backward(self, loss):
        (loss * self.scale).backward()

    def grad_scale(self) -> float:
        return self.scale


def toy_batch(k: int = 2, n: int = 8, d_in: int = 4) -> dict:
    g = torch.Generator().manual_seed(1)
    batch = {"image": torch.randn(n, d_in, generator=g)}
    batch.update({f"t{i}": torch.randn(n, generator=g) for i in range(k)})
    return batch


def setup(strategy, k: int = 2, scale: float = 1.0):
    """A strategy set up on a fresh toy model; returns ``(module, batch)``."""
    module = ToyModule(ToyNet(k), scale=scale)
    strategy.setup(tasks=module.tasks, module=module)
    return module, toy_batch(k)


def step(strategy, module, batch) -> dict:
    """One strategy forward + backward with fresh ``.grad``; returns the logs."""
    for p in module.model.parameters():
        p.grad = None
    _, losses, aux = strategy.forward(batch, module=module)
    return strategy.backward(losses, module=module, extra=aux, batch=batch)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models: one torch thread avoids the intra-op threading overhead that dominates at
    this size on a shared CPU (restored after each test). Imported by every strategy test module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
