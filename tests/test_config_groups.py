"""Config groups along the real axes (issue 18): model/backbone × model/decoder presets, recipes, short
dataset experiments, one `_target_` convention, group names = package names, and every experiment
composing to the values it composed to before the redesign.

``tests/configs/resolved_before_issue18.json`` holds, per experiment, the resolved config (without
``hydra``) composed before the redesign from ``train.yaml`` (key ``<experiment>``) and ``eval.yaml``
with ``ckpt_path=/CKPT`` (key ``eval_<experiment>``), with the paths below. Only the renames and
new keys listed here, each with its reason, may differ; any other difference names the experiment
and the key.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
BEFORE = json.loads((ROOT / "tests" / "configs" / "resolved_before_issue18.json").read_text())
PATHS = [
    "paths.data_dir=/DATA",
    "paths.root_dir=/ROOT",
    "paths.output_dir=/OUT",
    "paths.log_dir=/LOG",
    "paths.work_dir=/WORK",
]

# `_target_` renames: every mtl target now names the module that defines it (test below).
RENAMED_TARGETS = {
    "mtl.backbones.TimmBackbone": "mtl.backbones.timm_backbone.TimmBackbone",
    "mtl.strategies.FixedWeights": "mtl.strategies.weighting.FixedWeights",
    "mtl.strategies.GradientAggregation": "mtl.strategies.aggregation.GradientAggregation",
    "mtl.strategies.DBMTL": "mtl.strategies.dbmtl.DBMTL",
    "mtl.strategies.DynamicWeightAverage": "mtl.strategies.adaptive.DynamicWeightAverage",
    "mtl.strategies.GeometricLoss": "mtl.strategies.adaptive.GeometricLoss",
    "mtl.strategies.RandomLossWeighting": "mtl.strategies.adaptive.RandomLossWeighting",
    "mtl.strategies.UncertaintyWeighting": "mtl.strategies.adaptive.UncertaintyWeighting",
    "mtl.strategies.FAMO": "mtl.strategies.famo.FAMO",
    "mtl.strategies.FlatMTL": "mtl.strategies.fmtl.FlatMTL",
    "mtl.strategies.GradNorm": "mtl.strategies.gradnorm.GradNorm",
    "mtl.strategies.SAM": "mtl.strategies.sam.SAM",
    "mtl.merging.AdaMerging": "mtl.merging.adamerging.AdaMerging",
    "mtl.merging.WeightAveraging": "mtl.merging.arithmetic.WeightAveraging",
    "mtl.merging.TaskArithmetic": "mtl.merging.arithmetic.TaskArithmetic",
    "mtl.merging.ModelBreadcrumbs": "mtl.merging.breadcrumbs.ModelBreadcrumbs",
    "mtl.merging.TIESMerging": "mtl.merging.ties.TIESMerging",
    # the training callback moved out of mtl/merging/ (issue 18: it is not a merging method)
    "mtl.merging.fingerprint.InitFingerprint": "mtl.callbacks.InitFingerprint",
}
# key renames (old dotted path → new): the `baselines` group's package now has the group's name
RENAMED_KEYS = {"baseline": "baselines"}
# top-level keys that only the new compositions have, per entry point, with the reason
NEW_KEYS = {
    "eval": {
        "eval_steps": "pipeline.evaluate's pluggable evaluation steps (configs/eval_steps/)",
        "gpu": "issue 20: GPU knobs (configs/gpu/), defaults keep the papers' fp32",
        "ckpt_trusted": "issue 21: checkpoints load with weights_only=True unless the user vouches for one",
    },
    "train": {
        "gpu": "issue 20: GPU knobs (configs/gpu/), defaults keep the papers' fp32",
        "pretrained": "issue 25: initial backbone weights (configs/pretrained/), default none",
    },
}
# deliberate value changes made by later issues, to match the field's reference code: experiment
# (or "*" for every experiment) → dotted key or key prefix → reason. Only the listed keys may differ
# from the snapshot; the tests of the issue that changed them assert the new values.
CHANGED_LATER: dict[str, dict[str, str]] = {
    "*": {
        "trainer.strategy": "issue 20: trainer=ddp builds a DDPStrategy with its options (bucket size, …)",
        "data.num_workers": "issue 20: real datasets size their loader workers to the node ('auto')",
        "data.cache": "issue 24 (new): real datasets read decoded samples from a memory-mapped cache",
        "data.cache_dir": "issue 24 (new): where that cache lives (default under the dataset root)",
        "data.fast_augment": "issue 24 (new): the train augmentation in one pass (same draws, same samples)",
        "data.photometric_on_device": "issue 24 (new): photometric distortion on the device (auto: on a GPU)",
        "module.nonfinite.check_grads": "issue 21: a non-finite gradient behind finite losses skips the step",
        "data.allow_bad_data": "issue 21: the data preflight stops on wrong encodings unless this is set",
        "data.split_kwargs.test": "issue 22: the synthetic test split (eval.split=test) has val's length",
        "callbacks.model_checkpoint.save_last": "issue 21: last.ckpt has one writer (PeriodicCheckpoint)",
        "logger.csv._target_": "issue 21: mtl.loggers.CSVLogger continues metrics.csv on resume",
        "logger.tensorboard._target_": "issue 21: mtl.loggers.TensorBoardLogger continues on resume",
        "callbacks.progress": "issue 22: progress lines in the log when stdout is not a terminal",
        "eval.edge.progress": "issue 22: progress of the exact edge evaluation",
        "eval.edge.progress_interval": "issue 22: progress of the exact edge evaluation",
        "extras.print_config": "issue 22: the config dump is opt-in; a short run summary is always logged",
        "eval.run_config": "issue 22 (new): eval.py takes the model and data from the checkpoint's run",
        "model.decoder.gate_mode": "issue 25 (new): TaskExpert ablation option, the paper's per-pixel gates",
        "model.decoder.fusion": "issue 25 (new): TaskExpert ablation option, the paper's final memory",
        "model.decoder.expert_activation": "issue 25 (new): TaskExpert ablation option, MLP experts",
    },
    **{
        f"{dataset}_mtlora": {
            "model.backbone.drop_path_rate": "issue 19 (new): stochastic depth 0.2, the MTLoRA reference's",
            "model.backbone.shared_mode": "issue 19 (new): the reference's task path ('matrix') or a variant",
            "model.backbone.lora_merging": "issue 19 (new): MTLoRA+ (LoRA on patch merging) switch, off",
            **(
                {}
                if dataset == "synthetic"  # keeps its CPU-sized decoder width and its recipe
                else {
                    "model.decoder.channels": "issue 19: the MTLoRA reference's [18, 36, 72, 144] per level",
                    "scheduler.min_ratio": "issue 19: the reference's cosine floor MIN_LR / BASE_LR = 0.01",
                }
            ),
            **(
                {
                    "data.tasks": "issue 19: the paper's 4 tasks (no edge), as its 8.34M count",
                    "model.backbone.tasks": "issue 19: follows data.tasks (the paper's 4 tasks)",
                }
                if dataset == "pascal"
                else {}
            ),
        }
        for dataset in ("nyud", "pascal", "synthetic")
    },
    "nyud_m3vit": {
        "model.backbone.noisy_gating": "issue 19: no router noise, as M³ViT's reference runs",
        "model.backbone.same_router_init": "issue 19 (new): task routers start identical, as the reference's",
        "model.backbone.task_embed": "issue 19 (new): the reference's task code for a shared router",
        "model.backbone.task_embed_dim": "issue 19 (new): width of that task code",
    },
    "pascal_m3vit": {
        "model.backbone.noisy_gating": "issue 19: no router noise, as M³ViT's reference runs",
        "model.backbone.same_router_init": "issue 19 (new): task routers start identical, as the reference's",
        "model.backbone.task_embed": "issue 19 (new): the reference's task code for a shared router",
        "model.backbone.task_embed_dim": "issue 19 (new): width of that task code",
    },
    "synthetic_m3vit": {
        "model.backbone.noisy_gating": "issue 19: no router noise, as M³ViT's reference runs",
        "model.backbone.same_router_init": "issue 19 (new): task routers start identical, as the reference's",
        "model.backbone.task_embed": "issue 19 (new): the reference's task code for a shared router",
        "model.backbone.task_embed_dim": "issue 19 (new): width of that task code",
    },
}
# mtl targets that name a package's public surface instead of the defining module
PUBLIC_PACKAGE_TARGETS = {
    "mtl.data.synthetic.SyntheticScenes": "the mtl.data.synthetic package exports its one dataset",
}
# the seven dataset pairs that must be short lists of choices
PAIRS = ["baseline", "m3vit", "mtlora", "single_task", "slimmable", "taskexpert", "taskexpert_vitb"]
PAIRS += ["m3vit_ref"]  # issue 19: M³ViT's own recipe (SGD, 100 epochs, PUP heads)
MAX_EXPERIMENT_LINES = 12


@pytest.fixture(scope="module")
def composer() -> Iterator:
    """``composer(config_name, overrides)`` → the composed config (no Hydra run, no output folder)."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        yield lambda name, overrides, hydra=False: compose(
            config_name=name, overrides=list(overrides), return_hydra_config=hydra
        )


