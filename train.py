"""Train a multi-task model: ``python train.py [experiment=NAME] [key=value ...]``."""

import hydra
from omegaconf import DictConfig, OmegaConf

from mtl.objective import objective
from mtl.pipeline import train


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    if cfg.get("extras", {}).get("print_config"):
        print(OmegaConf.to_yaml(cfg, resolve=False))
    metrics, _ = train(cfg)
    if not any(k.startswith("val/") for k in metrics):  # e.g. debug runs without validation
        return None
    return objective(metrics, cfg.get("optimized_metric"))  # what a sweeper (Optuna) optimises


if __name__ == "__main__":
    main()
