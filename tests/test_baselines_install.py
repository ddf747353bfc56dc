"""Single-task baselines: a multirun writes into its sweep folder only, and installing one into
configs/baselines/ is an explicit, checked step (issue 22, item 1)."""

from __future__ import annotations

import filecmp
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

import mtl.baselines as baselines
from mtl.baselines import METRICS_PROTOCOL, WriteBaseline, install, write_baseline

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SHIPPED = "synthetic_nyud_swin_mini"
METRICS = {
    "semseg": {"test/semseg/miou": 0.4, "val/semseg/miou": 0.3, "val/semseg/iou_0": 0.1},
    "depth": {"test/depth/rmse": 0.7, "val/depth/rmse": 0.8, "val/depth/loss": 0.2},
    "normals": {"test/normals/mean": 20.0, "val/normals/nonfinite": 0.0},
    "edge": {"test/edge/odsf": 0.5, "val/edge/f": 0.6},
}


def fake_job(
    sweep: Path, task: str, *, epochs: int = 3, seed: int = 42, pretrained: str | None = None
) -> Path:
    """A job folder as `train.py -m experiment=synthetic_single_task task=<task>` leaves it."""
    job = sweep / task
    (job / ".hydra").mkdir(parents=True)
    (job / "metrics.json").write_text(json.dumps(METRICS[task]))
    config = {  # <job>/config.yaml: the resolved config train() writes, with the code version
        "task": task,
        "seed": seed,
        "optimized_metric": None,
        "data": {
            "tasks": [task],
            "dataset": {
                "_target_": "mtl.data.synthetic.SyntheticScenes",
                "resolution": [128, 128],
                "length": 1040,
            },
            "input_size": [128, 128],
        },
        "trainer": {"max_epochs": epochs, "max_steps": -1},
        "code": {"commit": "0123abc", "dirty": False},
    }
    if pretrained is not None:  # pretrained=<source> (configs/pretrained/)
        config["pretrained"] = {"source": pretrained}
    (job / "config.yaml").write_text(yaml.safe_dump(config))
    (job / ".hydra" / "config.yaml").write_text(
        yaml.safe_dump({**config, "data": {**config["data"], "tasks": ["${task}"]}})
    )
    hydra_yaml = {
        "hydra": {
            "runtime": {
                "choices": {"data": "synthetic_nyud", "model/backbone": "swin_mini"},
                "config_sources": [
                    {"path": "hydra.conf", "schema": "pkg", "provider": "hydra"},
                    {"path": str(CONFIGS), "schema": "file", "provider": "main"},  # read only
                ],
            },
            "job": {"num": list(METRICS).index(task)},
        }
    }
    (job / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra_yaml))
    (job / ".hydra" / "overrides.yaml").write_text(
        yaml.safe_dump(["experiment=synthetic_single_task", f"task={task}"])
    )
    return job


def fake_sweep(root: Path, tasks: list[str], **kwargs) -> Path:
    for task in tasks:
        fake_job(root, task, **kwargs)
    return root


@pytest.fixture
def baselines_copy(tmp_path, monkeypatch) -> Path:
    """A copy of configs/baselines/ standing in for it (the real folder is never written by tests),
    without the installed baselines of the default recipe (``*_128px_3ep*``): the tests install
    their own runs of that recipe under those names."""
    copy = tmp_path / "configs" / "baselines"
    shutil.copytree(CONFIGS / "baselines", copy, ignore=shutil.ignore_patterns("*_128px_3ep*"))
    monkeypatch.setattr(baselines, "CONFIG_DIR", copy)
    return copy


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_debug_multirun_writes_into_its_sweep_folder_and_leaves_configs_baselines_alone(
    tmp_path, baselines_copy, capsys
):
    real_before = _snapshot(CONFIGS / "baselines")
    copy_before = _snapshot(baselines_copy)
    sweep = fake_sweep(tmp_path / "multiruns" / "2026-01-01_00-00-00", ["semseg", "depth"])
    # the callback exactly as the single-task experiment configures it
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", ["experiment=synthetic_single_task", "task=semseg"], return_hydra_config=True)
    hook = instantiate(cfg.hydra.callbacks.write_baseline)
    assert isinstance(hook, WriteBaseline)
    hook.on_multirun_end(config=OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    assert _snapshot(baselines_copy) == copy_before, "a multirun must never write into configs/baselines/"
    assert _snapshot(CONFIGS / "baselines") == real_before
    written = yaml.safe_load((sweep / "baseline.yaml").read_text())
    assert written["metrics"] == {"semseg/miou": 0.4, "depth/rmse": 0.7}
    assert written["name"] == "synthetic_nyud_swin_mini_128px_3ep"  # what `install` would name it
    out = capsys.readouterr().out
    assert str(sweep / "baseline.yaml") in out and "semseg/miou: 0.4" in out  # printed
    assert "normals" in out and "edge" in out  # the tasks it lacks before it can be installed


def test_callback_pointed_at_a_folder_never_replaces_a_file_there(tmp_path, baselines_copy, capsys):
    sweep = fake_sweep(tmp_path / "sweep", ["semseg", "depth", "normals", "edge"])
    before = _snapshot(baselines_copy)
    WriteBaseline(out_dir=str(baselines_copy), name=SHIPPED).on_multirun_end(
        config=OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}})
    )
    assert _snapshot(baselines_copy) == before
    assert yaml.safe_load((sweep / "baseline.yaml").read_text())["name"] == SHIPPED
    assert "not replaced" in capsys.readouterr().out


