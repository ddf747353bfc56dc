"""Two-rank worker for ``test_ddp_comm.py``: toy-model steps of per-task-gradient strategies.

Run as ``python comm_worker.py OUT_DIR name,name,...`` with ``MASTER_ADDR``, ``MASTER_PORT``,
``RANK`` and ``WORLD_SIZE`` set (gloo, CPU); in-process, :func:`run` with ``world = 1`` is the
single process on the union of the ranks' batches. Each rank takes a contiguous half of the toy
batch (mean losses over equal halves: the union's loss is the mean of the ranks' losses).
Writes ``OUT_DIR/<name>.pt`` (rank 0): the parameters after :data:`STEPS` SGD steps, the last
step's task weights and the collectives / backward passes of every step (:class:`CommLog`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))

from comm_log import CommLog  # noqa: E402
from torchjd.aggregation import UPGrad  # noqa: E402
from toy import ToyModule, ToyNet, toy_batch  # noqa: E402

from mtl.strategies import DBMTL, SAM, FlatMTL, GradientAggregation  # noqa: E402
from mtl.strategies.aggregators import MGDA, CAGrad  # noqa: E402

K, N, STEPS, LR = 3, 8, 2, 0.1

MAKERS = {
    "upgrad": lambda: GradientAggregation(aggregator=UPGrad()),
    "mgda_heads": lambda: GradientAggregation(aggregator=MGDA(), task_weighted_heads=True),
    "upgrad_rep": lambda: GradientAggregation(aggregator=UPGrad(), rep_grad=True),
    "upgrad_gramian": lambda: GradientAggregation(aggregator=UPGrad(), gramian_only=True),
    "dbmtl": lambda: DBMTL(),
    "fmtl": lambda: FlatMTL(aggregator=CAGrad(c=0.4), rho=0.05),
    "sam": lambda: SAM(rho=0.05),
}


def run(name: str, rank: int = 0, world: int = 1) -> dict:
    """:data:`STEPS` SGD steps of strategy ``name`` on rank ``rank``'s part of the toy batch."""
    module = ToyModule(ToyNet(K))
    strategy = MAKERS[name]()
    strategy.setup(tasks=module.tasks, module=module)
    full = toy_batch(K, n=N)
    part = N // world
    batch = {k: v[rank * part : (rank + 1) * part] for k, v in full.items()}
    params = list(module.model.parameters())
    logs = {}
    with CommLog() as log:
        for _ in range(STEPS):
            for p in params:
                p.grad = None
            step = strategy.forward(batch, module=module)
            logs = strategy.backward(step, module=module, batch=batch)
            log.step()
            with torch.no_grad():
                for p in params:
                    p.sub_(LR * p.grad)
    weights = {k: float(v) for k, v in logs.items() if k.endswith("/weight")}
    n_shared = sum(p.numel() for p in module.model.shared_parameters())
    return {
        "params": {k: v.detach().clone() for k, v in module.model.state_dict().items()},
        "weights": weights,
        "events": [log.step_events(i) for i in range(STEPS)],
        "n_shared": n_shared,
    }


if __name__ == "__main__":
    out, names = Path(sys.argv[1]), sys.argv[2].split(",")
    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {n: run(n, rank, world) for n in names}
    gathered = [None] * world
    dist.all_gather_object(gathered, {n: r["params"] for n, r in results.items()})
    if rank == 0:
        for n, r in results.items():
            r["params_other_ranks"] = [g[n] for g in gathered[1:]]
            torch.save(r, out / f"{n}.pt")
    dist.destroy_process_group()
