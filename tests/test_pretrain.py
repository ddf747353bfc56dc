"""Synthetic pretraining (mtl/pretrain.py) and ``pretrained=synthetic`` (configs/pretrained/, InitWeights).

A tiny recipe (16 px, 2 steps of batch 2) is pretrained once per module into a temporary cache.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from conftest import compose_cfg
from hydra.utils import instantiate

from mtl.data.synthetic import SPLITS, SyntheticScenes
from mtl.data.synthetic.corpus import CORPUS_TAG, SCENES_TAG, VARIANTS, SyntheticCorpus, stream_seed
from mtl.initial_weights import init_weights_paths, load_init_weights, state_fingerprint
from mtl.pipeline import build_datamodule, build_module
from mtl.pretrain import missing_pretrained_message, parse_args, plan, pretrain, pretrain_command

TINY = {"steps": 2, "batch_size": 2, "corpus_length": 8, "decoder_channels": 8, "warmup_steps": 1}
SIZE = 16


def recipe_overrides(cache: Path, recipe: dict = TINY) -> list[str]:
    size = f"data.dataset.resolution=[{SIZE},{SIZE}]"
    return ["pretrained=synthetic", f"pretrained.cache_dir={cache}", size,
            *(f"pretrained.recipe.{k}={v}" for k, v in recipe.items())]  # fmt: skip


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pretrained")


@pytest.fixture(scope="module")
def swin_file(cache: Path) -> Path:
    return pretrain("swin_mini", resolution=SIZE, recipe=TINY, cache_dir=cache)


@pytest.fixture(scope="module")
def vit_file(cache: Path) -> Path:
    return pretrain("vit_tiny", resolution=SIZE, recipe=TINY, cache_dir=cache)


def test_corpus_is_disjoint_from_every_evaluation_stream():
    # a scene is fixed by (stream seed, index): no corpus stream seed may be an evaluation stream seed
    assert stream_seed(0, "val", SCENES_TAG) == SyntheticScenes(split="val", length=1, seed=0).stream_seed
    assert SyntheticCorpus(split="train", length=1, seed=0).stream_seed == stream_seed(0, "train", CORPUS_TAG)
    seeds = range(1000)
    scenes = {stream_seed(s, split, SCENES_TAG) for s in seeds for split in SPLITS}
    corpus = {stream_seed(s, split, CORPUS_TAG) for s in seeds for split in SPLITS}
    assert len(scenes) == len(corpus) == 3000 and not scenes & corpus
    # and the images differ from the default experiment's (seed 0) first scenes of every split
    first = SyntheticCorpus(split="train", length=4, resolution=(32, 32), seed=0)
    for split in SPLITS:
        ev = SyntheticScenes(split=split, length=4, resolution=(32, 32), seed=0)
        assert all(not (first[i]["image"] == ev[i]["image"]).all() for i in range(4))


def test_corpus_cycles_its_scene_distributions():
    c = SyntheticCorpus(split="train", length=8, resolution=(16, 16), tasks=["depth"])
    assert len(c.variants) == len(VARIANTS) and c.variants[2]["num_objects"] == (6, 12)
    with pytest.raises(ValueError, match="fov_deg"):
        SyntheticCorpus(split="train", length=2, variants=[{"fov_deg": 500.0}])


def test_tiny_pretraining_writes_checkpoint_and_recipe_then_reuses_it(swin_file, cache, caplog):
    ckpt = torch.load(swin_file, map_location="cpu", weights_only=True)
    assert swin_file.parent == cache and swin_file.with_suffix(".json").is_file()
    assert ckpt["format"] == "mtl-pretrained-backbone" and ckpt["recipe"]["steps"] == 2
    assert (
        ckpt["recipe"]["backbone"]["img_size"] == [SIZE, SIZE]
        and ckpt["recipe"]["backbone"]["embed_dim"] == 48
    )
    assert ckpt["code"]["commit"] and ckpt["date"] and ckpt["command"].startswith("python -m mtl.pretrain")
    assert ckpt["fingerprint"] == state_fingerprint(ckpt["state_dict"])
    assert not list(cache.glob(".*"))  # no temporary file or work folder left
    mtime = swin_file.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="mtl.pretrain"):
        again = pretrain("swin_mini", resolution=SIZE, recipe=TINY, cache_dir=cache)
    assert again == swin_file and swin_file.stat().st_mtime_ns == mtime
    assert "found, reusing" in caplog.text
    # another recipe, backbone or size is another file
    other = {plan("swin_mini", resolution=SIZE, recipe={**TINY, "steps": 3}, cache_dir=cache).path,
             plan("swin_mini", resolution=32, recipe=TINY, cache_dir=cache).path,
             plan("vit_tiny", resolution=SIZE, recipe=TINY, cache_dir=cache).path}  # fmt: skip
    assert len(other) == 3 and swin_file not in other


def _module_with_init(cfg):
    module = build_module(cfg, build_datamodule(cfg))
    instantiate(cfg.callbacks.pretrained, _convert_="all").setup(None, module, "fit")
    return module


@pytest.mark.parametrize(
    ("backbone", "extra"),
    [("swin_mini", []), ("vit_tiny", []), ("mtlora_swin_mini", ["model=mtlora", "model.backbone.rank=4"])],
)
def test_pretrained_synthetic_loads_identical_backbone_weights(
    request, tmp_path, cache, swin_file, vit_file, backbone, extra
):
    file = vit_file if backbone == "vit_tiny" else swin_file  # MTLoRA wraps swin_mini: the same file
    cfg = compose_cfg([*extra, f"model/backbone={backbone}", *recipe_overrides(cache)], tmp_path)
    assert init_weights_paths(cfg.callbacks) == [str(file)]
    module = _module_with_init(cfg)
    own = module.state_dict()
    state = torch.load(file, map_location="cpu", weights_only=True)["state_dict"]
    for key, value in state.items():
        target = f"model.backbone.{key}"
        if target not in own:  # a LoRA-adapted layer keeps its pretrained weight at .base
            head, _, leaf = target.rpartition(".")
            target = f"{head}.base.{leaf}"
        assert torch.equal(own[target], value), key


def test_missing_checkpoint_prints_the_command_that_makes_it(tmp_path):
    empty = tmp_path / "empty"
    cfg = compose_cfg(recipe_overrides(empty), tmp_path)
    with pytest.raises(FileNotFoundError, match="python -m mtl.pretrain backbone=swin_mini") as err:
        _module_with_init(cfg)
    message = str(err.value)
    command = message.split("\n")[1].strip()
    assert command.startswith("python -m mtl.pretrain ") and "pretrained=none" in message
    args = parse_args(command.split()[3:])  # the printed command names exactly the missing file
    assert (
        plan(**args).path == Path(init_weights_paths(cfg.callbacks)[0]) and plan(**args).path.parent == empty
    )


def test_command_for_a_non_default_architecture(cache):
    p = plan("vit_tiny", resolution=SIZE, recipe=TINY, backbone_overrides={"depth": 2}, cache_dir=cache)
    command = pretrain_command(p.recipe, cache)
    assert "backbone=vit_tiny backbone.depth=2 resolution=16x16" in command
    assert plan(**parse_args(command.split()[3:])).path == p.path
    assert str(p.path) in missing_pretrained_message(p.path, p.recipe)
    # vit_mini is the same timm model with 4×4 patches: each recipe names its own option
    mini = plan("vit_mini", resolution=SIZE, recipe=TINY, cache_dir=cache)
    command = pretrain_command(mini.recipe, cache)
    assert "backbone=vit_mini resolution=16x16" in command and mini.path != p.path
    assert plan(**parse_args(command.split()[3:])).path == mini.path


def test_recipe_mismatch_is_refused_naming_file_and_keys(tmp_path, cache, swin_file):
    other = {**TINY, "steps": 3}
    cfg = compose_cfg(recipe_overrides(tmp_path, other), tmp_path)
    wrong = Path(init_weights_paths(cfg.callbacks)[0])
    wrong.write_bytes(swin_file.read_bytes())  # a file that claims the name of another recipe
    with pytest.raises(ValueError, match=r"another recipe.*\n  steps: file 2, run 3") as err:
        _module_with_init(cfg)
    assert str(wrong) in str(err.value)


def test_damaged_file_is_refused_by_its_fingerprint(tmp_path, swin_file):
    ckpt = torch.load(swin_file, map_location="cpu", weights_only=True)
    key = "model.patch_embed.proj.weight"
    ckpt["state_dict"][key] = ckpt["state_dict"][key] + 1e-3
    cfg = compose_cfg(recipe_overrides(tmp_path), tmp_path)
    damaged = Path(init_weights_paths(cfg.callbacks)[0])
    torch.save(ckpt, damaged)
    with pytest.raises(
        ValueError, match=f"'{damaged}': tensor '{key}' does not match its recorded fingerprint"
    ):
        _module_with_init(cfg)


def test_other_architecture_is_refused_naming_both(tmp_path, swin_file):
    size = f"data.dataset.resolution=[{SIZE},{SIZE}]"
    cfg = compose_cfg(["model/backbone=vit_tiny", size], tmp_path)
    vit = build_module(cfg, build_datamodule(cfg))
    with pytest.raises(ValueError, match=r"swin_tiny_patch4_window7_224.*TimmBackbone of a timm \w*ViT"):
        load_init_weights(vit, swin_file)
    wide = compose_cfg(["model.backbone.embed_dim=32", size], tmp_path)
    narrow = build_module(wide, build_datamodule(wide))
    shapes = (
        r"'model.patch_embed.proj.weight' is \[48, 3, 4, 4\] in the file, "
        r"'model.backbone.model.patch_embed.proj.weight' is \[32, 3, 4, 4\] in the model"
    )
    with pytest.raises(ValueError, match=shapes):
        load_init_weights(narrow, swin_file)


def test_default_training_does_not_use_the_cache(tmp_path):
    cfg = compose_cfg([], tmp_path)
    assert cfg.pretrained.source == "none" and "pretrained" not in cfg.callbacks
    assert init_weights_paths(cfg.callbacks) == []
    mtlora = compose_cfg(["experiment=synthetic_mtlora_pretrained"], tmp_path)
    assert (
        mtlora.pretrained.source == "synthetic" and mtlora.callbacks.pretrained.pretrained.backbone.rank == 16
    )


@pytest.mark.slow
def test_training_and_merge_start_from_the_pretrained_weights(tmp_path, cache, swin_file):
    from mtl.merging.run import rebuild_initial_state
    from mtl.pipeline import train

    cfg = compose_cfg([*recipe_overrides(cache), "debug=fdr", "logger=none"], tmp_path)
    _, objects = train(cfg)
    fingerprint = next(
        c for c in objects["trainer"].callbacks if type(c).__name__ == "InitFingerprint"
    ).fingerprint
    stored = torch.load(swin_file, map_location="cpu", weights_only=True)["fingerprint"]
    assert {f"model.backbone.{k}": v for k, v in stored.items()} == {
        k: v for k, v in fingerprint.items() if k.startswith("model.backbone.")
    }  # θ0 of the run is the pretrained backbone
    rebuilt = state_fingerprint(rebuild_initial_state(compose_cfg([*recipe_overrides(cache)], tmp_path)))
    assert rebuilt == fingerprint  # merge.py rebuilds that θ0 exactly (backbone and seeded decoder)
