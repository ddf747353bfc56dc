"""Train a multi-task model: ``python train.py [experiment=NAME] [key=value ...]``."""

import hydra
from omegaconf import DictConfig, OmegaConf


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    # torch and Lightning are imported here, after Hydra has parsed the command line: `--cfg job`,
    # `--help` and config errors answer in about a second
    from mtl.objective import objective
    from mtl.pipeline import train

    if cfg.get("extras", {}).get("print_config"):
        print(OmegaConf.to_yaml(cfg, resolve=False))
    metrics, _ = train(cfg)
    if not any(k.startswith("val/") for k in metrics):  # e.g. debug runs without validation
        return None
    return objective(metrics, cfg.get("optimized_metric"))  # what a sweeper (Optuna) optimises


if __name__ == "__main__":
    main()
