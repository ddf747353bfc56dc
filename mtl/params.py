"""Trainable / total parameter counts per group of a :class:`~mtl.model.MultiTaskNet`.

``train`` logs the table at the start of every run and sends the trainable counts to the
loggers. The groups are the model's parts (backbone, decoder, heads); inside the backbone,
parameter-efficient training (LoRA, MTLoRA) is told apart by the adapters' parameter names
(``lora_A`` / ``lora_B``, task-specific ones under ``per_task``): how many parameters train
and where they sit.
"""

from __future__ import annotations

from torch import nn


def group_of(name: str) -> str:
    """The report group of a parameter name of a :class:`~mtl.model.MultiTaskNet`."""
    top = name.split(".", 1)[0]
    if top == "backbone":
        if ".per_task." in name and "lora_" in name:
            return "backbone: task-specific LoRA"
        if "lora_" in name:
            return "backbone: task-agnostic LoRA"
        return "backbone: other"
    return top if top in ("decoder", "heads") else "other"


def parameter_counts(model: nn.Module) -> dict[str, dict[str, int]]:
    """``{group: {"trainable": n, "total": n}}`` plus an ``all`` row."""
    counts: dict[str, dict[str, int]] = {}
    for name, p in model.named_parameters():
        for g in (group_of(name), "all"):
            row = counts.setdefault(g, {"trainable": 0, "total": 0})
            row["total"] += p.numel()
            row["trainable"] += p.numel() if p.requires_grad else 0
    return counts


def parameter_report(model: nn.Module) -> str:
    """A Markdown table of :func:`parameter_counts` (millions of parameters)."""
    counts = parameter_counts(model)
    lines = ["| group | trainable (M) | total (M) | trainable share |", "|---|---|---|---|"]
    for g in sorted(counts, key=lambda k: (k == "all", k)):
        t, n = counts[g]["trainable"], counts[g]["total"]
        lines.append(f"| {g} | {t / 1e6:.3f} | {n / 1e6:.3f} | {t / max(n, 1):.1%} |")
    return "\n".join(lines)
