"""Evaluate a checkpoint: ``python eval.py ckpt_path=<run>/checkpoints/best.ckpt [key=value ...]``.

The model, data and task options are the run's own (its saved config); overrides on this command line
win over them (``eval.run_config`` in configs/eval.yaml).
"""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    # torch and Lightning are imported here, after Hydra has parsed the command line
    from hydra.core.hydra_config import HydraConfig

    from mtl.pipeline import evaluate

    evaluate(cfg, overrides=list(HydraConfig.get().overrides.task))


if __name__ == "__main__":
    main()
