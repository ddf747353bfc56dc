"""Fault injection: diverging weights, non-finite gradients and non-finite predictions.

An exploding learning rate must end with a finite ``last.ckpt`` that resumes (the guard checks the
gradients before every step and never saves NaN weights); evaluation must count NaN/inf predictions
instead of crashing in a metric.
"""

from __future__ import annotations

import math

import pytest
import torch

from mtl.guards import NonFiniteLossError, grad_norm, nonfinite_grads
from mtl.metrics.pixelwise import DepthMetric, NormalsMetric
from mtl.pipeline import train
from mtl.tasks.depth import Depth

BASE = ["logger=none", "module.log_images=false", "trainer.max_epochs=1"]
FOUR = "data.tasks=[semseg,depth,normals,edge]"


def finite_state(path) -> bool:
    saved = torch.load(path, weights_only=True)
    tensors = [v for v in saved["state_dict"].values() if torch.is_tensor(v) and v.is_floating_point()]
    for opt in saved["optimizer_states"]:
        tensors += [t for st in opt["state"].values() for t in st.values() if torch.is_tensor(t)]
    return all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())


def test_exploding_lr_ends_with_a_finite_last_ckpt_that_resumes(make_cfg, tmp_path):
    """lr = 1e6 on all four NYUD-like tasks: batches are skipped (non-finite losses or gradients),
    validation does not crash on NaN predictions, and the run stops with a finite checkpoint."""
    cfg = make_cfg(
        BASE
        + [FOUR, "optimizer.lr=1e6", "module.nonfinite.max_skips=2", "data.dataset.length=40"]
        + ["callbacks.periodic_checkpoint.every_n_steps=1"]
    )
    with pytest.raises(NonFiniteLossError, match="non-finite") as err:
        train(cfg)
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    assert "last.ckpt" in str(err.value) and ckpt.is_file(), str(err.value)
    assert finite_state(ckpt)
    resumed = make_cfg(BASE + [FOUR, "optimizer.lr=1e-4", "data.dataset.length=40", f"ckpt_path={ckpt}"])
    metrics, objects = train(resumed)  # resumes from the saved state and finishes the epoch
    assert objects["trainer"].global_step >= torch.load(ckpt, weights_only=True)["global_step"]
    assert all(torch.isfinite(p).all() for p in objects["module"].parameters())


def nan_gradient(pred: torch.Tensor) -> torch.Tensor:
    """0 in value, NaN in its gradient: d√x/dx at 0 is inf, times the inner factor 0."""
    return torch.sqrt(pred.flatten()[:1] * 0.0).sum()


def test_nonfinite_gradient_with_finite_losses_is_skipped(make_cfg, monkeypatch):
    """A NaN gradient behind finite losses: the step is skipped (before, it was taken and the weights
    became NaN while every loss stayed finite)."""
    original = Depth.loss
    calls: list[int] = []

    def loss(self, pred, batch):
        calls.append(1)
        out = original(self, pred, batch)
        return out + nan_gradient(pred) if len(calls) == 2 else out

    monkeypatch.setattr(Depth, "loss", loss)
    with pytest.warns(UserWarning, match=r"non-finite gradient \(finite losses\) at step 1.*batch skipped"):
        _, objects = train(make_cfg(BASE + ["+trainer.limit_val_batches=0", "module.nonfinite.max_skips=2"]))
    module = objects["module"]
    assert module.skipped == 1 and objects["trainer"].global_step == 3  # 4 batches, one skipped
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_gradient_check_names_the_parameters():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    (a.sum() + nan_gradient(b)).backward()
    assert not torch.isfinite(grad_norm([a, b]))
    assert torch.isfinite(grad_norm([a]))
    assert nonfinite_grads([("a", a), ("b", b)]) == ["b"]


