"""Every strategy config trains a few steps of the real model without NaN; bf16 / fp16 paths."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from toy import TINY, ToyModule, one_torch_thread  # noqa: F401

from mtl.pipeline import build_datamodule, build_module

# the configs of mtl/strategies (configs/strategy also holds other issues' strategies, e.g. sandwich)
STRATEGIES = [
    "ew", "fixed", "uw", "dwa", "rlw", "gls", "gradnorm", "famo", "dbmtl",
    "mgda", "mgda_ub", "pcgrad", "cagrad", "imtl_g", "nash_mtl", "aligned_mtl", "upgrad", "gradvac",
    "graddrop", "dualproj", "config", "fairgrad", "sam", "asam", "fmtl",
]  # fmt: skip


def _fit(make_cfg, overrides, *, steps=2, **trainer_kwargs):
    cfg = make_cfg(TINY + overrides)
    L.seed_everything(0, verbose=False)
    dm = build_datamodule(cfg)
    module = build_module(cfg, dm)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        **trainer_kwargs,
    )
    before = {k: v.detach().clone() for k, v in module.model.named_parameters()}
    trainer.fit(module, datamodule=dm)
    return module, trainer, before


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """The real composed model, tasks and a synthetic batch, shared by the per-strategy runs."""
    from conftest import FAST, compose_cfg

    cfg = compose_cfg(FAST + TINY, tmp_path_factory.mktemp("cfg"))
    dm = build_datamodule(cfg)
    dm.setup("fit")
    return cfg, dm, next(iter(dm.train_dataloader()))


AGGREGATORS = ["mgda", "pcgrad", "cagrad", "imtl_g", "nash_mtl", "aligned_mtl", "upgrad", "gradvac",
               "graddrop", "dualproj", "config", "fairgrad"]  # fmt: skip


@pytest.mark.parametrize("name", STRATEGIES + [f"{a}:rep" for a in AGGREGATORS if a != "mgda"])
def test_every_strategy_trains_without_nan(tiny_setup, tmp_path, name):
    """Three optimiser steps of the real model under each config (no Lightning: only the strategy
    varies); ``<aggregator>:rep`` is its representation-level variant (``strategy.rep_grad=true``)."""
    from conftest import FAST, compose_cfg

    name, _, rep = name.partition(":")
    overrides = [f"strategy={name}", "strategy.diagnostics_every=1"] + (
        ["strategy.rep_grad=true"] if rep else []
    )
    cfg = compose_cfg(FAST + TINY + overrides, tmp_path)
    _, dm, batch = tiny_setup
    L.seed_everything(0, verbose=False)
    real = build_module(cfg, dm)  # sets the strategy up exactly as training does
    module, strategy = ToyModule(real.model, tasks=real.tasks), real.strategy
    before = {k: v.detach().clone() for k, v in real.model.named_parameters()}
    opt = torch.optim.AdamW(real.parameters(), lr=1e-3)
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        step = strategy.forward(batch, module=module)
        losses = step.losses
        logs = strategy.backward(step, module=module, batch=batch)
        opt.step()
        strategy.after_step(batch, module=module, losses=losses)
        assert all(torch.isfinite(loss) for loss in losses.values()), name
    strategy.epoch_end()
    after = dict(real.model.named_parameters())
    assert all(torch.isfinite(p).all() for p in after.values()), name
    assert max(float((after[k] - before[k]).abs().max()) for k in before) > 0, f"{name}: nothing moved"
    assert "grad/conflicts" in logs and all(math.isfinite(v) for v in logs.values()), (name, logs)


def test_lightning_logs_strategy_weights_and_diagnostics(make_cfg):
    module, trainer, _ = _fit(make_cfg, ["strategy=cagrad", "strategy.diagnostics_every=1"])
    logged = trainer.callback_metrics
    assert {"train/grad/conflicts", "train/grad/semseg/norm", "train/strategy/depth/weight"} <= set(logged)
    assert all(torch.isfinite(p).all() for p in module.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ew", "cagrad", "mgda_ub"])
def test_bf16_autocast_trains(make_cfg, name):
    module, _, _ = _fit(make_cfg, [f"strategy={name}", "module.grad_clip=1.0"], precision="bf16-mixed")
    assert all(torch.isfinite(p).all() for p in module.parameters())


def _fp16(init_scale: float) -> tuple[MixedPrecision, torch.amp.GradScaler]:
    # precision="16-mixed" on CPU silently becomes bf16 in Lightning: pass the fp16 plugin explicitly
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    return MixedPrecision("16-mixed", "cpu", scaler=scaler), scaler


@pytest.mark.parametrize("rep_grad", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_fp16_unscales_before_aggregating(make_cfg, rep_grad):
    """FairGrad's weights depend on the gradients' scale (Gw = w^(-1/α)): under fp16 (scale 2¹⁰)
    they match fp32's only if the scale is removed before aggregating."""
    plugin, scaler = _fp16(2.0**10)
    overrides = ["strategy=fairgrad", f"strategy.rep_grad={str(rep_grad).lower()}", "module.grad_clip=1.0"]
    fp16, _, _ = _fit(make_cfg, overrides, steps=1, plugins=[plugin])
    fp32, _, _ = _fit(make_cfg, overrides, steps=1)
    assert scaler.get_scale() == 2.0**10  # finite gradients: no back-off
    assert all(torch.isfinite(p).all() for p in fp16.parameters())
    w16, w32 = (torch.as_tensor(m.strategy.last_weights) for m in (fp16, fp32))
    assert torch.allclose(w16, w32, rtol=0.05, atol=1e-3), (w16, w32)


@pytest.mark.parametrize(
    "name",
    ["upgrad", pytest.param("ew", marks=pytest.mark.slow), pytest.param("fmtl", marks=pytest.mark.slow)],
)
def test_fp16_overflow_skips_the_step_and_backs_off_the_scale(make_cfg, name):
    plugin, scaler = _fp16(2.0**60)
    module, _, before = _fit(make_cfg, [f"strategy={name}"], steps=1, plugins=[plugin])
    for k, p in module.model.named_parameters():
        assert torch.equal(p.detach(), before[k]), f"{name}: {k} changed although the gradients overflowed"
    assert scaler.get_scale() < 2.0**60
