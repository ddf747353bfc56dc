"""Comparison tables from many runs (issue 23): ``python -m mtl.compare`` and the multirun callback.

Fabricated run folders in the exact format train.py / eval.py / Hydra write (``metrics.json``,
``config.yaml``, ``.hydra/{config,overrides}.yaml``; ``results.json``, ``results.provenance.json``,
``results.config.yaml``), with values whose means, standard deviations and Δm are computed by hand
below; then a real tiny multirun that ends with its table.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from mtl.compare import CompareError, build_table, main, to_latex, to_markdown
from mtl.sweep import CompareTable

ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC = "mtl.data.synthetic.SyntheticScenes"
COMMON = ["experiment=synthetic_baseline", "trainer.max_epochs=3"]


def _config(seed: int, strategy: str, *, tasks=("semseg", "depth"), target=SYNTHETIC, extra=None) -> dict:
    """A training config as Hydra composes it (``${seed}`` and paths unresolved)."""
    cfg = {
        "task_name": "train",
        "seed": seed,
        "test": True,
        "data": {
            "_target_": "mtl.data.datamodule.MTLDataModule",
            "tasks": list(tasks),
            "dataset": {"_target_": target, "_partial_": True, "resolution": [64, 64], "length": 32},
            "batch_size": 4,
            "seed": "${seed}",
            "num_workers": 0,
        },
        "strategy": {"_target_": "mtl.strategies.weighting.FixedWeights", "uniform": strategy == "ew"}
        if strategy in ("ew", "fixed")
        else {"_target_": f"mtl.strategies.{strategy}.S"},
        "trainer": {"max_epochs": 3},
        "paths": {"output_dir": "${hydra:runtime.output_dir}"},
        "callbacks": {
            "model_checkpoint": {"dirpath": "${paths.output_dir}/checkpoints", "monitor": "val/loss"}
        },
    }
    for key, value in (extra or {}).items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return cfg


def fake_train(
    folder: Path,
    strategy: str,
    seed: int,
    values: dict[str, float],
    *,
    tasks=("semseg", "depth"),
    target=SYNTHETIC,
    extra: dict | None = None,
    overrides: list[str] | None = None,
    images_per_sec: float | None = None,
    resolved_extra: dict | None = None,
) -> Path:
    """A job folder of ``train.py -m ... test=true``; ``values``: ``task/metric`` → raw test value."""
    (folder / ".hydra").mkdir(parents=True)
    composed = _config(seed, strategy, tasks=tasks, target=target, extra=extra)
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(composed))
    over = [*COMMON, f"strategy={strategy}", f"seed={seed}", *(overrides or [])]
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(over))
    resolved = json.loads(json.dumps(composed).replace("${seed}", str(seed)))
    resolved["data"]["seed"] = seed
    resolved["paths"]["output_dir"] = str(folder.resolve())
    resolved["callbacks"]["model_checkpoint"]["dirpath"] = str(folder.resolve() / "checkpoints")
    resolved["code"] = {"commit": "0123456789abcdef", "dirty": False}
    resolved.update(resolved_extra or {})
    (folder / "config.yaml").write_text(yaml.safe_dump(resolved))
    metrics = {f"val/{k}": v for k, v in values.items()}
    metrics.update({f"test/{k}": v for k, v in values.items()})
    metrics["test/loss"] = 1.0
    if images_per_sec is not None:
        metrics["train/images_per_sec"] = images_per_sec
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def fake_eval(
    folder: Path, train_run: Path, values: dict[str, float], *, split="val", tasks=("semseg", "depth")
):
    """An ``eval.py`` run folder evaluating ``<train_run>/checkpoints/best.ckpt``."""
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({f"test/{k}": v for k, v in values.items()}))
    prov = {
        "checkpoint": str((train_run / "checkpoints" / "best.ckpt").resolve()),
        "split": split,
        "dataset": "synthetic",
        "tasks": list(tasks),
        "code": {"commit": "0123456789abcdef", "dirty": False},
        "overrides": [f"ckpt_path={train_run}/checkpoints/best.ckpt", f"eval.split={split}"],
    }
    (folder / "results.provenance.json").write_text(json.dumps(prov))
    used = yaml.safe_load((train_run / "config.yaml").read_text())
    used["eval"] = {"split": split, "pictures": 4}
    (folder / "results.config.yaml").write_text(yaml.safe_dump(used))
    return folder


# ew: 3 seeds, uw: 2 seeds (semseg mIoU fraction, depth RMSE in metres)
EW = [(0.50, 0.60), (0.52, 0.62), (0.54, 0.61)]
UW = [(0.40, 0.45), (0.44, 0.55)]
BASE = {"semseg/miou": 0.50, "depth/rmse": 0.50}


def make_sweep(root: Path, **kwargs) -> Path:
    sweep = root / "multiruns" / "2026-12-01_10-00-00"
    num = 0
    for strategy, rows in (("ew", EW), ("uw", UW)):
        for seed, (miou, rmse) in enumerate(rows):
            fake_train(sweep / str(num), strategy, seed, {"semseg/miou": miou, "depth/rmse": rmse}, **kwargs)
            num += 1
    return sweep


def baseline_file(path: Path, *, protocol: int = 2, target: str = SYNTHETIC) -> Path:
    body = {
        "name": "fake_base",
        "protocol": protocol,
        "recipe": {"dataset": "synthetic_nyud", "dataset_target": target, "backbone": "swin_mini"},
        "metrics": BASE,
    }
    path.write_text("# @package baselines\n" + yaml.safe_dump(body))
    return path


def md_rows(text: str) -> dict[str, list[str]]:
    """Markdown table rows by configuration label (cells stripped)."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| rank"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[1]] = cells
    return rows


