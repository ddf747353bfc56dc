"""What ``python train.py data=<real dataset>`` trains when the experiment was made for other data.

The default experiment (``synthetic_baseline``) picks the synthetic CPU recipe: a small Swin from
scratch, AdamW, 3 epochs. Switching only the dataset (``data=nyud``) keeps that recipe and model,
which is not the field's protocol on the real data; choosing ViT-L, DDP and 40k iterations behind
the user's back would surprise more. So the recipe is kept and :func:`dataset_switch_warning` says,
in one line, what is trained and which experiment holds the dataset's published recipe.
"""

from __future__ import annotations

from collections.abc import Mapping

from omegaconf import DictConfig

from mtl.data.base import FolderDataset, resolve_dataset_class

SYNTHETIC_RECIPES = frozenset({"synthetic_cpu"})
"""Recipes (``configs/recipe/``) made for the synthetic scenes, not for a real dataset."""
EXPERIMENT_PREFIX = {"nyud": "nyud", "pascal_context": "pascal"}
"""Dataset key → the prefix of its experiments (``configs/experiment/<prefix>_*.yaml``)."""
DATASET_NAMES = {"nyud": "NYUD-v2", "pascal_context": "PASCAL-Context"}


def _hydra_choices() -> Mapping[str, str | None]:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}


def dataset_switch_warning(cfg: DictConfig, choices: Mapping[str, str | None] | None = None) -> str | None:
    """A one-line warning when a real dataset is trained with a recipe made for the synthetic scenes.

    Args:
        cfg: the composed training config (``data``, ``model``, ``optimizer``, ``trainer``).
        choices: the config groups chosen (Hydra's ``hydra.runtime.choices``); ``None``: read from
            the running Hydra app (no app: no warning).

    Returns:
        ``None`` when the data are synthetic or the recipe is not a synthetic one; else the
        warning, naming the model, backbone, input size, length and optimiser trained and the
        experiment that holds the dataset's published recipe.
    """
    choices = _hydra_choices() if choices is None else choices
    if not choices:
        return None
    cls = resolve_dataset_class(str(cfg.data.dataset.get("_target_", "")))
    if cls is None or not issubclass(cls, FolderDataset):
        return None
    recipe = choices.get("recipe")
    if recipe is not None and recipe not in SYNTHETIC_RECIPES:
        return None
    trainer = cfg.get("trainer") or {}
    steps, epochs = trainer.get("max_steps"), trainer.get("max_epochs")
    length = f"{steps} steps" if steps is not None and steps > 0 else f"{epochs} epochs"
    backbone = cfg.model.get("backbone") or {}
    origin = "pretrained" if backbone.get("pretrained") else "from scratch"
    backbone_name = choices.get("model/backbone") or backbone.get("name") or backbone.get("_target_")
    h, w = cfg.data.input_size
    optimizer = str(cfg.optimizer.get("_target_", "?")).rpartition(".")[2]
    name = DATASET_NAMES.get(cls.KEY, cls.__name__)
    prefix = EXPERIMENT_PREFIX.get(cls.KEY, cls.KEY)
    return (
        f"data={choices.get('data')} keeps the recipe of experiment={choices.get('experiment')} "
        f"(recipe={recipe}), made for the synthetic scenes: it trains {choices.get('model')} with backbone "
        f"{backbone_name} ({origin}) on {name} at {h}×{w} for {length}, "
        f"{optimizer} lr {cfg.optimizer.get('lr')} - not the field's protocol. For {name}'s published "
        f"recipe use experiment={prefix}_baseline (or another {prefix}_* experiment in configs/experiment/)."
    )
