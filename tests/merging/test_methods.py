"""The merging methods on state dicts: the identities the issue names, and each method's defining rule."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mtl.merging import ModelBreadcrumbs, TaskArithmetic, TIESMerging, WeightAveraging
from mtl.merging.adamerging import unsupervised_loss
from mtl.merging.breadcrumbs import breadcrumb_mask
from mtl.merging.io import Run, check_runs
from mtl.tasks import build_tasks


def _state(seed: int, shapes=None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or {
        "model.backbone.a": (6, 5),
        "model.backbone.b": (7,),
        "model.decoder.fuse.w": (3, 3, 2),
    }
    return {k: torch.randn(*s, generator=g) for k, s in shapes.items()}


def _merge(method, base, states):
    keys = list(states[0])
    return method.merge(base=base, states=states, keys=keys)


def test_averaging_two_identical_models_returns_the_same_model():
    s = _state(0)
    out = _merge(WeightAveraging(), None, [s, {k: v.clone() for k, v in s.items()}])
    for k in s:
        assert torch.equal(out[k], s[k]), k


def test_task_arithmetic_lambda_one_single_task_returns_that_model():
    base, s = _state(0), _state(1)
    out = _merge(TaskArithmetic(lam=1.0), base, [s])
    for k in s:
        torch.testing.assert_close(out[k], s[k], rtol=0, atol=1e-6)


def test_task_arithmetic_is_theta0_plus_scaled_sum_of_task_vectors():
    base, s1, s2 = _state(0), _state(1), _state(2)
    out = _merge(TaskArithmetic(lam=0.3), base, [s1, s2])
    for k in base:
        torch.testing.assert_close(out[k], base[k] + 0.3 * ((s1[k] - base[k]) + (s2[k] - base[k])))
    avg = _merge(WeightAveraging(), None, [s1, s2])
    half = _merge(TaskArithmetic(lam=0.5), base, [s1, s2])  # λ = 1/T is averaging
    for k in base:
        torch.testing.assert_close(avg[k], half[k])


def test_ties_without_trimming_and_agreeing_signs_equals_the_mean():
    base = _state(0)
    sign = {k: torch.sign(torch.randn_like(v)) for k, v in base.items()}
    states = [{k: base[k] + sign[k] * _state(i)[k].abs().add(0.1) for k in base} for i in (1, 2, 3)]
    out = _merge(TIESMerging(k=1.0, lam=1.0), base, states)
    mean = _merge(WeightAveraging(), None, states)
    for k in base:
        torch.testing.assert_close(out[k], mean[k])


def test_ties_trims_elects_and_averages_disjointly():
    base = {"w": torch.zeros(5)}
    t1 = {"w": torch.tensor([3.0, -1.0, 2.0, 0.1, -4.0])}
    t2 = {"w": torch.tensor([1.0, 2.0, -5.0, 0.2, -2.0])}
    # k = 0.4 keeps int(0.4·5) + 1 = 3 largest |τ| of each task (the TIES code's count): t1 keeps 3, 2, −4;
    # t2 keeps 2, −5, −2
    out = _merge(TIESMerging(k=0.4, lam=1.0), base, [t1, t2])["w"]
    # entry 0: only t1 kept (3) → 3; entry 1: only t2 kept (2) → 2; entry 2: 2 vs −5 → sign −, mean of −5
    # entry 3: trimmed in both → 0; entry 4: −4, −2 agree → −3
    torch.testing.assert_close(out, torch.tensor([3.0, 2.0, -5.0, 0.0, -3.0]))


def test_breadcrumbs_masks_both_tails_per_layer():
    # granularity=tensor: the whole tensor is one row; the bottom 20 % and top 10 % are masked, i.e. 70 % kept
    # after the top 10 % (beta is the fraction kept since issue 19)
    tau = torch.arange(1, 101, dtype=torch.float32) * torch.where(torch.arange(100) % 2 == 0, 1.0, -1.0)
    mask = breadcrumb_mask(tau, beta=0.7, gamma=0.1, granularity="tensor")
    kept = tau.abs()[mask]
    assert mask.sum() == 70 and kept.min() == 21 and kept.max() == 90
    base, s = {"w": torch.zeros(100)}, {"w": tau}
    with pytest.warns(UserWarning, match="fraction KEPT"):
        method = ModelBreadcrumbs(alpha=0.5, beta=0.7, gamma=0.1, granularity="tensor")
    out = _merge(method, base, [s])["w"]
    torch.testing.assert_close(out, 0.5 * tau * mask)
    with pytest.warns(UserWarning, match="fraction KEPT"):
        no_mask = ModelBreadcrumbs(alpha=1.0, beta=1.0, gamma=0.0, granularity="tensor")
    plain = _merge(no_mask, base, [s])["w"]  # no masking: TA
    torch.testing.assert_close(plain, tau)


@pytest.mark.parametrize(
    ("method", "kwargs", "match"),
    [
        (TIESMerging, {"k": 0.0}, "method.k"),
        (TIESMerging, {"k": 1.5}, "method.k"),
        (ModelBreadcrumbs, {"beta": 1.5}, "method.beta"),
        (ModelBreadcrumbs, {"alpha": 0.0}, "method.alpha"),
        (ModelBreadcrumbs, {"granularity": "layer"}, "method.granularity"),
        (ModelBreadcrumbs, {"lam": 0.5}, "now method.alpha"),
        (TaskArithmetic, {"lam": 0.0}, "method.lam"),
    ],
)
def test_bad_hyperparameters_are_named(method, kwargs, match):
    with pytest.raises(ValueError, match=match):
        method(**kwargs)


def _run(state, tasks, cfg_overrides=None, fingerprint=None, name="a"):
    cfg = OmegaConf.create({"model": {"backbone": {"name": "x", "pretrained": False}, "decoder": {"c": 8}},
                            "data": {"tasks": tasks, "input_size": [32, 32]}, "seed": 1})  # fmt: skip
    for k, v in (cfg_overrides or {}).items():
        OmegaConf.update(cfg, k, v)
    return Run(Path(f"/ckpt/{name}.ckpt"), cfg, tasks, state, fingerprint)


def test_architecture_mismatches_name_the_first_bad_key():
    a, b = _state(0), _state(1)
    keys = list(a)
    b["model.backbone.b"] = torch.zeros(8)
    with pytest.raises(ValueError, match=r"architecture mismatch at 'model.backbone.b': shape \(7,\)"):
        check_runs([_run(a, ["semseg"]), _run(b, ["depth"], name="b")], keys)
    c = {k: v for k, v in _state(1).items() if k != "model.backbone.a"}
    with pytest.raises(ValueError, match="'model.backbone.a' of /ckpt/a.ckpt is missing in /ckpt/b.ckpt"):
        check_runs([_run(a, ["semseg"]), _run(c, ["depth"], name="b")], keys)
    d = {**_state(1), "model.backbone.extra": torch.zeros(1)}
    with pytest.raises(ValueError, match="'model.backbone.extra' of /ckpt/b.ckpt is not in /ckpt/a.ckpt"):
        check_runs([_run(a, ["semseg"]), _run(d, ["depth"], name="b")], keys)
    with pytest.raises(ValueError, match=r"model configs differ .*model.decoder.c: 8 vs 16"):
        check_runs([_run(a, ["semseg"]), _run(_state(1), ["depth"], {"model.decoder.c": 16}, name="b")], keys)
    with pytest.raises(ValueError, match="task 'semseg' is in two checkpoints"):
        check_runs([_run(a, ["semseg"]), _run(_state(1), ["semseg"], name="b")], keys)


def test_different_initialisations_are_refused():
    a, b = _state(0), _state(1)
    keys = list(a)
    fp_a = {k: "same" for k in keys}
    fp_b = {**fp_a, "model.backbone.b": "other"}
    with pytest.raises(ValueError, match="initial 'model.backbone.b' of /ckpt/b.ckpt differs"):
        check_runs(
            [_run(a, ["semseg"], fingerprint=fp_a), _run(b, ["depth"], fingerprint=fp_b, name="b")], keys
        )
    # without fingerprints: the backbone source and seed must agree
    with pytest.raises(ValueError, match="different initialisation"):
        check_runs([_run(a, ["semseg"]), _run(b, ["depth"], {"seed": 2}, name="b")], keys)


def test_unsupervised_objectives():
    tasks = build_tasks(["semseg", "edge", "depth", "normals"], num_classes={"semseg": 9})
    uniform = torch.zeros(2, 9, 4, 4)
    assert float(unsupervised_loss(tasks["semseg"], uniform, None)) == pytest.approx(1.0)
    confident = torch.zeros(2, 9, 4, 4)
    confident[:, 3] = 30.0
    assert float(unsupervised_loss(tasks["semseg"], confident, None)) < 1e-6
    assert float(unsupervised_loss(tasks["edge"], torch.zeros(2, 1, 4, 4), None)) == pytest.approx(1.0)
    z = torch.randn(2, 1, 4, 4)
    p = torch.sigmoid(z)
    h = -(p * p.log() + (1 - p) * (1 - p).log()).mean() / math.log(2)
    assert float(unsupervised_loss(tasks["edge"], z, None)) == pytest.approx(float(h), rel=1e-5)
    d = torch.rand(2, 1, 4, 4) + 0.5
    assert float(unsupervised_loss(tasks["depth"], d, d)) == 0.0
    assert float(unsupervised_loss(tasks["depth"], 2 * d, d)) == pytest.approx(1.0)
    n = torch.randn(2, 3, 4, 4)
    assert float(unsupervised_loss(tasks["normals"], 3 * n, n)) == pytest.approx(0.0, abs=1e-6)
    assert float(unsupervised_loss(tasks["normals"], -n, n)) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="single-task model's predictions"):
        unsupervised_loss(tasks["depth"], d, None)


def test_training_callbacks_store_what_merging_reads(tmp_path):
    """InitFingerprint (mtl.callbacks) saves under the key stored_fingerprint looks for; InitWeights
    loads what init_weights_paths finds in a run's callbacks config, old target paths included."""
    from mtl.callbacks import InitFingerprint, InitWeights
    from mtl.initial_weights import init_weights_paths, state_fingerprint, stored_fingerprint

    module = torch.nn.Linear(3, 2)
    callback = InitFingerprint()
    callback.on_fit_start(None, module)
    ckpt = {"callbacks": {callback.state_key: callback.state_dict()}}
    assert stored_fingerprint(ckpt) == state_fingerprint(module.state_dict())
    callbacks = {
        "init_weights": {"_target_": "mtl.callbacks.InitWeights", "path": "a.ckpt"},
        "old": {"_target_": "mtl.merging.init_weights.InitWeights", "path": "b.ckpt"},
        "other": {"_target_": "mtl.callbacks.PeriodicCheckpoint", "dirpath": "x"},
    }
    assert init_weights_paths(callbacks) == ["a.ckpt", "b.ckpt"]
    source = torch.nn.Linear(3, 2)
    torch.save({"state_dict": source.state_dict()}, tmp_path / "init.ckpt")
    InitWeights(path=str(tmp_path / "init.ckpt")).setup(None, module, "fit")
    assert torch.equal(module.weight, source.weight) and torch.equal(module.bias, source.bias)
