"""Expert utilisation of a task-conditioned MoE backbone (M³ViT), written by ``eval.py``.

Liang et al., "M³ViT", NeurIPS 2022, show which experts each task activates; this writes, from
the token-to-expert assignments counted over the evaluated split:

* ``experts.json`` and ``experts.md``: per MoE block and task, every expert's share of the task's
  assignments (each token counts ``k`` times), the usage entropy / log E and the largest share;
* ``routing.png``: the task × expert routing matrix of every MoE block (one heat map each);
* ``cost.json``: GFLOPs per image of the evaluated task subset (``torch.utils.flop_counter``).

:class:`RoutingReport` is the evaluation step that writes them after the test pass.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mtl.backbones.m3vit import M3ViT
from mtl.eval_steps import EvalContext, EvalStep


def routing_shares(counts: Mapping[int, Mapping[str, torch.Tensor]]) -> dict[int, dict[str, list[float]]]:
    """Block → task → each expert's share of the task's assignments (sums to 1)."""
    return {
        block: {t: (c / c.sum().clamp_min(1)).tolist() for t, c in per_task.items()}
        for block, per_task in counts.items()
    }


def shares_markdown(shares: Mapping[int, Mapping[str, list[float]]]) -> str:
    """One Markdown table per MoE block: tasks × experts (percent), entropy and max share."""
    lines = []
    for block, per_task in shares.items():
        n = len(next(iter(per_task.values())))
        lines += [f"### block {block}", ""]
        lines.append("| task | " + " | ".join(f"e{j}" for j in range(n)) + " | entropy | max share |")
        lines.append("|---" * (n + 3) + "|")
        for t, s in per_task.items():
            p = np.asarray(s)
            ent = float(-(p * np.log(np.clip(p, 1e-12, None))).sum() / math.log(n)) if n > 1 else 0.0
            cells = " | ".join(f"{100 * v:.1f}" for v in s)
            lines.append(f"| {t} | {cells} | {ent:.3f} | {100 * p.max():.1f}% |")
        lines.append("")
    return "\n".join(lines)


def routing_picture(shares: Mapping[int, Mapping[str, list[float]]], path: Path) -> Path:
    """Saves the task × expert matrices (one panel per MoE block) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = list(shares)
    tasks = list(next(iter(shares.values())))
    n = len(next(iter(shares[blocks[0]].values())))
    fig, axes = plt.subplots(
        len(blocks),
        1,
        figsize=(0.45 * n + 2.5, 0.45 * len(tasks) * len(blocks) + 1.2 * len(blocks)),
        squeeze=False,
    )
    vmax = max(max(s) for per_task in shares.values() for s in per_task.values())
    for ax, block in zip(axes[:, 0], blocks, strict=True):
        mat = np.array([shares[block][t] for t in tasks])
        im = ax.imshow(mat, cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto")
        ax.set_yticks(range(len(tasks)), tasks)
        ax.set_xticks(range(n), [str(j) for j in range(n)], fontsize=7)
        ax.set_title(f"block {block}: share of each task's token assignments per expert", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.03)
    axes[-1, 0].set_xlabel("expert")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


@torch.no_grad()
def subset_gflops(model: nn.Module, input_size: tuple[int, int]) -> float:
    """GFLOPs of one eval-mode forward of one image (the model's ``tasks_at_inference``)."""
    was_training = model.training
    model.eval()
    x = torch.zeros(1, 3, *input_size, device=next(model.parameters()).device)
    with FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was_training)
    return counter.get_total_flops() / 1e9


def sum_over_ranks(
    counts: Mapping[int, Mapping[str, torch.Tensor]], device: torch.device
) -> dict[int, dict[str, torch.Tensor]]:
    """The routing counts summed over the DDP ranks (each counted its share of the split).

    One all-reduce of every count, on ``device`` (NCCL reduces device tensors only); the result
    is on the CPU. Without an initialised process group: the counts as they are.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return {b: dict(per_task) for b, per_task in counts.items()}
    keys = [(b, t) for b, per_task in counts.items() for t in per_task]
    flat = torch.cat([counts[b][t].reshape(-1).to(device, torch.float64) for b, t in keys])
    dist.all_reduce(flat)
    out: dict[int, dict[str, torch.Tensor]] = {}
    for (b, t), chunk in zip(keys, flat.cpu().split([counts[b][t].numel() for b, t in keys]), strict=True):
        out.setdefault(b, {})[t] = chunk.view_as(counts[b][t])
    return out


def write_routing_report(
    model: nn.Module, output_dir: Path, input_size: tuple[int, int] | None = None, *, write: bool = True
) -> dict:
    """Writes the files of the module docstring when ``model.backbone`` is an M³ViT; else nothing.

    Under DDP every rank calls it (the counts of the ranks' shares are summed over the ranks)
    and only the one with ``write`` writes the files.

    Args:
        model: a :class:`~mtl.model.MultiTaskNet` after a test epoch.
        output_dir: where the files go.
        input_size: image size for ``cost.json`` (``None``: no FLOP count).
        write: write the files (``False`` on every DDP rank but 0).

    Returns:
        The shares (block → task → per-expert share), empty for a backbone without routing.
    """
    if not isinstance(model.backbone, M3ViT):
        return {}
    counts = model.backbone.routing_counts()
    if not counts:
        return {}
    counts = sum_over_ranks(counts, next(model.parameters()).device)
    if not write:
        return routing_shares(counts)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    shares = routing_shares(counts)
    (output_dir / "experts.json").write_text(json.dumps({str(b): s for b, s in shares.items()}, indent=2))
    (output_dir / "experts.md").write_text(shares_markdown(shares))
    routing_picture(shares, output_dir / "routing.png")
    if input_size is not None:
        tasks = model.tasks_at_inference or model.tasks
        cost = {
            "tasks": list(tasks),
            "input_size": list(input_size),
            "gflops": subset_gflops(model, input_size),
        }
        (output_dir / "cost.json").write_text(json.dumps(cost, indent=2))
    return shares


class RoutingReport(EvalStep):
    """Evaluation step: :func:`write_routing_report` after the test pass.

    Backbones without token routing get no files; the shares (if any) are ``ctx.reports["routing"]``.
    Under DDP every rank sums the counts of the ranks' shares of the split; rank 0 writes.
    """

    def before_test(self, ctx: EvalContext) -> None:
        if isinstance(ctx.module.model.backbone, M3ViT):  # count the test pass only
            ctx.module.model.backbone.reset_routing_counts()

    def after_test(self, ctx: EvalContext) -> None:
        shares = write_routing_report(
            ctx.module.model, ctx.output_dir, input_size=ctx.input_size, write=ctx.is_global_zero
        )
        if shares:
            ctx.reports["routing"] = shares
