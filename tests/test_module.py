"""MTLModule: gradient clipping is applied, and the strategy decides the update."""

import lightning as L
import torch

from mtl.pipeline import build_datamodule, build_module


class GradNorm(L.Callback):
    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        grads = [p.grad.norm() for p in module.parameters() if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack(grads))))


def _fit(make_cfg, overrides):
    cfg = make_cfg(overrides)
    dm = build_datamodule(cfg)
    module = build_module(cfg, dm)
    probe = GradNorm()
    trainer = L.Trainer(
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[probe],
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=dm)
    return probe.norms, module


def test_gradient_clipping_bounds_the_global_norm(make_cfg):
    free, _ = _fit(make_cfg, ["module.grad_clip=null"])
    clipped, _ = _fit(make_cfg, ["module.grad_clip=0.01"])
    assert min(free) > 0.01
    assert max(clipped) <= 0.01 * (1 + 1e-4)


def test_fixed_weights_default_to_the_fields_and_ew_is_uniform(make_cfg):
    _, module = _fit(make_cfg, [])
    assert module.strategy.weights == {"semseg": 1.0, "depth": 1.0, "normals": 10.0, "edge": 50.0}
    _, module = _fit(make_cfg, ["strategy=ew"])
    assert set(module.strategy.weights.values()) == {1.0}
    _, module = _fit(make_cfg, ["strategy.weights={edge: 5.0}"])
    assert module.strategy.weights["edge"] == 5.0 and module.strategy.weights["normals"] == 10.0
