"""``python train.py data=nyud`` (issue 22, item 11): the plain dataset switch says what it trains.

The switch keeps the default experiment's synthetic CPU recipe and model (the experiments'
resolved configs do not change, tests/test_config_groups.py); a one-line warning names the model,
backbone, resolution, length and optimiser trained and the experiment of the dataset's recipe.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import compose_cfg
from omegaconf import OmegaConf

from mtl.data.switch import dataset_switch_warning

EXPERIMENTS = Path(__file__).resolve().parents[2] / "configs" / "experiment"


def warning_for(overrides: list[str], tmp_path: Path) -> str | None:
    cfg = compose_cfg(overrides, tmp_path)
    choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
    assert dataset_switch_warning(cfg) == dataset_switch_warning(cfg, choices)  # read from the Hydra app
    return dataset_switch_warning(cfg, choices)


@pytest.mark.parametrize(
    ("data", "name", "size", "experiment"),
    [
        ("nyud", "NYUD-v2", "448×576", "nyud_baseline"),
        ("pascal_context", "PASCAL-Context", "512×512", "pascal_baseline"),
    ],
)
def test_plain_dataset_switch_says_what_it_trains(tmp_path, data, name, size, experiment):
    msg = warning_for([f"data={data}"], tmp_path)
    assert msg is not None and "\n" not in msg
    for part in (f"data={data}", "experiment=synthetic_baseline", "recipe=synthetic_cpu", "multihead",
                 "swin_mini (from scratch)", f"on {name} at {size}", "for 3 epochs", "AdamW lr 0.001",
                 f"experiment={experiment}"):  # fmt: skip
        assert part in msg, (part, msg)
    assert (EXPERIMENTS / f"{experiment}.yaml").is_file()


def test_switch_from_another_synthetic_experiment_names_it(tmp_path):
    msg = warning_for(["experiment=synthetic_m3vit", "data=nyud"], tmp_path)
    assert "experiment=synthetic_m3vit" in msg and "m3vit" in msg and "experiment=nyud_baseline" in msg


@pytest.mark.parametrize(
    "overrides",
    [[], ["data=synthetic_pascal"], ["experiment=nyud_baseline"], ["experiment=pascal_mtlora"],
     ["experiment=nyud_baseline", "trainer.max_steps=10"]],
)  # fmt: skip
def test_no_warning_for_synthetic_data_or_a_dataset_recipe(tmp_path, overrides):
    assert warning_for(overrides, tmp_path) is None


def test_no_hydra_app_no_warning(tmp_path):
    from hydra.core.hydra_config import HydraConfig

    cfg = compose_cfg(["data=nyud"], tmp_path)
    HydraConfig().cfg = None  # as outside a Hydra app
    assert dataset_switch_warning(cfg) is None