def test_install_refuses_an_incomplete_task_set_naming_the_missing_tasks(tmp_path, baselines_copy, capsys):
    sweep = fake_sweep(tmp_path / "sweep", ["semseg", "depth"])
    with pytest.raises(ValueError, match=r"no runs of task\(s\) \['normals', 'edge'\]"):
        install(sweep, baselines_copy)
    write_baseline(sweep)  # the sweep's own file is refused the same way
    with pytest.raises(ValueError, match="normals"):
        install(sweep / "baseline.yaml", baselines_copy)
    with pytest.raises(SystemExit) as exit_:  # the command line: exit status 2 and the message
        baselines.main(["install", str(sweep), "--out", str(baselines_copy)])
    assert exit_.value.code == 2 and "['normals', 'edge']" in capsys.readouterr().err
    assert not list(baselines_copy.glob("*_128px_*"))
    # the missing tasks run later in another sweep: both folders together are complete
    later = fake_sweep(tmp_path / "later", ["normals", "edge"])
    assert install([sweep, later], baselines_copy).name == "synthetic_nyud_swin_mini_128px_3ep.yaml"


def test_install_records_the_recipe_in_the_file_and_its_name_and_it_loads(tmp_path, baselines_copy, capsys):
    sweep = fake_sweep(tmp_path / "sweep", ["semseg", "depth", "normals", "edge"])
    baselines.main(["install", str(sweep)])  # default folder: configs/baselines (here the copy)
    path = baselines_copy / "synthetic_nyud_swin_mini_128px_3ep.yaml"
    assert "baselines=synthetic_nyud_swin_mini_128px_3ep" in capsys.readouterr().out
    text = path.read_text()
    assert text.startswith("# @package baselines\n")
    node = yaml.safe_load(text)
    assert node["name"] == path.stem and node["protocol"] == METRICS_PROTOCOL
    recipe = node["recipe"]
    expected = {
        "dataset": "synthetic_nyud",
        "dataset_tasks": ["semseg", "depth", "normals", "edge"],  # configs/data/synthetic_nyud.yaml
        "resolution": [128, 128],
        "length": 1040,
        "max_epochs": 3,
        "max_steps": -1,
        "backbone": "swin_mini",
        "seeds": [42],
        "metrics_protocol": METRICS_PROTOCOL,
        "code": {"commit": "0123abc", "dirty": False},
        "tasks": ["depth", "edge", "normals", "semseg"],
    }
    assert {k: recipe[k] for k in expected} == expected and recipe["date"]
    assert node["metrics"] == {
        "semseg/miou": 0.4,
        "depth/rmse": 0.7,
        "normals/mean": 20.0,
        "edge/odsf": 0.5,
        "edge/f": 0.6,
    }
    # selectable as baselines=<name>, without the old-protocol warning
    from mtl.pipeline import baseline_metrics

    # (under a name of its own: configs/baselines/ ships a file of this name, which would win)
    own = path.with_name(f"copy_of_{path.name}")
    own.write_text(text)
    searchpath = f"hydra.searchpath=[file://{baselines_copy.parent}]"
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", [searchpath, f"baselines={own.stem}"])
    assert baseline_metrics(cfg) == node["metrics"]
    # another recipe, another name: a 1-epoch debug sweep cannot take the 3-epoch name
    short = fake_sweep(tmp_path / "short", ["semseg", "depth", "normals", "edge"], epochs=1)
    assert install(short, baselines_copy).name == "synthetic_nyud_swin_mini_128px_1ep.yaml"
    assert install(short, baselines_copy, name="mine").name == "mine_128px_1ep.yaml"


