"""eval.py end to end on a synthetic checkpoint, Δm, the baseline collector and the single-task
experiments."""

import csv
import json

import pytest
import yaml
from omegaconf import OmegaConf

from mtl.adapters.lora import MergeLoRA
from mtl.backbones.routing_report import RoutingReport
from mtl.baselines import METRICS_PROTOCOL, WriteBaseline, write_baseline
from mtl.control.run import Control
from mtl.decoders.taskexpert import GateReport
from mtl.eval_steps import EvalContext, EvalStep
from mtl.metrics.delta_m import delta_m, delta_m_terms
from mtl.pipeline import build_eval_steps, dataset_key, eval_metric_options, evaluate, train
from mtl.tasks import build_tasks
from mtl.visualise import PredictionPictures

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
    assert text.startswith("# @package baselines\n")
    assert yaml.safe_load(text)["metrics"] == {"semseg/miou": 0.4, "edge/odsf": 0.5, "edge/f": 0.6}
    assert yaml.safe_load(text)["protocol"] == METRICS_PROTOCOL  # the metric definitions it was measured with
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
        "# @package baselines\nmetrics:\n  semseg/miou: 0.1\n  depth/rmse: 2.0\n  normals/mean: 40.0\n"
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


class RecordingStep(EvalStep):
    """A user's evaluation step (added by config): records what each hook saw."""

    def __init__(self, *, label: str) -> None:
        self.label = label

    def before_test(self, ctx: EvalContext) -> None:
        ctx.reports[self.label] = {"before": dict(ctx.metrics), "training": ctx.module.training}

    def after_test(self, ctx: EvalContext) -> None:
        ctx.reports[self.label]["after"] = dict(ctx.metrics)
        ctx.reports[self.label]["loggers"] = len(ctx.trainer.loggers)
        (ctx.output_dir / f"{self.label}.txt").write_text(str(sorted(ctx.metrics)))


def _untrained_checkpoint(make_cfg, tmp_path, overrides=()):
    import torch

    from mtl.pipeline import build_datamodule, build_module

    cfg = make_cfg(["data.tasks=[semseg,depth]", "logger=none", *overrides], config_name="eval")
    ckpt = tmp_path / "untrained.ckpt"
    torch.save({"state_dict": build_module(cfg, build_datamodule(cfg)).state_dict()}, ckpt)
    cfg.ckpt_path = str(ckpt)
    return cfg


def test_eval_runs_the_configured_steps_in_order_around_the_test_pass(make_cfg, tmp_path):
    target = f"{__name__}.RecordingStep"
    cfg = _untrained_checkpoint(
        make_cfg,
        tmp_path,
        [f"+eval_steps.mine._target_={target}", "+eval_steps.mine.label=mine", "eval.pictures=1"],
    )
    steps = build_eval_steps(cfg)
    assert [type(s) for s in steps] == [
        MergeLoRA,
        Control,
        RoutingReport,
        GateReport,
        PredictionPictures,
        RecordingStep,
    ]
    metrics, objects = evaluate(cfg)
    seen = objects["reports"]["mine"]
    assert seen["before"] == {} and seen["after"] == metrics and "test/semseg/miou" in metrics
    assert seen["loggers"] == 0  # logger=none
    assert (tmp_path / "mine.txt").is_file()
    assert objects["reports"]["pictures"] == [str(tmp_path / "pictures" / "sample_000.png")]
    assert objects["control"] == {} and "lora_merge" not in objects["reports"]  # nothing asked


def test_eval_steps_none_removes_them_and_a_wrong_target_is_refused(make_cfg, tmp_path):
    cfg = _untrained_checkpoint(make_cfg, tmp_path, ["eval_steps=none", "eval.pictures=2"])
    assert build_eval_steps(cfg) == []
    evaluate(cfg)
    assert not (tmp_path / "pictures").exists()
    bad = make_cfg(["+eval_steps.oops._target_=collections.OrderedDict"], config_name="eval")
    with pytest.raises(TypeError, match=r"eval_steps\.oops: collections\.OrderedDict .*EvalStep"):
        build_eval_steps(bad)
    bad = make_cfg(["+eval_steps.oops.n=1"], config_name="eval")
    with pytest.raises(ValueError, match=r"eval_steps\.oops needs a _target_"):
        build_eval_steps(bad)


def test_eval_steps_read_the_user_keys_and_default_without_an_eval_config(make_cfg):
    cfg = make_cfg(["adapter.merge=true", "eval.pictures=3", "control.budget=2.5"], config_name="eval")
    merge, control, _, _, pictures = build_eval_steps(cfg)
    assert merge.enabled and pictures.n == 3 and control.options["budget"] == 2.5
    cfg.adapter.merge, cfg.eval.pictures = False, 0  # set after composing (as tests and scripts do)
    merge, _, _, _, pictures = build_eval_steps(cfg)
    assert not merge.enabled and pictures.n == 0
    # a training config (merge.py's in-process evaluation) has no eval_steps, adapter or control keys
    train_cfg = make_cfg([])
    assert "eval_steps" not in train_cfg and "control" not in train_cfg
    steps = build_eval_steps(train_cfg)
    assert [type(s) for s in steps] == [MergeLoRA, Control, RoutingReport, GateReport, PredictionPictures]
    assert not steps[0].enabled and steps[1].options["budget"] is None and steps[4].n == 0
