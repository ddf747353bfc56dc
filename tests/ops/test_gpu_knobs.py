"""GPU knobs (configs/gpu/, trainer=ddp's DDPStrategy, data.num_workers: auto) reach torch and Lightning.

Everything here runs on the CPU: the knobs are checked where they land (torch's global flags, the
optimiser's ``fused`` option, the DDP wrapper's options, the precision plugin, the compiled
functions); the tests marked ``gpu`` check the CUDA-only choices on a GPU.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import DDPStrategy
from torch.nn.parallel import DistributedDataParallel

from mtl import gpu
from mtl.gpu import ChannelsLast, CompileOptions, GPUSettings, compile_model
from mtl.optim import build_optimizer, fused_choice, param_groups, with_fused
from mtl.pipeline import build_datamodule, build_module, build_trainer, setup_gpu, train

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(autouse=True)
def _restore_torch_flags():
    """The knobs are process-wide: every test leaves them as it found them."""
    saved = (
        torch.get_float32_matmul_precision(),
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.allow_tf32,
    )
    yield
    torch.set_float32_matmul_precision(saved[0])
    torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = saved[1:]


def _quiet_trainer(**kwargs) -> L.Trainer:
    return L.Trainer(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        **kwargs,
    )


# ------------------------------------------------------------------ config and torch flags
def test_defaults_keep_the_papers_fp32(make_cfg):
    cfg = make_cfg(["experiment=nyud_taskexpert"], fast=False)
    settings = GPUSettings.from_config(cfg.gpu)
    assert settings.float32_matmul_precision == "highest" and not settings.cudnn_benchmark
    assert not settings.channels_last and not settings.compile.enabled
    assert settings.fused_optimizer == "auto"  # same fp32 maths, fewer kernels
    assert cfg.trainer.precision == 32


def test_gpu_fast_switches_to_tf32_bf16_and_autotuning_over_the_recipe(make_cfg):
    cfg = make_cfg(["experiment=nyud_taskexpert", "gpu=fast"], fast=False)
    assert cfg.trainer.precision == "bf16-mixed"  # beats recipe=invpt_ddp's fp32
    assert cfg.gpu.float32_matmul_precision == "high" and cfg.gpu.cudnn_benchmark
    cfg = make_cfg(["experiment=nyud_taskexpert", "gpu=fast", "trainer.precision=32"], fast=False)
    assert cfg.trainer.precision == 32  # the command line still wins


def test_train_sets_matmul_precision_and_cudnn_flags(make_cfg):
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.benchmark = False
    cfg = make_cfg(
        [
            "debug=fdr",
            "gpu.float32_matmul_precision=high",
            "gpu.cudnn_benchmark=true",
            "gpu.cudnn_allow_tf32=false",
        ]
    )
    train(cfg)
    assert torch.get_float32_matmul_precision() == "high"
    assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.allow_tf32
    setup_gpu(make_cfg([]))  # the defaults put them back
    assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.benchmark


@pytest.mark.parametrize(
    ("node", "match"),
    [
        ({"float32_matmul": "high"}, r"gpu: unknown key\(s\) \['float32_matmul'\]; valid keys"),
        ({"compile": {"backbones": True}}, r"gpu.compile: unknown key\(s\) \['backbones'\]"),
        ({"float32_matmul_precision": "tf32"}, r"float32_matmul_precision must be one of .*'tf32'"),
        ({"fused_optimizer": "yes"}, "fused_optimizer must be auto, true or false, got 'yes'"),
        ({"compile": {"mode": "fast"}}, r"gpu.compile.mode must be one of"),
    ],
)
def test_bad_gpu_settings_name_the_key(node, match):
    with pytest.raises(ValueError, match=match):
        GPUSettings.from_config(node)


# ------------------------------------------------------------------ DDP options
DDP_OPTIONS = {"static_graph": True, "gradient_as_bucket_view": True, "bucket_cap_mb": 50}


def _ddp_overrides(devices: int) -> list[str]:
    return ["trainer=ddp_cpu", f"trainer.devices={devices}"] + [
        f"trainer.strategy.{k}={str(v).lower()}" for k, v in DDP_OPTIONS.items()
    ]


def test_trainer_ddp_builds_ddpstrategy_with_the_options(make_cfg):
    trainer = build_trainer(make_cfg(_ddp_overrides(2)))
    assert isinstance(trainer.strategy, DDPStrategy)
    assert {k: trainer.strategy._ddp_kwargs[k] for k in DDP_OPTIONS} == DDP_OPTIONS
    assert trainer.strategy._ddp_kwargs["find_unused_parameters"] is False


class _DDPProbe(L.Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        self.ddp = trainer.strategy.model


@pytest.mark.slow
def test_ddp_wrapper_receives_the_options(make_cfg):
    """One gloo process: the DistributedDataParallel wrapper is built with the configured options."""
    probe = _DDPProbe()
    cfg = make_cfg(["debug=fdr", *_ddp_overrides(1)])
    try:
        dm = build_datamodule(cfg)
        module = build_module(cfg, dm)
        trainer = build_trainer(cfg)
        trainer.callbacks.append(probe)
        trainer.fit(module, datamodule=dm)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    ddp = probe.ddp
    assert isinstance(ddp, DistributedDataParallel)
    assert ddp.static_graph and ddp.gradient_as_bucket_view
    assert ddp.bucket_bytes_cap == 50 * 1024 * 1024


# ------------------------------------------------------------------ fused optimiser
def _fake_params(cuda: bool, floating: bool = True) -> list:
    return [SimpleNamespace(is_cuda=cuda, is_floating_point=lambda: floating) for _ in range(3)]


def test_fused_auto_only_when_every_parameter_is_on_cuda():
    assert fused_choice(torch.optim.AdamW, _fake_params(cuda=True), "auto") is True
    assert fused_choice(torch.optim.AdamW, _fake_params(cuda=False), "auto") is None
    assert fused_choice(torch.optim.AdamW, _fake_params(cuda=True, floating=False), "auto") is None
    assert fused_choice(torch.optim.AdamW, _fake_params(cuda=True), False) is None
    mixed = _fake_params(cuda=True) + _fake_params(cuda=False)
    assert fused_choice(torch.optim.AdamW, mixed, "auto") is None
    assert fused_choice(torch.optim.LBFGS, _fake_params(cuda=True), "auto") is None  # has no fused kernels


def test_cpu_keeps_the_default_optimizer_and_true_forces_fused():
    params = [torch.nn.Parameter(torch.randn(4, 3))]
    opt = build_optimizer(params, optimizer=torch.optim.AdamW, fused="auto", lr=1e-3)
    assert not opt.defaults["fused"]
    opt = build_optimizer(params, optimizer=torch.optim.AdamW, fused=True, lr=1e-3)
    assert opt.defaults["fused"] is True
    with pytest.raises(ValueError, match="LBFGS has no fused kernels"):
        build_optimizer(params, optimizer=torch.optim.LBFGS, fused=True)


def test_with_fused_keeps_the_partials_options():
    factory = with_fused(functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.05), "auto")
    assert factory.keywords["weight_decay"] == 0.05  # MTLModule reads it from there
    opt = factory([{"params": [torch.nn.Parameter(torch.zeros(2))], "weight_decay": 0.05}])
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["lr"] == 1e-3
    with pytest.raises(TypeError, match="_partial_: true"):
        with_fused(torch.optim.AdamW, "auto")


def test_pipeline_module_builds_the_configured_optimizer_fused_on_request(make_cfg):
    cfg = make_cfg(["gpu.fused_optimizer=true"])
    module = build_module(cfg, build_datamodule(cfg))
    opt = module.optimizer_fn(param_groups(module, 0.0))  # what configure_optimizers calls
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"] is True


def _fp16_fit(make_cfg, fused: bool) -> dict[str, torch.Tensor]:
    """The model's weights after two fp16 steps with gradient clipping (CPU autocast and scaler)."""
    cfg = make_cfg(["module.grad_clip=0.05", f"gpu.fused_optimizer={str(fused).lower()}"])
    torch.manual_seed(0)
    dm = build_datamodule(cfg)
    module = build_module(cfg, dm)
    before = [p.detach().clone() for p in module.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)  # no overflow: every step updates
    trainer = _quiet_trainer(
        max_steps=2, accelerator="cpu", plugins=[MixedPrecision("16-mixed", "cpu", scaler)]
    )
    trainer.fit(module, datamodule=dm)
    assert scaler.get_scale() == 2.0**8, "a step was skipped (inf/nan gradients)"
    assert any(not torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))
    return {k: v.detach().clone() for k, v in module.model.state_dict().items()}


