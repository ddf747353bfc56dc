"""Merge single-task checkpoints: ``python merge.py method=<name> ckpts=[a.ckpt,b.ckpt] [base_ckpt=…]``."""

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

log = logging.getLogger("merge")


@hydra.main(version_base="1.3", config_path="configs", config_name="merge")
def main(cfg: DictConfig) -> None:
    # torch and Lightning are imported here, after Hydra has parsed the command line
    from hydra.utils import instantiate

    from mtl.loggers import quiet_libraries
    from mtl.merging.run import checkpoint_list, evaluate_merged, merge_checkpoints

    quiet_libraries()
    ckpts = checkpoint_list(cfg.ckpts)  # [a.ckpt,b.ckpt], a.ckpt or 'a.ckpt,b.ckpt'
    method = instantiate(cfg.method)
    out_dir = Path(cfg.paths.output_dir)
    log.info("run folder: %s", out_dir)
    path, merged_cfg = merge_checkpoints(
        ckpts=ckpts, method=method, output_dir=out_dir, base_ckpt=cfg.base_ckpt, output=cfg.output
    )
    # the merged checkpoint carries its config: eval.py needs nothing else
    log.info("merged checkpoint: %s\nevaluate it with: python eval.py ckpt_path=%s", path, path)
    if cfg.evaluate:
        eval_dir = out_dir / "merged_eval"
        evaluate_merged(path, merged_cfg, cfg.eval, eval_dir)
        log.info("evaluation of the merged model: %s", eval_dir / "results.md")


if __name__ == "__main__":
    main()
