"""DDP equivalence: 2 CPU processes (gloo) == 1 process on the union of their batches."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import ddp_worker
import pytest
import torch
from toy import one_torch_thread  # noqa: F401

STRATEGIES = ["ew", "uw", "cagrad", "upgrad", "upgrad_gramian", "mgda_ub", "fmtl"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_equal_one_process_on_the_union(tmp_path: Path):
    env = dict(
        os.environ,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        WORLD_SIZE="2",
        NODE_RANK="0",
        OMP_NUM_THREADS="1",
        PL_DISABLE_FORK="1",
    )
    worker = str(Path(ddp_worker.__file__))
    procs = [
        subprocess.Popen(
            [sys.executable, worker, str(tmp_path), ",".join(STRATEGIES)],
            env=dict(env, LOCAL_RANK=str(r), RANK=str(r)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-4000:]
    for name in STRATEGIES:
        ddp = torch.load(tmp_path / f"{name}.pt")
        single = ddp_worker.run(name, devices=1, batch_size=2 * ddp_worker.BATCH)
        init = ddp_worker.build(name).model.state_dict()
        moved = max(float((single[k] - init[k]).abs().max()) for k in single if single[k].is_floating_point())
        assert moved > 1e-3, f"{name}: the parameters did not move"
        worst = max(float((ddp[k] - single[k]).abs().max()) for k in single if single[k].is_floating_point())
        assert worst < 1e-5, f"{name}: DDP and single-process parameters differ by {worst:.2e}"
