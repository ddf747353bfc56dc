"""The merging experiment on synthetic NYUD-like scenes: merged single-task models versus the
single-task models themselves and joint multi-task training, all from one pretrained backbone.

Steps (each a real command line, skipped when its output exists, so the script resumes):

1. pretrain: ``train.py experiment=synthetic_pascal_baseline data.tasks=[human_parts,saliency]``
   on other scenes (``data.dataset.seed=1``): the shared "pretrained" backbone, exported as a
   timm weight file (``backbone.pth``) for ``model.backbone.checkpoint_path``;
2. single-task fine-tuning from it: ``train.py -m experiment=synthetic_single_task
   task=semseg,depth,normals,edge +model.backbone.checkpoint_path=backbone.pth``;
3. joint multi-task training from it for the same number of steps (``experiment=synthetic_baseline``);
4. ``merge.py method=<m> ckpts=[…4 single-task checkpoints…] evaluate=true`` for every method;
5. the table: main metric per task (eval protocol: exact odsF for edges) and Δm (%) against the
   single-task models and against joint training, written to ``<root>/results.md``.

With ``--init synthetic`` step 1 is replaced by the framework's synthetic pretraining
(``pretrained=synthetic``: the cached ``python -m mtl.pretrain`` backbone at ``--size``; the script
stops with the command that makes it when it is missing), so θ0 is that backbone and seeded decoders.

Usage::

    python benchmarks/merging.py --size 64 --pretrain-epochs 4 --epochs 3 --lr 5e-4   # the defaults
    python -m mtl.pretrain backbone=swin_mini resolution=64 && \
        python benchmarks/merging.py --init synthetic --root logs/merging_synthetic
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import timm
import torch
from omegaconf import OmegaConf

from mtl.data.synthetic import SyntheticScenes
from mtl.metrics.delta_m import delta_m
from mtl.report import display
from mtl.tasks import build_tasks

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["semseg", "depth", "normals", "edge"]
MAIN = {"semseg": ("miou", "mIoU ↑"), "depth": ("rmse", "RMSE ↓"), "normals": ("mean", "mErr ↓"),
        "edge": ("odsf", "odsF ↑")}  # fmt: skip
#: name → merge.py overrides
METHODS = {
    "weight averaging": ["method=average"],
    "task arithmetic λ=0.3": ["method=task_arithmetic", "method.lam=0.3"],
    "task arithmetic λ=0.5": ["method=task_arithmetic", "method.lam=0.5"],
    "task arithmetic λ=1.0": ["method=task_arithmetic", "method.lam=1.0"],
    "TIES k=0.2 λ=1.0": ["method=ties"],
    "TIES k=0.2 λ=0.5": ["method=ties", "method.lam=0.5"],
    "Breadcrumbs per tensor β=0.14 γ=0.01 α=0.5": ["method=breadcrumbs", "method.granularity=tensor"],
    "Breadcrumbs per tensor β=0.14 γ=0.01 α=1.0": [
        "method=breadcrumbs",
        "method.granularity=tensor",
        "method.alpha=1.0",
    ],
    "AdaMerging (layer-wise, 50 steps)": ["method=adamerging"],
}


def run(cmd: list[str], log: Path) -> float:
    """Runs ``python <cmd>`` in the repository root; returns its wall time; raises on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        print("$ python " + " ".join(cmd), flush=True)
        proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise RuntimeError(f"command failed ({proc.returncode}), see {log}: {' '.join(cmd)}")
    return time.perf_counter() - t0


