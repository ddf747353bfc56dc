"""Multiruns end with a one-screen summary of their jobs; the Optuna search tunes loss weights only
where they act and picks checkpoints by a weight-free metric (issue 22, item 9)."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import OmegaConf

from mtl.sweep import STATUS_FILE, SUMMARY_FILE, SweepSummary, fixed_strategy_weights, read_sweep

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
COMMON = ["hparams_search=optuna", "trainer.max_steps=5"]


def fake_job(
    sweep: Path,
    num: int,
    overrides: list[str],
    *,
    metrics: dict | None = None,
    status: dict | None = None,
    optimized_metric: str | None = None,
) -> Path:
    """A job folder of `python train.py -m ...`: .hydra/, config.yaml, and what the job left."""
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([*COMMON, *overrides]))
    (job / ".hydra" / "hydra.yaml").write_text(
        yaml.safe_dump({"hydra": {"job": {"num": num}, "mode": "MULTIRUN"}})
    )
    (job / "config.yaml").write_text(yaml.safe_dump({"optimized_metric": optimized_metric, "seed": 42}))
    if metrics is not None:
        (job / "metrics.json").write_text(json.dumps(metrics))
    if status is not None:
        (job / STATUS_FILE).write_text(json.dumps(status))
    return job


def _sweep(root: Path) -> Path:
    sweep = root / "multiruns" / "2026-01-01_00-00-00"
    done = {"status": "COMPLETED", "error": None}
    fake_job(
        sweep, 0, ["optimizer.lr=0.000123456789", "strategy=uw"], metrics={"val/score": 0.3}, status=done
    )
    fake_job(sweep, 1, ["optimizer.lr=0.002", "strategy=fixed", "++strategy.weights.depth=1.5"],
             metrics={"val/score": 0.5, "val/loss": 9.0}, status=done)  # fmt: skip
    fake_job(sweep, 2, ["optimizer.lr=0.003", "strategy=famo"],
             status={"status": "FAILED", "error": "RuntimeError: CUDA out of memory"})  # fmt: skip
    fake_job(sweep, 3, ["optimizer.lr=0.001", "strategy=dwa"])  # killed: nothing but .hydra/
    fake_job(sweep, 4, ["optimizer.lr=0.0005", "strategy=uw"], metrics={"val/loss": 1.0}, status=done)
    return sweep


def test_multirun_end_prints_each_job_and_names_the_best_folder(tmp_path, capsys):
    sweep = _sweep(tmp_path)
    hook = SweepSummary()
    hook.on_multirun_end(config=OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    out = capsys.readouterr().out
    summary = (sweep / SUMMARY_FILE).read_text()
    assert summary in out  # printed and written
    assert (
        "5 jobs: 1 failed, 1 no objective, 2 ok, 1 unfinished; objective val/score (higher is better)" in out
    )
    assert "common overrides: hparams_search=optuna trainer.max_steps=5" in out
    rows = {
        line.split("|")[1].strip(): line
        for line in out.splitlines()
        if line.startswith("| ") and "|---" not in line
    }
    assert "ok" in rows["0"] and "0.3" in rows["0"] and "optimizer.lr=0.0001235 strategy=uw" in rows["0"]
    assert (
        "ok" in rows["1 **best**"]
        and "0.5" in rows["1 **best**"]
        and "++strategy.weights.depth=1.5" in rows["1 **best**"]
    )
    assert "failed: RuntimeError: CUDA out of memory" in rows["2"] and "strategy=famo" in rows["2"]
    assert "unfinished" in rows["3"]
    assert "no objective" in rows["4"] and "val/score" in rows["4"]
    assert f"best: job 1 (val/score 0.5): {sweep / '1'}" in out
    assert len(out.splitlines()) < 25  # one screen


def test_objective_follows_each_job_and_the_sweeper_direction(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    fake_job(
        sweep, 0, ["a=1"], metrics={"val/delta_m": -2.0, "val/score": 0.9}, status={"status": "COMPLETED"}
    )
    fake_job(
        sweep, 1, ["a=2"], metrics={"val/delta_m": 1.0, "val/score": 0.1}, status={"status": "COMPLETED"}
    )
    jobs = read_sweep(sweep)
    assert [(j.metric, j.objective) for j in jobs] == [("val/delta_m", -2.0), ("val/delta_m", 1.0)]
    config = {"hydra": {"sweep": {"dir": str(sweep)}, "sweeper": {"direction": "minimize"}}}
    SweepSummary().on_multirun_end(config=OmegaConf.create(config))
    assert f"best: job 0 (val/delta_m -2): {sweep / '0'}" in capsys.readouterr().out
    fake_job(sweep, 2, ["a=3"], metrics={"val/score": 0.7, "val/delta_m": 5.0}, optimized_metric="val/score")
    assert read_sweep(sweep)[2].metric == "val/score" and read_sweep(sweep)[2].objective == 0.7


def test_job_end_records_status_and_keeps_the_summary_current_when_a_job_fails(tmp_path, capsys):
    sweep = _sweep(tmp_path)
    job = sweep / "5"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([*COMMON, "strategy=rlw"]))
    config = OmegaConf.create(
        {
            "hydra": {
                "mode": RunMode.MULTIRUN,
                "runtime": {"output_dir": str(job)},
                "sweep": {"dir": "unused", "subdir": "5"},
            }
        }
    )
    ret = JobReturn(
        overrides=["strategy=rlw"], status=JobStatus.FAILED, _return_value=ValueError("bad lr\nmore")
    )
    SweepSummary().on_job_end(config=config, job_return=ret)
    state = json.loads((job / STATUS_FILE).read_text())
    assert state["status"] == "FAILED" and state["error"] == "ValueError: bad lr"
    out = capsys.readouterr().out
    assert str(job) in out and str(sweep / SUMMARY_FILE) in out
    assert (
        "failed: ValueError: bad lr" in (sweep / SUMMARY_FILE).read_text()
    )  # written before the sweep stops
    done = JobReturn(overrides=[], status=JobStatus.COMPLETED, _return_value=0.25)
    run_cfg = OmegaConf.create(
        {"hydra": {"mode": RunMode.RUN, "runtime": {"output_dir": str(tmp_path / "run")}}}
    )
    SweepSummary().on_job_end(config=run_cfg, job_return=done)  # a single run: its status only, no summary
    assert json.loads((tmp_path / "run" / STATUS_FILE).read_text())["return_value"] == 0.25
    assert not (tmp_path / SUMMARY_FILE).exists()


def test_only_rank_zero_writes(tmp_path, monkeypatch):
    sweep = _sweep(tmp_path)
    monkeypatch.setenv("RANK", "1")
    SweepSummary().on_multirun_end(config=OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    assert not (sweep / SUMMARY_FILE).exists()


@pytest.fixture(scope="module")
def optuna_cfg():
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("train", ["hparams_search=optuna"], return_hydra_config=True)


def test_optuna_search_tunes_weights_only_for_the_fixed_strategy(optuna_cfg):
    sweeper = optuna_cfg.hydra.sweeper
    assert not [k for k in sweeper.params if "weight" in k and k != "optimizer.weight_decay"]
    assert sweeper.custom_search_space == "mtl.sweep.fixed_strategy_weights"
    params = {}
    for strategy in ("fixed", "uw", "dwa", "famo"):
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        trial = study.ask({"strategy": optuna.distributions.CategoricalDistribution([strategy])})
        fixed_strategy_weights(optuna_cfg, trial)
        params[strategy] = dict(trial.params)
    weights = {k: v for k, v in params["fixed"].items() if k != "strategy"}
    assert sorted(weights) == [
        "++strategy.weights.depth",
        "++strategy.weights.edge",
        "++strategy.weights.normals",
    ]
    assert (
        0.25 <= weights["++strategy.weights.depth"] <= 4.0
        and 12.5 <= weights["++strategy.weights.edge"] <= 200.0
    )
    assert all(list(params[s]) == ["strategy"] for s in ("uw", "dwa", "famo"))
    # a strategy fixed on the command line (not searched) counts too
    trial = study.ask()
    trial.set_user_attr("strategy", "fixed")
    fixed_strategy_weights(optuna_cfg, trial)
    assert "++strategy.weights.depth" in trial.params


def test_sampled_weights_reach_the_fixed_strategy_and_leave_val_loss_alone(optuna_cfg):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(
            "train", ["strategy=fixed", "++strategy.weights.depth=1.5", "++strategy.weights.edge=20.0"]
        )
    strategy = instantiate(cfg.strategy)
    assert strategy.overrides == {"depth": 1.5, "edge": 20.0}
    assert OmegaConf.to_container(cfg.task_options) == {}  # the tasks' default weights (val/loss) unchanged


def test_optuna_sweep_selects_checkpoints_by_the_weight_free_score_and_summarises(optuna_cfg):
    assert optuna_cfg.callbacks.model_checkpoint.monitor == "val/score"
    assert optuna_cfg.callbacks.model_checkpoint.mode == "max"
    assert optuna_cfg.hydra.callbacks.sweep_summary._target_ == "mtl.sweep.SweepSummary"
    assert optuna_cfg.hydra.sweeper.direction == "maximize"


def test_val_score_is_logged_at_every_validation_so_a_sweep_can_monitor_it(make_cfg, tmp_path):
    """The sweep's checkpoint monitor (val/score) must exist when ModelCheckpoint looks for it."""
    from mtl.pipeline import train

    overrides = ["trainer.max_epochs=1", "logger=none", "data.tasks=[semseg,depth]"]
    monitor = ["callbacks.model_checkpoint.monitor=val/score", "callbacks.model_checkpoint.mode=max"]
    metrics, objects = train(make_cfg([*overrides, *monitor]))
    callback = objects["trainer"].checkpoint_callback
    assert Path(callback.best_model_path).is_file() and callback.monitor == "val/score"
    assert float(callback.best_model_score) == pytest.approx(metrics["val/score"])
