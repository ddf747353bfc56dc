"""A new task and a new dataset from outside ``mtl/``: one module plus config overrides.

The test writes a tiny module (a toy task that regresses the image's brightness and a toy
dataset that provides it) into ``tmp_path``, puts it on ``sys.path`` and trains the real
configs on it through :func:`mtl.pipeline.train` (and evaluates through
:func:`mtl.pipeline.evaluate`): the task enters by ``task_options.toy._target_`` (it is not
registered), the dataset by ``data.dataset._target_``. Every number the framework reports for
the toy task comes from the toy task's own hooks, and no file under ``mtl/`` changes.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mtl.merging.adamerging import unsupervised_loss
from mtl.objective import score
from mtl.pipeline import dataset_key, eval_metric_options, evaluate, train
from mtl.report import published_table
from mtl.tasks import TASKS, build_tasks

ROOT = Path(__file__).resolve().parents[1]

TOY_MODULE = '''
"""A toy task (per-pixel brightness) and a toy dataset, defined outside mtl/."""

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics import Metric

from mtl.data.base import DenseDataset
from mtl.tasks import Task

UPDATES = []  # (task, metric) per call of the toy task's update_metric


class BrightnessMetric(Metric):
    """Mean absolute error and the fraction of pixels within ``tolerance``."""

    def __init__(self, tolerance):
        super().__init__()
        self.tolerance = tolerance
        self.add_state("err", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("hit", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, pred, target, *, scale):  # no default: only the toy task's hook calls it right
        err = (torch.sigmoid(pred.float()) * scale - target).abs()
        self.err += err.sum().double()
        self.hit += (err < self.tolerance).sum().double()
        self.n += err.numel()

    def compute(self):
        n = self.n.clamp(min=1)
        return {"mae": self.err / n, "within": self.hit / n}


class Brightness(Task):
    name = "toy"
    default_weight = 3.0
    main_metric = "mae"
    higher_is_better = False
    out_channels = 1
    directions = {"mae": False, "within": True}
    delta_m_metrics = ("mae",)
    score_metrics = ("within",)
    score_factor = 0.5
    report_digits = 3

    def __init__(self, *, scale=1.0, tolerance=0.25):
        self.scale, self.tolerance = scale, tolerance

    def loss(self, pred, batch):
        return F.l1_loss(torch.sigmoid(pred.float()) * self.scale, batch[self.name])

    def metric(self):
        return BrightnessMetric(self.tolerance)

    @classmethod
    def eval_metric_defaults(cls, dataset):
        return {"tolerance": 10 * dataset.EDGE_MAX_DIST}

    def eval_metric(self, *, tolerance=None):
        return BrightnessMetric(self.tolerance if tolerance is None else tolerance)

    def update_metric(self, metric, pred, batch):
        UPDATES.append((self, metric))
        metric.update(pred, batch[self.name], scale=self.scale)

    def label_free_loss(self, pred, reference):
        p = torch.sigmoid(pred.float())
        return (p * (1 - p)).mean() * 4

    def postprocess(self, pred):
        return torch.sigmoid(pred) * self.scale

    def to_rgb(self, value):
        v = (value[0].clamp(0, 1) * 255).to(torch.uint8).numpy()
        return np.repeat(v[..., None], 3, axis=-1)


class ToyScenes(DenseDataset):
    """Random two-tone images: semseg = bright / dark, toy = per-pixel grey level in [0, 1]."""

    KEY = "toy"
    TASKS = ("semseg", "toy")
    CLASS_NAMES = {"semseg": ("dark", "bright")}
    NUM_CLASSES = {"semseg": 2}
    EDGE_MAX_DIST = 0.02

    def __init__(self, *, split="train", tasks=None, transform=None, length=8, resolution=(32, 32), seed=0):
        self.split, self.length, self.resolution = split, int(length), tuple(resolution)
        self.tasks = self.TASKS if tasks is None else tuple(tasks)
        self.transform, self.seed = transform, int(seed) + (0 if split == "train" else 1000)

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        rng = np.random.default_rng([self.seed, index])
        h, w = self.resolution
        grey = np.where(rng.random((h // 8, w // 8)) > 0.5, 0.8, 0.2).repeat(8, 0).repeat(8, 1)
        grey = (grey + 0.05 * rng.standard_normal((h, w))).clip(0, 1).astype(np.float32)
        sample = {"image": np.repeat((grey * 255).astype(np.uint8)[..., None], 3, axis=-1)}
        sample["meta"] = {"id": f"{self.split}_{index}", "size": (h, w)}
        if "semseg" in self.tasks:
            sample["semseg"] = (grey > 0.5).astype(np.uint8)
        if "toy" in self.tasks:
            sample["toy"] = grey
        return self.transform(sample) if self.transform is not None else sample
'''

TOY = [
    "data.tasks=[semseg,toy]",
    "data.dataset._target_=toy_ext.ToyScenes",
    "data.dataset.resolution=[32,32]",
    "data.dataset.length=8",
    "data.split_kwargs.val.length=4",
    "data.batch_size=4",
    "data.eval_batch_size=4",
    "+task_options.toy._target_=toy_ext.Brightness",
    "+task_options.toy.scale=1.0",
    "extras.print_config=false",
    "logger=none",
]


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` (bytecode caches aside) → (size, mtime)."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """The toy module, importable as ``toy_ext``."""
    src = tmp_path / "toy_src"
    src.mkdir()
    (src / "toy_ext.py").write_text(textwrap.dedent(TOY_MODULE))
    monkeypatch.syspath_prepend(str(src))
    import toy_ext

    yield toy_ext
    sys.modules.pop("toy_ext", None)


def test_toy_task_builds_from_its_import_path_and_errors_name_it(toy):
    assert "toy" not in TASKS  # not registered: it enters by _target_ only
    tasks = build_tasks(
        ["semseg", "toy"],
        num_classes={"semseg": 2},
        options={"toy": {"_target_": "toy_ext.Brightness", "scale": 2.0}},
    )
    assert isinstance(tasks["toy"], toy.Brightness) and tasks["toy"].scale == 2.0
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['toy'\]; valid tasks: \['depth'"):
        build_tasks(["toy"])
    with pytest.raises(ValueError, match=r"task_options.toy._target_: cannot import 'toy_ext.Nope'"):
        build_tasks(["toy"], options={"toy": {"_target_": "toy_ext.Nope"}})
    with pytest.raises(ValueError, match="toy_ext.Brightness is task 'toy', not 'bright'"):
        build_tasks(["bright"], options={"bright": {"_target_": "toy_ext.Brightness"}})
    with pytest.raises(TypeError, match="not a mtl.tasks.Task subclass"):
        build_tasks(["toy"], options={"toy": {"_target_": "toy_ext.ToyScenes"}})


def test_toy_task_and_dataset_train_and_evaluate_without_touching_mtl(toy, make_cfg, tmp_path):
    before = _snapshot(ROOT / "mtl")
    cfg = make_cfg([*TOY, "debug=fdr"], fast=False)
    assert dataset_key(cfg) == "toy"  # declared by the dataset class, not guessed from its name
    assert eval_metric_options(cfg, "toy") == {"tolerance": pytest.approx(0.2)}  # toy hook × toy dataset
    metrics, objects = train(cfg)
    module = objects["module"]
    assert objects["datamodule"].class_names == {"semseg": ("dark", "bright")}
    assert module.tasks["toy"].default_weight == 3.0 and isinstance(module.tasks["toy"], toy.Brightness)
    # its loss and its own metrics are logged, updated through its own hook
    for key in ("train/toy/loss", "val/toy/loss", "val/toy/mae", "val/toy/within", "val/semseg/miou"):
        assert key in metrics, key
    assert toy.UPDATES and all(isinstance(m, toy.BrightnessMetric) for _, m in toy.UPDATES)
    # the sweep score: semseg's mIoU and the toy task's own metric × its own factor
    expected = (metrics["val/semseg/miou"] + 0.5 * metrics["val/toy/within"]) / 2
    assert metrics["val/score"] == pytest.approx(expected)
    assert score(metrics, module.tasks) == pytest.approx(expected)
    # the report column: its headline metric, direction and digits
    md = published_table(metrics, module.tasks, stage="val", name="toy", dataset=dataset_key(cfg))
    assert md.splitlines()[0] == "| model | semseg mIoU ↑ | toy mae ↓ | Δm (%) ↑ |"
    assert f"| {metrics['val/toy/mae']:.3f} |" in md.splitlines()[-1]
    # the label-free objective (AdaMerging) and the pictures are the task's own
    task, z = module.tasks["toy"], torch.zeros(2, 1, 8, 8)
    assert not task.label_free_needs_reference
    assert float(unsupervised_loss(task, z, None)) == pytest.approx(1.0)  # p(1 − p)·4 at p = ½
    picture = task.visualise(z, {"toy": torch.full((2, 1, 8, 8), 0.5)})
    assert picture.shape == (8, 16, 3) and int(picture[0, 0, 0]) == 127
    # nothing under mtl/ was touched or names the toy module
    assert _snapshot(ROOT / "mtl") == before
    assert not [p for p in (ROOT / "mtl").rglob("*.py") if "toy_ext" in p.read_text()]


def test_toy_checkpoint_evaluates(toy, make_cfg, tmp_path):
    before = _snapshot(ROOT / "mtl")
    train(make_cfg([*TOY, "trainer.max_epochs=1"], fast=False))
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    cfg = make_cfg([*TOY, f"ckpt_path={ckpt}", "eval.pictures=1", "eval.name=toy"], "eval", fast=False)
    cfg.paths.output_dir = str(tmp_path / "eval")
    results, _ = evaluate(cfg)
    assert {"test/toy/mae", "test/toy/within", "test/semseg/miou"} <= set(results)
    md = (tmp_path / "eval" / "results.md").read_text()
    assert md.splitlines()[0] == "| model | semseg mIoU ↑ | toy mae ↓ | Δm (%) ↑ |"
    assert len(md.split("\n\n")[0].splitlines()) == 3  # no headline rows for the toy dataset
    assert (tmp_path / "eval" / "pictures" / "sample_000.png").is_file()
    assert _snapshot(ROOT / "mtl") == before
