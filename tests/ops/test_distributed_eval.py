"""Exact distributed evaluation: under DDP every image of the split counts once, the metrics equal
the one-process ones, and rank 0 alone writes the result files.

The 2-rank runs are 2 CPU processes (gloo) started like torchrun starts them (``dist_worker.py``);
the split has an odd number of images, which a padding ``DistributedSampler`` would evaluate
one of twice.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys

import dist_worker
import pytest
import torch
from lightning.pytorch import Trainer

from mtl.data.datamodule import EvalShardSampler
from mtl.eval_steps import EvalContext

RESULT_FILES = ("results.json", "results.csv", "results.md")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(args: list[str], world: int = 2, timeout: int = 600) -> None:
    """``dist_worker.py args…`` as ``world`` DDP ranks (gloo); fails with their output."""
    env = dict(
        os.environ,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        WORLD_SIZE=str(world),
        NODE_RANK="0",
        OMP_NUM_THREADS="1",
        PL_DISABLE_FORK="1",
        WANDB_MODE="offline",
        HYDRA_FULL_ERROR="1",
    )
    procs = [
        subprocess.Popen(
            [sys.executable, dist_worker.__file__, *args],
            env=dict(env, LOCAL_RANK=str(r), RANK=str(r)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    for r, (p, out) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0, f"rank {r}:\n{out[-5000:]}"


# ----------------------------------------------------------------------------- the sampler
@pytest.mark.parametrize(("n", "world"), [(654, 4), (654, 8), (7, 2), (5, 5)])
def test_eval_shards_hold_every_sample_once(n, world):
    data = list(range(n))
    shards = [list(EvalShardSampler(data, num_replicas=world, rank=r)) for r in range(world)]
    assert sorted(i for s in shards for i in s) == data  # no padding, no duplicate
    lengths = [len(EvalShardSampler(data, num_replicas=world, rank=r)) for r in range(world)]
    assert [len(s) for s in shards] == lengths
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_eval_shards_need_a_sample_per_rank():
    with pytest.raises(ValueError, match="fewer than the 4 DDP ranks"):
        EvalShardSampler(list(range(3)), num_replicas=4, rank=0)


def test_datamodule_shards_validation_and_test_under_ddp(make_cfg):
    """Lightning keeps a DistributedSampler subclass as it is: the loaders shard without padding."""
    from mtl.pipeline import build_datamodule

    dm = build_datamodule(make_cfg(["data.split_kwargs.val.length=7", "data.eval_batch_size=2"]))
    dm.setup("validate")

    class TwoRanks:
        world_size, global_rank = 2, 1

    dm.trainer = TwoRanks()
    for loader in (dm.val_dataloader(), dm.test_dataloader()):
        assert isinstance(loader.sampler, EvalShardSampler)
        assert list(loader.sampler) == [1, 3, 5]
    whole = dm.eval_dataloader(shard=False)  # one process's view of the whole split (pictures, control)
    assert sum(b["image"].shape[0] for b in whole) == 7
    dm.trainer = None
    assert sum(b["image"].shape[0] for b in dm.val_dataloader()) == 7


# --------------------------------------------------------------------- rank 0 writes, unit
@pytest.fixture
def not_rank_zero(monkeypatch):
    monkeypatch.setattr(Trainer, "is_global_zero", property(lambda self: False))


def _ctx(make_cfg, tmp_path, overrides: list[str]) -> EvalContext:
    from mtl.pipeline import build_datamodule, build_module

    cfg = make_cfg(overrides, config_name="eval")
    dm = build_datamodule(cfg)
    dm.setup("validate")
    module = build_module(cfg, dm)
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    return EvalContext(cfg=cfg, module=module, datamodule=dm, trainer=trainer, output_dir=tmp_path / "out",
                       input_size=tuple(cfg.data.input_size))  # fmt: skip


def test_pictures_and_routing_report_are_written_by_rank_zero_only(make_cfg, tmp_path, not_rank_zero):
    from mtl.backbones.routing_report import RoutingReport
    from mtl.visualise import PredictionPictures

    ctx = _ctx(make_cfg, tmp_path, ["experiment=synthetic_m3vit", "ckpt_path=unused", *dist_worker.M3VIT])
    backbone = ctx.module.model.backbone
    backbone.reset_routing_counts()
    ctx.module.eval()
    with torch.no_grad():
        ctx.module.model.run(torch.randn(2, 3, *ctx.input_size))
    PredictionPictures(n=2).after_test(ctx)
    RoutingReport().after_test(ctx)
    assert ctx.reports["routing"]  # every rank computes the shares …
    assert not ctx.output_dir.exists()  # … and writes nothing


def test_control_files_are_written_by_rank_zero_only(make_cfg, tmp_path, not_rank_zero):
    from mtl.control.run import Control

    small = [
        "model.backbone.widths=[0.5,1.0]",
        "++model.backbone.depth=2",
        "++model.backbone.embed_dim=32",
        "++model.backbone.num_heads=2",
        "model.backbone.out_indices=[0,1]",
        "model.decoder.channels=8",
        "data.tasks=[semseg,depth]",  # an untrained model's edge F can be 0, which search() divides by
    ]
    ctx = _ctx(make_cfg, tmp_path, ["experiment=synthetic_slimmable", "ckpt_path=unused",
                                    "data.split_kwargs.val.length=2", *small])  # fmt: skip
    Control(budget=1e9, sweep=False).before_test(ctx)
    assert "encoder" in ctx.reports["control"]  # the sub-network is chosen on every rank
    assert not ctx.output_dir.exists()


def test_baseline_file_is_written_by_rank_zero_only(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from mtl.baselines import WriteBaseline

    monkeypatch.setenv("RANK", "1")
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "missing")}}})
    WriteBaseline(out_dir=str(tmp_path / "baselines")).on_multirun_end(config)  # rank 0 would raise here
    assert not (tmp_path / "baselines").exists()


# ------------------------------------------------------------------- 2 processes, end to end
def _close(a: dict[str, float], b: dict[str, float]) -> list[str]:
    """Keys whose values differ: metrics to 1e-6; losses to 1e-3 (a loss is the mean of its batches'
    means over valid pixels, and the ranks batch other images together than one process does)."""
    assert set(a) == set(b), set(a) ^ set(b)
    rel = {k: 1e-3 if k.endswith("loss") else 1e-6 for k in a}
    return [f"{k}: {a[k]} vs {b[k]}" for k in a if not math.isclose(a[k], b[k], rel_tol=rel[k], abs_tol=1e-7)]


@pytest.mark.slow
@pytest.mark.parametrize("experiment", ["synthetic_baseline", "synthetic_m3vit"])
def test_two_rank_eval_equals_one_process_and_rank_zero_writes(tmp_path, experiment):
    from mtl.pipeline import evaluate

    ckpt = dist_worker.write_checkpoint(experiment, tmp_path / "model.ckpt")
    single_dir = tmp_path / "single"
    single, objects = evaluate(dist_worker.compose_cfg(dist_worker.eval_overrides(experiment, str(ckpt), 1),
                                                       single_dir, "eval"))  # fmt: skip
    run_ranks(["eval", str(tmp_path), str(ckpt), experiment])
    rank0, rank1 = tmp_path / "rank0", tmp_path / "rank1"
    for r in range(2):  # every rank holds the pooled metrics of the whole split
        returned = json.loads((tmp_path / f"returned_rank{r}.json").read_text())
        bad = _close(returned["metrics"], single)
        assert not bad, f"rank {r} differs from one process:\n" + "\n".join(bad)
    written = json.loads((rank0 / "results.json").read_text())
    assert not _close(written, single)
    assert all((rank0 / f).is_file() for f in RESULT_FILES)
    assert len(list((rank0 / "pictures").glob("sample_*.png"))) == 2
    assert not any((rank1 / f).exists() for f in RESULT_FILES) and not (rank1 / "pictures").exists()
    if experiment == "synthetic_m3vit":  # the routing counts of both ranks' shares, summed
        assert (rank0 / "experts.json").is_file() and not (rank1 / "experts.json").exists()
        ddp = json.loads((rank0 / "experts.json").read_text())
        one = json.loads((single_dir / "experts.json").read_text())
        assert ddp.keys() == one.keys()
        for block in one:
            for task, shares in one[block].items():
                assert ddp[block][task] == pytest.approx(shares, abs=1e-12), (block, task)
