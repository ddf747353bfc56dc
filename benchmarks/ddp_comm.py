"""Communication of the per-task-gradient strategies under DDP, and host syncs per step.

Two tables.

1. Collectives per step: 2 CPU processes (gloo) run each strategy's step (``strategy.forward`` +
   ``strategy.backward``, as ``MTLModule`` calls them) on a small ViT multi-head model with 3 tasks
   (semseg, depth, normals). ``CommLog`` (``tests/strategies/comm_log.py``) wraps the collectives
   of ``torch.distributed`` and ``torch.autograd.grad`` and counts, per step: the collectives (and
   how many are asynchronous), the bytes each rank sends in a ring (all-reduce ``2(R−1)/R`` of its
   buffer, reduce-scatter and all-gather ``(R−1)/R``, broadcast 1), the part of them launched
   asynchronously while backward passes were still to come (overlapped with compute), relative to
   one all-reduce of the ``k × n`` rows.
2. Host syncs per step on the toy model of ``tests/strategies/toy.py`` (3 tasks), counted by
   ``tests/strategies/sync_counter.py`` (a ``TorchDispatchMode`` that emulates the device on the
   CPU: reads of device values, device-to-host copies and blocking host-to-device copies), first
   step and the steady state.

    python benchmarks/ddp_comm.py [--only upgrad,cagrad] [--steps 3] [--skip-comm] [--skip-syncs]
"""

from __future__ import annotations

import argparse
import functools
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hydra.utils import instantiate
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "strategies"))

from comm_log import RING, CommLog  # noqa: E402

from mtl.backbones import TimmBackbone  # noqa: E402
from mtl.contracts import ModelOutput  # noqa: E402
from mtl.decoders.multihead import MultiHeadDecoder  # noqa: E402
from mtl.model import MultiTaskNet  # noqa: E402
from mtl.tasks import build_tasks  # noqa: E402

#: the per-task-gradient strategies (their communication is the strategy's, not DDP's reducer)
PER_TASK = ["upgrad", "cagrad", "mgda", "nash_mtl", "graddrop", "dbmtl", "upgrad_gramian", "mgda_ub", "fmtl"]
#: every strategy with a config of its own, for the host-sync table
ALL = PER_TASK + ["ew", "uw", "dwa", "gls", "rlw", "famo", "gradnorm", "sam"]
TASKS = ["semseg", "depth", "normals"]
RES, BATCH = 32, 2


def strategy_config(name: str):
    """The strategy config ``configs/strategy/<name>.yaml`` (its ``defaults`` merged)."""
    cfg = OmegaConf.load(ROOT / "configs" / "strategy" / f"{name}.yaml")
    if "defaults" in cfg:
        base = OmegaConf.load(ROOT / "configs" / "strategy" / f"{cfg.defaults[0]}.yaml")
        cfg = OmegaConf.merge(base, {k: v for k, v in cfg.items() if k != "defaults"})
    return cfg


class BenchHost:
    """What a strategy uses of ``MTLModule`` (:class:`~mtl.contracts.StrategyHost`), without Lightning."""

    def __init__(self, model: MultiTaskNet, tasks) -> None:
        self.model, self.tasks = model, tasks

    def task_losses(self, out: ModelOutput, batch: dict) -> dict[str, torch.Tensor]:
        return {t: task.loss(out.preds[t], batch) for t, task in self.tasks.items()}

    def manual_backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def grad_scale(self) -> float:
        return 1.0


def build(name: str) -> tuple[BenchHost, object]:
    torch.manual_seed(0)
    tasks = build_tasks(TASKS, num_classes={"semseg": 4})
    backbone = TimmBackbone(
        name="vit_tiny_patch16_224",
        img_size=(RES, RES),
        out_indices=[0, 1],
        depth=2,
        embed_dim=64,
        num_heads=2,
    )
    model = MultiTaskNet(
        backbone=backbone,
        decoder=functools.partial(MultiHeadDecoder, channels=16),
        tasks={t: task.out_channels for t, task in tasks.items()},
    )
    host = BenchHost(model, tasks)
    strategy = instantiate(strategy_config(name), _convert_="all")
    strategy.setup(tasks=tasks, module=host)
    return host, strategy


