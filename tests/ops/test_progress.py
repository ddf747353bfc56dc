"""Progress reports when the output goes to a file (:mod:`mtl.progress`): periodic training lines through
Python logging, validation / test lines, rank 0 only, no host sync per step, and the exact edge
evaluation's image counter."""

from __future__ import annotations

import logging
import re

import lightning as L
import numpy as np
import pytest
import torch

import mtl.progress as progress
from mtl.host_syncs import SyncsPerStep
from mtl.metrics.edge_eval import SEISMEdgeF
from mtl.metrics.morphology import seg2bmap, thin
from mtl.pipeline import train
from mtl.progress import Progress, ProgressLog, progress_bar_enabled

LOGGER = "mtl.progress"
CALLBACK = "++callbacks.progress._target_=mtl.progress.ProgressLog"  # '++': also when the defaults hold one
QUICK = ["logger=none", "module.log_images=false", "+trainer.enable_progress_bar=false"]


def lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


@pytest.fixture
def no_tty(monkeypatch):
    """Standard output is a file (SLURM, nohup)."""
    monkeypatch.setattr(progress, "stdout_is_tty", lambda: False)


# ------------------------------------------------------------------------------- training lines
def test_training_writes_step_loss_eta_lines_and_the_test_counts_edge_images(make_cfg, caplog, no_tty):
    """Non-TTY (``mode: auto``): a line every 2 optimiser steps with epoch, step, per-task losses,
    throughput and ETA; the headline metrics after every validation; the test pass (``test=true``:
    exact SEISM odsF) reports its batches and the edge evaluation its images done / total."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    cfg = make_cfg(
        [
            *QUICK,
            CALLBACK,
            "++callbacks.progress.every_n_steps=2",
            "++callbacks.progress.every_n_seconds=0",
            "trainer.max_epochs=2",
            "trainer.log_every_n_steps=1",
            "test=true",
            "++eval.edge.workers=0",
            "++eval.edge.progress_interval=0.000001",  # a line per image
        ]
    )
    _, objects = train(cfg)
    out = lines(caplog)
    text = "\n".join(out)
    assert out[0].startswith("training: 8 optimiser steps, 2 epochs of 4 batches, 1 process(es)"), text

    train_lines = [m for m in out if m.startswith("train epoch")]
    steps = [int(re.search(r" step (\d+)/8 ", m).group(1)) for m in train_lines]
    assert steps == [1, 3, 5, 7], text  # the first step, then every 2 steps
    assert [m.split(" step")[0] for m in train_lines] == ["train epoch 1/2"] * 2 + ["train epoch 2/2"] * 2
    for m in train_lines:
        assert re.search(r"loss semseg \S+ depth \S+ normals \S+ edge \S+ \|", m), m
        assert re.search(r"\| [\d.]+ img/s \| elapsed \d:\d\d:\d\d \| ETA (\d:\d\d:\d\d|\?)$", m), m
    assert all(re.search(r"ETA \d:\d\d:\d\d$", m) for m in train_lines), text  # the rate is known at once
    assert "(88%)" in train_lines[-1]  # step 7 of 8 is batch 3 of 4 in epoch 2: (4 + 3) / 8

    val_lines = [m for m in out if m.startswith("validation epoch")]
    assert [m.split(" (")[0] for m in val_lines] == [
        "validation epoch 1/2 step 4",
        "validation epoch 2/2 step 8",
    ]
    for m in val_lines:
        assert "val/loss=" in m and "val/semseg/miou=" in m and "val/edge/f=" in m, m
    assert any(m.startswith("training done: step 8") for m in out), text

    # the test pass: 8 validation images in one batch, each image counted by the SEISM metric
    assert "test: 1 batches (8 images on this process) on 1 process(es)" in out, text
    assert "edge odsF (SEISM): evaluating 8 images, in-process" in out, text
    counted = [
        int(re.match(r"edge odsF \(SEISM\): (\d+)/8 images", m).group(1)) for m in out if "/8 images" in m
    ]
    assert counted == list(range(1, 9)), text
    assert any(re.match(r"edge odsF \(SEISM\): done, 8 images in \d:\d\d:\d\d$", m) for m in out), text
    assert any(m.startswith("test done in ") for m in out), text
    assert objects["trainer"].callback_metrics["test/edge/odsf"] >= 0


def test_ranks_other_than_zero_write_nothing(make_cfg, caplog, no_tty, monkeypatch):
    """A simulated rank 1: the callback and the edge counter stay silent."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    monkeypatch.setattr(L.Trainer, "is_global_zero", property(lambda self: False))
    monkeypatch.setattr(progress, "_process_rank", lambda: 1)
    cfg = make_cfg(
        [
            *QUICK,
            CALLBACK,
            "++callbacks.progress.every_n_steps=1",
            "trainer.max_epochs=1",
            "trainer.max_steps=3",
        ]
    )
    train(cfg)
    assert lines(caplog) == []
    metric = SEISMEdgeF(max_dist=0.011, workers=0, progress="always", progress_interval=1e-6)
    metric.expect_images(2)
    metric.update(*_edge_batch(2))
    metric.compute()
    assert lines(caplog) == []