def test_seeds_grouped_into_rows_with_mean_and_sample_std(tmp_path):
    table = build_table([make_sweep(tmp_path)], command="cmd")
    assert [r.label for r in table.rows] == ["strategy=ew", "strategy=uw"]  # never a folder or a date
    ew, uw = table.rows
    assert ew.seeds == [0, 1, 2] and uw.seeds == [0, 1]
    # mIoU in percent: ew 50, 52, 54 → mean 52, sample std sqrt((4 + 0 + 4) / 2) = 2
    assert ew.values["semseg/miou"].mean == pytest.approx(52.0)
    assert ew.values["semseg/miou"].std == pytest.approx(2.0)
    # uw 40, 44 → 42 ± sqrt((4 + 4) / 1) = 2.828…
    assert uw.values["semseg/miou"].std == pytest.approx(math.sqrt(8))
    # depth: ew 0.60, 0.62, 0.61 → 0.61 ± sqrt((1e-4 + 1e-4 + 0) / 2) = 0.01
    assert ew.values["depth/rmse"].mean == pytest.approx(0.61)
    assert ew.values["depth/rmse"].std == pytest.approx(0.01)
    md = to_markdown(table)
    rows = md_rows(md)
    assert rows["strategy=ew"][2:5] == ["3", "**52.00 ± 2.00**", "0.6100 ± 0.0100"]
    assert rows["strategy=uw"][2:5] == ["2", "42.00 ± 2.83", "**0.5000 ± 0.0707**"]
    assert "semseg mIoU ↑ | depth RMSE ↓" in md
    assert "common overrides: `experiment=synthetic_baseline trainer.max_epochs=3`" in md
    assert table.rows[0].delta_m is None and "Δm: none" in md  # no baseline anywhere


