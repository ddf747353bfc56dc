"""``eval.py ... adapter.merge=true`` evaluates the folded model and reports the same metrics."""

from __future__ import annotations

import pytest
import torch

from mtl.adapters.lora import lora_modules
from mtl.pipeline import build_datamodule, build_module, evaluate


@pytest.mark.slow
def test_eval_with_merged_adapters_matches_unmerged(make_cfg, tmp_path):
    cfg = make_cfg(["experiment=synthetic_mtlora", "data.tasks=[semseg,depth,normals]"], config_name="eval")
    module = build_module(cfg, build_datamodule(cfg))
    torch.manual_seed(0)
    for m in lora_modules(module.model):  # a trained-looking adapter: non-zero updates
        torch.nn.init.normal_(m.lora_B, std=0.05)
    ckpt = tmp_path / "mtlora.ckpt"
    torch.save({"state_dict": module.state_dict()}, ckpt)
    results = {}
    for merge in (False, True):
        cfg.ckpt_path, cfg.adapter.merge, cfg.eval.pictures = str(ckpt), merge, 0
        cfg.paths.output_dir = str(tmp_path / f"merge_{merge}")
        results[merge], objects = evaluate(cfg)
        assert all(m.merged == merge for m in lora_modules(objects["module"].model))
    for key in ("test/semseg/miou", "test/depth/rmse", "test/normals/mean"):
        assert results[True][key] == pytest.approx(results[False][key], rel=1e-4, abs=1e-5), key
