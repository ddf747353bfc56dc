"""A short real training run learns; its checkpoints evaluate through eval's pipeline."""

import json

import pytest
import torch

from mtl.pipeline import evaluate, train


@pytest.mark.slow
def test_short_training_run_loss_goes_down_and_eval_reads_checkpoint(make_cfg, tmp_path):
    cfg = make_cfg(
        [
            "data.dataset.length=48",
            "trainer.max_epochs=3",
            "data.tasks=[semseg,depth,normals,edge]",
            "logger=default",
            "scheduler.warmup_steps=5",
            "trainer.log_every_n_steps=1",
        ]
    )
    metrics, objects = train(cfg)
    csv = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()
    header = csv[0].split(",")
    col = header.index("train/loss")
    losses = [float(r.split(",")[col]) for r in csv[1:] if r.split(",")[col]]
    assert len(losses) >= 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, losses
    # per-step schedule: linear warm-up over 5 steps, then poly decay towards 0
    lr_col = header.index("lr-AdamW/pg1")
    lrs = [float(r.split(",")[lr_col]) for r in csv[1:] if r.split(",")[lr_col]]
    peak = lrs.index(max(lrs))
    assert 4 <= peak <= 6 and lrs[-1] < 0.1 * lrs[peak], lrs
    ckpt_dir = tmp_path / "checkpoints"
    assert (ckpt_dir / "best.ckpt").is_file() and (ckpt_dir / "last.ckpt").is_file()
    assert not list(ckpt_dir.glob("*.tmp"))
    assert json.loads((tmp_path / "metrics.json").read_text())["val/semseg/miou"] == pytest.approx(
        metrics["val/semseg/miou"]
    )

    eval_dir = tmp_path / "eval"
    eval_cfg = make_cfg(
        [
            "data.dataset.length=48",
            "data.tasks=[semseg,depth,normals,edge]",
            f"ckpt_path={ckpt_dir / 'last.ckpt'}",
            "eval.pictures=2",
        ],
        config_name="eval",
    )
    eval_cfg.paths.output_dir = str(eval_dir)
    results, _ = evaluate(eval_cfg)
    # evaluating the last checkpoint on the same split reproduces the final validation metrics
    assert results["test/semseg/miou"] == pytest.approx(metrics["val/semseg/miou"], abs=1e-5)
    assert results["test/depth/rmse"] == pytest.approx(metrics["val/depth/rmse"], rel=1e-4)
    assert (eval_dir / "results.md").read_text().startswith("| model |")
    assert 0.0 <= results["test/edge/odsf"] <= 1.0  # the exact SEISM protocol in eval
    assert len(list((eval_dir / "pictures").glob("sample_*.png"))) == 2  # one panel per sample


def test_eval_rejects_mismatched_checkpoint(make_cfg, tmp_path):
    path = tmp_path / "bad.ckpt"
    torch.save({"state_dict": {"model.foo": torch.zeros(1)}}, path)
    cfg = make_cfg([f"ckpt_path={path}"], config_name="eval")
    with pytest.raises(ValueError, match="does not match the configured model"):
        evaluate(cfg)
    cfg = make_cfg([f"ckpt_path={tmp_path / 'missing.ckpt'}"], config_name="eval")
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        evaluate(cfg)


def test_resume_from_last_checkpoint_continues(make_cfg, tmp_path):
    cfg = make_cfg(["trainer.max_epochs=1", "logger=none"])
    train(cfg)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 4
    cfg = make_cfg(["trainer.max_epochs=2", "logger=none", "ckpt_path=last"])
    _, objects = train(cfg)
    assert objects["trainer"].global_step == 8 and objects["trainer"].current_epoch == 2