def test_a_pretrained_start_is_another_baseline_and_is_not_merged_with_scratch_runs(tmp_path, baselines_copy):
    tasks = ["semseg", "depth", "normals", "edge"]
    scratch = install(fake_sweep(tmp_path / "scratch", tasks), baselines_copy)
    explicit_none = install(
        fake_sweep(tmp_path / "none", tasks, pretrained="none"), baselines_copy, force=True
    )
    assert scratch == explicit_none  # pretrained=none is the default start: the same name
    path = install(fake_sweep(tmp_path / "pre", tasks, pretrained="synthetic"), baselines_copy)
    assert path.name == "synthetic_nyud_swin_mini_128px_3ep_synthetic_pretrained.yaml"
    assert yaml.safe_load(path.read_text())["recipe"]["init"] == "synthetic"
    mixed = tmp_path / "mixed"
    fake_job(mixed, "semseg")
    fake_job(mixed, "depth", pretrained="synthetic")
    with pytest.raises(ValueError, match=r"init: 'synthetic' vs None"):
        write_baseline(mixed)


def test_install_refuses_to_overwrite(tmp_path, baselines_copy):
    sweep = fake_sweep(tmp_path / "sweep", ["semseg", "depth", "normals", "edge"])
    path = install(sweep, baselines_copy)
    first = path.read_bytes()
    with pytest.raises(FileExistsError, match="--force"):
        install(sweep, baselines_copy)
    assert path.read_bytes() == first
    shipped = (baselines_copy / f"{SHIPPED}.yaml").read_bytes()
    with pytest.raises(FileExistsError, match="exists"):  # the shipped name gets the recipe: taken too
        install(sweep, baselines_copy, name=SHIPPED)
    assert (baselines_copy / f"{SHIPPED}.yaml").read_bytes() == shipped
    assert install(sweep, baselines_copy, force=True) == path  # explicit --force replaces it


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_install_never_replaces_a_git_tracked_file_without_force(tmp_path):
    repo = tmp_path / "repo"
    folder = repo / "configs" / "baselines"
    folder.mkdir(parents=True)
    tracked = folder / "synthetic_nyud_swin_mini_128px_3ep.yaml"
    tracked.write_text("# @package baselines\nmetrics: {}\n")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(["git", "add", "."], cwd=repo, check=True)
    tracked.unlink()  # deleted in the work tree, still tracked: not free to take
    sweep = fake_sweep(tmp_path / "sweep", ["semseg", "depth", "normals", "edge"])
    with pytest.raises(FileExistsError, match="tracked by git"):
        install(sweep, folder)
    assert not tracked.exists()
    assert install(sweep, folder, force=True) == tracked


def test_runs_of_different_recipes_are_not_merged(tmp_path):
    sweep = tmp_path / "sweep"
    fake_job(sweep, "semseg", epochs=3)
    fake_job(sweep, "depth", epochs=1)
    with pytest.raises(
        ValueError, match=r"depth and .*semseg were trained differently \(max_epochs: 1 vs 3\)"
    ):
        write_baseline(sweep)


def test_the_shipped_baseline_still_loads_and_is_not_installable_over(tmp_path, baselines_copy):
    from mtl.pipeline import baseline_metrics

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", [f"baselines={SHIPPED}"])
    assert cfg.baselines.name == SHIPPED and cfg.baselines.recipe.max_epochs == 3
    assert set(baseline_metrics(cfg)) >= {"semseg/miou", "depth/rmse", "normals/mean", "edge/odsf", "edge/f"}
    # it was measured with the former metric definitions: re-installing it is refused
    with pytest.raises(ValueError, match="protocol 1"):
        install(CONFIGS / "baselines" / f"{SHIPPED}.yaml", baselines_copy, name="again")
    assert filecmp.cmp(
        CONFIGS / "baselines" / f"{SHIPPED}.yaml", baselines_copy / f"{SHIPPED}.yaml", shallow=False
    )
