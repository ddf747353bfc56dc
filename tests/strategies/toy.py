"""A tiny two-layer multi-task model and a stand-in for ``MTLModule`` for hand-checkable tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtl.contracts import Features, ModelOutput, StrategyHost


class ToyTask:
    """Squared error of a scalar prediction (mean over the batch)."""

    def __init__(self, name: str, default_weight: float = 1.0) -> None:
        self.name, self.default_weight = name, default_weight

    def loss(self, pred: torch.Tensor, batch: dict) -> torch.Tensor:
        return ((pred.squeeze(-1) - batch[self.name]) ** 2).mean()


class ToyNet(nn.Module):
    """``z = tanh(W x)`` shared, one linear head per task; exposes the MultiTaskNet API a strategy uses."""

    def __init__(self, k: int = 2, d_in: int = 4, d_rep: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tasks = [f"t{i}" for i in range(k)]
        self.enc = nn.Linear(d_in, d_rep)
        self.backbone = self.enc  # the shared encoder, under MultiTaskNet's name
        self.decoder = nn.Identity()  # the heads read the representation directly
        self.heads = nn.ModuleDict({t: nn.Linear(d_rep, 1) for t in self.tasks})

    def encode(self, x):
        return [torch.tanh(self.enc(x))]

    def encode_features(self, x):
        rep = self.encode(x)
        return rep, Features(shared=rep)

    def decode(self, rep, *, size=None, tasks=None, features=None) -> ModelOutput:
        return ModelOutput(preds={t: self.heads[t](rep[0]) for t in (tasks or self.tasks)})

    def run(self, x, *, tasks=None) -> ModelOutput:
        return self.decode(self.encode(x), tasks=tasks)

    def forward(self, x, *, tasks=None):
        return self.run(x, tasks=tasks).preds

    def shared_parameters(self):
        yield from self.enc.parameters()

    representation_parameters = shared_parameters

    def task_parameters(self, t):
        yield from self.heads[t].parameters()


class ToyModule:
    """Stands in for ``MTLModule``: exactly :class:`~mtl.contracts.StrategyHost` (``model``, ``tasks``,
    ``task_losses``, ``manual_backward``, ``grad_scale``), so a strategy that uses more fails here."""

    def __init__(self, model: nn.Module, scale: float = 1.0, tasks: dict | None = None) -> None:
        self.model = model
        self.tasks = tasks if tasks is not None else {t: ToyTask(t) for t in model.tasks}
        self.scale = scale

    def task_losses(self, out: ModelOutput, batch: dict) -> dict:
        return {t: task.loss(out.preds[t], batch) for t, task in self.tasks.items()}

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
    assert isinstance(module, StrategyHost)
    strategy.setup(tasks=module.tasks, module=module)
    return module, toy_batch(k)


def step(strategy, module, batch) -> dict:
    """One strategy forward + backward with fresh ``.grad``; returns the logs."""
    for p in module.model.parameters():
        p.grad = None
    return strategy.backward(strategy.forward(batch, module=module), module=module, batch=batch)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models: one torch thread avoids the intra-op threading overhead that dominates at
    this size on a shared CPU (restored after each test). Imported by every strategy test module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# a real composed module, as small as it gets (tests that build it with Hydra)
TINY = [
    "data.tasks=[semseg,depth,normals]",
    "data.dataset.resolution=[32,32]",
    "data.dataset.length=4",
    "data.batch_size=2",
    "model.backbone.embed_dim=16",
    "model.decoder.channels=16",
]
