"""Per-step time and peak memory of every optimisation strategy, relative to EW.

Same model (the multi-head baseline on a small Swin or a small ViT, ``--backbones``), same batch,
same initial weights for every strategy; 2, 4 and 5 tasks (NYUD-like semseg/depth; + normals/edge; PASCAL-like
semseg/human_parts/saliency/normals/edge). A step is forward + ``strategy.backward`` (+ the
optimiser step and, for FAMO, its look-ahead forward), driven by a bare loop so that only the
strategy differs; EW is measured in the same run as the baseline.

Time: median over ``--steps`` steps after the first one (and after one discarded warm-up run
per task count); on CUDA wall-clock time (synchronised),
on CPU the process's CPU time with one intra-op thread (``torch.set_num_threads(1)``), which
other jobs on a shared machine barely perturb. Memory: the peak of tensor memory allocated
during the first step (which also creates everything a strategy keeps: the ``k × n`` buffer,
the optimiser state, retained graphs) above what was allocated before it (model and batch);
on CUDA ``torch.cuda.max_memory_allocated``, on CPU the running sum of the CPU allocator's
alloc/free events recorded by ``torch.profiler`` (``profile_memory=True``): exact tensor
bytes, not the noisy resident set size.

Rows: every strategy config, plus ``upgrad_gramian_passes`` (``upgrad_gramian`` with
``strategy.autogram=false``: the polarised ``k(k+1)/2 + 1`` passes instead of the autogram engine);
one table per backbone. A Gramian-only row whose engine fell back to the passes is marked
``(fallback)`` and the reason printed; below each table, the ops over which the engine's ``vmap``
looped once per task (no batching rule on this device: on a GPU, whether the fused attention's
backward is among them decides if ``TIMM_FUSED_ATTN=0`` makes this mode faster).

    python benchmarks/strategies.py [--tasks 2,4,5] [--steps 5] [--resolution 64] [--batch 4]
                                     [--only ew,cagrad] [--backbones swin,vit]
"""

from __future__ import annotations

import argparse
import functools
import gc
import statistics
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mtl.backbones import TimmBackbone  # noqa: E402
from mtl.contracts import ModelOutput  # noqa: E402
from mtl.decoders.multihead import MultiHeadDecoder  # noqa: E402
from mtl.model import MultiTaskNet  # noqa: E402
from mtl.strategies import GradientAggregation  # noqa: E402
from mtl.strategies.autogram import LOOPED_OPS  # noqa: E402
from mtl.tasks import build_tasks  # noqa: E402

TASK_SETS = {
    2: ["semseg", "depth"],
    4: ["semseg", "depth", "normals", "edge"],
    5: ["semseg", "human_parts", "saliency", "normals", "edge"],
}
CLASSES = {"semseg": 9, "human_parts": 7}


class BenchModule:
    """What a strategy uses of ``MTLModule`` (:class:`~mtl.contracts.StrategyHost`), without Lightning
    (fp32, single process)."""

    def __init__(self, model: MultiTaskNet, tasks) -> None:
        self.model, self.tasks = model, tasks

    def task_losses(self, out: ModelOutput, batch: dict) -> dict[str, torch.Tensor]:
        return {t: task.loss(out.preds[t], batch) for t, task in self.tasks.items()}

    def manual_backward(self, loss):
        loss.backward()

    def grad_scale(self) -> float:
        return 1.0


def make_batch(tasks: list[str], bs: int, res: int, device) -> dict:
    g = torch.Generator().manual_seed(0)
    normals = torch.nn.functional.normalize(torch.randn(bs, 3, res, res, generator=g), dim=1)
    full = {
        "image": torch.randn(bs, 3, res, res, generator=g),
        "semseg": torch.randint(0, 9, (bs, res, res), generator=g),
        "human_parts": torch.randint(0, 7, (bs, res, res), generator=g),
        "saliency": (torch.rand(bs, 1, res, res, generator=g) > 0.5).float(),
        "depth": torch.rand(bs, 1, res, res, generator=g) * 4 + 0.5,
        "normals": normals,
        "edge": (torch.rand(bs, 1, res, res, generator=g) > 0.9).float(),
    }
    return {k: v.to(device) for k, v in full.items() if k == "image" or k in tasks}


#: the small backbones (timm architectures as the configs use them, narrow and shallow)
BACKBONES = {
    "swin": dict(
        name="swin_tiny_patch4_window7_224",
        out_indices=[0, 1, 2, 3],
        embed_dim=48,
        depths=[2, 2, 2, 2],
        num_heads=[2, 4, 8, 16],
        window_size=4,
    ),
    "vit": dict(name="vit_base_patch16_384", out_indices=[2, 5, 8, 11], depth=12, embed_dim=96, num_heads=4),
}


def build_model(tasks, res: int, device, backbone_name: str = "swin") -> MultiTaskNet:
    torch.manual_seed(0)
    backbone = TimmBackbone(img_size=(res, res), **BACKBONES[backbone_name])
    decoder = functools.partial(MultiHeadDecoder, channels=64)
    return MultiTaskNet(
        backbone=backbone, decoder=decoder, tasks={t: k.out_channels for t, k in tasks.items()}
    )