def resolved(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.create({k: cfg[k] for k in cfg if k != "hydra"}), resolve=True)


def renamed(node: Any) -> Any:
    """``node`` (a config before the redesign) with the listed `_target_` renames applied."""
    if isinstance(node, dict):
        return {
            k: RENAMED_TARGETS.get(v, v) if k == "_target_" and isinstance(v, str) else renamed(v)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [renamed(v) for v in node]
    return node


def move_key(cfg: dict, old: str, new: str) -> None:
    *parents, leaf = old.split(".")
    node = cfg
    for p in parents:
        if not isinstance(node.get(p), dict):
            return
        node = node[p]
    if leaf in node:
        value = node.pop(leaf)
        *new_parents, new_leaf = new.split(".")
        node = cfg
        for p in new_parents:
            node = node.setdefault(p, {})
        node[new_leaf] = value


def differences(old: Any, new: Any, path: str = "") -> Iterator[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new), key=str):
            key = f"{path}.{k}" if path else str(k)
            if k not in new:
                yield f"{key}: removed (was {old[k]!r})"
            elif k not in old:
                yield f"{key}: added ({new[k]!r})"
            else:
                yield from differences(old[k], new[k], key)
    elif old != new or type(old) is not type(new):
        yield f"{path}: {old!r} → {new!r}"


