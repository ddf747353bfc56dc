"""Fault injection: checkpoints and run history.

One writer of ``last.ckpt`` (always the latest state, never a ``last-v1.ckpt``); a kill during a
checkpoint write keeps the previous ``last.ckpt`` loadable and resumable; truncated, foreign and
non-checkpoint files are refused with errors that name them and say what to do; a resumed run
continues its loggers' histories; ``merge.py ckpts=a.ckpt`` without brackets; a resume with another
batch size trains on exactly the samples the interrupted epoch had left.
"""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mtl.callbacks import SimulatedCrash
from mtl.checkpoint import CheckpointReadError, read_checkpoint
from mtl.loggers import CSVLogger, TensorBoardLogger, previous_wandb_run_id, resume_loggers
from mtl.merging.run import checkpoint_list
from mtl.pipeline import evaluate, train

ROOT = Path(__file__).resolve().parents[2]
# 16 samples, batch 4: 4 optimiser steps per epoch; a validation at every epoch end
BASE = [
    "logger=none",
    "module.log_images=false",
    "callbacks.lr_monitor=null",
    "+trainer.enable_progress_bar=false",
]


def _ckpts(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize(("length", "final"), [("trainer.max_epochs=2", 8), ("trainer.max_steps=5", 5)])
def test_one_writer_of_last_ckpt_holds_the_final_state(make_cfg, tmp_path, length, final):
    """A periodic save (step 3) comes before the first validation (step 4): still one last.ckpt,
    rewritten after the validation and at the end (step 5: no validation follows)."""
    cfg = make_cfg([*BASE, length, "callbacks.periodic_checkpoint.every_n_steps=3"])
    _, objects = train(cfg)
    assert objects["trainer"].global_step == final
    folder = tmp_path / "checkpoints"
    assert _ckpts(folder) == ["best.ckpt", "last.ckpt"]  # no last-v1.ckpt, no .tmp
    last = read_checkpoint(folder / "last.ckpt")
    assert last["global_step"] == final
    # written after ModelCheckpoint: it knows best.ckpt (a resume keeps the best-model bookkeeping)
    state = next(v for k, v in last["callbacks"].items() if k.startswith("ModelCheckpoint"))
    assert state["best_model_path"] == str(folder / "best.ckpt")


def test_a_second_writer_of_last_ckpt_is_refused(make_cfg):
    cfg = make_cfg([*BASE, "trainer.max_steps=1", "callbacks.model_checkpoint.save_last=true"])
    with pytest.raises(ValueError, match="two writers of .*last.ckpt.*save_last=false"):
        train(cfg)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_resume_continues_the_csv_history(make_cfg, tmp_path):
    """Crash at step 3 (last.ckpt at step 2), resume to step 8: metrics.csv holds every step once."""
    log = ["logger=csv", "trainer.log_every_n_steps=1", "callbacks.periodic_checkpoint.every_n_steps=2"]
    crash = ["+callbacks.crash._target_=mtl.callbacks.CrashAt", "+callbacks.crash.step=3"]
    with pytest.raises(SimulatedCrash):
        train(make_cfg([*BASE, *log, "trainer.max_epochs=2", *crash]))
    metrics = tmp_path / "csv" / "metrics.csv"
    before = [r for r in _rows(metrics) if r.get("train/loss")]
    assert [int(r["step"]) for r in before] == [0, 1, 2]  # step 2 is after the checkpoint
    train(make_cfg([*BASE, *log, "trainer.max_epochs=2", "ckpt_path=last"]))
    rows = _rows(metrics)
    train_steps = [int(r["step"]) for r in rows if r.get("train/loss")]
    assert train_steps == list(range(8)), train_steps  # the first part kept, the replayed step once
    assert [r["train/loss"] for r in rows if r.get("train/loss")][:2] == [r["train/loss"] for r in before[:2]]
    assert sorted(int(r["epoch"]) for r in rows if r.get("val/loss")) == [0, 1]


def test_fresh_run_moves_the_earlier_history_aside(tmp_path):
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "metrics.csv").write_text("epoch,step,train/loss\n0,0,1.0\n")
    logger = CSVLogger(save_dir=tmp_path, name="csv", version="")
    resume_loggers([logger], None)
    logger.log_metrics({"train/loss": 2.0}, step=0)
    logger.save()
    assert (tmp_path / "csv" / "metrics.1.csv").read_text() == "epoch,step,train/loss\n0,0,1.0\n"
    assert [r["train/loss"] for r in _rows(tmp_path / "csv" / "metrics.csv")] == ["2.0"]


