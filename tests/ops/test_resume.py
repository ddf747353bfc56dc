"""Exact resume: N steps, crash, resume from last.ckpt for N more equals 2N uninterrupted steps."""

from __future__ import annotations

import pytest
import torch

from mtl.callbacks import SimulatedCrash
from mtl.pipeline import train

BASE = [
    "logger=none",
    "trainer.max_epochs=10",
    "trainer.max_steps=6",  # 4 batches per epoch: the resumed part crosses an epoch end
    "callbacks.periodic_checkpoint.every_n_steps=1",
    "module.log_images=false",
    "data.augment.hflip=0.5",
]


def _final_state(objects) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in objects["module"].state_dict().items() if torch.is_tensor(v)}


def _assert_same(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            assert torch.allclose(a[k], b[k], atol=atol, rtol=0), (k, (a[k] - b[k]).abs().max())
        else:
            assert torch.equal(a[k], b[k]), k


def _run(make_cfg, tmp_path, name: str, extra: list[str]):
    out = tmp_path / name
    cfg = make_cfg(BASE + extra)
    cfg.paths.output_dir = str(out)
    cfg.trainer.default_root_dir = str(out)
    cfg.callbacks.model_checkpoint.dirpath = str(out / "checkpoints")
    cfg.callbacks.periodic_checkpoint.dirpath = str(out / "checkpoints")
    return cfg


@pytest.mark.parametrize(
    ("strategy", "crash"),
    [
        ("uw", 3),
        pytest.param("dwa", 4, marks=pytest.mark.slow),  # the checkpoint right after the epoch's last batch
        pytest.param("famo", 3, marks=pytest.mark.slow),
        pytest.param("gradvac", 5, marks=pytest.mark.slow),
        pytest.param("dbmtl", 3, marks=pytest.mark.slow),
        pytest.param("rlw", 2, marks=pytest.mark.slow),
    ],
)
def test_crash_and_resume_equals_uninterrupted(make_cfg, tmp_path, strategy, crash):
    """Model, optimiser, scheduler, strategy state, RNG and epoch position all come back."""
    _, full = train(_run(make_cfg, tmp_path, "full", [f"strategy={strategy}"]))
    crash_cfg = _run(
        make_cfg,
        tmp_path,
        "resumed",
        [
            f"strategy={strategy}",
            "+callbacks.crash._target_=mtl.callbacks.CrashAt",
            f"+callbacks.crash.step={crash}",
        ],
    )
    with pytest.raises(SimulatedCrash):
        train(crash_cfg)
    last = tmp_path / "resumed" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)  # plain types only: loads without pickle
    assert saved["global_step"] == crash and "rng_states" in saved
    resume_cfg = _run(make_cfg, tmp_path, "resumed", [f"strategy={strategy}", "ckpt_path=last"])
    _, resumed = train(resume_cfg)
    assert resumed["trainer"].global_step == full["trainer"].global_step == 6
    _assert_same(_final_state(full), _final_state(resumed))


def test_loader_resumes_mid_epoch_with_the_same_batches(make_cfg, tmp_path):
    """The stateful loader skips what was trained on; augmentation depends on (seed, epoch, index)."""
    from mtl.pipeline import build_datamodule

    cfg = make_cfg(["data.augment.hflip=0.5"])
    dm = build_datamodule(cfg)
    dm.setup("fit")
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(1)
    full = [b["image"] for b in loader]
    again = dm.train_dataloader()
    again.load_state_dict({"epoch": 1, "batches": 2})
    rest = [b["image"] for b in again]
    assert len(rest) == len(full) - 2
    for a, b in zip(full[2:], rest, strict=True):
        assert torch.equal(a, b)
    other = dm.train_dataloader()
    other.sampler.set_epoch(2)
    assert not torch.equal(torch.cat(full), torch.cat([b["image"] for b in other]))
    done = dm.train_dataloader()
    done.load_state_dict({"epoch": 1, "batches": -1})  # saved at the epoch's end
    assert done.sampler.epoch == 2 and done.sampler.skip == 0
