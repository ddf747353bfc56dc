"""The GPU knobs of a run (``configs/gpu/``): matmul precision (TF32), cuDNN autotuning, fused
optimisers, channels_last, ``torch.compile`` of the backbone / decoder, loader workers sized to the node.

:mod:`mtl.pipeline` reads the config's ``gpu`` node into :class:`GPUSettings` and applies it: the
backend flags before anything is built (:func:`apply_backend_settings`), ``compile`` on the built
model (:func:`compile_model`), ``channels_last`` as a callback (:class:`ChannelsLast`), the fused
optimiser through :func:`mtl.optim.with_fused`. ``gpu=default`` keeps the papers' fp32 numerics;
``gpu=fast`` switches to TF32 matmuls, cuDNN autotuning and bf16-mixed (README, "GPU").
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch

from mtl.model import MultiTaskNet

log = logging.getLogger(__name__)

MATMUL_PRECISIONS = ("highest", "high", "medium")
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
MAX_AUTO_WORKERS = 8


@dataclass(frozen=True)
class CompileOptions:
    """``gpu.compile``: which parts :func:`torch.compile` compiles, and how.

    Attributes:
        backbone: compile the backbone's ``features`` (what every training and evaluation forward runs).
        decoder: compile the decoder's ``forward``.
        mode: ``torch.compile``'s mode (``None``: its default).
        backend: ``torch.compile``'s backend (``inductor``; ``aot_eager`` to debug).
        dynamic: ``torch.compile``'s ``dynamic`` (``None``: recompile once, then dynamic shapes).
        fullgraph: fail on graph breaks instead of splitting the graph.
    """

    backbone: bool = False
    decoder: bool = False
    mode: str | None = None
    backend: str = "inductor"
    dynamic: bool | None = None
    fullgraph: bool = False

    def __post_init__(self) -> None:
        if self.mode not in COMPILE_MODES:
            raise ValueError(f"gpu.compile.mode must be one of {list(COMPILE_MODES)}, got {self.mode!r}")

    @property
    def enabled(self) -> bool:
        return self.backbone or self.decoder

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``torch.compile``."""
        return {
            "mode": self.mode,
            "backend": self.backend,
            "dynamic": self.dynamic,
            "fullgraph": self.fullgraph,
        }


@dataclass(frozen=True)
class GPUSettings:
    """The ``gpu`` config node (``configs/gpu/default.yaml`` documents every key).

    Attributes:
        float32_matmul_precision: ``torch.set_float32_matmul_precision``: ``highest`` (true fp32,
            the papers'), ``high`` (TF32 tensor cores on Ampere and later) or ``medium`` (bf16).
        cudnn_allow_tf32: ``torch.backends.cudnn.allow_tf32``: TF32 in cuDNN convolutions
            (PyTorch's default: on).
        cudnn_benchmark: ``torch.backends.cudnn.benchmark``: autotune convolution algorithms per
            input shape (fixed crop sizes: faster after the first steps).
        fused_optimizer: ``auto`` (fused kernels when the optimiser has them and every parameter
            is on a CUDA device), ``true`` (always; an error for an optimiser without them),
            ``false`` (PyTorch's default, foreach).
        channels_last: train and evaluate the model in channels-last memory format (conv decoders
            and CNN backbones on tensor cores; no gain for ViTs' linear layers).
        compile: :class:`CompileOptions`.
    """

    float32_matmul_precision: str = "highest"
    cudnn_allow_tf32: bool = True
    cudnn_benchmark: bool = False
    fused_optimizer: bool | str = "auto"
    channels_last: bool = False
    compile: CompileOptions = field(default_factory=CompileOptions)

    def __post_init__(self) -> None:
        if self.float32_matmul_precision not in MATMUL_PRECISIONS:
            raise ValueError(
                f"gpu.float32_matmul_precision must be one of {list(MATMUL_PRECISIONS)}, "
                f"got {self.float32_matmul_precision!r}"
            )
        if self.fused_optimizer not in ("auto", True, False):
            raise ValueError(f"gpu.fused_optimizer must be auto, true or false, got {self.fused_optimizer!r}")

    @classmethod
    def from_config(cls, node: Mapping | None) -> GPUSettings:
        """Settings from the ``gpu`` config node (``None`` or absent keys: the defaults).

        Raises:
            ValueError: an unknown key (named, with the valid ones) or an invalid value.
        """
        node = dict(node or {})
        compile_node = dict(node.pop("compile", None) or {})
        for name, given, known in (
            ("gpu", node, {f.name for f in dataclasses.fields(cls)} - {"compile"}),
            ("gpu.compile", compile_node, {f.name for f in dataclasses.fields(CompileOptions)}),
        ):
            unknown = sorted(set(given) - known)
            if unknown:
                raise ValueError(f"{name}: unknown key(s) {unknown}; valid keys: {sorted(known)}")
        return cls(**node, compile=CompileOptions(**compile_node))


