"""Evaluate a checkpoint: ``python eval.py [experiment=NAME] ckpt_path=PATH``."""

import hydra
from omegaconf import DictConfig

from mtl.pipeline import evaluate


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