def test_delta_m_against_a_baseline_file_by_hand(tmp_path):
    base = baseline_file(tmp_path / "base.yaml")
    table = build_table([make_sweep(tmp_path)], baseline=str(base), per_task=True, command="cmd")
    ew, uw = table.rows
    # Δm per run = mean over tasks of ±(M − B)/B·100; baseline mIoU 0.50, RMSE 0.50 (lower is better)
    ew_runs = [((0.50 - 0.5) / 0.5 * 100 - (0.60 - 0.5) / 0.5 * 100) / 2,  # (0 − 20)/2 = −10
               ((0.52 - 0.5) / 0.5 * 100 - (0.62 - 0.5) / 0.5 * 100) / 2,  # (4 − 24)/2 = −10
               ((0.54 - 0.5) / 0.5 * 100 - (0.61 - 0.5) / 0.5 * 100) / 2]  # (8 − 22)/2 = −7  # fmt: skip
    assert ew_runs == pytest.approx([-10, -10, -7])
    assert ew.delta_m.mean == pytest.approx(-9.0)
    assert ew.delta_m.std == pytest.approx(math.sqrt((1 + 1 + 4) / 2))  # 1.732
    # uw: (−20 + 10)/2 = −5 and (−12 − 10)/2 = −11 → −8 ± sqrt(9 + 9) = 4.243
    assert uw.delta_m.mean == pytest.approx(-8.0)
    assert uw.delta_m.std == pytest.approx(math.sqrt(18))
    assert ew.terms["semseg/miou"].mean == pytest.approx(4.0) and ew.terms[
        "depth/rmse"
    ].mean == pytest.approx(-22)
    rows = md_rows(to_markdown(table))
    # columns: rank, label, n, mIoU, RMSE, Δm, Δsemseg, Δdepth, MR
    assert rows["strategy=ew"][5:9] == ["-9.00 ± 1.73", "**+4.00 ± 4.00**", "-22.00 ± 2.00", "**1.50**"]
    assert rows["strategy=uw"][5] == "**-8.00 ± 4.24**"
    assert rows["strategy=uw"][0] == "1" and rows["strategy=ew"][0] == "2"  # rank by Δm
    # the same file by its name in configs/baselines/ is found there; another protocol is refused
    with pytest.raises(CompareError, match="protocol 1"):
        build_table(
            [make_sweep(tmp_path / "b")], baseline=str(baseline_file(tmp_path / "old.yaml", protocol=1))
        )
    with pytest.raises(CompareError, match="measured on mtl.data.nyud.NYUDv2"):
        build_table(
            [make_sweep(tmp_path / "c")],
            baseline=str(baseline_file(tmp_path / "nyud.yaml", target="mtl.data.nyud.NYUDv2")),
        )


def test_delta_m_against_a_row(tmp_path):
    table = build_table([make_sweep(tmp_path)], baseline_row="strategy=ew")
    ew, uw = table.rows
    miou, rmse = (0.50 + 0.52 + 0.54) / 3, (0.60 + 0.62 + 0.61) / 3  # the ew row's means: 0.52, 0.61
    uw_runs = [((m - miou) / miou * 100 - (r - rmse) / rmse * 100) / 2 for m, r in UW]
    assert uw.delta_m.mean == pytest.approx(sum(uw_runs) / 2)
    assert uw.delta_m.std == pytest.approx(abs(uw_runs[0] - uw_runs[1]) / math.sqrt(2))
    assert ew.delta_m.mean == pytest.approx(0.0, abs=1e-9)  # the reference row against its own mean
    assert "against the row `strategy=ew`" in to_markdown(table)
    with pytest.raises(CompareError, match=r"no such row.*strategy=ew"):
        build_table([make_sweep(tmp_path / "x")], baseline_row="strategy=cagrad")


def test_runs_own_baseline_is_the_default(tmp_path):
    node = {"name": "fake_base", "protocol": 2, "metrics": BASE}
    table = build_table([make_sweep(tmp_path, resolved_extra={"baselines": node})])
    assert table.rows[0].delta_m.mean == pytest.approx(-9.0)
    assert "the runs' baselines=fake_base" in to_markdown(table)
    old = {**node, "protocol": 1}
    with pytest.raises(CompareError, match="protocol 1"):
        build_table([make_sweep(tmp_path / "old", resolved_extra={"baselines": old})])


def test_mixed_split_dataset_tasks_protocol_are_refused_naming_the_runs(tmp_path):
    sweep = make_sweep(tmp_path)
    # another split: an evaluation on the test split of one of the runs
    other = fake_eval(
        tmp_path / "eval_test", sweep / "0", {"semseg/miou": 0.5, "depth/rmse": 0.6}, split="test"
    )
    with pytest.raises(CompareError, match="evaluation split") as err:
        build_table([sweep, other])
    assert str(other) in str(err.value) and str(sweep / "1") in str(err.value)
    # another dataset
    nyud = fake_train(tmp_path / "n" / "0", "ew", 5, {"semseg/miou": 0.5, "depth/rmse": 0.6},
                      target="mtl.data.nyud.NYUDv2")  # fmt: skip
    with pytest.raises(CompareError, match=r"dataset.*'nyud'") as err:
        build_table([sweep, nyud.parent])
    assert str(nyud) in str(err.value)
    # another task set
    one = fake_train(tmp_path / "t" / "0", "ew", 7, {"semseg/miou": 0.5}, tasks=("semseg",))
    with pytest.raises(CompareError, match="task set") as err:
        build_table([sweep, one])
    assert str(one) in str(err.value)
    # another metrics protocol
    old = fake_train(tmp_path / "p" / "0", "ew", 8, {"semseg/miou": 0.5, "depth/rmse": 0.6},
                     resolved_extra={"metrics_protocol": 1})  # fmt: skip
    with pytest.raises(CompareError, match="metrics protocol") as err:
        build_table([sweep, old])
    assert str(old) in str(err.value)