def apply_backend_settings(settings: GPUSettings) -> None:
    """Sets the process-wide matmul precision and cuDNN flags of ``settings``."""
    torch.set_float32_matmul_precision(settings.float32_matmul_precision)
    torch.backends.cudnn.allow_tf32 = settings.cudnn_allow_tf32
    torch.backends.cudnn.benchmark = settings.cudnn_benchmark


def compile_model(model: MultiTaskNet, options: CompileOptions) -> None:
    """Compiles the backbone's ``features`` and / or the decoder's ``forward`` in place.

    Parameter names, ``state_dict`` keys and checkpoints are those of the uncompiled model (the
    modules are not wrapped); compilation happens at the first forward.
    """
    if options.backbone:
        model.backbone.features = torch.compile(model.backbone.features, **options.kwargs())
    if options.decoder:
        model.decoder.compile(**options.kwargs())
    if options.enabled:
        parts = [p for p, on in (("backbone", options.backbone), ("decoder", options.decoder)) if on]
        log.info("torch.compile(%s) of the %s", options.kwargs(), " and ".join(parts))


class ChannelsLast(L.Callback):
    """Puts the module's 4-D weights and every batch's images in channels-last memory format."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        pl_module.to(memory_format=torch.channels_last)

    @staticmethod
    def _images(batch: dict) -> None:
        batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._images(batch)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._images(batch)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._images(batch)


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask: what SLURM / taskset granted)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def local_processes(devices: Any, accelerator: Any) -> int:
    """Training processes on this node for ``trainer.devices`` / ``trainer.accelerator``.

    ``LOCAL_WORLD_SIZE`` (torchrun) wins; ``devices`` may be an int, a list of ids, ``"auto"`` or
    ``-1`` (every visible GPU, one process on CPU).
    """
    if os.environ.get("LOCAL_WORLD_SIZE"):
        return max(int(os.environ["LOCAL_WORLD_SIZE"]), 1)
    if isinstance(devices, Sequence) and not isinstance(devices, str):
        return max(len(devices), 1)
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if isinstance(devices, int) and devices > 0:
        return devices
    return max(torch.cuda.device_count(), 1) if on_gpu(accelerator) else 1


def on_gpu(accelerator: Any) -> bool:
    """Whether ``trainer.accelerator`` trains on a CUDA GPU (``auto``: when one is visible)."""
    return str(accelerator) in ("gpu", "cuda") or (str(accelerator) == "auto" and torch.cuda.is_available())


def auto_num_workers(processes: int, cpus: int | None = None, cap: int = MAX_AUTO_WORKERS) -> int:
    """``min(cap, CPUs per process − 1)``: one CPU per process stays with the training loop."""
    cpus = cpu_count() if cpus is None else cpus
    return max(min(cap, cpus // max(processes, 1) - 1), 0)


def resolve_num_workers(value: Any, *, devices: Any = 1, accelerator: Any = "auto") -> int:
    """``data.num_workers``: an int as given, or ``auto`` → :func:`auto_num_workers` for this node.

    Raises:
        ValueError: neither a non-negative int nor ``auto``.
    """
    if value == "auto":
        return auto_num_workers(local_processes(devices, accelerator))
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"data.num_workers must be a non-negative int or 'auto', got {value!r}")
    return value


def resolve_photometric_on_device(value: Any, *, fast_augment: bool, accelerator: Any = "auto") -> bool:
    """``data.photometric_on_device``: a bool as given, or ``auto`` → on when the one-pass augmentation
    is (``data.fast_augment``) and training runs on a GPU (:func:`on_gpu`), off on the CPU (where the
    device half would run on the training process's own cores).

    Raises:
        ValueError: neither a bool nor ``auto``.
    """
    if value == "auto":
        return bool(fast_augment) and on_gpu(accelerator)
    if not isinstance(value, bool):
        raise ValueError(f"data.photometric_on_device must be true, false or 'auto', got {value!r}")
    return value