def test_tensorboard_and_wandb_continue_their_run(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for start, stop, resume in ((0, 20, None), (12, 15, 12)):  # crashed at 20, resumed from step 12
        tb = TensorBoardLogger(save_dir=tmp_path / "tb", name=None, version="")
        resume_loggers([tb], resume)
        for step in range(start, stop):
            tb.log_metrics({"x": float(step + (100 if resume else 0))}, step=step)
        tb.finalize("success")
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    seen = [(e.step, e.value) for e in events.Scalars("x")]
    assert seen == [(s, float(s)) for s in range(12)] + [(s, float(s + 100)) for s in range(12, 15)]
    wandb_dir = tmp_path / "wandb"
    (wandb_dir / "offline-run-20250101_000000-abc123").mkdir(parents=True)
    os.symlink("offline-run-20250101_000000-abc123", wandb_dir / "latest-run")
    assert previous_wandb_run_id(wandb_dir) == "abc123"
    assert previous_wandb_run_id(tmp_path / "nowhere") is None


def _save_cut_short(real_save):
    def save(obj, f, *args, **kwargs):
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise SimulatedCrash("killed during the checkpoint write")

    return save


def test_kill_during_a_checkpoint_write_keeps_the_previous_last_ckpt(make_cfg, tmp_path, monkeypatch):
    train(make_cfg([*BASE, "trainer.max_epochs=1"]))
    folder = tmp_path / "checkpoints"
    assert read_checkpoint(folder / "last.ckpt")["global_step"] == 4
    with monkeypatch.context() as m:
        m.setattr(torch, "save", _save_cut_short(torch.save))
        resume = [
            *BASE,
            "trainer.max_epochs=2",
            "ckpt_path=last",
            "callbacks.periodic_checkpoint.every_n_steps=1",
        ]
        with pytest.raises(SimulatedCrash):
            train(make_cfg(resume))
    assert read_checkpoint(folder / "last.ckpt")["global_step"] == 4  # untouched by the cut-short write
    with pytest.raises(CheckpointReadError, match="truncated"):
        read_checkpoint(folder / "last.ckpt.tmp")  # the half-written file, left where the kill found it
    _, objects = train(make_cfg(resume))  # the leftover .tmp is no obstacle
    assert objects["trainer"].global_step == 8
    assert read_checkpoint(folder / "last.ckpt")["global_step"] == 8
    assert not list(folder.glob("*.tmp"))


def test_truncated_last_ckpt_names_the_file_and_the_way_out(make_cfg, tmp_path):
    train(make_cfg([*BASE, "trainer.max_epochs=1"]))
    last = tmp_path / "checkpoints" / "last.ckpt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])  # as a kill during a non-atomic write leaves it
    with pytest.raises(CheckpointReadError) as err:
        train(make_cfg([*BASE, "trainer.max_epochs=2", "ckpt_path=last"]))
    msg = str(err.value)
    assert str(last) in msg and "truncated" in msg and "best.ckpt" in msg


def test_eval_names_a_file_that_is_not_a_checkpoint(make_cfg, tmp_path):
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(CheckpointReadError, match=r"notes\.ckpt' is not a PyTorch checkpoint"):
        evaluate(make_cfg([f"ckpt_path={text}"], config_name="eval"))
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(
        CheckpointReadError, match=r"empty\.ckpt' is not a PyTorch checkpoint \(an empty file"
    ):
        evaluate(make_cfg([f"ckpt_path={empty}"], config_name="eval"))


def test_objects_beyond_weights_need_an_explicit_trust(make_cfg, tmp_path):
    """weights_only loading: a file with other Python objects is refused unless ckpt_trusted=true."""
    path = tmp_path / "foreign.ckpt"
    torch.save(
        {"state_dict": {"model.foo": torch.zeros(1)}, "hyper_parameters": OmegaConf.create({"a": 1})}, path
    )
    with pytest.raises(CheckpointReadError, match=r"omegaconf\.dictconfig\.DictConfig.*ckpt_trusted=true"):
        evaluate(make_cfg([f"ckpt_path={path}"], config_name="eval"))
    with pytest.raises(ValueError, match="does not match the configured model"):  # read, then checked
        evaluate(make_cfg([f"ckpt_path={path}", "ckpt_trusted=true"], config_name="eval"))


def test_checkpoints_of_train_load_weights_only(make_cfg, tmp_path):
    train(make_cfg([*BASE, "trainer.max_epochs=1"]))
    for name in ("last.ckpt", "best.ckpt"):
        ckpt = torch.load(tmp_path / "checkpoints" / name, weights_only=True)  # no pickled objects
        assert ckpt["global_step"] == 4


def test_merge_ckpts_accepts_one_path_without_brackets(tmp_path):
    assert checkpoint_list("a.ckpt") == ["a.ckpt"]
    assert checkpoint_list("a.ckpt, b.ckpt") == ["a.ckpt", "b.ckpt"]
    assert checkpoint_list(OmegaConf.create({"c": ["a.ckpt", "b.ckpt"]}).c) == ["a.ckpt", "b.ckpt"]
    with pytest.raises(TypeError, match="ckpts must be a checkpoint path.*got int 5"):
        checkpoint_list(5)
    with pytest.raises(TypeError, match="every entry must be a path"):
        checkpoint_list([1, 2])
    with pytest.raises(ValueError, match="ckpts is empty"):
        checkpoint_list(" , ")
    missing = tmp_path / "a.ckpt"
    out = subprocess.run(
        [sys.executable, "merge.py", f"ckpts={missing}", f"hydra.run.dir={tmp_path / 'merge'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HYDRA_FULL_ERROR": "1"},
    )
    assert out.returncode != 0
    assert f"checkpoint '{missing}' does not exist" in out.stderr, out.stderr[-2000:]


def test_loader_resumes_after_the_same_samples_with_another_batch_size(make_cfg):
    from mtl.pipeline import build_datamodule

    dm = build_datamodule(make_cfg(["data.batch_size=2"]))
    dm.setup("fit")
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(1)
    order = [i for i, _ in loader.sampler]
    saved = {"epoch": 1, "batches": 2, "world_size": 1, "batch_size": 4, "samples": 8}  # 2 batches of 4
    with pytest.warns(
        UserWarning, match=r"batch size 4 per rank \(data.batch_size\), this run uses 2.*after the 8"
    ):
        loader.load_state_dict(saved)
    assert [i for i, _ in loader.sampler] == order[8:]  # exactly the samples the epoch had left
    loader.progress = lambda: 2 + 2  # the trainer's count: 2 restored batches of 4, then 2 batches of 2
    assert loader.state_dict()["samples"] == 8 + 2 * 2


def test_resume_with_another_batch_size_trains_on_the_rest_of_the_epoch(make_cfg, tmp_path):
    crash = ["+callbacks.crash._target_=mtl.callbacks.CrashAt", "+callbacks.crash.step=2"]
    periodic = ["trainer.max_epochs=1", "callbacks.periodic_checkpoint.every_n_steps=1"]
    with pytest.raises(SimulatedCrash):
        train(make_cfg([*BASE, *periodic, *crash]))  # batch size 4: 8 of the 16 samples trained on
    with pytest.warns(UserWarning, match="batch size 4 per rank"):
        _, objects = train(make_cfg([*BASE, *periodic, "ckpt_path=last", "data.batch_size=2"]))
    assert objects["trainer"].global_step == 2 + 4  # the 8 samples left, in batches of 2
    state = read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["MTLDataModule"]["train_loader"]
    assert state["batch_size"] == 2 and (state["samples"] == -1 or state["samples"] >= 16)
