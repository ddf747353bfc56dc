"""Failure handling: non-finite losses, out-of-memory messages, config errors before any data."""

from __future__ import annotations

import pytest
import torch

import mtl.pipeline as pipeline
from mtl.config_check import ConfigError
from mtl.guards import NonFiniteLossError
from mtl.module import MTLModule
from mtl.pipeline import train
from mtl.tasks.depth import Depth

BASE = ["logger=none", "trainer.max_epochs=1", "module.log_images=false", "+trainer.limit_val_batches=0"]


@pytest.fixture
def nan_depth_at(monkeypatch):
    """Makes the depth loss NaN on the given training steps (counted over calls while training)."""

    def _set(steps: set[int]) -> list[int]:
        calls: list[int] = []
        original = Depth.loss

        def loss(self, pred, batch):
            out = original(self, pred, batch)
            calls.append(len(calls))
            return out * float("nan") if len(calls) - 1 in steps else out

        monkeypatch.setattr(Depth, "loss", loss)
        return calls

    return _set


def test_nonfinite_loss_skips_the_batch_and_names_task_and_step(make_cfg, nan_depth_at):
    nan_depth_at({1})
    with pytest.warns(UserWarning, match=r"non-finite loss in depth at step 1 \(epoch 0, batch 1\)"):
        _, objects = train(make_cfg(BASE + ["module.nonfinite.max_skips=2"]))
    module = objects["module"]
    assert module.skipped == 1
    assert objects["trainer"].global_step == 3  # 4 batches, one skipped: no update for it
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_nonfinite_loss_stops_with_a_resumable_checkpoint(make_cfg, nan_depth_at, tmp_path):
    nan_depth_at({2})
    with pytest.raises(NonFiniteLossError, match="depth at step 2") as err:
        train(make_cfg(BASE + ["module.nonfinite.max_skips=0"]))
    assert "last.ckpt" in str(err.value) and "optimizer.lr" in str(err.value)
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 2  # the last good state: two updates, none from the bad batch
    assert all(
        torch.isfinite(v).all()
        for v in saved["state_dict"].values()
        if torch.is_tensor(v) and v.is_floating_point()
    )


def test_out_of_memory_names_batch_resolution_and_knobs(make_cfg, monkeypatch):
    def oom(self, batch, batch_idx):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(MTLModule, "training_step", oom)
    with pytest.raises(torch.OutOfMemoryError) as err:
        train(make_cfg(BASE))
    msg = str(err.value)
    for part in ("data.batch_size=4", "64×64", "accumulate_grad_batches", "bf16-mixed", "grad_checkpointing"):
        assert part in msg, part
    assert "Tried to allocate 2.00 GiB" in msg


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("data.batch_size=abc", r"data.batch_size = 'abc': .*MTLDataModule' expects int"),
        ("+optimizer.weight_decy=0.1", r"optimizer.weight_decy: 'torch.optim.AdamW' has no parameter"),
        ("data.tasks=semseg", r"data.tasks = 'semseg'.*expects Sequence"),
        ("module.nonfinite.max_skips=-1", r"module.nonfinite"),
    ],
)
def test_config_mistakes_are_reported_before_any_data(make_cfg, monkeypatch, override, expected):
    def no_data(cfg):
        raise AssertionError("data was touched before the config was checked")

    if not override.startswith("module."):
        monkeypatch.setattr(pipeline, "build_datamodule", no_data)
    with pytest.raises((ConfigError, ValueError), match=expected):
        train(make_cfg(BASE + [override]))


def test_gradient_accumulation_steps_once_per_group(make_cfg):
    _, objects = train(make_cfg(BASE + ["+trainer.accumulate_grad_batches=2"]))
    trainer = objects["trainer"]
    assert trainer.accumulate_grad_batches == 1  # Lightning's flag is not used (manual optimisation)
    assert objects["module"].accumulate == 2
    assert trainer.fit_loop.epoch_loop.batch_progress.total.completed == 4
    assert trainer.global_step == 2


def test_restore_grads_sums_micro_batches():
    from mtl.optim import restore_grads, stash_grads

    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([1.0, 2.0, 3.0])
    stash = stash_grads([p])
    assert p.grad is None
    p.grad = torch.tensor([1.0, 1.0, 1.0])
    restore_grads(stash)
    assert torch.equal(p.grad, torch.tensor([2.0, 3.0, 4.0]))


def test_stop_message_says_when_no_finite_state_was_ever_saved():
    from mtl.guards import stop_message

    saved = stop_message("non-finite loss", max_skips=3, ckpt="run/checkpoints/last.ckpt")
    assert "saved at run/checkpoints/last.ckpt (resume with ckpt_path=last;" in saved and "best.ckpt" in saved
    never = stop_message("non-finite loss", max_skips=3, ckpt=None)
    assert "no checkpoint was saved" in never and "ckpt_path=last" not in never
