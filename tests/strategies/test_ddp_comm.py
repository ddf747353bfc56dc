"""Per-task-gradient strategies under DDP: what crosses the ranks, when, and how many host syncs.

Two gloo processes on the toy model (``comm_worker.py``) must equal one process on the union of their
batches, with the rows' collectives launched asynchronously during the per-task backward passes and
a Gramian aggregator sending less than one all-reduce of the ``k × n`` rows. On one process, a
``TorchDispatchMode`` that emulates the device counts the host syncs of a step.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import comm_worker
import pytest
import torch
from comm_log import RING
from sync_counter import HostSyncs
from torchjd.aggregation import MGDA as TorchjdMGDA
from torchjd.aggregation import UPGrad
from toy import one_torch_thread, setup, step  # noqa: F401

from mtl.strategies import DBMTL, FAMO, SAM, FixedWeights, FlatMTL, GradientAggregation, GradNorm
from mtl.strategies.adaptive import DynamicWeightAverage, RandomLossWeighting, UncertaintyWeighting
from mtl.strategies.aggregators import MGDA, CAGrad

NAMES = list(comm_worker.MAKERS)
K = comm_worker.K


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict[str, dict]:
    """Every strategy of :data:`comm_worker.MAKERS` run on 2 gloo ranks (rank 0's record)."""
    out = tmp_path_factory.mktemp("ddp_comm")
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2")
    env["OMP_NUM_THREADS"] = "1"
    procs = [
        subprocess.Popen(
            [sys.executable, comm_worker.__file__, str(out), ",".join(NAMES)],
            env=dict(env, RANK=str(r)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-4000:]
    return {n: torch.load(out / f"{n}.pt") for n in NAMES}


# DB-MTL's rows are gradients of log L_t on each rank's batch: the mean over the ranks of ∇L_r / L_r is
# not ∇L / L of the union (its reference, LibMTL, has no DDP either), so it is left out here.
@pytest.mark.parametrize("name", [n for n in NAMES if n != "dbmtl"])
def test_two_ranks_equal_one_process_on_the_union(two_ranks, name):
    ddp, single = two_ranks[name], comm_worker.run(name)
    for k, v in single["params"].items():
        assert torch.allclose(ddp["params"][k], v, atol=1e-6, rtol=1e-5), (name, k)
        for other in ddp["params_other_ranks"]:
            assert torch.equal(other[k], ddp["params"][k]), f"{name}: ranks disagree on {k}"
    for t, w in single["weights"].items():
        assert ddp["weights"][t] == pytest.approx(w, rel=1e-5, abs=1e-7), (name, t)


def _row_collectives_during_the_passes(events: list[tuple], n: int) -> list[tuple]:
    """The collectives of at least one row (``n`` floats) launched before the step's last backward pass."""
    last = max(i for i, e in enumerate(events) if e[0] == "grad")
    return [e for e in events[:last] if e[0] != "grad" and e[1] >= 4 * n]


@pytest.mark.parametrize("name", ["upgrad", "mgda_heads", "dbmtl", "fmtl"])
def test_rows_are_reduced_asynchronously_during_the_per_task_passes(two_ranks, name):
    rec = two_ranks[name]
    for events in rec["events"]:
        early = _row_collectives_during_the_passes(events, rec["n_shared"])
        # rows 0..k-2 go while the next tasks' backward passes run (F-MTL: twice, clean and flat)
        assert len(early) >= K - 1, (name, events)
        assert all(async_op for _, _, async_op in early), (name, events)
        rows = [e for e in events if e[0] in ("all_reduce", "reduce_scatter") and e[1] >= 4 * rec["n_shared"]]
        assert all(async_op for _, _, async_op in rows), f"{name}: rows reduced synchronously: {rows}"


@pytest.mark.parametrize("name", ["upgrad", "mgda_heads"])
def test_gramian_aggregators_send_less_than_an_all_reduce_of_the_rows(two_ranks, name):
    """Reduce-scatter of the rows + all-gather of ``wᵀJ̄``: ``(k+1)/(2k)`` of the all-reduce's traffic."""
    rec = two_ranks[name]
    n_total = sum(v.numel() for k, v in rec["params"].items())
    for events in rec["events"]:
        kinds = {e[0] for e in events if e[0] != "grad"}
        assert "reduce_scatter" in kinds and "all_gather" in kinds, (name, events)
        sent = sum(e[1] * RING[e[0]](2) for e in events if e[0] != "grad")
        rows = K * rec["n_shared"] * 4 * RING["all_reduce"](2)
        heads = (n_total - rec["n_shared"]) * 4 * RING["all_reduce"](2)
        # (k + 1)/(2k) of the rows' all-reduce, plus the heads and k × k-sized messages
        assert sent <= (K + 1) / (2 * K) * rows + heads + 1024, (name, sent, rows)


# ------------------------------------------------------------------ host syncs (one process)
AGGREGATORS = {
    "upgrad": lambda: GradientAggregation(aggregator=UPGrad()),
    "upgrad_rep": lambda: GradientAggregation(aggregator=UPGrad(), rep_grad=True),
    "upgrad_gramian": lambda: GradientAggregation(aggregator=UPGrad(), gramian_only=True),
    "mgda": lambda: GradientAggregation(aggregator=MGDA()),
    "torchjd_mgda": lambda: GradientAggregation(aggregator=TorchjdMGDA()),
    "cagrad": lambda: GradientAggregation(aggregator=CAGrad(c=0.4)),
    "mgda_heads": lambda: GradientAggregation(aggregator=MGDA(), task_weighted_heads=True),
    "dbmtl": lambda: DBMTL(),
    "sam": lambda: SAM(rho=0.05),
}
ONE_BACKWARD = {
    "ew": lambda: FixedWeights(),
    "uw": lambda: UncertaintyWeighting(),
    "dwa": lambda: DynamicWeightAverage(),
    "rlw": lambda: RandomLossWeighting(),
    "famo": lambda: FAMO(),
    "gradnorm": lambda: GradNorm(),
}


def count_syncs(strategy, steps: int = 2) -> list[int]:
    """Host syncs of each of ``steps`` toy steps (forward, backward, after_step)."""
    module, batch = setup(strategy, k=K)
    counts = []
    for _ in range(steps):
        seeds = (module.model.parameters(), batch.values(), strategy.buffers(), strategy.parameters())
        with HostSyncs(*seeds) as syncs:
            step(strategy, module, batch)
            strategy.after_step(batch, module=module, losses=strategy.forward(batch, module=module).losses)
        counts.append(syncs.count)
        assert syncs.count == len(syncs.where)
    return counts


def test_the_counter_sees_the_syncs_a_gpu_would():
    x = torch.ones(3)
    with HostSyncs([x]) as syncs:
        y = x * 2
        float(y.sum())  # 1: a device value read
        w = y.cpu()  # 2: a device-to-host copy
        float(w[0]), w.tolist()  # host reads: free
        torch.ones(3).to(x.device)  # 3: a blocking host-to-device copy
        torch.ones(3).to(x.device, non_blocking=True)  # no sync
        torch.full((3,), 1.0, device=x.device).sum().item()  # 4: device scalar read
    assert syncs.count == 4, syncs.where


@pytest.mark.parametrize("name", list(AGGREGATORS))
def test_a_gradient_aggregation_step_syncs_once(name):
    """The step's one sync: the Gramian (with the finite flags) copied to the host for the solver.
    The Gramian-only mode's first step also checks torchjd's autogram Gramian against the polarised
    one (a one-time cost of a few reads)."""
    counts = count_syncs(AGGREGATORS[name](), steps=3)
    assert counts[1:] == [1, 1], counts
    assert counts[0] == 1 or (name == "upgrad_gramian" and counts[0] <= 3), counts


def test_fmtl_syncs_once_per_gramian():
    assert count_syncs(FlatMTL(aggregator=CAGrad(c=0.4), rho=0.05)) == [2, 2]


@pytest.mark.parametrize("name", list(ONE_BACKWARD))
def test_loss_weightings_do_not_sync_in_the_steady_state(name):
    """Logged weights stay on the device; a counter buffer is read once, then mirrored on the host."""
    assert count_syncs(ONE_BACKWARD[name](), steps=3)[1:] == [0, 0]


def test_logged_weights_are_device_scalars():
    strategy = GradientAggregation(aggregator=UPGrad(), diagnostics_every=1)
    module, batch = setup(strategy, k=K)
    logs = step(strategy, module, batch)
    for t in module.tasks:
        assert isinstance(logs[f"{t}/weight"], torch.Tensor) and logs[f"{t}/weight"].dim() == 0
        assert isinstance(logs[f"grad/{t}/weight"], torch.Tensor)
    assert isinstance(strategy.last_weights, torch.Tensor)
