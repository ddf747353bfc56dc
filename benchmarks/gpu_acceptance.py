"""GPU acceptance: the real experiments on one GPU, through the NCCL path, in one table.

What a person with one GPU runs (under 8 minutes on an H100/H200-class GPU) before trusting a
multi-GPU run::

    python benchmarks/gpu_acceptance.py [--steps 30] [--peak-tflops 989] [--json out.json]
    python benchmarks/gpu_acceptance.py --smoke        # CPU, seconds: the same code path, tiny models

Every row trains ``mtl.pipeline.train`` (Hydra configs, Lightning, ``trainer=ddp`` with one device,
so the NCCL process group and every ``sync_dist`` collective are exercised) on fake data in the
real on-disk format (:mod:`mtl.data.fake`, NYUD-v2 at 448×576, PASCAL-Context at 375×500), with a
validation (the metrics computed on the GPU) and a checkpoint inside the run, in a fresh process:

- ``nyud_taskexpert`` (ViT-L/16 + TaskExpert, batch 2) in fp32, fp32 with TF32 matmuls
  (``gpu.float32_matmul_precision=high``) and bf16-mixed;
- ``nyud_m3vit`` and ``pascal_mtlora`` (the recipe's batch 32) in bf16-mixed.

Columns: images/s and step time over the steps after the warm-up (validation and checkpoint
excluded), the time between two steps (waiting for the loader, plus the loop's own work), peak
memory (``torch.cuda.max_memory_allocated``), model FLOPs utilisation (3 × forward FLOPs per image
× images/s ÷ the GPU's peak for that precision; forward FLOPs from ``torch.utils.flop_counter``,
peaks from :data:`PEAK_TFLOPS` or ``--peak-tflops``) and host syncs per training step
(:class:`mtl.host_syncs.HostSyncCounter`, counted on separate steps: it slows dispatch).

Then a two-rank run on the same GPU (two processes, gloo carrying CUDA tensors: NCCL refuses two
ranks on one GPU) reports every collective that received a tensor not on the GPU (NCCL would fail
there) with the code that asked. ``--smoke`` runs all of it on the CPU (gloo) with tiny models at
64×80, 3 steps; the CUDA-only columns are left out. ``tests/test_gpu_acceptance_smoke.py`` runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = str(ROOT / "configs")
sys.modules.setdefault("gpu_acceptance", sys.modules[__name__])  # Hydra targets: gpu_acceptance.<Class>

try:  # the project's counter (host reads, data-dependent shapes, blocking copies)
    from mtl.host_syncs import HostSyncCounter
except ImportError:  # pragma: no cover - a checkout without it: the scalar reads only
    from torch.utils._python_dispatch import TorchDispatchMode

    class HostSyncCounter(TorchDispatchMode):  # type: ignore[no-redef]
        """Counts ``aten._local_scalar_dense`` (``item``, ``float(t)``, ``bool(t)``) and ``nonzero``."""

        def __init__(self) -> None:
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten._local_scalar_dense, torch.ops.aten.nonzero):
                self.count += 1
            return func(*args, **(kwargs or {}))


# dense peaks (no sparsity) from the vendors' datasheets, TFLOP/s: fp32 on CUDA cores, tf32 and bf16
# on tensor cores; the longest name contained in torch.cuda.get_device_name() wins
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4},
    "GH200": {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4},
    "H100": {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4},  # SXM
    "H100 PCIe": {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0},
    "H100 NVL": {"fp32": 60.0, "tf32": 417.5, "bf16": 835.0},
    "H800": {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4},
    "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0},
    "A800": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0},
    "L40S": {"fp32": 91.6, "tf32": 183.0, "bf16": 362.1},
    "L40": {"fp32": 90.5, "tf32": 90.5, "bf16": 181.0},
    "L4": {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0},
    "A10": {"fp32": 31.2, "tf32": 62.5, "bf16": 125.0},
    "RTX 4090": {"fp32": 82.6, "tf32": 82.6, "bf16": 165.2},
    "RTX 3090": {"fp32": 35.6, "tf32": 35.6, "bf16": 71.0},
    "V100": {"fp32": 15.7, "tf32": 15.7},  # no TF32 / bf16 tensor cores
}
COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "broadcast",
    "reduce",
    "gather",
    "scatter",
    "all_to_all",
    "all_to_all_single",
)

# ----------------------------------------------------------------------------- setups
BIG = {  # the real models, from scratch (no download), NYUD at 448×576, PASCAL at the recipe's 448×448
    "vit_large": ["model.backbone.pretrained=false"],
    "m3vit": ["model.backbone.pretrained=false"],
    "mtlora": ["model.backbone.pretrained=false"],
}
TINY = {  # what tests/conftest.py trains for these experiments on a CPU
    "vit_large": [
        "model/backbone=vit_tiny",
        "+model.backbone.depth=4",
        "+model.backbone.embed_dim=32",
        "+model.backbone.num_heads=2",
        "model.backbone.out_indices=[0,1,2,3]",
        "model.decoder.channels=32",
    ],
    "m3vit": [
        "model.backbone.pretrained=false",
        "model.backbone.name=vit_tiny_patch16_224",
        "++model.backbone.depth=2",
        "++model.backbone.embed_dim=32",
        "++model.backbone.num_heads=2",
        "model.backbone.out_indices=[0,1]",
        "model.backbone.num_experts=4",
        "model.backbone.top_k=2",
        "model.decoder.channels=16",
    ],
    "mtlora": [
        "model.backbone.pretrained=false",
        "++model.backbone.embed_dim=16",
        "++model.backbone.depths=[1,1,2,1]",
        "++model.backbone.num_heads=[1,2,2,4]",
        "++model.backbone.window_size=4",
        "model.backbone.rank=4",
        "model.decoder.channels=8",
    ],
}
SMOKE_DATA = [  # the fake roots at 64×80 (PASCAL 60×76 padded), batch 2
    "data.batch_size=2",
    "data.eval_batch_size=2",
    "data.num_workers=0",
    "data.pin_memory=false",
    "data.input_size=[64,80]",
    "++data.resize=null",
]


@dataclass(frozen=True)
class Setup:
    """One row: an experiment, its model size key (``BIG`` / ``TINY``), precision and extra overrides."""

    name: str
    experiment: str
    model: str
    precision: str  # fp32 | tf32 | bf16: the row's peak for MFU
    overrides: tuple[str, ...] = ()

    def trainer_precision(self) -> str:
        return "bf16-mixed" if self.precision == "bf16" else "32"


SETUPS = [
    Setup("taskexpert_fp32", "nyud_taskexpert", "vit_large", "fp32"),
    Setup("taskexpert_tf32", "nyud_taskexpert", "vit_large", "tf32", ("gpu.float32_matmul_precision=high",)),
    Setup("taskexpert_bf16", "nyud_taskexpert", "vit_large", "bf16"),
    Setup("m3vit_bf16", "nyud_m3vit", "m3vit", "bf16"),
    Setup("mtlora_bf16", "pascal_mtlora", "mtlora", "bf16"),
]
TWO_RANK = ["taskexpert_bf16", "m3vit_bf16", "mtlora_bf16"]


def overrides_for(
    setup: Setup, *, smoke: bool, data_dir: Path, steps: int, two_rank: bool = False
) -> list[str]:
    """The ``train.py`` overrides of one row."""
    val_at = max(steps, 1) if smoke else max(2 * steps // 3, 1)  # one validation (+ checkpoint) inside
    out = [
        f"experiment={setup.experiment}",
        "trainer=ddp_cpu" if smoke else "trainer=ddp",
        "trainer.devices=1",
        f"trainer.precision={setup.trainer_precision()}",
        f"trainer.max_steps={steps}",
        "trainer.max_epochs=-1",
        "trainer.check_val_every_n_epoch=null",
        f"++trainer.val_check_interval={val_at}",
        "++trainer.limit_val_batches=2",
        "++trainer.num_sanity_val_steps=1",
        "trainer.log_every_n_steps=10",
        f"paths.data_dir={data_dir}",
        "extras.print_config=false",
        "+callbacks.acceptance._target_=gpu_acceptance.AcceptanceProbe",
        f"+callbacks.acceptance.sync_steps={1 if smoke or two_rank else 3}",
        *(TINY if smoke else BIG)[setup.model],
        *(SMOKE_DATA if smoke else []),
        *setup.overrides,
    ]
    if two_rank:  # two "nodes" of one device each, on the same GPU (or CPU), gloo
        out += [
            "++trainer.num_nodes=2",
            "trainer.strategy.process_group_backend=gloo",
            "trainer.sync_batchnorm=false",
        ]
    return out


def write_data(data_dir: Path, *, smoke: bool, steps: int) -> Path:
    """Fake NYUDv2/ and PASCALContext/ roots in the real formats: enough images for ``steps`` steps."""
    from mtl.data.fake import write_nyud, write_pascal

    if smoke:
        write_nyud(data_dir / "NYUDv2", n_train=8, n_val=2, size=(64, 80))
        write_pascal(data_dir / "PASCALContext", n_train=8, n_val=2, size=(60, 76))
    else:
        write_nyud(data_dir / "NYUDv2", n_train=2 * steps + 4, n_val=8)
        write_pascal(data_dir / "PASCALContext", n_train=128, n_val=64)
    return data_dir


# ----------------------------------------------------------------------------- measuring
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class AcceptanceProbe(L.Callback):
    """Times the training steps, counts host syncs, checkpoints and validations, peak memory, FLOPs.

    Steps ``[1, 1 + sync_steps)`` run under the host-sync counter; the steps after them are timed
    (the step right after a validation is left out of the loader wait, the validation and its
    checkpoint out of the time).

    Args:
        sync_steps: steps counted for host syncs.
    """

    def __init__(self, *, sync_steps: int = 3) -> None:
        super().__init__()
        self.sync_steps = int(sync_steps)
        self.first_timed = 1 + self.sync_steps
        self.step = 0
        self.syncs: list[int] = []
        self.data_waits: list[float] = []
        self.paused = 0.0
        self.validations = 0
        self.checkpoints = 0
        self.batch_size = 0
        self.timed_steps = 0
        self.wall = 0.0
        self.peak_bytes: int | None = None
        self.forward_flops: float | None = None
        self._counter: Any = None
        self._mark = 0
        self._t0: float | None = None
        self._prev_end: float | None = None
        self._pause_start: float | None = None
        self._image: torch.Tensor | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._counter is not None:  # the counted step ran until this batch
            self.syncs.append(self._counter.count - self._mark)
            self._mark = self._counter.count
            if self.step == self.first_timed:
                self._counter.__exit__(None, None, None)
                self._counter = None
        if self.step == 1 and self.sync_steps > 0:
            self._counter = HostSyncCounter()
            self._counter.__enter__()
            self._mark = 0
        if self._pause_start is not None:
            self.paused += now - self._pause_start
            self._pause_start = None
        elif self._prev_end is not None and self.step >= self.first_timed:
            self.data_waits.append(now - self._prev_end)
        if self.step == self.first_timed:
            _sync(pl_module.device)
            self._t0 = time.perf_counter()
        self.batch_size = int(batch["image"].shape[0])
        self._image = batch["image"][:1]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.step += 1
        if self._t0 is not None:
            self.timed_steps += 1
        self._prev_end = time.perf_counter()

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking and self._t0 is not None:
            _sync(pl_module.device)
            self._pause_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.validations += 1

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.checkpoints += 1

    def on_train_end(self, trainer, pl_module) -> None:
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self._counter = None
        _sync(pl_module.device)
        if self._t0 is not None:
            pause = self.paused + (time.perf_counter() - self._pause_start if self._pause_start else 0.0)
            self.wall = time.perf_counter() - self._t0 - pause
        if pl_module.device.type == "cuda":
            self.peak_bytes = int(torch.cuda.max_memory_allocated(pl_module.device))
        if self._image is not None:
            with torch.no_grad(), FlopCounterMode(display=False) as flops:
                pl_module.model.run(self._image)
            self.forward_flops = float(flops.get_total_flops())

    def report(self) -> dict[str, Any]:
        """The row's measurements (``None`` where not measured)."""
        images = self.batch_size * self.timed_steps
        return {
            "batch_size": self.batch_size,
            "timed_steps": self.timed_steps,
            "images_per_s": images / self.wall if self.wall > 0 else None,
            "step_ms": 1e3 * self.wall / self.timed_steps if self.timed_steps else None,
            "data_wait_ms": 1e3 * sum(self.data_waits) / len(self.data_waits) if self.data_waits else None,
            "syncs_per_step": sum(self.syncs) / len(self.syncs) if self.syncs else None,
            "peak_mem_gib": self.peak_bytes / 2**30 if self.peak_bytes is not None else None,
            "forward_gflops_per_image": self.forward_flops / 1e9 if self.forward_flops else None,
            "validations": self.validations,
            "checkpoints": self.checkpoints,
        }