@pytest.mark.parametrize("entry", sorted(BEFORE))
def test_experiment_composes_to_the_values_before_the_redesign(composer, entry):
    config_name, experiment = ("eval", entry[5:]) if entry.startswith("eval_") else ("train", entry)
    extra = ["ckpt_path=/CKPT"] if config_name == "eval" else []
    now = resolved(composer(config_name, [*extra, f"experiment={experiment}", *PATHS]))
    before = renamed(BEFORE[entry])
    for old, new in RENAMED_KEYS.items():
        move_key(before, old, new)
    for key in NEW_KEYS[config_name]:
        now.pop(key, None)
    allowed = {**CHANGED_LATER.get("*", {}), **CHANGED_LATER.get(experiment, {})}
    diff = [
        d
        for d in differences(before, now)
        if not any(d.split(":")[0] == k or d.startswith(f"{k}.") for k in allowed)
    ]
    assert not diff, f"experiment '{experiment}' ({config_name}.yaml) changed:\n  " + "\n  ".join(diff)


def test_every_experiment_before_the_redesign_still_exists():
    names = {e.removeprefix("eval_") for e in BEFORE}
    assert names <= {p.stem for p in (CONFIGS / "experiment").glob("*.yaml")}


def test_renamed_targets_import():
    for new in RENAMED_TARGETS.values():
        module, _, name = new.rpartition(".")
        assert getattr(importlib.import_module(module), name), new


def _code_lines(path: Path) -> list[str]:
    lines = (line.split(" #")[0].rstrip() for line in path.read_text().splitlines())
    return [line for line in lines if line.strip() and not line.lstrip().startswith("#")]


@pytest.mark.parametrize("pair", PAIRS)
@pytest.mark.parametrize("dataset", ["nyud", "pascal"])
def test_dataset_experiments_are_short_lists_of_choices(dataset, pair):
    path = CONFIGS / "experiment" / f"{dataset}_{pair}.yaml"
    lines = _code_lines(path)
    assert len(lines) <= MAX_EXPERIMENT_LINES, (
        f"{path.name}: {len(lines)} lines of settings (at most {MAX_EXPERIMENT_LINES}); a recipe "
        "(configs/recipe/) or a model/backbone or model/decoder option should hold the rest:\n"
        + "\n".join(lines)
    )
    cfg = OmegaConf.load(path)
    assert "defaults" in cfg, f"{path.name}: no defaults list (it should pick data, model, recipe, ...)"
    picks = [next(iter(d)) if isinstance(d, DictConfig) else d for d in cfg.defaults]
    assert any("/recipe" in str(p) for p in picks) or pair == "taskexpert_vitb", f"{path.name}: no recipe"