def test_modes_and_the_progress_bar(monkeypatch, caplog):
    """``auto`` on a terminal: Lightning's bar, no lines; ``always``: lines and no bar; ``never``:
    the bar; a wrong mode names the config key."""
    monkeypatch.setattr(progress, "stdout_is_tty", lambda: True)
    assert not ProgressLog().active and progress_bar_enabled([ProgressLog()])
    assert ProgressLog(mode="always").active and not progress_bar_enabled([ProgressLog(mode="always")])
    assert progress_bar_enabled([ProgressLog(mode="never")]) and progress_bar_enabled([])
    monkeypatch.setattr(progress, "stdout_is_tty", lambda: False)
    assert ProgressLog().active and not ProgressLog(mode="never").active
    with pytest.raises(ValueError, match=r"callbacks.progress.mode = 'sometimes'.*auto, always, never"):
        ProgressLog(mode="sometimes")
    with pytest.raises(ValueError, match=r"callbacks.progress.every_n_steps = -1"):
        ProgressLog(every_n_steps=-1)
    with pytest.raises(ValueError, match=r"eval.edge.progress = 'loud'"):
        SEISMEdgeF(progress="loud")
    assert progress.format_duration(3725.4) == "1:02:05" and progress.format_duration(None) == "?"


def test_tty_run_writes_no_line(make_cfg, caplog, monkeypatch):
    """On a terminal the run keeps Lightning's bar and the callback does nothing."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    monkeypatch.setattr(progress, "stdout_is_tty", lambda: True)
    cfg = make_cfg(
        ["logger=none", "module.log_images=false", CALLBACK, "trainer.max_epochs=1", "trainer.max_steps=2"]
    )
    _, objects = train(cfg)
    assert lines(caplog) == []
    assert objects["trainer"].progress_bar_callback is not None  # today's bar


# ------------------------------------------------------------------------------- host syncs
def syncs_per_step(objects) -> tuple[list[int], SyncsPerStep]:
    (cb,) = [c for c in objects["trainer"].callbacks if isinstance(c, SyncsPerStep)]
    return cb.per_step[cb.warmup :], cb


def test_progress_lines_add_no_host_sync(make_cfg, caplog):
    """A line after every step (the worst case) costs the step no host sync: the same count per
    step as the same run without lines, and no sync is asked from mtl/progress.py."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    steps = [
        *QUICK,
        CALLBACK,
        "+trainer.limit_val_batches=0",
        "trainer.max_epochs=1",
        "trainer.max_steps=6",
        "data.dataset.length=24",
        "trainer.log_every_n_steps=100",
        "+callbacks.host_syncs._target_=mtl.host_syncs.SyncsPerStep",
        "+callbacks.host_syncs.warmup=2",
    ]
    _, without = train(make_cfg([*steps, "++callbacks.progress.mode=never"]))
    assert lines(caplog) == []
    every_step = ["++callbacks.progress.mode=always", "++callbacks.progress.every_n_steps=1"]
    _, with_lines = train(make_cfg([*steps, *every_step]))
    base, _ = syncs_per_step(without)
    counted, cb = syncs_per_step(with_lines)
    assert len(counted) >= 3 and counted == base, (counted, base, cb.counter.by_site)
    assert not any("progress.py" in site for site in cb.counter.by_site), cb.counter.by_site
    train_lines = [m for m in lines(caplog) if m.startswith("train epoch")]
    assert len(train_lines) == 6 and all("loss semseg" in m for m in train_lines), train_lines


# ------------------------------------------------------------------------------- exact edge evaluation
def _edge_batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` 40 × 48 images: a square's boundary, predicted shifted by one pixel per image."""
    seg = np.zeros((40, 48), dtype=np.int64)
    seg[10:30, 12:36] = 1
    gt = torch.from_numpy(thin(seg2bmap(seg)).astype(np.float32))
    target = gt.expand(n, 1, 40, 48).clone()
    logits = torch.stack([torch.roll(gt, i, dims=1) for i in range(n)])[:, None] * 12 - 6
    return logits, target


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_edge_evaluation_counts_images_in_log_lines(caplog, workers):
    caplog.set_level(logging.INFO, logger=LOGGER)
    metric = SEISMEdgeF(max_dist=0.011, workers=workers, start_method="fork", progress="always")
    metric.progress.interval = 1e-9  # a line per image
    metric.expect_images(5)
    logits, target = _edge_batch(5)
    metric.update(logits[:3], target[:3])
    metric.update(logits[3:], target[3:])
    scores = metric.compute()
    out = lines(caplog)
    where = "in-process" if workers == 0 else f"{workers} worker processes"
    assert out[0] == f"edge odsF (SEISM): evaluating 5 images, {where}", out
    counted = [int(re.match(r"edge odsF \(SEISM\): (\d)/5 images \(\d+%\)", m).group(1)) for m in out[1:-1]]
    assert counted == [1, 2, 3, 4, 5], out
    assert re.search(r"\| [\d.]+ images/s \| elapsed \d:\d\d:\d\d \| ETA 0:00:00$", out[-2]), out
    assert re.match(r"edge odsF \(SEISM\): done, 5 images in \d:\d\d:\d\d$", out[-1]), out
    assert int(metric.n_images) == 5 and 0 < float(scores["odsf"]) <= 1


def test_edge_evaluation_shows_a_bar_on_a_terminal(caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger=LOGGER)
    monkeypatch.setattr(progress, "stdout_is_tty", lambda: True)
    metric = SEISMEdgeF(max_dist=0.011, workers=0)
    metric.expect_images(4)
    metric.update(*_edge_batch(4))
    bar = metric.progress._bar
    assert bar is not None and (bar.n, bar.total) == (4, 4)
    metric.compute()
    assert metric.progress._bar is None and lines(caplog) == []


def test_progress_without_a_total_counts_and_has_no_eta(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    p = Progress("job", mode="always", interval=1e-9, unit="items")
    p.update(3)
    p.close()
    assert lines(caplog)[0] == "job: evaluating items"
    assert re.match(r"job: 3 items \| [\d.]+ items/s \| elapsed 0:00:00 \| ETA \?$", lines(caplog)[1])
    assert lines(caplog)[2] == "job: done, 3 items in 0:00:00"