@dataclass
class CollectiveCheck:
    """Wraps ``torch.distributed``'s collectives and records every tensor not on ``device_type``."""

    device_type: str
    calls: Counter = field(default_factory=Counter)
    off_device: list[dict] = field(default_factory=list)

    @staticmethod
    def _tensors(value: Any) -> Iterator[torch.Tensor]:
        if torch.is_tensor(value):
            yield value
        elif isinstance(value, list | tuple):
            for v in value:
                yield from CollectiveCheck._tensors(v)

    @staticmethod
    def _site() -> str:
        """The innermost project frame that asked (``mtl/``, else any code outside installed packages)."""
        frames = traceback.extract_stack()[:-2]  # without _site and the wrapper
        ours = [f for f in frames if "/mtl/" in f.filename]
        outside = [f for f in frames if "-packages/" not in f.filename and f.filename != __file__]
        frame = (ours or outside or frames)[-1]
        return f"{os.path.relpath(frame.filename, ROOT)}:{frame.lineno}"

    def wrap(self, name: str, fn: Any) -> Any:
        def checked(*args, **kwargs):
            self.calls[name] += 1
            for t in self._tensors([*args, *kwargs.values()]):
                if t.device.type != self.device_type:
                    self.off_device.append(
                        {
                            "collective": name,
                            "device": str(t.device),
                            "shape": list(t.shape),
                            "site": self._site(),
                        }
                    )
            return fn(*args, **kwargs)

        return checked

    @contextlib.contextmanager
    def installed(self) -> Iterator[CollectiveCheck]:
        """``torch.distributed.<collective>`` (and the c10d module's) wrapped while inside."""
        modules = [dist, dist.distributed_c10d]
        saved = [(m, n, getattr(m, n)) for m in modules for n in COLLECTIVES if hasattr(m, n)]
        for m, n, fn in saved:
            setattr(m, n, self.wrap(n, fn))
        try:
            yield self
        finally:
            for m, n, fn in saved:
                setattr(m, n, fn)