def test_metrics_count_nonfinite_predictions_instead_of_crashing():
    """A NaN angle once became a negative histogram index (``bincount`` crashed); now the field's
    numbers come out: NaN mean and median, NaN pixels never 'within' a threshold."""
    target = torch.nn.functional.normalize(torch.randn(2, 3, 4, 5), dim=1)
    pred = target.clone()
    pred[0, :, 0, 0] = float("nan")
    normals = NormalsMetric()
    normals.update(pred, target)
    out = normals.compute()
    assert math.isnan(out["mean"]) and math.isnan(out["median"]) and math.isnan(out["rmse"])
    assert out["within_11_25"] == pytest.approx(100.0 * 39 / 40)
    assert int(normals.nonfinite) == 1
    clean = NormalsMetric()
    clean.update(target, target)
    assert float(clean.compute()["median"]) == pytest.approx(0.0005)  # the first bin's centre

    depth = DepthMetric()
    d_pred = torch.full((1, 1, 2, 2), 2.0)
    d_pred[0, 0, 0, 0] = float("nan")  # the field's clamp keeps NaN: RMSE NaN (not 1e-9 m)
    depth.update(d_pred, torch.full((1, 1, 2, 2), 2.0))
    assert math.isnan(depth.compute()["rmse"])


def test_evaluation_reports_nonfinite_predictions(make_cfg, monkeypatch):
    """NaN weights at validation: no crash; ``val/<task>/nonfinite`` logged and a warning."""
    cfg = make_cfg(BASE + [FOUR, "+trainer.limit_train_batches=1"])
    from mtl.module import MTLModule

    start, end = MTLModule.on_validation_epoch_start, MTLModule.on_validation_epoch_end
    kept: dict[str, torch.Tensor] = {}

    def poison(self):  # NaN weights during validation only (a checkpoint of them would be refused)
        start(self)
        kept.update({k: v.clone() for k, v in self.model.state_dict().items()})
        with torch.no_grad():
            for p in self.model.parameters():
                p.fill_(float("nan"))

    def heal(self):
        end(self)
        self.model.load_state_dict(kept)

    monkeypatch.setattr(MTLModule, "on_validation_epoch_start", poison)
    monkeypatch.setattr(MTLModule, "on_validation_epoch_end", heal)
    with pytest.warns(UserWarning, match=r"val: \d+ of \d+ normals prediction values \(100 %\) are NaN/inf"):
        metrics, _ = train(cfg)
    assert metrics["val/normals/nonfinite"] > 0


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("optimizer.lr=-0.1", r"optimizer.lr = -0.1: expected a learning rate > 0"),
        ("module.grad_clip=-1", r"module.grad_clip = -1: expected a max gradient norm > 0, or null / 0"),
        ("optimizer.weight_decay=-1e-4", r"optimizer.weight_decay = -0.0001"),
        ("data.batch_size=0", r"data.batch_size = 0"),
    ],
)
def test_values_out_of_range_are_refused_before_anything_is_built(make_cfg, monkeypatch, override, expected):
    """A negative learning rate was reported by the optimiser after the model was built (late with
    ViT-L) without the config key; ``grad_clip=-1`` silently disabled clipping."""
    import mtl.pipeline as pipeline
    from mtl.config_check import ConfigError

    def nothing(cfg):
        raise AssertionError("the data was built before the config was checked")

    monkeypatch.setattr(pipeline, "build_datamodule", nothing)
    with pytest.raises(ConfigError, match=expected):
        train(make_cfg(BASE + [override]))


def test_module_refuses_a_negative_grad_clip():
    from mtl.module import MTLModule

    with pytest.raises(ValueError, match=r"module.grad_clip = -1"):
        MTLModule(model=None, tasks={}, optimizer=torch.optim.SGD, grad_clip=-1)  # type: ignore[arg-type]


def test_missing_dataset_root_is_reported_before_anything_is_built(make_cfg, monkeypatch, tmp_path):
    """It was reported when the data was first read, after the model (minutes with ViT-L)."""
    import mtl.pipeline as pipeline
    from mtl.config_check import ConfigError

    def nothing(cfg):
        raise AssertionError("the data module was built before the root was checked")

    monkeypatch.setattr(pipeline, "build_datamodule", nothing)
    missing = tmp_path / "no_such_folder"
    cfg = make_cfg(BASE + ["experiment=nyud_baseline", f"data.dataset.root={missing}"])
    with pytest.raises(ConfigError, match=rf"data.dataset.root is {missing}, which does not exist"):
        train(cfg)
