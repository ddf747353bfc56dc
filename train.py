"""Train a multi-task model: ``python train.py [experiment=NAME] [key=value ...]``."""

import hydra
from omegaconf import DictConfig, OmegaConf

from mtl.pipeline import train


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    if cfg.get("extras", {}).get("print_config"):
        print(OmegaConf.to_yaml(cfg, resolve=False))
    metrics, _ = train(cfg)
    return metrics.get("val/loss")


if __name__ == "__main__":
    main()
