"""``eval.split`` is honoured, checked and recorded (it used to be read nowhere: the test pass ran on
the validation set, which also picks ``best.ckpt``)."""

from __future__ import annotations

import json

import pytest

from mtl.pipeline import evaluate, train

TRAIN = [
    "logger=none",
    "module.log_images=false",
    "trainer.max_steps=2",
    "trainer.max_epochs=1",
    "test=false",
]


@pytest.fixture
def ckpt(make_cfg, tmp_path):
    train(make_cfg(TRAIN))
    return tmp_path / "checkpoints" / "last.ckpt"


def eval_cfg(make_cfg, ckpt, out, *extra):
    cfg = make_cfg(
        [f"ckpt_path={ckpt}", "eval.pictures=0", "eval.edge.exact=false", *extra], config_name="eval"
    )
    cfg.paths.output_dir = str(out)
    return cfg


def test_eval_split_selects_the_split_and_is_recorded(make_cfg, ckpt, tmp_path):
    val, _ = evaluate(eval_cfg(make_cfg, ckpt, tmp_path / "val"))
    test, objects = evaluate(eval_cfg(make_cfg, ckpt, tmp_path / "test", "eval.split=test"))
    assert objects["datamodule"].eval_split == "test"
    assert test["test/semseg/miou"] != val["test/semseg/miou"]  # other scenes, other numbers
    for split in ("val", "test"):
        meta = json.loads((tmp_path / split / "results.provenance.json").read_text())
        assert meta["split"] == split and meta["checkpoint"] == str(ckpt.resolve())
        assert "code" in meta and meta["dataset"]
        assert f"Split: `{split}`" in (tmp_path / split / "results.md").read_text()


def test_unknown_eval_split_is_refused_naming_the_key(make_cfg, ckpt, tmp_path):
    with pytest.raises(ValueError, match=r"eval.split.*banana"):
        evaluate(eval_cfg(make_cfg, ckpt, tmp_path / "x", "eval.split=banana"))