def test_missing_results_and_metrics_are_refused_naming_the_runs(tmp_path):
    sweep = make_sweep(tmp_path)
    dead = sweep / "9"
    (dead / ".hydra").mkdir(parents=True)
    (dead / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["strategy=famo", "seed=0"]))
    (dead / "job_status.json").write_text(json.dumps({"status": "FAILED", "error": "RuntimeError: boom"}))
    with pytest.raises(CompareError, match=r"1 of 6 runs have no test results") as err:
        build_table([sweep])
    assert str(dead) in str(err.value) and "RuntimeError: boom" in str(err.value)
    table = build_table([sweep], skip_missing=True)  # left out, and said so under the table
    assert len(table.rows) == 2 and f"Left out (no results): {dead}" in to_markdown(table)
    # a run without the column's metric (e.g. approximate edges only) is refused, not averaged in
    partial = fake_train(tmp_path / "q" / "0", "ew", 4, {"semseg/miou": 0.5, "depth/abs_rel": 0.1})
    with pytest.raises(CompareError, match="lack test/depth/rmse") as err:
        build_table([make_sweep(tmp_path / "r"), partial])
    assert str(partial) in str(err.value)
    # train.py without test=true: no test metrics
    (partial / "metrics.json").write_text(json.dumps({"val/semseg/miou": 0.5}))
    with pytest.raises(CompareError, match="no test/ metrics.*test=true"):
        build_table([partial])


def test_same_configuration_and_seed_twice_is_refused(tmp_path):
    sweep = make_sweep(tmp_path)
    again = fake_eval(tmp_path / "eval_val", sweep / "0", {"semseg/miou": 0.5, "depth/rmse": 0.6})
    with pytest.raises(CompareError, match="both measure the training run") as err:
        build_table([sweep, again])
    assert str(sweep / "0") in str(err.value) and str(again) in str(err.value)
    # one configuration and seed in two sweeps (a sweep run twice)
    with pytest.raises(CompareError, match="same configuration with the same seed") as err:
        build_table([sweep, make_sweep(tmp_path / "again")])
    assert str(sweep / "0") in str(err.value) and str(tmp_path / "again") in str(err.value)


def test_evaluations_are_labelled_by_their_training_runs(tmp_path):
    runs = tmp_path / "train"
    a = fake_train(runs / "a", "ew", 0, {"semseg/miou": 0.1, "depth/rmse": 1.0})
    b = fake_train(runs / "b", "cagrad", 0, {"semseg/miou": 0.1, "depth/rmse": 1.0})
    evals = tmp_path / "evals"
    fake_eval(evals / "2026-12-01_11-00-00", a, {"semseg/miou": 0.30, "depth/rmse": 0.7})
    fake_eval(evals / "2026-12-01_11-05-00", b, {"semseg/miou": 0.35, "depth/rmse": 0.8})
    table = build_table([evals])
    assert [r.label for r in table.rows] == ["strategy=ew", "strategy=cagrad"]
    assert [r.values["semseg/miou"].mean for r in table.rows] == pytest.approx([30.0, 35.0])


def test_labels_fall_back_on_the_config_difference(tmp_path):
    # two sweeps with the same command line, but the experiment's lr was edited in between
    a = fake_train(tmp_path / "s1" / "0", "ew", 0, {"semseg/miou": 0.5, "depth/rmse": 0.6},
                   extra={"optimizer.lr": 0.001})  # fmt: skip
    b = fake_train(tmp_path / "s2" / "0", "ew", 0, {"semseg/miou": 0.5, "depth/rmse": 0.6},
                   extra={"optimizer.lr": 0.002})  # fmt: skip
    table = build_table([a, b])
    assert [r.label for r in table.rows] == ["optimizer.lr=0.001", "optimizer.lr=0.002"]


