"""eval.py end to end on a synthetic checkpoint, Δm, the baseline collector and the single-task
experiments."""

import csv
import json

import pytest
import yaml
from omegaconf import OmegaConf

from mtl.baselines import WriteBaseline, write_baseline
from mtl.metrics.delta_m import delta_m, delta_m_terms
from mtl.pipeline import dataset_key, eval_metric_options, evaluate, train
from mtl.tasks import build_tasks

TASKS = "data.tasks=[semseg,depth,normals,edge]"


def test_delta_m_known_values_and_errors():
    tasks = build_tasks(["semseg", "depth", "edge"], num_classes={"semseg": 3})
    baseline = {"semseg/miou": 0.50, "depth/rmse": 0.60, "edge/f": 0.70, "edge/odsf": 0.80}
    metrics = {"val/semseg/miou": 0.55, "val/depth/rmse": 0.54, "val/edge/f": 0.70}
    terms = delta_m_terms(metrics, baseline, tasks)
    # +10 % mIoU, RMSE 10 % lower (lower is better → +10 %), edge: odsf absent in val → f, 0 %
    assert terms == pytest.approx({"semseg/miou": 10.0, "depth/rmse": 10.0, "edge/f": 0.0})
    assert delta_m(metrics, baseline, tasks) == pytest.approx(20.0 / 3)
    test = {"test/semseg/miou": 0.45, "test/depth/rmse": 0.66, "test/edge/odsf": 0.88}
    assert delta_m(test, baseline, tasks, stage="test") == pytest.approx((-10 - 10 + 10) / 3)
    with pytest.raises(ValueError, match="depth"):
        delta_m(metrics, {"semseg/miou": 0.5, "edge/f": 0.7}, tasks)


def _fake_sweep(root, data="synthetic_nyud", backbone="swin_mini"):
    for task, metrics in {
        "semseg": {"test/semseg/miou": 0.4, "val/semseg/miou": 0.3, "val/semseg/iou_0": 0.1},
        "edge": {"test/edge/odsf": 0.5, "val/edge/f": 0.6, "val/edge/loss": 1.0},
    }.items():
        job = root / task
        (job / ".hydra").mkdir(parents=True)
        (job / "metrics.json").write_text(json.dumps(metrics))
        (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"data": {"tasks": [task]}}))
        choices = {"data": data, "model/backbone": backbone}
        hydra_yaml = {"hydra": {"runtime": {"choices": choices}}}
        (job / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra_yaml))


def test_baseline_collector_prefers_test_metrics(tmp_path):
    _fake_sweep(tmp_path / "sweep")
    path = write_baseline(tmp_path / "sweep", tmp_path / "out")
    assert path.name == "synthetic_nyud_swin_mini.yaml"
    text = path.read_text()
    assert text.startswith("# @package baseline")
    assert yaml.safe_load(text)["metrics"] == {"semseg/miou": 0.4, "edge/odsf": 0.5, "edge/f": 0.6}
    with pytest.raises(FileNotFoundError, match="metrics.json"):
        write_baseline(tmp_path / "nothing", tmp_path / "out")
    # the Hydra callback of the single-task experiments does the same at the end of the multirun
    hook = WriteBaseline(out_dir=str(tmp_path / "hook"), name="mine")
    hook.on_job_start(config=None)  # other hooks: no-ops
    hook.on_multirun_end(config=OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "sweep")}}}))
    assert yaml.safe_load((tmp_path / "hook" / "mine.yaml").read_text())["name"] == "mine"


def test_single_task_experiments_compose(make_cfg, fake_data_dir):
    cfg = make_cfg(["experiment=synthetic_single_task", "task=depth"])
    assert list(cfg.data.tasks) == ["depth"] and cfg.test is True
    cases = (("nyud_single_task", "depth", "nyud"), ("pascal_single_task", "saliency", "pascal_context"))
    for exp, task, key in cases:
        cfg = make_cfg([f"experiment={exp}", f"task={task}", "trainer=cpu"])
        assert list(cfg.data.tasks) == [task] and dataset_key(cfg) == key
        assert cfg.optimizer.lr == pytest.approx(2e-5) and cfg.trainer.max_steps == 40000
    pascal = make_cfg(["data=pascal_context"], config_name="eval")
    assert eval_metric_options(pascal, "edge")["max_dist"] == 0.0075
    assert eval_metric_options(make_cfg([], config_name="eval"), "edge")["max_dist"] == 0.011


@pytest.mark.slow
def test_eval_end_to_end_writes_tables_pictures_and_delta_m(make_cfg, tmp_path):
    baseline = tmp_path / "configs" / "baselines"
    baseline.mkdir(parents=True)
    (baseline / "tiny.yaml").write_text(
        "# @package baseline\nmetrics:\n  semseg/miou: 0.1\n  depth/rmse: 2.0\n  normals/mean: 40.0\n"
        "  edge/odsf: 0.2\n  edge/f: 0.2\n"
    )
    use_baseline = [f"hydra.searchpath=[file://{tmp_path / 'configs'}]", "baselines=tiny"]
    trained, _ = train(make_cfg([TASKS, "trainer.max_epochs=1", "logger=none", *use_baseline]))
    assert "val/delta_m" in trained  # logged at validation epoch end when a baseline is configured
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    cfg = make_cfg(
        [
            TASKS,
            f"ckpt_path={ckpt}",
            "eval.pictures=2",
            "eval.edge.workers=0",
            "eval.name=tiny",
            "logger=tensorboard",
            *use_baseline,
        ],
        config_name="eval",
    )
    cfg.paths.output_dir = str(tmp_path / "eval")
    results, _ = evaluate(cfg)
    out = tmp_path / "eval"
    for key in ("edge/odsf", "edge/oisf", "edge/ap", "depth/abs_rel", "normals/median", "semseg/iou_0"):
        assert f"test/{key}" in results
    assert 0.0 <= results["test/edge/odsf"] <= 1.0
    saved = json.loads((out / "results.json").read_text())
    assert saved["test/delta_m"] == pytest.approx(results["test/delta_m"])
    rows = list(csv.reader((out / "results.csv").open()))
    assert rows[1][0] == "tiny" and float(rows[1][rows[0].index("test/edge/odsf")]) == pytest.approx(
        results["test/edge/odsf"], rel=1e-5
    )
    md = (out / "results.md").read_text()
    head = "| model | semseg mIoU ↑ | depth RMSE ↓ | normals mErr ↓ | edge odsF ↑ | Δm (%) ↑ |"
    assert md.splitlines()[0] == head
    assert f"{results['test/delta_m']:+.2f}" in md and "| **tiny** |" in md
    pictures = sorted((out / "pictures").glob("*.png"))
    assert [p.name for p in pictures] == ["sample_000.png", "sample_001.png"]
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))
