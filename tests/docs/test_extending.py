"""The extending guide's worked examples (docs/extending.md shows these files verbatim).

``my_ext/`` holds one file per addition (a task, a dataset, a strategy, a decoder, a backbone) and
``conf/`` one config each, in the layout of ``configs/``; Hydra finds them through
``hydra.searchpath``, as it would for a user's own config folder. The tests train and evaluate
them through the real pipeline on a tiny on-disk root, and check each part on its own.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from mtl.contracts import Features
from mtl.pipeline import evaluate, train

HERE = Path(__file__).resolve().parent
SEARCHPATH = f"hydra.searchpath=[file://{HERE / 'conf'}]"
QUICK = ["logger=none", "extras.print_config=false", "trainer.max_epochs=1"]


@pytest.fixture
def my_ext(monkeypatch):
    """The example package, importable as ``my_ext`` (as a user's own package would be)."""
    monkeypatch.syspath_prepend(str(HERE))
    import my_ext

    yield my_ext
    for name in [m for m in sys.modules if m == "my_ext" or m.startswith("my_ext.")]:
        sys.modules.pop(name)


@pytest.fixture
def stripes_root(my_ext, tmp_path):
    from my_ext.stripes import write_stripes

    return write_stripes(tmp_path / "data" / "Stripes", n={"train": 8, "val": 4, "test": 4})


def test_the_parts_keep_their_contracts(my_ext, stripes_root):
    from my_ext.brightness import Brightness
    from my_ext.concat_decoder import ConcatDecoder
    from my_ext.stripes import Stripes
    from my_ext.tiny_cnn import TinyCNN

    ds = Stripes(root=stripes_root, split="test")
    sample = ds[0]
    assert len(ds) == 4 and sample["image"].shape == (32, 32, 3)
    assert sample["brightness"].dtype.name == "float32" and set(sample["semseg"].flat) <= {0, 1}
    with pytest.raises(ValueError, match="unknown split 'banana'"):
        Stripes(root=stripes_root, split="banana")

    backbone = TinyCNN()
    feats = backbone.features(torch.zeros(2, 3, 32, 32), ["semseg"])
    assert isinstance(feats, Features)
    assert [f.shape[1] for f in feats.shared] == [i["channels"] for i in backbone.feature_info]
    assert [32 // f.shape[-1] for f in feats.shared] == [i["stride"] for i in backbone.feature_info]

    decoder = ConcatDecoder(in_channels=[16, 32, 64], tasks=["semseg", "brightness"], channels=8)
    out = decoder(feats.shared, tasks=["brightness"])
    assert list(out.features) == ["brightness"] and out.features["brightness"].shape == (2, 8, 8, 8)

    task = Brightness()
    pred, target = torch.zeros(2, 1, 8, 8), torch.full((2, 1, 8, 8), 0.5)
    assert float(task.loss(pred, {"brightness": target})) == pytest.approx(0.0)
    metric = task.metric()
    metric.update(pred, target)
    assert {k: float(v) for k, v in metric.compute().items()} == {"mae": 0.0, "within_0_1": 1.0}


def test_stripes_demo_trains_and_evaluates(my_ext, stripes_root, make_cfg, tmp_path):
    data_dir = f"paths.data_dir={stripes_root.parent}"
    cfg = make_cfg([SEARCHPATH, "experiment=stripes_demo", data_dir, *QUICK], fast=False)
    assert cfg.strategy._target_ == "my_ext.inverse_loss.InverseLossWeights"
    metrics, objects = train(cfg)
    module = objects["module"]
    assert type(module.model.backbone).__name__ == "TinyCNN"
    assert type(module.model.decoder).__name__ == "ConcatDecoder"
    assert type(module.tasks["brightness"]).__name__ == "Brightness"
    expected = ("train/brightness/loss", "val/brightness/mae", "val/brightness/within_0_1", "val/semseg/miou")
    assert set(expected) <= set(metrics), sorted(metrics)
    assert torch.isfinite(torch.tensor(metrics["val/brightness/mae"]))

    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    eval_cfg = make_cfg(
        [SEARCHPATH, "experiment=stripes_demo", data_dir, "logger=none", "extras.print_config=false",
         f"ckpt_path={ckpt}", "eval.pictures=1"],
        "eval",
        fast=False,
    )  # fmt: skip
    eval_cfg.paths.output_dir = str(tmp_path / "eval")
    results, _ = evaluate(eval_cfg)
    assert {"test/brightness/mae", "test/brightness/within_0_1", "test/semseg/miou"} <= set(results)
    header = (tmp_path / "eval" / "results.md").read_text().splitlines()[0]
    assert header == "| model | semseg mIoU ↑ | brightness mae ↓ | Δm (%) ↑ |"