def test_step_time_relative_to_ew(tmp_path):
    table = build_table([make_sweep(tmp_path, images_per_sec=8.0)])
    assert [r.time_rel for r in table.rows] == pytest.approx([1.0, 1.0])
    uw = tmp_path / "slow" / "0"
    fake_train(uw, "cagrad", 0, {"semseg/miou": 0.5, "depth/rmse": 0.6}, images_per_sec=2.0)
    table = build_table([make_sweep(tmp_path / "x", images_per_sec=8.0), uw])
    assert table.rows[-1].label == "strategy=cagrad" and table.rows[-1].time_rel == pytest.approx(4.0)
    assert "time/step (× strategy=ew)" in to_markdown(table)
    assert "time/step" not in to_markdown(build_table([make_sweep(tmp_path / "y")]))  # nothing timed


def test_step_time_is_the_fastest_seed_of_each_row(tmp_path):
    # one seed of each row ran while the machine was busy (4x slower): best of n, as timeit, ignores it
    sweep = tmp_path / "sweep"
    for i, (strategy, seed, rate) in enumerate(
        (("ew", 0, 8.0), ("ew", 1, 2.0), ("cagrad", 0, 4.0), ("cagrad", 1, 1.0))
    ):
        fake_train(
            sweep / str(i), strategy, seed, {"semseg/miou": 0.5, "depth/rmse": 0.6}, images_per_sec=rate
        )
    table = build_table([sweep])
    assert [r.time_rel for r in table.rows] == pytest.approx([1.0, 2.0])
    ew = table.rows[0]
    assert ew.step_time is not None and ew.step_time.mean == pytest.approx((4 / 8.0 + 4 / 2.0) / 2)  # batch 4


def test_a_run_without_the_pretrained_group_equals_pretrained_none(tmp_path):
    # runs composed before the `pretrained` config group existed are the same configuration as
    # `pretrained=none` (nothing loaded); `pretrained=synthetic` stays a configuration of its own
    sweep = tmp_path / "sweep"
    fake_train(sweep / "0", "ew", 0, {"semseg/miou": 0.5, "depth/rmse": 0.6})
    fake_train(sweep / "1", "ew", 1, {"semseg/miou": 0.5, "depth/rmse": 0.6},
               extra={"pretrained.source": "none"})  # fmt: skip
    fake_train(sweep / "2", "ew", 2, {"semseg/miou": 0.5, "depth/rmse": 0.6},
               extra={"pretrained.source": "synthetic"})  # fmt: skip
    table = build_table([sweep])
    assert [len(r.runs) for r in table.rows] == [2, 1]
    assert table.rows[1].label == "pretrained.source=synthetic"


def test_published_rows_are_marked_and_not_ranked(tmp_path):
    nyud = tmp_path / "nyud"
    for i, (strategy, miou) in enumerate((("ew", 0.40), ("uw", 0.45))):
        fake_train(nyud / str(i), strategy, 0, {"semseg/miou": miou, "depth/rmse": 0.6},
                   target="mtl.data.nyud.NYUDv2")  # fmt: skip
    table = build_table([nyud], published=True)
    md = to_markdown(table)
    rows = md_rows(md)
    assert rows["InvPT (ViT-L, published)"][:4] == ["—", "InvPT (ViT-L, published)", "—", "53.56"]
    assert rows["strategy=uw"][3] == "**45.00**"  # the best measured value, not the paper's
    assert "published: the papers' numbers" in md
    synthetic = build_table([make_sweep(tmp_path)], published=True)
    assert "No published numbers for dataset 'synthetic'" in to_markdown(synthetic)


