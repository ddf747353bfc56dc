"""Merge single-task checkpoints: ``python merge.py method=<name> ckpts=[a.ckpt,b.ckpt] [base_ckpt=…]``."""

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from mtl.merging.run import checkpoint_list, eval_command, evaluate_merged, merge_checkpoints


@hydra.main(version_base="1.3", config_path="configs", config_name="merge")
def main(cfg: DictConfig) -> None:
    ckpts = checkpoint_list(cfg.ckpts)  # [a.ckpt,b.ckpt], a.ckpt or 'a.ckpt,b.ckpt'
    method = instantiate(cfg.method)
    out_dir = cfg.paths.output_dir
    path, merged_cfg = merge_checkpoints(
        ckpts=ckpts, method=method, output_dir=out_dir, base_ckpt=cfg.base_ckpt, output=cfg.output
    )
    print(f"merged checkpoint: {path}\nevaluate it with: {eval_command(ckpts, path, merged_cfg)}")
    if cfg.evaluate:
        evaluate_merged(path, merged_cfg, cfg.eval, out_dir + "/eval")


if __name__ == "__main__":
    main()
