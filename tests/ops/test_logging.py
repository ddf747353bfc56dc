"""Every run keeps its resolved config and code version; loggers receive both."""

from __future__ import annotations

import yaml

from mtl.pipeline import train


def test_run_folder_keeps_resolved_config_and_code_version(make_cfg, tmp_path):
    train(make_cfg(["logger=csv", "trainer.max_epochs=1", "+trainer.limit_val_batches=0"]))
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["data"]["batch_size"] == 4 and saved["trainer"]["max_epochs"] == 1
    assert "${" not in (tmp_path / "config.yaml").read_text()  # resolved
    assert "commit" in saved["code"] or "version" in saved["code"]
    (hparams,) = list(tmp_path.glob("csv/**/hparams.yaml"))
    logged = yaml.safe_load(hparams.read_text())
    assert logged["code"] == saved["code"] and "trainable_params" in logged
