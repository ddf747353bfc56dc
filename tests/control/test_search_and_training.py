"""Search within budget and preference; CI-KD; sandwich training through the real module."""

from __future__ import annotations

import itertools

import pytest
import torch

from mtl.control.cost import WidthConfig
from mtl.control.sandwich import ci_kd_loss
from mtl.control.search import scores, search

W = (0.25, 0.5, 0.75, 1.0)
TASKS = ("semseg", "depth", "normals")
HIB = {"semseg": True, "depth": False, "normals": False}


def table():
    """Metrics improving with both widths (mIoU up, errors down), at different rates per task."""
    out = {}
    for t, rate in zip(TASKS, (0.3, 0.5, 0.2), strict=True):
        out[t] = {
            (e, d): (0.2 + 0.3 * e + rate * d) if HIB[t] else (2.0 - 0.5 * e - rate * d)
            for e, d in itertools.product(W, W)
        }
    return out


def cost(config: WidthConfig) -> float:
    return 10 * config.encoder + sum(2 * d for d in config.decoders.values())


@pytest.mark.parametrize("budget", [6.0, 9.0, 12.0, 16.0])
@pytest.mark.parametrize("pref", [(0.6, 0.3, 0.1), (0.1, 0.1, 0.8), (1 / 3, 1 / 3, 1 / 3)])
def test_search_respects_budget_and_preference(budget, pref):
    preference = dict(zip(TASKS, pref, strict=True))
    config, report = search(budget=budget, preference=preference, widths=W, table=table(), cost=cost,
                            higher_is_better=HIB)  # fmt: skip
    assert report["cost"] <= budget and cost(config) == report["cost"]
    for a in TASKS:
        for b in TASKS:
            if preference[a] > preference[b]:
                assert config.decoders[a] >= config.decoders[b]
    # brute force: no preference-monotone configuration within the budget scores higher
    best = max(
        sum(preference[t] * s for t, s in scores(table(), c, HIB).items()) / sum(pref)
        for c in (
            WidthConfig(e, dict(zip(TASKS, ds, strict=True)))
            for e in W
            for ds in itertools.product(W, repeat=3)
        )
        if cost(c) <= budget
        and all(c.decoders[a] >= c.decoders[b] for a in TASKS for b in TASKS if preference[a] > preference[b])
    )
    assert report["objective"] == pytest.approx(best) and report["candidates"] > 0


def test_search_full_budget_picks_the_full_model_and_errors_below_the_cheapest():
    common = {"widths": W, "table": table(), "cost": cost, "higher_is_better": HIB}
    config, report = search(budget=1e9, preference=dict.fromkeys(TASKS, 1.0), **common)
    assert config == WidthConfig(1.0, dict.fromkeys(TASKS, 1.0)) and report["objective"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="cheapest costs 4"):
        search(
            budget=1.0,
            preference=dict.fromkeys(TASKS, 1.0),
            widths=W,
            table=table(),
            cost=cost,
            higher_is_better=HIB,
        )
    with pytest.raises(ValueError, match="exactly the tasks"):
        search(
            budget=9.0, preference={"semseg": 1.0}, widths=W, table=table(), cost=cost, higher_is_better=HIB
        )


def test_ci_kd_is_zero_for_the_largest_configuration():
    feats = [torch.randn(2, 4, 3, 3, requires_grad=True), torch.randn(2, 4, 2, 2)]
    assert ci_kd_loss(feats, feats).item() == 0.0
    other = [f + 1.0 for f in feats]
    loss = ci_kd_loss(other, feats)
    assert loss.item() == pytest.approx(1.0)
    loss.backward()
    assert feats[0].grad is not None  # through the student only (the teacher is detached)


@pytest.mark.slow
def test_synthetic_slimmable_trains(make_cfg):
    from mtl.pipeline import train

    cfg = make_cfg(["experiment=synthetic_slimmable", "debug=fdr"])
    metrics, objects = train(cfg)
    assert objects["trainer"].state.finished
    assert "train/strategy/ci_kd" in metrics and metrics["train/strategy/ci_kd"] >= 0


@pytest.mark.slow
def test_eval_with_budget_and_sweep(make_cfg, tmp_path):
    import json

    from mtl.pipeline import build_datamodule, build_module, evaluate

    overrides = [
        "experiment=synthetic_slimmable",
        "data.tasks=[semseg,depth]",
        "model.backbone.widths=[0.5,1.0]",
    ]
    cfg = make_cfg(overrides, config_name="eval")
    module = build_module(cfg, build_datamodule(cfg))
    ckpt = tmp_path / "slim.ckpt"
    torch.save({"state_dict": module.state_dict()}, ckpt)
    cfg.ckpt_path, cfg.eval.pictures = str(ckpt), 0
    cfg.control.sweep = True
    cfg.paths.output_dir = str(tmp_path / "sweep")
    _, objects = evaluate(cfg)
    out = tmp_path / "sweep"
    for name in ("control_table.json", "controllability.json", "controllability.md", "controllability.png"):
        assert (out / name).is_file(), name
    rows = json.loads((out / "controllability.json").read_text())["rows"]
    assert rows and all(r["gflops"] <= r["budget"] + 1e-9 for r in rows)
    # one request: the chosen sub-network is within budget and is the one evaluated
    budget = sorted({r["budget"] for r in rows})[-2]  # below the full model's cost
    cfg.control.sweep, cfg.control.budget, cfg.control.preference = False, budget, [0.8, 0.2]
    cfg.control.table = str(out / "control_table.json")
    cfg.paths.output_dir = str(tmp_path / "one")
    metrics, objects = evaluate(cfg)
    report = objects["control"]
    assert report["gflops"] <= budget and report["decoders"]["semseg"] >= report["decoders"]["depth"]
    assert objects["module"].model.backbone.width == report["encoder"]
    assert "test/semseg/miou" in metrics


def test_default_budgets_fall_inside_encoder_bands():
    """Quantile budgets: the cheapest and the full cost, and budgets where the decoders must trade off."""
    from mtl.control.run import default_budgets

    widths, tasks = [0.25, 0.5, 1.0], ["a", "b"]

    def cost(c):  # encoder dominates (10 per unit width), decoders add 1 per unit width each
        return (10 * c.encoder + sum(c.decoders.values()), 0)

    budgets = default_budgets(cost, widths, tasks, n=7)
    assert budgets == sorted(budgets)
    assert budgets[0] == 10 * 0.25 + 0.5 and budgets[-1] == 10 + 2
    # some budget lies strictly inside the smallest encoder's band (decoders cannot all be full)
    assert any(3.0 < b < 4.5 for b in budgets)
