"""Merging real 2-step single-task checkpoints: checks, θ0, merge.py end to end, eval.py on the result."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import compose_cfg
from tiny_runs import TINY, train_single_task

from mtl.initial_weights import state_fingerprint, stored_fingerprint
from mtl.merging import AdaMerging, TaskArithmetic, TIESMerging
from mtl.merging.io import key_owners, load_run
from mtl.merging.run import merge_checkpoints, rebuild_initial_state
from mtl.pipeline import evaluate

ROOT = Path(__file__).resolve().parents[2]
TASKS = ("semseg", "depth", "normals", "edge")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    """task → last.ckpt of a 2-step single-task run; all four from the same seeded initialisation."""
    root = tmp_path_factory.mktemp("single_task")
    return {t: train_single_task(t, root / t) for t in TASKS}


def _eval(ckpt: Path, tasks, out: Path) -> dict[str, float]:
    cfg = compose_cfg(
        ["experiment=synthetic_single_task", *TINY, f"data.tasks=[{','.join(tasks)}]", f"ckpt_path={ckpt}",
         "eval.pictures=0", "eval.edge.workers=0", "logger=none"],
        out, config_name="eval",
    )  # fmt: skip
    return evaluate(cfg)[0]


def test_training_stores_the_initial_fingerprint_and_merge_rebuilds_theta0(ckpts):
    runs = [load_run(p) for p in ckpts.values()]
    assert all(r.fingerprint for r in runs)
    shared = [
        k for k in runs[0].state if k.startswith("model.backbone.") or ".lateral." in k or ".fuse." in k
    ]
    for r in runs[1:]:
        assert all(r.fingerprint[k] == runs[0].fingerprint[k] for k in shared)
        assert any(not torch.equal(r.state[k], runs[0].state[k]) for k in shared)  # but trained apart
    rebuilt = state_fingerprint(rebuild_initial_state(runs[0].cfg.copy()))
    assert all(rebuilt[k] == runs[0].fingerprint[k] for k in shared)


def test_task_arithmetic_lambda_one_on_one_checkpoint_returns_it(ckpts, tmp_path):
    path, _ = merge_checkpoints(
        ckpts=[str(ckpts["depth"])], method=TaskArithmetic(lam=1.0), output_dir=tmp_path
    )
    merged = torch.load(path, weights_only=True)["state_dict"]
    original = load_run(ckpts["depth"]).state
    assert {k for k in merged if k.startswith("model.")} == {k for k in original if k.startswith("model.")}
    for k, v in ((k, v) for k, v in merged.items() if k.startswith("model.")):
        torch.testing.assert_close(v, original[k], rtol=0, atol=1e-6, msg=k)
    a = _eval(path, ["depth"], tmp_path / "merged")
    b = _eval(ckpts["depth"], ["depth"], tmp_path / "single")
    assert a["test/depth/rmse"] == pytest.approx(b["test/depth/rmse"], rel=1e-5)


def test_merged_checkpoint_keeps_every_task_branch_and_merges_the_shared_weights(ckpts, tmp_path):
    order = list(TASKS)
    path, cfg = merge_checkpoints(
        ckpts=[str(ckpts[t]) for t in order], method=TIESMerging(), output_dir=tmp_path
    )
    saved = torch.load(path, weights_only=False)
    assert list(cfg.data.tasks) == order and saved["config"]["data"]["tasks"] == order
    assert saved["merge"]["method"] == "TIESMerging" and saved["merge"]["k"] == 0.2
    state = saved["state_dict"]
    runs = {t: load_run(ckpts[t]) for t in order}
    for t in order:  # decoder branch and head: exactly the single-task model's
        own = [k for k in state if f".per_task.{t}." in k or f".heads.{t}." in k]
        assert own and all(torch.equal(state[k], runs[t].state[k]) for k in own)
    key = "model.backbone.model.layers.0.blocks.0.mlp.fc1.weight"
    assert all(not torch.equal(state[key], r.state[key]) for r in runs.values())


def test_base_ckpt_must_be_the_initialisation(ckpts, tmp_path):
    run = load_run(ckpts["semseg"])
    init = tmp_path / "init.ckpt"
    torch.save({"state_dict": rebuild_initial_state(run.cfg.copy())}, init)
    pair = [str(ckpts["semseg"]), str(ckpts["depth"])]
    a, _ = merge_checkpoints(
        ckpts=pair, method=TaskArithmetic(), output_dir=tmp_path / "a", base_ckpt=str(init)
    )
    b, _ = merge_checkpoints(ckpts=pair, method=TaskArithmetic(), output_dir=tmp_path / "b")
    sa, sb = (torch.load(p, weights_only=True)["state_dict"] for p in (a, b))
    assert all(torch.equal(sa[k], sb[k]) for k in sa if k.startswith("model."))
    with pytest.raises(ValueError, match=r"θ0 mismatch: 'model\.backbone\..*' of base_ckpt"):
        merge_checkpoints(ckpts=pair, method=TaskArithmetic(), output_dir=tmp_path / "c", base_ckpt=pair[0])


def _copy_run(src_ckpt: Path, dst: Path, edit) -> Path:
    shutil.copytree(src_ckpt.parent.parent, dst)
    path = dst / "checkpoints" / "last.ckpt"
    ckpt = torch.load(path, weights_only=False)
    edit(ckpt)
    torch.save(ckpt, path)
    return path


def test_bad_checkpoints_give_clear_errors(ckpts, tmp_path):
    key = "model.backbone.model.layers.1.blocks.0.attn.qkv.weight"

    def reshape(c):
        c["state_dict"][key] = torch.zeros(3, 3)

    bad = _copy_run(ckpts["depth"], tmp_path / "bad", reshape)
    with pytest.raises(ValueError, match=rf"architecture mismatch at '{key}'"):
        merge_checkpoints(
            ckpts=[str(ckpts["semseg"]), str(bad)], method=TaskArithmetic(), output_dir=tmp_path
        )

    def forget(c):  # a checkpoint written without the InitFingerprint callback
        c["callbacks"] = {}

    old = [_copy_run(ckpts[t], tmp_path / f"old_{t}", forget) for t in ("semseg", "depth")]
    assert stored_fingerprint(torch.load(old[0], weights_only=False)) is None
    with (
        pytest.raises(ValueError, match="trained from scratch .* give base_ckpt="),
        pytest.warns(UserWarning),
    ):
        merge_checkpoints(ckpts=[str(p) for p in old], method=TaskArithmetic(), output_dir=tmp_path / "o")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        merge_checkpoints(ckpts=[str(tmp_path / "nope.ckpt")], method=TaskArithmetic(), output_dir=tmp_path)


def test_overlapping_tasks_name_both_checkpoints(ckpts, tmp_path):
    """The union's task list used to be built first and fail with 'task list has duplicates' and
    no file named."""
    same = [str(ckpts["semseg"]), str(ckpts["semseg"])]
    with pytest.raises(ValueError, match=r"task 'semseg' is in two checkpoints: .*semseg.* and .*semseg"):
        merge_checkpoints(ckpts=same, method=TaskArithmetic(), output_dir=tmp_path)


def test_adamerging_learns_layerwise_coefficients(ckpts, tmp_path):
    method = AdaMerging(steps=4, lr=0.05, images=4, batch_size=2)
    path, _ = merge_checkpoints(ckpts=[str(ckpts[t]) for t in TASKS], method=method, output_dir=tmp_path)
    info = torch.load(path, weights_only=False)["merge"]
    coefs = torch.tensor(list(info["coefficients"].values()))
    assert coefs.shape[0] == 4 and coefs.shape[1] == info["merged_keys"]
    assert ((coefs >= 0) & (coefs <= 1)).all() and not torch.allclose(coefs, torch.full_like(coefs, 0.3))
    assert len(method.history) == 4


@pytest.mark.slow
def test_merge_py_then_eval_end_to_end(ckpts, tmp_path):
    out = tmp_path / "merge_run"
    listed = ",".join(str(ckpts[t]) for t in TASKS)
    proc = subprocess.run(
        [sys.executable, "merge.py", "method=ties", f"ckpts=[{listed}]", f"hydra.run.dir={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = out / "checkpoints" / "merged.ckpt"
    assert merged.is_file() and f"ckpt_path={merged}" in proc.stdout
    results = _eval(merged, TASKS, tmp_path / "eval")
    for key in ("test/semseg/miou", "test/depth/rmse", "test/normals/mean", "test/edge/odsf"):
        assert torch.isfinite(torch.tensor(results[key])), key
    shared, owner = key_owners(evaluate_module_of(merged))
    assert set(owner.values()) == set(TASKS) and shared


def evaluate_module_of(ckpt: Path):
    from mtl.merging.run import merged_config
    from mtl.pipeline import build_datamodule, build_module

    run = load_run(ckpt)
    cfg = merged_config([run], ckpt.parent)
    return build_module(cfg, build_datamodule(cfg))


def test_runs_started_from_init_weights_merge_against_that_initialisation(ckpts, tmp_path):
    pre = ckpts["semseg"]  # any train.py checkpoint serves as the "pretrained" model
    init = [
        "+callbacks.init_weights._target_=mtl.callbacks.InitWeights",
        f"+callbacks.init_weights.path={pre}",
    ]
    runs = [train_single_task(t, tmp_path / t, extra=init) for t in ("depth", "normals")]
    fp = load_run(runs[0]).fingerprint
    pre_state = load_run(pre).state
    for key in ("model.backbone.model.patch_embed.proj.weight", "model.decoder.fuse.0.weight"):
        assert fp[key] == state_fingerprint({key: pre_state[key]})[key]  # θ0 = the pretrained weights
    path, _ = merge_checkpoints(
        ckpts=[str(p) for p in runs], method=TaskArithmetic(), output_dir=tmp_path / "m"
    )
    assert path.is_file()  # θ0 rebuilt with the InitWeights checkpoint and verified by the fingerprint
