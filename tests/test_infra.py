"""Atomic checkpoints, W&B offline fallback, schedules, transforms."""

import numpy as np
import pytest
import torch

from mtl.checkpoint import AtomicCheckpointIO, NonFiniteCheckpointError, nonfinite_entries
from mtl.data.transforms import RandomHorizontalFlip, ToTensor
from mtl.loggers import wandb_logger
from mtl.optim import lr_lambda


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)

    def crash(obj, f, *a, **k):
        f.write(b"partial garbage")
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=False) == {"step": 1}


def test_non_finite_weights_or_optimiser_state_never_replace_a_checkpoint(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    good = {"state_dict": {"w": torch.ones(3), "step": torch.tensor(4)}, "optimizer_states": []}
    io.save_checkpoint(good, path)
    poisoned = {"state_dict": {"w": torch.tensor([1.0, float("nan"), 2.0]), "b": torch.zeros(2)}}
    with pytest.raises(NonFiniteCheckpointError, match=r"1 tensor\(s\) hold NaN/inf.*state_dict\.w.*is kept"):
        io.save_checkpoint(poisoned, path)
    exp_avg = torch.tensor([float("inf")])
    bad_opt = {"state_dict": {"w": torch.ones(3)}, "optimizer_states": [{"state": {0: {"exp_avg": exp_avg}}}]}
    assert nonfinite_entries(bad_opt) == ["optimizer_states.0.0.exp_avg"]
    with pytest.raises(NonFiniteCheckpointError, match="optimizer_states.0.0.exp_avg"):
        io.save_checkpoint(bad_opt, path)
    assert torch.equal(torch.load(path, weights_only=False)["state_dict"]["w"], torch.ones(3))  # the good one
    with pytest.raises(NonFiniteCheckpointError, match="is not written"):
        io.save_checkpoint(poisoned, tmp_path / "first.ckpt")
    assert not (tmp_path / "first.ckpt").exists()


def test_wandb_offline_without_key(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    logger = wandb_logger(project="mtl-test", save_dir=str(tmp_path))
    assert logger._offline


@pytest.mark.parametrize("name", ["poly", "cosine", "constant"])
def test_schedules_warm_up_then_decay(name):
    f = lr_lambda(name, total_steps=100, warmup_steps=10, warmup_start=0.01)
    assert f(0) == pytest.approx(0.01)
    assert f(10) == pytest.approx(1.0)
    if name != "constant":
        assert f(55) < 1.0 and f(100) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="valid"):
        lr_lambda("step", total_steps=10)


def test_flip_negates_normal_x_and_to_tensor_encodings():
    h, w = 4, 5
    n = np.zeros((h, w, 3), np.float32)
    n[..., 0] = np.linspace(-1, 1, w)
    n[..., 2] = 1
    sample = {
        "image": np.arange(h * w * 3, dtype=np.uint8).reshape(h, w, 3),
        "normals": n,
        "semseg": np.tile(np.arange(w, dtype=np.uint8), (h, 1)),
        "edge": np.zeros((h, w), np.uint8),
        "meta": {"id": "x"},
    }
    flipped = RandomHorizontalFlip(p=1.0)(sample)
    assert np.array_equal(flipped["semseg"][:, 0], sample["semseg"][:, -1])
    assert np.allclose(flipped["normals"][:, 0, 0], -sample["normals"][:, -1, 0])
    t = ToTensor()(flipped)
    assert t["image"].shape == (3, h, w) and t["image"].dtype == torch.float32
    assert t["semseg"].dtype == torch.int64 and t["edge"].shape == (1, h, w)
    assert t["normals"].shape == (3, h, w) and t["meta"] == {"id": "x"}