def test_outputs_and_byte_identical_rerun(tmp_path, capsys):
    sweep = make_sweep(tmp_path)
    base = baseline_file(tmp_path / "base.yaml")
    out = tmp_path / "out"
    args = [str(sweep), "--baseline", str(base), "--per-task", "--out", str(out), "--plot"]
    assert main(args) == 0
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(first) == ["compare.csv", "compare.json", "compare.md", "compare.tex",
                             "compare_delta_m.png", "compare_tasks.png"]  # fmt: skip
    assert first["compare_delta_m.png"][:8] == b"\x89PNG\r\n\x1a\n"
    assert main(args) == 0
    second = {p.name: p.read_bytes() for p in out.iterdir()}
    for name in ("compare.csv", "compare.json"):
        assert first[name] == second[name]
    for name in ("compare.md", "compare.tex"):  # all but the last line: the date it was generated
        a, b = first[name].decode().splitlines(), second[name].decode().splitlines()
        assert a[:-1] == b[:-1] and "generated" in a[-1]
    md = first["compare.md"].decode()
    assert f"command: `python -m mtl.compare {sweep} --baseline {base} --per-task --out {out} --plot`" in md
    assert "machine: " in md and "CPUs" in md and "torch " in md
    assert "code: runs 0123456789ab;" in md
    # CSV: raw numbers of each row
    rows = list(csv.DictReader(io.StringIO(first["compare.csv"].decode())))
    assert [r["configuration"] for r in rows] == ["strategy=ew", "strategy=uw"]
    assert float(rows[0]["semseg/miou"]) == pytest.approx(52.0) and float(rows[0]["semseg/miou std"]) == 2.0
    assert float(rows[1]["delta_m"]) == pytest.approx(-8.0) and rows[0]["seeds"] == "0 1 2"
    # LaTeX: booktabs, escaped, best in \textbf, ± in math
    tex = first["compare.tex"].decode()
    assert r"\toprule" in tex and r"\bottomrule" in tex
    assert r"\textbf{$52.00 \pm 2.00$}" in tex and r"$\Delta$m (\%) $\uparrow$" in tex
    assert r"strategy=ew & 3 &" in tex
    # the CLI refuses with the message and exit status 2
    capsys.readouterr()
    assert main([str(sweep), "--baseline-row", "strategy=nope", "--out", str(out)]) == 2
    assert "no such row" in capsys.readouterr().err


def test_latex_escapes_labels(tmp_path):
    for i, n in enumerate((8, 4)):
        key = "model.decoder.num_experts"
        values = {"semseg/miou": 0.5, "depth/rmse": 0.6}
        fake_train(tmp_path / "a" / str(i), "ew", 0, values, overrides=[f"{key}={n}"], extra={key: n})
    tex = to_latex(build_table([tmp_path / "a"]))
    assert r"model.decoder.num\_experts=8 & 1 &" in tex and r"model.decoder.num\_experts=4 & 1 &" in tex


def test_multirun_callback_writes_the_table_into_the_sweep(tmp_path, capsys):
    sweep = make_sweep(tmp_path)
    config = OmegaConf.create(
        {"hydra": {"sweep": {"dir": str(sweep)}, "job": {"name": "train"},
                   "overrides": {"task": [*COMMON, "strategy=ew,uw", "seed=0,1,2"],
                                 "hydra": [f"hydra.sweep.dir={sweep}", "hydra.mode=MULTIRUN"]}}}
    )  # fmt: skip
    CompareTable(baseline_row="strategy=ew").on_multirun_end(config=config)
    out = capsys.readouterr().out
    md = (sweep / "compare.md").read_text()
    assert md in out
    command = (
        "python train.py -m experiment=synthetic_baseline trainer.max_epochs=3 strategy=ew,uw seed=0,1,2"
    )
    assert f"command: `{command} hydra.sweep.dir={sweep}`" in md  # hydra.mode is not typed
    assert f"python -m mtl.compare {sweep} --baseline-row strategy=ew --skip-missing" in out
    assert (sweep / "compare.csv").is_file() and (sweep / "compare.tex").is_file()
    # a sweep that cannot be compared gets a note, not an exception (the sweep itself succeeded)
    one = fake_train(sweep / "7", "ew", 9, {"semseg/miou": 0.5}, tasks=("semseg",))
    CompareTable().on_multirun_end(config=config)
    assert "no comparison table" in capsys.readouterr().out and one.exists()


TINY = [
    "data.dataset.resolution=[32,32]",
    "data.dataset.length=4",
    "data.split_kwargs.val.length=4",
    "data.batch_size=2",
    "data.eval_batch_size=4",
    "extras.print_config=false",
    "++model.backbone.embed_dim=16",
    "++model.backbone.depths=[1,1,1,1]",
    "++model.backbone.num_heads=[1,1,2,2]",
    "++model.backbone.window_size=2",
    "model.decoder.channels=8",
    "trainer.max_epochs=1",
    "trainer.max_steps=2",
    "logger=none",
    "module.log_images=false",
    "callbacks.lr_monitor=null",
    "+trainer.enable_progress_bar=false",
]