def export_backbone(ckpt: Path, out: Path) -> None:
    """The backbone of a train.py checkpoint as a full timm state dict (pruned parts freshly initialised)."""
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    cfg = OmegaConf.load(ckpt.parent.parent / ".hydra" / "config.yaml")
    bb = OmegaConf.to_container(cfg.model.backbone, resolve=False)
    wrapper_keys = ("_target_", "name", "img_size", "pretrained", "out_indices", "checkpoint_path",
                    "grad_checkpointing")  # fmt: skip
    kwargs = {k: v for k, v in bb.items() if k not in wrapper_keys}
    full = timm.create_model(
        bb["name"], pretrained=False, img_size=tuple(cfg.data.dataset.resolution), **kwargs
    )
    sd = full.state_dict()
    prefix = "model.backbone.model."
    trained = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    unknown = sorted(set(trained) - set(sd))
    if unknown:
        raise ValueError(f"backbone keys not in {bb['name']}: {unknown[:3]}")
    sd.update(trained)
    torch.save(sd, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=ROOT / "logs" / "merging_experiment")
    ap.add_argument("--pretrain-epochs", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs (130 steps of batch 8 each)")
    ap.add_argument("--size", type=int, default=64, help="scene resolution (px) of every run")
    ap.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads per command (shared CPUs)")
    ap.add_argument(
        "--lr", type=float, default=5e-4, help="fine-tuning learning rate (single-task and joint)"
    )
    ap.add_argument(
        "--init",
        choices=("backbone", "full", "synthetic"),
        default="full",
        help="what the fine-tuning runs start from: the pretrained backbone file (backbone.pth via "
        "model.backbone.checkpoint_path; the decoder's shared part randomly initialised), every "
        "matching weight of the pretraining checkpoint (InitWeights callback), or the cached "
        "synthetic-pretrained backbone of python -m mtl.pretrain (pretrained=synthetic)",
    )
    ap.add_argument("--pretrain-dir", type=Path, default=None, help="reuse this pretraining run")
    args = ap.parse_args()
    root = args.root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    common = ["logger=csv", "scheduler.warmup_steps=20", f"data.dataset.resolution=[{args.size},{args.size}]"]
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)

    pre = (args.pretrain_dir or root / "pretrain").resolve()
    if args.init == "synthetic":
        from mtl.pretrain import plan, pretrain_command

        cached = plan("swin_mini", resolution=args.size)
        if not cached.path.is_file():
            sys.exit(f"--init synthetic: no pretrained backbone at {cached.path}; make it once with\n"
                     f"    {pretrain_command(cached.recipe, None)}")  # fmt: skip
    elif not (pre / "checkpoints" / "last.ckpt").is_file():
        times["pretrain"] = run(["train.py", "experiment=synthetic_pascal_baseline",
                                 "data.tasks=[human_parts,saliency]", "data.dataset.seed=1",
                                 f"trainer.max_epochs={args.pretrain_epochs}", *common,
                                 f"hydra.run.dir={pre}"], root / "logs" / "pretrain.log")  # fmt: skip
    backbone = root / "backbone.pth"
    if args.init in ("backbone", "full") and not backbone.is_file():
        export_backbone(pre / "checkpoints" / "last.ckpt", backbone)
    init = (
        [f"+model.backbone.checkpoint_path={backbone}"]
        if args.init == "backbone"
        else ["pretrained=synthetic"]
        if args.init == "synthetic"
        else ["+callbacks.init_weights._target_=mtl.callbacks.InitWeights",
              f"+callbacks.init_weights.path={pre / 'checkpoints' / 'last.ckpt'}"]
    )  # fmt: skip
    finetune = [*init, f"trainer.max_epochs={args.epochs}", f"optimizer.lr={args.lr}", *common]

    single = root / "single"
    if not all((single / t / "metrics.json").is_file() for t in TASKS):
        times["single-task ×4"] = run(["train.py", "-m", "experiment=synthetic_single_task",
                                       f"task={','.join(TASKS)}", *finetune, f"hydra.sweep.dir={single}",
                                       f"hydra.callbacks.write_baseline.out_dir={root}",
                                       "hydra.callbacks.write_baseline.name=baseline"],
                                      root / "logs" / "single.log")  # fmt: skip
    joint = root / "joint"
    if not (joint / "metrics.json").is_file():
        times["joint"] = run(["train.py", "experiment=synthetic_baseline", *finetune, "test=true",
                              f"hydra.run.dir={joint}"], root / "logs" / "joint.log")  # fmt: skip
    ckpts = ",".join(str(single / t / "checkpoints" / "best.ckpt") for t in TASKS)
    results: dict[str, dict[str, float]] = {}
    for name, overrides in METHODS.items():
        slug = (
            name.split(" (")[0]
            .replace("λ", "lam")
            .replace("β", "beta")
            .replace("γ", "gamma")
            .replace("α", "alpha")
        )
        out = root / "merge" / re.sub(r"[^A-Za-z0-9.]+", "_", slug)  # Hydra overrides: ASCII paths
        if not (out / "eval" / "results.json").is_file():
            times[name] = run(["merge.py", *overrides, f"ckpts=[{ckpts}]", "evaluate=true",
                               f"hydra.run.dir={out}"], root / "logs" / f"{out.name}.log")  # fmt: skip
        results[name] = json.loads((out / "eval" / "results.json").read_text())

    tasks = build_tasks(TASKS, num_classes=SyntheticScenes.NUM_CLASSES)
    st = {}
    for t in TASKS:
        m = json.loads((single / t / "metrics.json").read_text())
        st.update({k.split("/", 1)[1]: v for k, v in m.items() if k.startswith(f"test/{t}/")})
    jt = json.loads((joint / "metrics.json").read_text())
    jt_base = {k.split("/", 1)[1]: v for k, v in jt.items() if k.startswith("test/")}
    rows = {
        "single-task models (4 backbones)": {f"test/{k}": v for k, v in st.items()},
        "joint multi-task": jt,
    }
    rows.update(results)
    head = (
        "| model | "
        + " | ".join(f"{t} {MAIN[t][1]}" for t in TASKS)
        + " | Δm vs single-task (%) | Δm vs joint (%) |"
    )
    lines = [head, "|" + "---|" * (len(TASKS) + 3)]
    for name, m in rows.items():
        cells = [f"{display(MAIN[t][0], m[f'test/{t}/{MAIN[t][0]}']):.2f}" if MAIN[t][0] != "rmse"
                 else f"{m[f'test/{t}/rmse']:.4f}" for t in TASKS]  # fmt: skip
        dst = delta_m(m, st, tasks, stage="test")
        djt = delta_m(m, jt_base, tasks, stage="test")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {dst:+.2f} | {djt:+.2f} |")
    table = "\n".join(lines)
    (root / "results.md").write_text(table + "\n")
    (root / "times.json").write_text(json.dumps(times, indent=2))
    print(table)
    print("wall times of this invocation (s):", json.dumps({k: round(v, 1) for k, v in times.items()}))


if __name__ == "__main__":
    main()