@pytest.mark.parametrize("preset", ["multihead", "taskexpert", "m3vit", "mtlora", "mtlora_vit", "slimmable"])
def test_model_presets_pick_a_backbone_and_a_decoder(composer, preset):
    cfg = OmegaConf.load(CONFIGS / "model" / f"{preset}.yaml")
    groups = {next(iter(d)) for d in cfg.defaults if isinstance(d, DictConfig)}
    assert groups == {"backbone", "decoder"}, f"model/{preset}.yaml picks {groups}"
    assert "_target_" not in (cfg.get("backbone") or {}) and "_target_" not in (cfg.get("decoder") or {})
    composed = composer("train", [f"model={preset}", *PATHS], hydra=True)
    choices = composed.hydra.runtime.choices
    assert choices["model/backbone"] and choices["model/decoder"]


@pytest.mark.parametrize("decoder", sorted(p.stem for p in (CONFIGS / "model" / "decoder").glob("*.yaml")))
@pytest.mark.parametrize("preset", ["multihead", "m3vit", "mtlora"])
def test_any_decoder_composes_with_any_preset(composer, preset, decoder):
    overrides = [f"model={preset}", f"model/decoder={decoder}"]
    if decoder == "slimmable":  # its widths follow a slimmable backbone's
        overrides.append("model/backbone=slimmable_vit_tiny")
    cfg = composer("train", [*overrides, *PATHS])
    assert cfg.model.decoder._target_.startswith(f"mtl.decoders.{decoder}.")
    OmegaConf.to_container(cfg.model, resolve=True)


@pytest.mark.parametrize("backbone", sorted(p.stem for p in (CONFIGS / "model" / "backbone").glob("*.yaml")))
def test_every_backbone_option_composes(composer, backbone):
    cfg = composer("train", [f"model/backbone={backbone}", *PATHS])
    assert cfg.model.backbone._target_.startswith("mtl.")
    OmegaConf.to_container(cfg.model, resolve=True)


def test_overrides_keep_their_keys(composer):
    cfg = composer(
        "train",
        [
            "experiment=nyud_taskexpert",
            "model.decoder.num_experts=15",
            "model.decoder.memory_update=ema",
            "model.backbone.out_indices=[1,2]",
            *PATHS,
        ],
    )
    assert cfg.model.decoder.num_experts == 15 and cfg.model.decoder.memory_update == "ema"
    assert list(cfg.model.backbone.out_indices) == [1, 2]
    cfg = composer("train", ["experiment=nyud_m3vit", "model/decoder=taskexpert", *PATHS])
    assert cfg.model.decoder._target_.endswith("TaskExpertDecoder") and cfg.model.tasks_at_inference is None


DDP = "ddp"  # trainer=ddp (issue 20: a DDPStrategy node with DistributedDataParallel's options)


def _strategy(node: Any) -> Any:
    """``ddp`` for Lightning's DDPStrategy node of trainer=ddp, the value itself otherwise."""
    if isinstance(node, DictConfig) and node.get("_target_") == "lightning.pytorch.strategies.DDPStrategy":
        return DDP
    return node


@pytest.mark.parametrize(
    ("recipe", "optimizer", "lr", "scheduler", "trainer"),
    [
        ("synthetic_cpu", "torch.optim.AdamW", 1e-3, "poly", {"max_epochs": 3}),
        ("invpt", "torch.optim.Adam", 2e-5, "poly", {"max_steps": 40000, "max_epochs": -1}),
        ("invpt_ddp", "torch.optim.Adam", 2e-5, "poly", {"strategy": DDP, "val_check_interval": 4000}),
        ("mtlora", "torch.optim.AdamW", 3.125e-5, "cosine", {"max_epochs": 300}),
        ("m3vit", "torch.optim.SGD", 0.002, "poly", {"max_epochs": 100, "max_steps": -1, "strategy": DDP}),
    ],
)
def test_recipes_compose_alone(composer, recipe, optimizer, lr, scheduler, trainer):
    cfg = composer("train", ["~experiment", f"recipe={recipe}", *PATHS])
    assert (cfg.optimizer._target_, cfg.optimizer.lr, cfg.scheduler.name) == (optimizer, lr, scheduler)
    assert {k: _strategy(cfg.trainer[k]) if k == "strategy" else cfg.trainer[k] for k in trainer} == trainer