def test_tiny_real_multirun_ends_with_its_table(tmp_path):
    """2 strategies × 2 seeds through train.py -m, test=true, timed steps; the callback's table."""
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable, str(ROOT / "train.py"), "-m", "experiment=synthetic_baseline", "strategy=ew,uw",
        "seed=0,1", "test=true", *TINY, "+callbacks.throughput._target_=mtl.callbacks.Throughput",
        "+callbacks.throughput.warmup=1", f"hydra.sweep.dir={sweep}",
        "++hydra.callbacks.compare_table._target_=mtl.sweep.CompareTable",
    ]  # fmt: skip
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (sweep / "compare.md").read_text()
    rows = md_rows(md)
    assert set(rows) == {"strategy=ew", "strategy=uw"}
    assert rows["strategy=ew"][2] == "2" and " ± " in rows["strategy=ew"][3]
    assert "time/step (× strategy=ew)" in md and "edge odsF ↑" in md
    assert md in proc.stdout
    # the tool on the same folder: the same rows
    table = build_table([sweep], baseline_row="strategy=uw", cost=True)
    assert [r.label for r in table.rows] == ["strategy=ew", "strategy=uw"]
    assert all(r.seeds == [0, 1] for r in table.rows)
    # the same model in both rows: the same parameters and forward FLOPs, counted from the run's config
    ew, uw = (r.cost for r in table.rows)
    assert ew == uw and ew["params_m"] > 0 and ew["gflops"] > 0
    assert "params (M) | GFLOPs" in to_markdown(table)


def _tables_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("tables", ROOT / "benchmarks" / "tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_table_commands_compose_the_issue_sets(tmp_path, monkeypatch, capsys):
    """benchmarks/tables.py: the baselines' recipe is the tables' one, table 1 sweeps the representative
    strategies × 3 seeds, table 2 the five architectures; --dry-run prints the commands only."""
    from hydra import compose, initialize_config_dir

    tables = _tables_script()
    monkeypatch.setattr(tables, "CONFIG_DIR", tmp_path)  # no installed baseline: the baseline steps run
    assert tables.main(["strategies", "--dry-run"]) == 0
    out = capsys.readouterr().out
    name = tables.baseline_name()
    assert name == "synthetic_nyud_swin_mini_32px_8ep"
    assert "experiment=synthetic_single_task recipe=table_cpu task=semseg,depth,normals,edge" in out
    assert f"mtl.baselines install {tables.OUT / 'baselines'}" in out
    assert f"experiment=table_strategies baselines={name}" in out
    strategies = {p.stem for p in (ROOT / "configs" / "strategy").glob("*.yaml")}
    with initialize_config_dir(str(ROOT / "configs"), version_base=None):
        base = compose("train", ["experiment=synthetic_single_task", "recipe=table_cpu", "task=depth"])
        assert list(base.data.input_size) == [32, 32] and base.trainer.max_epochs == 8
        cfg = compose("train", ["experiment=table_strategies"], return_hydra_config=True)
        sweep = cfg.hydra.sweeper.params
        listed = sweep.strategy.split(",")
        assert len(listed) == 15 and set(listed) <= strategies and sweep.seed == "0,1,2"
        for must in ("ew", "fixed", "uw", "dwa", "rlw", "famo", "dbmtl", "mgda_ub", "pcgrad", "cagrad",
                     "imtl_g", "nash_mtl", "upgrad", "fairgrad", "fmtl"):  # fmt: skip
            assert must in listed
        assert cfg.test and cfg.callbacks.throughput._target_ == "mtl.callbacks.Throughput"
        assert cfg.trainer.check_val_every_n_epoch == cfg.trainer.max_epochs  # step times without validation
        for arch in tables.ARCHITECTURES:
            cfg = compose("train", [f"experiment={arch}"])
            assert cfg.test and list(cfg.data.input_size) == [32, 32] and cfg.trainer.max_epochs == 8
        nomem = compose("train", ["experiment=table_arch_taskexpert_nomem"])
        assert nomem.model.decoder.use_memory is False and nomem.model.decoder.num_experts == 8
    assert tables.main(["architectures", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"experiment={','.join(tables.ARCHITECTURES)} seed=0,1,2 baselines={name}" in out