def batch_for(rank: int) -> dict:
    g = torch.Generator().manual_seed(100 + rank)
    normals = torch.nn.functional.normalize(torch.randn(BATCH, 3, RES, RES, generator=g), dim=1)
    return {
        "image": torch.randn(BATCH, 3, RES, RES, generator=g),
        "semseg": torch.randint(0, 4, (BATCH, RES, RES), generator=g),
        "depth": torch.rand(BATCH, 1, RES, RES, generator=g) + 0.5,
        "normals": normals,
    }


def _comm_worker(rank: int, port: int, names: list[str], steps: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    results = {}
    for name in names:
        host, strategy = build(name)
        batch = batch_for(rank)
        with CommLog() as log:
            for _ in range(steps):
                for p in host.model.parameters():
                    p.grad = None
                step = strategy.forward(batch, module=host)
                strategy.backward(step, module=host, batch=batch)
                log.step()
        n = sum(p.numel() for p in host.model.shared_parameters() if p.requires_grad)
        results[name] = {**log.summary(-1), "n": n}
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def comm_table(names: list[str], steps: int) -> dict[str, dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(Path(os.environ.get("TMPDIR", "/tmp")) / f"ddp_comm_{os.getpid()}.pt")
    mp.spawn(_comm_worker, args=(port, names, steps, out), nprocs=2, join=True)
    results = torch.load(out)
    os.remove(out)
    return results


def sync_table(names: list[str], steps: int) -> dict[str, list[int]]:
    from sync_counter import HostSyncs
    from toy import ToyModule, ToyNet, toy_batch

    torch.set_num_threads(1)
    counts = {}
    for name in names:
        module = ToyModule(ToyNet(3))
        strategy = instantiate(strategy_config(name), _convert_="all")
        strategy.setup(tasks=module.tasks, module=module)
        batch = toy_batch(3)
        per_step = []
        for _ in range(steps):
            for p in module.model.parameters():
                p.grad = None
            seeds = (module.model.parameters(), batch.values(), strategy.buffers(), strategy.parameters())
            with HostSyncs(*seeds) as syncs:
                step = strategy.forward(batch, module=module)
                strategy.backward(step, module=module, batch=batch)
                strategy.after_step(batch, module=module, losses=step.losses)
            per_step.append(syncs.count)
        counts[name] = per_step
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", default=None, help="comma-separated strategy names")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--skip-comm", action="store_true")
    parser.add_argument("--skip-syncs", action="store_true")
    args = parser.parse_args()
    only = args.only.split(",") if args.only else None
    if not args.skip_comm:
        names = [n for n in PER_TASK if only is None or n in only]
        res = comm_table(names, args.steps)
        print(f"\n2 ranks (gloo), {len(TASKS)} tasks, per step (the last of {args.steps})\n")
        print(
            "| strategy | collectives (async) | sent per rank, MB | overlapped, MB "
            "| ÷ all-reduce of k×n | backward passes | kinds |"
        )
        print("|---|---:|---:|---:|---:|---:|---|")
        for name, r in res.items():
            kn = len(TASKS) * r["n"] * 4 * RING["all_reduce"](2)
            print(
                f"| {name} | {r['collectives']} ({r['async']}) | {r['sent'] / 2**20:.2f} | "
                f"{r['overlapped'] / 2**20:.2f} | {r['sent'] / kn:.2f} | {r['passes']} | "
                f"{', '.join(r['kinds'])} |"
            )
        n = next(iter(res.values()))["n"] if res else 0
        print(
            f"\nn = {n:,} shared parameters; sent per rank in a ring of R = 2 "
            "(all-reduce 2(R−1)/R of the buffer, reduce-scatter and all-gather (R−1)/R, broadcast 1)"
        )
    if not args.skip_syncs:
        names = [n for n in ALL if only is None or n in only]
        counts = sync_table(names, args.steps)
        print(f"\nhost syncs per step, toy model, 3 tasks (steps 1..{args.steps})\n")
        print("| strategy | first step | steady state |")
        print("|---|---:|---:|")
        for name, c in counts.items():
            print(f"| {name} | {c[0]} | {c[-1]} |")


if __name__ == "__main__":
    main()