def test_fp16_gradient_clipping_works_with_a_fused_optimizer(make_cfg):
    """Lightning refuses to clip for fused optimisers under fp16; the module clips the scaled gradients
    itself (threshold × scale, before ``step()``) as for foreach ones: the same update."""
    fused = _fp16_fit(make_cfg, fused=True)
    foreach = _fp16_fit(make_cfg, fused=False)
    for k in foreach:
        torch.testing.assert_close(fused[k], foreach[k], rtol=1e-5, atol=1e-6, msg=k)


# ------------------------------------------------------------------ channels_last
class _ImageFormat(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.channels_last = batch["image"].is_contiguous(memory_format=torch.channels_last)


def test_channels_last_converts_weights_and_images(make_cfg):
    cfg = make_cfg(["debug=fdr", "gpu.channels_last=true"])
    trainer = build_trainer(cfg)
    assert any(isinstance(c, ChannelsLast) for c in trainer.callbacks)
    spy = _ImageFormat()
    trainer.callbacks.append(spy)  # after ChannelsLast: sees the converted batch
    dm = build_datamodule(cfg)
    module = build_module(cfg, dm)
    trainer.fit(module, datamodule=dm)
    convs = [p for p in module.parameters() if p.ndim == 4 and p.shape[-1] > 1 and p.shape[1] > 1]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert spy.channels_last
    assert not any(isinstance(c, ChannelsLast) for c in build_trainer(make_cfg(["debug=fdr"])).callbacks)


# ------------------------------------------------------------------ torch.compile
def _losses(module, batch) -> torch.Tensor:
    out = module.model.run(batch["image"])
    return torch.stack(list(module.task_losses(out, batch).values()))


def _batch(dm) -> dict:
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


TINY_VIT_MULTIHEAD = [  # inductor generates C++ per kernel: a small graph keeps the slow test minutes long
    "model/backbone=vit_tiny",
    "+model.backbone.depth=2",
    "+model.backbone.embed_dim=32",
    "+model.backbone.num_heads=2",
    "model.backbone.out_indices=[0,1]",
    "model.decoder.channels=16",
]


@pytest.mark.parametrize(
    ("backend", "overrides"),
    [
        pytest.param("aot_eager", ["experiment=synthetic_taskexpert"], marks=pytest.mark.slow),
        pytest.param("inductor", TINY_VIT_MULTIHEAD, marks=pytest.mark.slow),
    ],
)
def test_compile_gives_the_same_training_loss_and_checkpoint_keys(make_cfg, backend, overrides):
    torch._dynamo.reset()
    cfg = make_cfg(overrides)
    dm = build_datamodule(cfg)
    module = build_module(cfg, dm)
    module.train()
    batch = _batch(dm)
    keys = list(module.state_dict())
    torch.manual_seed(0)
    eager = _losses(module, batch)
    compile_model(module.model, CompileOptions(backbone=True, decoder=True, backend=backend))
    torch.manual_seed(0)
    compiled = _losses(module, batch)
    compiled.sum().backward()  # the compiled graph trains
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    assert list(module.state_dict()) == keys  # checkpoints keep their keys
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert frames >= 2, f"expected the backbone and the decoder compiled, got {frames} graph(s)"
    assert all(p.grad is not None for p in module.model.backbone.parameters() if p.requires_grad)
    torch._dynamo.reset()


def test_compile_is_opt_in_and_reaches_the_training_pipeline(make_cfg, monkeypatch):
    seen = []
    monkeypatch.setattr("mtl.pipeline.compile_model", lambda model, options: seen.append(options))
    train(make_cfg(["debug=fdr", "gpu.compile.backbone=true", "gpu.compile.mode=max-autotune"]))
    assert seen == [CompileOptions(backbone=True, mode="max-autotune")]
    off = CompileOptions()
    model = SimpleNamespace(backbone=None, decoder=None)
    compile_model(model, off)  # nothing compiled, nothing touched
    assert model.backbone is None and not off.enabled


# ------------------------------------------------------------------ loader workers
def test_num_workers_auto_is_sized_to_the_cpus_per_process(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(gpu, "cpu_count", lambda: 16)
    assert gpu.resolve_num_workers("auto", devices=1, accelerator="gpu") == 8  # capped
    assert gpu.resolve_num_workers("auto", devices=4, accelerator="gpu") == 3  # 16 / 4 − 1
    assert gpu.resolve_num_workers("auto", devices=[0, 1], accelerator="gpu") == 7
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert gpu.resolve_num_workers("auto", devices="auto", accelerator="gpu") == 1  # 16 / 8 − 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun knows best
    assert gpu.resolve_num_workers("auto", devices="auto", accelerator="gpu") == 7
    monkeypatch.setattr(gpu, "cpu_count", lambda: 1)
    assert gpu.resolve_num_workers("auto", devices=1) == 0
    assert gpu.resolve_num_workers(3) == 3
    with pytest.raises(ValueError, match="non-negative int or 'auto', got 'many'"):
        gpu.resolve_num_workers("many")


def test_real_datasets_default_to_auto_workers_resolved_before_the_config_check(make_cfg, monkeypatch):
    monkeypatch.setattr(gpu, "cpu_count", lambda: 6)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    cfg = make_cfg(["experiment=nyud_taskexpert"], fast=False)
    assert cfg.data.num_workers == "auto"
    cfg = make_cfg(["experiment=nyud_taskexpert", "data.num_workers=auto", "trainer=cpu"])
    setup_gpu(cfg)
    assert cfg.data.num_workers == 5  # written into the config the run saves
    cfg = make_cfg(["experiment=nyud_taskexpert", "data.num_workers=auto", "trainer=cpu"])
    assert build_datamodule(cfg).num_workers == 5  # entry points without setup_gpu (merge.py)


def test_photometric_on_device_auto_follows_the_accelerator(make_cfg, monkeypatch):
    resolve = gpu.resolve_photometric_on_device
    assert resolve("auto", fast_augment=True, accelerator="gpu") is True
    assert resolve("auto", fast_augment=True, accelerator="cuda") is True
    assert resolve("auto", fast_augment=False, accelerator="gpu") is False  # needs the one-pass path
    assert resolve("auto", fast_augment=True, accelerator="cpu") is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve("auto", fast_augment=True, accelerator="auto") is True
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve("auto", fast_augment=True, accelerator="auto") is False
    assert resolve(True, fast_augment=True, accelerator="cpu") is True  # an explicit choice stands
    with pytest.raises(ValueError, match="true, false or 'auto', got 'yes'"):
        resolve("yes", fast_augment=True)
    cfg = make_cfg(["experiment=nyud_taskexpert", "trainer=cpu"])
    assert cfg.data.photometric_on_device == "auto"
    setup_gpu(cfg)
    assert cfg.data.photometric_on_device is False  # written into the config the run saves
    cfg = make_cfg(["experiment=nyud_taskexpert", "trainer=cpu"])
    assert build_datamodule(cfg).photometric_on_device is False


# ------------------------------------------------------------------ on a GPU
@pytest.mark.gpu
@CUDA
def test_fused_auto_on_cuda_parameters():
    params = [torch.nn.Parameter(torch.randn(4, 3, device="cuda"))]
    assert (
        build_optimizer(params, optimizer=torch.optim.AdamW, fused="auto", lr=1e-3).defaults["fused"] is True
    )


@pytest.mark.gpu
@CUDA
def test_fp16_clip_fused_trains_on_cuda(make_cfg):
    cfg = make_cfg(
        ["debug=fdr", "module.grad_clip=1.0", "trainer.accelerator=gpu", "trainer.precision=16-mixed"]
    )
    _, objects = train(cfg)
    trainer = objects["trainer"]
    assert trainer.optimizers[0].defaults["fused"] is True and trainer.state.finished


def test_ddp_searches_unused_parameters_for_backbones_that_leave_some_unused():
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from mtl.adapters.mtlora import MTLoRASwin
    from mtl.backbones.timm_backbone import TimmBackbone
    from mtl.pipeline import ddp_trainer_config

    assert MTLoRASwin.leaves_parameters_unused and not TimmBackbone.leaves_parameters_unused
    target = "lightning.pytorch.strategies.DDPStrategy"
    ddp = OmegaConf.create({"strategy": {"_target_": target, "find_unused_parameters": False}})
    mtlora = SimpleNamespace(backbone=SimpleNamespace(leaves_parameters_unused=True))
    plain = SimpleNamespace(backbone=SimpleNamespace(leaves_parameters_unused=False))
    assert ddp_trainer_config(ddp, mtlora).strategy.find_unused_parameters is True
    assert ddp.strategy.find_unused_parameters is False  # the config itself is left alone
    assert ddp_trainer_config(ddp, plain).strategy.find_unused_parameters is False
    assert ddp_trainer_config(OmegaConf.create({"strategy": "ddp"}), mtlora).strategy == (
        "ddp_find_unused_parameters_true"
    )
    assert ddp_trainer_config(OmegaConf.create({"strategy": "auto"}), mtlora).strategy == "auto"
