"""The TaskExpert / baseline experiments compose to the field's recipe; gate statistics and maps."""

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from mtl.pipeline import evaluate, train

VIT_L = ("vit_large_patch16_384", [5, 11, 17, 23])  # taps after blocks 6/12/18/24
VIT_B = ("vit_base_patch16_384", [2, 5, 8, 11])  # taps after blocks 3/6/9/12
NYUD, PASCAL = ("nyud", [448, 576]), ("pascal", [512, 512])
REAL = {
    "nyud_taskexpert": (*NYUD, *VIT_L, "TaskExpertDecoder"),
    "nyud_taskexpert_vitb": (*NYUD, *VIT_B, "TaskExpertDecoder"),
    "nyud_baseline": (*NYUD, *VIT_L, "MultiHeadDecoder"),
    "pascal_taskexpert": (*PASCAL, *VIT_L, "TaskExpertDecoder"),
    "pascal_taskexpert_vitb": (*PASCAL, *VIT_B, "TaskExpertDecoder"),
    "pascal_baseline": (*PASCAL, *VIT_L, "MultiHeadDecoder"),
}


@pytest.mark.parametrize("experiment", sorted(REAL))
def test_real_experiment_is_the_fields_recipe(make_cfg, experiment):
    data, size, backbone, taps, decoder = REAL[experiment]
    cfg = make_cfg([f"experiment={experiment}"], fast=False)
    job = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
    assert job["data"]["dataset"]["_target_"].endswith("NYUDv2" if data == "nyud" else "PASCALContext")
    assert job["data"]["input_size"] == size and job["data"]["batch_size"] == 2
    assert job["data"]["augment"]["scale"] == [0.5, 2.0] and job["data"]["augment"]["crop"] == size
    bb = job["model"]["backbone"]
    assert (bb["name"], bb["out_indices"], bb["img_size"], bb["pretrained"]) == (backbone, taps, size, True)
    dec = job["model"]["decoder"]
    assert dec["_target_"].endswith(decoder) and dec["channels"] == 256
    opt = job["optimizer"]
    assert (opt["_target_"], opt["lr"], opt["weight_decay"]) == ("torch.optim.Adam", 2e-5, 1e-6)
    sched = job["scheduler"]
    assert (sched["name"], sched["power"], sched["warmup_steps"]) == ("poly", 0.9, 0)
    tr = job["trainer"]
    assert (tr["max_steps"], tr["max_epochs"], tr["precision"]) == (40000, -1, 32)
    assert (tr["accelerator"], tr["devices"]) == ("gpu", "auto")
    assert tr["strategy"]["_target_"] == "lightning.pytorch.strategies.DDPStrategy"  # DDP, with its options
    assert tr["sync_batchnorm"]
    assert job["strategy"]["_target_"].endswith("FixedWeights")  # the field's loss weights


def test_tiny_stand_in_of_a_real_experiment_keeps_its_recipe(make_cfg):
    """What test_experiment_fast_dev_run trains for nyud_taskexpert: tiny ViT, CPU, same recipe."""
    cfg = make_cfg(["experiment=nyud_taskexpert"])
    assert cfg.model.backbone.pretrained is False and cfg.model.backbone.embed_dim == 32
    assert cfg.trainer.accelerator == "cpu" and "strategy" not in cfg.trainer
    assert cfg.optimizer.lr == 2e-5 and cfg.trainer.max_steps == 40000
    assert instantiate(cfg.model.decoder).func.__name__ == "TaskExpertDecoder"


@pytest.mark.slow
def test_gate_statistics_are_logged_and_eval_saves_gate_maps(make_cfg, tmp_path):
    cfg = make_cfg(
        [
            "experiment=synthetic_taskexpert",
            "data.tasks=[semseg,depth]",
            "trainer.max_epochs=1",
            "+trainer.limit_train_batches=2",
            "+trainer.limit_val_batches=1",
            "logger=csv",
        ]
    )
    metrics, _ = train(cfg)
    experts = [f"expert{j}" for j in range(8)] + ["memory"]
    for task in ("semseg", "depth"):
        for layer in range(4):
            means = [metrics[f"val/gates/{task}/layer{layer}/{e}"] for e in experts]
            assert sum(means) == pytest.approx(1.0, abs=1e-4)
            assert 0 < metrics[f"val/gates/{task}/layer{layer}/entropy"] <= 1
    eval_cfg = make_cfg(
        [
            "experiment=synthetic_taskexpert",
            "data.tasks=[semseg,depth]",
            f"ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}",
            "callbacks=gate_maps",
            "eval.pictures=2",
            "+trainer.limit_test_batches=1",
        ],
        config_name="eval",
    )
    eval_cfg.paths.output_dir = str(tmp_path / "eval")
    results, objects = evaluate(eval_cfg)
    assert "test/gates/depth/layer3/memory" in results
    pictures = sorted(p.name for p in (tmp_path / "eval" / "pictures").glob("gates_*.png"))
    assert pictures == [f"gates_{t}_{i:03d}.png" for t in ("depth", "semseg") for i in range(2)]
    # every gate mean in gates.md, a short summary on the console (GateReport)
    assert objects["reports"]["gates"] == str(tmp_path / "eval" / "gates.md")
    assert "| depth | 3 |" in (tmp_path / "eval" / "gates.md").read_text()
