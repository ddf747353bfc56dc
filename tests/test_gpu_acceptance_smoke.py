"""``benchmarks/gpu_acceptance.py --smoke`` inside the suite, its measuring parts, and the device-sensitive
paths on a GPU (``pytest -m gpu``; skipped without CUDA)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from mtl.pipeline import build_datamodule, build_module, train

ROOT = Path(__file__).resolve().parents[1]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def acceptance() -> ModuleType:
    """The benchmark script as the module ``gpu_acceptance`` (its Hydra callback target)."""
    spec = importlib.util.spec_from_file_location("gpu_acceptance", ROOT / "benchmarks" / "gpu_acceptance.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_acceptance"] = module
    spec.loader.exec_module(module)
    return module


def _check_row(row: dict) -> None:
    assert "error" not in row, f"{row['setup']} failed: {row.get('error')}"
    assert row["timed_steps"] >= 1 and row["images_per_s"] > 0 and row["step_ms"] > 0, row
    assert row["syncs_per_step"] is not None and row["data_wait_ms"] is not None, row
    assert row["forward_gflops_per_image"] > 0, row
    # both inside the run: best.ckpt (ModelCheckpoint) and last.ckpt (its one writer, PeriodicCheckpoint)
    assert row["validations"] == 1 and row["checkpoint_files"] == 2, row
    assert row["collectives"] > 0, row  # sync_dist through the (gloo) process group
    assert row["off_device"] == [], row


def test_smoke_trains_the_rows_and_prints_one_table(acceptance, tmp_path, capsys):
    rows = "taskexpert_fp32,taskexpert_bf16,m3vit_bf16"
    result = acceptance.main(["--smoke", "--no-two-rank", "--only", rows, "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert [r["setup"] for r in result["rows"]] == rows.split(",")
    for row in result["rows"]:
        _check_row(row)
    assert result["failed"] == [] and result["off_device"] == []
    header = next(line for line in out.splitlines() if line.startswith("| setup"))
    assert "images/s" in header and "host syncs/step" in header and "data wait ms" in header
    assert "MFU" not in header and "peak mem" not in header  # CUDA-only columns
    assert (
        sum(line.startswith("| taskexpert") or line.startswith("| m3vit") for line in out.splitlines()) == 3
    )
    assert json.loads((tmp_path / "r.json").read_text())["rows"][0]["setup"] == "taskexpert_fp32"


def test_smoke_mtlora_trains_under_ddp(acceptance):
    # MTLoRA leaves the last block's shared fc2 LoRA unused by design: DDP must search for unused
    # parameters (Backbone.leaves_parameters_unused), else it stops at the second step
    result = acceptance.main(["--smoke", "--no-two-rank", "--only", "mtlora_bf16"])
    _check_row(result["rows"][0])


@pytest.mark.slow
def test_smoke_two_ranks_report_their_collectives(acceptance, capsys):
    result = acceptance.main(["--smoke", "--only", "taskexpert_bf16"])
    (reports,) = result["two_rank"].values()
    assert len(reports) == 2 and all("error" not in r for r in reports), reports
    assert all(r["collectives"] > 0 and r["off_device"] == [] for r in reports)
    assert "taskexpert_bf16: none (" in capsys.readouterr().out


# ------------------------------------------------------------------ the measuring parts
def test_collective_check_names_tensors_off_the_device(acceptance):
    check = acceptance.CollectiveCheck("cuda")
    checked = check.wrap("all_reduce", lambda *tensors, **kw: None)
    checked(torch.zeros(2), group=None)
    checked([torch.zeros(1, device="meta"), torch.zeros(3)])
    assert check.calls["all_reduce"] == 2
    assert [(o["collective"], o["device"], o["shape"]) for o in check.off_device] == [
        ("all_reduce", "cpu", [2]),
        ("all_reduce", "meta", [1]),
        ("all_reduce", "cpu", [3]),
    ]
    assert check.off_device[0]["site"].startswith("tests/test_gpu_acceptance_smoke.py:")
    on_host = acceptance.CollectiveCheck("cpu")
    on_host.wrap("broadcast", lambda *a, **k: None)(torch.zeros(1))
    assert on_host.off_device == [] and on_host.calls["broadcast"] == 1
    original = torch.distributed.all_reduce
    with check.installed():
        assert torch.distributed.all_reduce is not original
    assert torch.distributed.all_reduce is original


def test_peak_table_and_mfu(acceptance, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 PCIe")
    assert acceptance.peak_tflops("bf16", None) == (756.0, "NVIDIA H100 PCIe")  # not the SXM's 989
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    assert acceptance.peak_tflops("tf32", None)[0] == 494.7
    assert acceptance.peak_tflops("fp32", 100.0)[0] == 100.0  # --peak-tflops wins
    row = {
        "setup": "x",
        "precision": "bf16",
        "batch_size": 2,
        "images_per_s": 100.0,
        "step_ms": 20.0,
        "data_wait_ms": 1.0,
        "syncs_per_step": 2.0,
        "peak_mem_gib": 10.0,
        "forward_gflops_per_image": 989.4,
        "validations": 1,
        "checkpoint_files": 1,
    }
    out = acceptance.table(
        [row, {"setup": "y", "precision": "fp32", "error": "Boom"}], smoke=False, peak_override=None
    )
    assert "| 30.0% |" in out  # 3 × 989.4 GFLOPs × 100 images/s ÷ 989.4 TFLOP/s
    assert "| y | fp32 | failed: Boom |" in out


def test_error_line_takes_the_last_named_error(acceptance):
    log = "start\n[rank0]: Traceback\n[rank0]: RuntimeError: first\nnoise\n"
    log += "[rank0]: [rank0]: ValueError: last\nbye\n"
    assert acceptance.error_line(log) == "ValueError: last"
    assert acceptance.error_line("") == "no output"


# ------------------------------------------------------------------ on a GPU
def _to(batch: dict, device: str) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


@pytest.mark.gpu
@CUDA
def test_cuda_bf16_training_and_validation_of_the_main_experiment(make_cfg):
    """nyud_taskexpert at tiny size on the GPU, bf16-mixed, through trainer=ddp (NCCL, one device)."""
    cfg = make_cfg(
        [
            "experiment=nyud_taskexpert",
            "debug=fdr",
            "trainer=ddp",
            "trainer.devices=1",
            "trainer.precision=bf16-mixed",
        ]
    )
    try:
        metrics, objects = train(cfg)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    assert objects["trainer"].state.finished and objects["module"].device.type == "cuda"
    vals = {k: v for k, v in metrics.items() if k.startswith("val/")}
    assert vals and all(math.isfinite(v) for v in vals.values()), vals


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("experiment", ["nyud_taskexpert", "pascal_taskexpert", "nyud_m3vit"])
def test_metrics_compute_on_cuda(make_cfg, experiment):
    """Every task's validation and evaluation metric updates and computes on CUDA tensors."""
    from mtl.pipeline import eval_metric_options

    cfg = make_cfg([f"experiment={experiment}"])
    dm = build_datamodule(cfg)
    module = build_module(cfg, dm).to("cuda").eval()
    dm.setup("validate")
    batch = _to(next(iter(dm.val_dataloader())), "cuda")
    with torch.no_grad():
        preds = module.model.run(batch["image"]).preds
    for t, task in module.tasks.items():
        opts = {**eval_metric_options(cfg, t), **({"workers": 0} if t == "edge" else {})}
        for metric in (module.metrics["val"][t], task.eval_metric(**opts).to("cuda")):
            task.update_metric(metric, preds[t], batch)
            values = metric.compute()
            assert values and all(math.isfinite(float(v)) for v in values.values()), (t, values)
