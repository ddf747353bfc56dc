"""What the dataset classes declare (key, tasks, classes, edge tolerance) and how it is read."""

import functools

import pytest
from torch.utils.data import Dataset

from mtl.data.base import DenseDataset
from mtl.data.datamodule import MTLDataModule, dataset_class
from mtl.data.nyud import NYUDv2
from mtl.data.pascal_context import PASCALContext
from mtl.data.synthetic import CLASSES, NUM_PARTS, SyntheticScenes


def test_dataset_declarations():
    assert {c.KEY: c.EDGE_MAX_DIST for c in (NYUDv2, PASCALContext, SyntheticScenes)} == {
        "nyud": 0.011,
        "pascal_context": 0.0075,
        "synthetic": 0.011,
    }
    assert NYUDv2.NUM_CLASSES == {"semseg": 40} and len(NYUDv2.CLASS_NAMES["semseg"]) == 40
    assert PASCALContext.NUM_CLASSES == {"semseg": 21, "human_parts": 7}
    assert PASCALContext.CLASS_NAMES["semseg"][15] == "person"
    assert SyntheticScenes.CLASS_NAMES["semseg"] == CLASSES
    assert len(SyntheticScenes.CLASS_NAMES["human_parts"]) == NUM_PARTS + 1
    for cls in (NYUDv2, PASCALContext, SyntheticScenes):
        assert {t: len(n) for t, n in cls.CLASS_NAMES.items()} == cls.NUM_CLASSES, cls.KEY


def test_dataset_class_reads_a_partial_and_refuses_other_classes():
    assert dataset_class(functools.partial(SyntheticScenes, length=4)) is SyntheticScenes
    assert dataset_class(NYUDv2) is NYUDv2

    class Plain(Dataset):
        pass

    with pytest.raises(TypeError, match="not a mtl.data.base.DenseDataset subclass"):
        dataset_class(functools.partial(Plain))

    class NoKey(DenseDataset):
        TASKS = ("depth",)

    with pytest.raises(TypeError, match="NoKey declares no KEY"):
        MTLDataModule(dataset=functools.partial(NoKey), tasks=["depth"])
    with pytest.raises(ValueError, match="disagree with the lengths of CLASS_NAMES"):

        class Wrong(DenseDataset):  # noqa: F841 (the class statement is the test)
            KEY = "wrong"
            CLASS_NAMES = {"semseg": ("a", "b")}
            NUM_CLASSES = {"semseg": 3}


def test_datamodule_exposes_the_declarations_of_the_tasks_in_use():
    dm = MTLDataModule(dataset=functools.partial(SyntheticScenes, length=4), tasks=["semseg", "depth"])
    assert dm.dataset_class is SyntheticScenes
    assert dm.num_classes == {"semseg": len(CLASSES)} and dm.class_names == {"semseg": CLASSES}