@contextlib.contextmanager
def _quiet(enabled: bool) -> Iterator[None]:
    if not enabled:
        yield
        return
    logging.disable(logging.WARNING)
    sink = io.StringIO()
    with contextlib.redirect_stderr(sink), contextlib.redirect_stdout(sink), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)


def run_setup(
    setup: Setup, *, data_dir: Path, output_dir: Path, steps: int, smoke: bool, two_rank: bool = False
) -> dict[str, Any]:
    """Trains one row in this process; its measurements (and, under two ranks, the collective check)."""
    from mtl.pipeline import compose_train_config, train

    cfg = compose_train_config(
        overrides_for(setup, smoke=smoke, data_dir=data_dir, steps=steps, two_rank=two_rank), output_dir
    )
    check = CollectiveCheck("cpu" if smoke else "cuda")
    start, excepthook = time.perf_counter(), sys.excepthook
    env = dict(os.environ)
    try:
        with check.installed(), _quiet(smoke):
            _, objects = train(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        sys.excepthook = excepthook  # init_process_group chains a rank-prefixing hook
        # Lightning leaves LOCAL_RANK, MASTER_PORT, … behind: a later launch would take itself for a rank
        os.environ.clear()
        os.environ.update(env)
    (probe,) = [c for c in objects["trainer"].callbacks if isinstance(c, AcceptanceProbe)]
    row = {"setup": setup.name, "precision": setup.precision, **probe.report()}
    row["checkpoint_files"] = len(list((output_dir / "checkpoints").glob("*.ckpt")))
    row["wall_s"] = time.perf_counter() - start
    row["collectives"] = sum(check.calls.values())
    row["off_device"] = check.off_device
    return row


# ----------------------------------------------------------------------------- processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker_cmd(args: argparse.Namespace, name: str, out: Path, output_dir: Path) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--worker-out", str(out)]
    cmd += ["--data-dir", str(args.data_dir), "--output-dir", str(output_dir), "--steps", str(args.steps)]
    return cmd + (["--smoke"] if args.smoke else [])


def error_line(text: str) -> str:
    """The last line of a failed run's output that names an error (else its last line)."""
    lines = [line.split("]: ")[-1].strip() for line in text.splitlines() if line.strip()]
    named = [line for line in lines if "Error" in line or "Exception" in line]
    return ((named or lines or ["no output"])[-1])[:400]


def failed_row(setup: Setup, error: str) -> dict[str, Any]:
    return {"setup": setup.name, "precision": setup.precision, "error": error}


def run_isolated(args: argparse.Namespace, setup: Setup, tmp: Path) -> dict[str, Any]:
    """One row in a fresh process (its own peak memory, matmul precision and process group)."""
    out, log = tmp / f"{setup.name}.json", tmp / f"{setup.name}.log"
    with log.open("w") as fh:
        proc = subprocess.run(
            _worker_cmd(args, setup.name, out, tmp / setup.name),
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    if proc.returncode != 0:
        return failed_row(setup, error_line(log.read_text()))
    return json.loads(out.read_text())


def run_two_ranks(args: argparse.Namespace, setup: Setup, tmp: Path) -> list[dict[str, Any]]:
    """Two processes on the one device (two single-device "nodes", gloo); each rank's collective check."""
    port, procs = _free_port(), []
    for rank in range(2):
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "NODE_RANK": str(rank),
            "LOCAL_RANK": "0",
            "WORLD_SIZE": "2",
        }
        out, log = tmp / f"{setup.name}_rank{rank}.json", tmp / f"{setup.name}_rank{rank}.log"
        cmd = _worker_cmd(args, setup.name, out, tmp / f"{setup.name}_2ranks") + ["--two-rank"]
        procs.append(
            (
                subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT, env=env),
                out,
                log,
            )
        )
    reports = []
    for proc, out, log in procs:
        try:
            proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:  # e.g. the other rank failed inside a collective
            for other, _, _ in procs:
                other.kill()
            proc.wait()
        if proc.returncode == 0:
            reports.append(json.loads(out.read_text()))
        else:
            reports.append(failed_row(setup, error_line(log.read_text()) + f" (exit {proc.returncode})"))
    return reports


