"""``eval.split`` (issue 22, item 3): the test loader serves the configured evaluation split.

The synthetic renderer's ``test`` split is an independent stream of scenes; NYUD-v2 and
PASCAL-Context have only train and val (their published numbers are on val), so ``test`` is
refused for them; an unknown value is refused naming ``eval.split`` and the valid values.
"""

from __future__ import annotations

import functools

import pytest
import torch
from hydra.utils import instantiate

from mtl.data.base import check_eval_split
from mtl.data.datamodule import EvalShardSampler, MTLDataModule
from mtl.data.fake import write_nyud
from mtl.data.nyud import NYUDv2
from mtl.data.pascal_context import PASCALContext
from mtl.data.synthetic import SyntheticScenes


def synthetic_dm(**kwargs) -> MTLDataModule:
    dataset = functools.partial(SyntheticScenes, resolution=(32, 32), length=6)
    split_kwargs = {"val": {"length": 4}, "test": {"length": 4}}
    return MTLDataModule(dataset=dataset, tasks=["semseg", "depth"], batch_size=2, split_kwargs=split_kwargs,
                         **kwargs)  # fmt: skip


def images(loader) -> torch.Tensor:
    return torch.cat([batch["image"] for batch in loader])


def test_synthetic_test_split_is_served_and_differs_from_val_and_train():
    dm = synthetic_dm(eval_split="test")
    dm.setup("fit")
    dm.setup("test")
    assert dm.eval_split == "test"
    val, test = images(dm.val_dataloader()), images(dm.test_dataloader())
    assert val.shape == test.shape == (4, 3, 32, 32)  # both 4 long (split_kwargs)
    train = torch.stack([dm.train_set[i]["image"] for i in range(4)])
    for i in range(4):  # no test scene is a val or train scene
        assert all(not torch.equal(test[i], other[j]) for other in (val, train) for j in range(4))
    assert torch.equal(images(dm.eval_dataloader("test")), test)
    assert torch.equal(images(dm.eval_dataloader()), val)  # default: the validation split


def test_default_eval_split_is_val():
    dm = synthetic_dm()
    dm.setup("test")
    assert dm.eval_split == "val"
    assert torch.equal(images(dm.test_dataloader()), images(dm.val_dataloader()))


def test_the_test_split_is_sharded_without_padding_under_ddp():
    dm = synthetic_dm(eval_split="test")
    dm.setup("test")

    class TwoRanks:
        world_size, global_rank = 2, 1

    dm.trainer = TwoRanks()
    loader = dm.test_dataloader()
    assert isinstance(loader.sampler, EvalShardSampler) and list(loader.sampler) == [1, 3]
    assert loader.dataset is dm.eval_sets["test"]


@pytest.mark.parametrize("where", ["datamodule", "check"])
def test_unknown_eval_split_is_refused_naming_the_key_and_the_valid_values(where):
    with pytest.raises(ValueError, match=r"eval\.split='banana'.*train, val, test"):
        if where == "datamodule":
            synthetic_dm(eval_split="banana")
        else:
            check_eval_split("mtl.data.synthetic.SyntheticScenes", "banana")


def test_eval_dataloader_refuses_an_unknown_split():
    dm = synthetic_dm()
    with pytest.raises(ValueError, match=r"eval\.split='tset'"):
        dm.eval_dataloader("tset")


@pytest.mark.parametrize(
    ("dataset", "name", "val_size"),
    [("mtl.data.nyud.NYUDv2", "NYUDv2", "654"), ("pascal_context", "PASCALContext", "5105")],
)
def test_real_datasets_refuse_test_saying_their_numbers_are_on_val(dataset, name, val_size):
    with pytest.raises(ValueError) as err:
        check_eval_split(dataset, "test")
    msg = str(err.value)
    for part in ("eval.split='test'", name, "it has train, val", "no test split", f"{val_size}-image val"):
        assert part in msg, (part, msg)
    assert check_eval_split(dataset, "val") == "val"


def test_nyud_fake_root_refuses_test_before_reading_the_disk(tmp_path):
    root = write_nyud(tmp_path / "NYUDv2", n_train=2, n_val=1, size=(8, 10))
    dataset = functools.partial(NYUDv2, root=str(root))
    with pytest.raises(
        ValueError, match=r"eval\.split='test': NYUDv2 \(nyud\) has no such split; it has train, val"
    ):
        MTLDataModule(dataset=dataset, tasks=["semseg"], eval_split="test")
    dm = MTLDataModule(dataset=dataset, tasks=["semseg"], eval_split="val", input_size=(8, 10))
    dm.setup("test")
    assert len(dm.test_dataloader().dataset) == 1


def test_split_classes_declare_their_splits():
    assert SyntheticScenes.SPLITS == ("train", "val", "test")
    assert NYUDv2.SPLITS == PASCALContext.SPLITS == ("train", "val")


@pytest.mark.parametrize("data", ["synthetic_nyud", "synthetic_pascal"])
def test_synthetic_configs_give_test_the_length_of_val(make_cfg, data):
    """What evaluate() builds with ``eval.split=test``: 200 independent scenes, as val."""
    cfg = make_cfg([f"data={data}"], config_name="eval", fast=False)
    assert cfg.eval.split == "val"
    assert cfg.data.split_kwargs.test.length == cfg.data.split_kwargs.val.length == 200
    dm = instantiate(cfg.data, _convert_="all", eval_split="test")
    assert dm.eval_split == "test"
    assert dm.eval_set("test").length == 200 and dm.eval_set("test").split == "test"