def test_command_line_choices_beat_the_recipe(composer):
    cfg = composer("train", ["experiment=nyud_taskexpert", "trainer=gpu", "optimizer=adamw", *PATHS])
    assert cfg.trainer.precision == "bf16-mixed" and cfg.optimizer._target_ == "torch.optim.AdamW"
    assert cfg.trainer.max_steps == 40000  # the recipe's length stays


@pytest.mark.parametrize("experiment", ["synthetic_single_task", "nyud_single_task", "pascal_single_task"])
def test_single_task_experiments_keep_their_run_folders_and_baseline_writer(composer, experiment):
    cfg = composer("train", [f"experiment={experiment}", "task=depth", *PATHS], hydra=True)
    assert list(cfg.data.tasks) == ["depth"] and cfg.task_name == "single_task" and cfg.test
    assert cfg.hydra.sweep.subdir == "depth" and cfg.hydra.run.dir.endswith("_depth")
    assert cfg.hydra.callbacks.write_baseline._target_ == "mtl.baselines.WriteBaseline"


def _targets(node: Any, path: str) -> Iterator[tuple[str, str]]:
    """(where, target) of every ``_target_`` in a config file's tree (interpolations left as text)."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "_target_" and isinstance(v, str):
                yield f"{path}._target_", v
            else:
                yield from _targets(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _targets(v, f"{path}[{i}]")


def test_mtl_targets_name_their_defining_module():
    wrong = []
    for file in sorted(CONFIGS.rglob("*.yaml")):
        tree = OmegaConf.to_container(OmegaConf.load(file), resolve=False)
        for where, target in _targets(tree, str(file.relative_to(CONFIGS))):
            if not target.startswith("mtl.") or target in PUBLIC_PACKAGE_TARGETS:
                continue
            module, _, name = target.rpartition(".")
            try:
                obj = getattr(importlib.import_module(module), name)
            except (ImportError, AttributeError) as err:
                wrong.append(f"{where}: {target} does not import ({err})")
                continue
            if f"{obj.__module__}.{obj.__qualname__}" != target:
                wrong.append(f"{where}: {target} is defined as {obj.__module__}.{obj.__qualname__}")
    assert not wrong, "mtl `_target_`s must be mtl.<package>.<module>.<Class>:\n  " + "\n  ".join(wrong)


def test_group_and_package_names_agree():
    wrong = []
    for file in sorted(CONFIGS.rglob("*.yaml")):
        group = file.parent.relative_to(CONFIGS)
        first = file.read_text().splitlines()[:1]
        if group == Path(".") or not first or not first[0].startswith("# @package"):
            continue
        package = first[0].split()[-1]
        if package not in ("_global_", ".".join(group.parts)):
            wrong.append(f"{file.relative_to(CONFIGS)}: package '{package}' in group '{group.as_posix()}'")
    assert not wrong, "\n".join(wrong)


def test_baselines_select_into_the_baselines_key(composer):
    cfg = composer("train", ["baselines=synthetic_nyud_swin_mini", *PATHS])
    assert "baseline" not in cfg and cfg.baselines.metrics["semseg/miou"] > 0


def test_baseline_metrics_read_under_the_group_name_and_the_legacy_package():
    from mtl.pipeline import baseline_metrics

    metrics = {"semseg/miou": 0.5, "depth/rmse": 0.6}
    assert baseline_metrics(OmegaConf.create({"baselines": {"metrics": metrics}})) == metrics
    # a baseline file written before the rename ('# @package baseline') still gives its Δm
    assert baseline_metrics(OmegaConf.create({"baseline": {"metrics": metrics}})) == metrics
    assert baseline_metrics(OmegaConf.create({"seed": 1})) is None


def test_baseline_of_another_metric_protocol_is_used_with_a_warning(caplog):
    from mtl.baselines import METRICS_PROTOCOL
    from mtl.pipeline import baseline_metrics

    metrics = {"semseg/miou": 0.5}
    with caplog.at_level("WARNING", logger="mtl.pipeline"):
        current = {"name": "a", "protocol": METRICS_PROTOCOL, "metrics": metrics}
        assert baseline_metrics(OmegaConf.create({"baselines": current})) == metrics
        assert not caplog.records
        old = {"name": "old_file", "metrics": metrics}  # no protocol: written before it existed
        assert baseline_metrics(OmegaConf.create({"baselines": old})) == metrics
    assert "old_file" in caplog.text and "protocol 1" in caplog.text