# ----------------------------------------------------------------------------- table
def peak_tflops(precision: str, override: float | None) -> tuple[float | None, str]:
    """The GPU's peak for ``precision`` (``--peak-tflops`` wins) and the GPU's name."""
    if not torch.cuda.is_available():
        return override, "CPU"
    name = torch.cuda.get_device_name()
    if override is not None:
        return override, name
    keys = sorted((k for k in PEAK_TFLOPS if k in name), key=len, reverse=True)
    return (PEAK_TFLOPS[keys[0]].get(precision) if keys else None), name


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def table(rows: list[dict[str, Any]], *, smoke: bool, peak_override: float | None) -> str:
    """The Markdown table of the rows (CUDA-only columns left out under ``--smoke``)."""
    head = ["setup", "precision", "batch", "images/s", "step ms", "data wait ms", "host syncs/step"]
    head += [] if smoke else ["peak mem GiB", "MFU"]
    head += ["fwd GFLOPs/img", "val", "ckpt"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            cells = [r["setup"], r["precision"], f"failed: {r['error']}"] + [""] * (len(head) - 3)
            lines.append("| " + " | ".join(cells) + " |")
            continue
        cells = [r["setup"], r["precision"], str(r["batch_size"]), _fmt(r["images_per_s"], ".2f")]
        cells += [_fmt(r["step_ms"], ".1f"), _fmt(r["data_wait_ms"], ".1f"), _fmt(r["syncs_per_step"], ".1f")]
        if not smoke:
            peak, _ = peak_tflops(r["precision"], peak_override)
            flops, ips = r["forward_gflops_per_image"], r["images_per_s"]
            mfu = 3 * flops * 1e9 * ips / (peak * 1e12) if peak and flops and ips else None
            cells += [_fmt(r["peak_mem_gib"], ".1f"), "—" if mfu is None else f"{100 * mfu:.1f}%"]
        cells += [
            _fmt(r["forward_gflops_per_image"], ".3g"),
            str(r["validations"]),
            str(r["checkpoint_files"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def two_rank_lines(results: dict[str, list[dict[str, Any]]], device: str) -> list[str]:
    lines = [f"two ranks on one {device} (gloo): collectives on a tensor not on the {device}"]
    for name, reports in results.items():
        errors = [r["error"] for r in reports if "error" in r]
        if errors:
            lines.append(f"- {name}: failed: {errors[0]}")
            continue
        off = [o for r in reports for o in r["off_device"]]
        calls = sum(r["collectives"] for r in reports)
        if not off:
            lines.append(f"- {name}: none ({calls} collectives over both ranks)")
            continue
        sites = Counter(f"{o['collective']} of a {o['device']} tensor at {o['site']}" for o in off)
        lines.append(f"- {name}: {len(off)} of {calls} collectives:")
        lines += [f"    {n}× {s}" for s, n in sites.most_common()]
    return lines


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny models, 64×80, 3 steps (seconds)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per row (default 30; smoke 3)")
    ap.add_argument("--only", default=None, help=f"comma-separated subset of {[s.name for s in SETUPS]}")
    ap.add_argument("--no-two-rank", action="store_true", help="skip the two-rank collective check")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the GPU's peak for MFU (all rows)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows and checks here")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per two-rank run")
    ap.add_argument("--data-dir", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--output-dir", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--two-rank", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.steps = args.steps or (3 if args.smoke else 30)
    by_name = {s.name: s for s in SETUPS}
    if args.worker:  # one row in this process (a subprocess of the run below)
        if args.smoke:
            torch.set_num_threads(1)
        row = run_setup(
            by_name[args.worker],
            data_dir=args.data_dir,
            output_dir=args.output_dir,
            steps=args.steps if not args.two_rank else min(args.steps, 4),
            smoke=args.smoke,
            two_rank=args.two_rank,
        )
        args.worker_out.write_text(json.dumps(row))
        return row
    if not args.smoke and not torch.cuda.is_available():
        ap.error("no CUDA device: run with --smoke on a CPU")
    names = args.only.split(",") if args.only else list(by_name)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        ap.error(f"unknown setup(s) {unknown}; choose from {list(by_name)}")
    with tempfile.TemporaryDirectory(prefix="gpu_acceptance_") as tmp_name:
        tmp = Path(tmp_name)
        args.data_dir = write_data(tmp / "data", smoke=args.smoke, steps=args.steps)
        rows = []
        for name in names:
            t = time.perf_counter()
            if args.smoke:  # in this process: seconds, not a process start per row
                torch.set_num_threads(1)
                try:
                    row = run_setup(
                        by_name[name],
                        data_dir=args.data_dir,
                        output_dir=tmp / name,
                        steps=args.steps,
                        smoke=True,
                    )
                except Exception as err:  # noqa: BLE001 - reported in the table, the other rows still run
                    row = failed_row(by_name[name], error_line(f"{type(err).__name__}: {err}"))
                rows.append(row)
            else:
                rows.append(run_isolated(args, by_name[name], tmp))
            print(f"{name}: {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
        two_rank: dict[str, list[dict[str, Any]]] = {}
        for name in (
            [] if args.no_two_rank else [n for n in TWO_RANK if n in names][: 1 if args.smoke else None]
        ):
            t = time.perf_counter()
            two_rank[name] = run_two_ranks(args, by_name[name], tmp)
            print(f"{name} on two ranks: {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    _, device = peak_tflops("bf16", args.peak_tflops)
    when = time.strftime("%Y-%m-%d")
    print(f"GPU acceptance ({'smoke, ' if args.smoke else ''}{device}, {when}, {args.steps} steps per row)")
    print(table(rows, smoke=args.smoke, peak_override=args.peak_tflops))
    off_single = [(r["setup"], o) for r in rows for o in r.get("off_device", [])]
    if off_single:
        print(f"collectives on a tensor not on the {'CPU' if args.smoke else 'GPU'} (one rank):")
        for name, o in off_single:
            print(f"- {name}: {o['collective']} of a {o['device']} tensor at {o['site']}")
    if two_rank:
        print("\n".join(two_rank_lines(two_rank, "CPU" if args.smoke else "GPU")))
    failed = [r["setup"] for r in rows if "error" in r]
    failed += [f"{n} (two ranks)" for n, reports in two_rank.items() if any("error" in r for r in reports)]
    off = [n for n, reports in two_rank.items() for r in reports if r.get("off_device")] + [
        n for n, _ in off_single
    ]
    result = {
        "device": device,
        "date": when,
        "steps": args.steps,
        "rows": rows,
        "two_rank": two_rank,
        "failed": failed,
        "off_device": sorted(set(off)),
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    outcome = main()
    sys.exit(1 if outcome.get("failed") or outcome.get("off_device") else 0)