def strategy_configs(only: list[str] | None) -> dict:
    names = sorted(p.stem for p in (ROOT / "configs" / "strategy").glob("*.yaml"))

    def ours(n: str) -> bool:  # other modules' strategies (e.g. sandwich) need their own model
        text = (ROOT / "configs" / "strategy" / f"{n}.yaml").read_text()
        return "_target_: mtl.strategies." in text or "defaults:" in text

    names = [n for n in names if n != "fixed" and ours(n)]  # fixed: the same computation as ew
    names.sort(key=lambda n: n != "ew")  # EW first: the baseline
    passes = "upgrad_gramian_passes"  # Gramian-only without the autogram engine: k(k+1)/2 + 1 passes
    if "upgrad_gramian" in names:
        names.insert(names.index("upgrad_gramian") + 1, passes)
    if only:
        names = [n for n in names if n in only or n == "ew"]
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
        configs = {}
        for n in names:
            overrides = [f"strategy={'upgrad_gramian' if n == passes else n}"]
            if n == passes:
                overrides.append("+strategy.autogram=false")
            configs[n] = compose(config_name="train", overrides=overrides).strategy
        return configs


def cpu_peak_bytes(prof) -> int:
    """Peak of the running sum of the CPU allocator's alloc (+) / free (−) events of a profile."""
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    peak = total = 0
    for _, nbytes in events:
        total += nbytes
        peak = max(peak, total)
    return peak


def bench(name: str, cfg, k: int, args, device, backbone: str) -> tuple[float, float, str | None]:
    """Median step time (s), peak memory (MiB) and, for Gramian-only, why the engine fell back (if it did)."""
    tasks = build_tasks(TASK_SETS[k], num_classes={t: c for t, c in CLASSES.items() if t in TASK_SETS[k]})
    model = build_model(tasks, args.resolution, device, backbone).to(device)
    module = BenchModule(model, tasks)
    strategy = instantiate(cfg, _convert_="all")
    strategy.setup(tasks=tasks, module=module)
    strategy.to(device)
    batch = make_batch(TASK_SETS[k], args.batch, args.resolution, device)
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad] + list(strategy.parameters()), lr=1e-4
    )
    cuda = device.type == "cuda"

    def one_step() -> float:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter() if cuda else time.process_time()
        opt.zero_grad(set_to_none=True)
        step = strategy.forward(batch, module=module)
        strategy.backward(step, module=module, batch=batch)
        opt.step()
        strategy.after_step(batch, module=module, losses=step.losses)
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() if cuda else time.process_time()) - t0

    gc.collect()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        one_step()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        with torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
        ) as prof:
            one_step()
        peak = cpu_peak_bytes(prof)
    times = [one_step() for _ in range(args.steps)]
    fallback = strategy.autogram_fallback if isinstance(strategy, GradientAggregation) else None
    return statistics.median(times), peak / 2**20, fallback


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", default="2,4,5")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--only", default=None, help="comma-separated strategy names (EW is always run)")
    parser.add_argument("--backbones", default="swin,vit", help=f"comma-separated, of {sorted(BACKBONES)}")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)
    configs = strategy_configs(args.only.split(",") if args.only else None)
    ks = [int(k) for k in args.tasks.split(",")]
    backbones = args.backbones.split(",")
    unknown = [b for b in backbones if b not in BACKBONES]
    if unknown:
        parser.error(f"--backbones {unknown}: expected some of {sorted(BACKBONES)}")
    results, looped = {}, {}
    for backbone in backbones:
        LOOPED_OPS.clear()
        for k in ks:
            bench("ew", configs["ew"], k, args, device, backbone)  # warm-up (allocator, caches): discarded
            for name, cfg in configs.items():
                results[backbone, name, k] = bench(name, cfg, k, args, device, backbone)
                t, m, fallback = results[backbone, name, k]
                note = f"  (autogram fell back: {fallback})" if fallback else ""
                print(
                    f"  {backbone} {name:12s} k={k}: {t * 1e3:8.1f} ms/step  peak +{m:8.1f} MiB{note}",
                    file=sys.stderr,
                    flush=True,
                )
        looped[backbone] = sorted(LOOPED_OPS)
    if device.type == "cuda":
        kind = "wall time; memory: CUDA max_memory_allocated"
    else:
        kind = "CPU time, 1 thread; memory: CPU allocator events (torch.profiler)"
    print(
        f"\ndevice {device}, {args.resolution}px, batch {args.batch}, median of {args.steps} steps, {kind}\n"
    )
    head = " | ".join(f"time k={k} | mem k={k}" for k in ks)
    for backbone in backbones:
        print(f"\n{backbone} ({BACKBONES[backbone]['name']}, small)\n")
        print(f"| strategy | {head} |")
        print("|---|" + "---:|" * (2 * len(ks)))
        for name in configs:
            cells = []
            for k in ks:
                t, m, _ = results[backbone, name, k]
                t0, m0, _ = results[backbone, "ew", k]
                cells += [f"{t / t0:.2f}×", f"{m / m0:.2f}×"]
            fell = any(results[backbone, name, k][2] for k in ks)
            print(f"| {name}{' (fallback)' if fell else ''} | " + " | ".join(cells) + " |")
        base = " · ".join(
            f"k={k}: {results[backbone, 'ew', k][0] * 1e3:.0f} ms, {results[backbone, 'ew', k][1]:.0f} MiB"
            for k in ks
        )
        print(f"\nEW (= 1.00×): {base}")
        if looped[backbone]:  # the autogram engine's vmap ran these once per task (no batching rule)
            print(f"autogram: vmap looped over the k tasks in {', '.join(looped[backbone])}")


if __name__ == "__main__":
    main()
