"""Decoding the per-task features of a task-conditioned backbone (M³ViT), one pass at a time.

Liang et al., "M³ViT", NeurIPS 2022, run the backbone once per task; the decoder then has to run on
each pass's own features. Used by :class:`mtl.model.MultiTaskNet`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn


def decode_passes(
    decoder: nn.Module, per_task: Mapping[str, list[torch.Tensor]], tasks: Sequence[str]
) -> tuple[dict[str, torch.Tensor], dict]:
    """Runs ``decoder`` once per backbone pass, each on that pass's features and tasks.

    Decoders keep per-forward state (TaskExpert: its aux loss, intermediate features and gate
    maps); it is merged over the passes so that it reads as one multi-task forward: aux losses
    averaged, intermediate features and ``last_gates`` joined per task.

    Returns:
        Task → decoder feature, and ``{"aux": Tensor | None, "intermediate": list[dict]}``.
    """
    groups: dict[int, tuple[list[torch.Tensor], list[str]]] = {}
    for t in tasks:
        groups.setdefault(id(per_task[t]), (per_task[t], []))[1].append(t)
    out: dict[str, torch.Tensor] = {}
    aux, intermediate, gates = [], [], {}
    for feats, group in groups.values():
        out.update(decoder(feats, task_subset=group))
        fn = getattr(decoder, "aux_loss", None)
        value = fn() if callable(fn) else None
        if value is not None:
            aux.append(value)
        fn = getattr(decoder, "intermediate_features", None)
        for level, feats_t in enumerate(fn() if callable(fn) else []):
            if level == len(intermediate):
                intermediate.append({})
            intermediate[level].update(feats_t)
        gates.update(getattr(decoder, "last_gates", None) or {})
    if gates:
        decoder.last_gates = gates
    state = {"aux": torch.stack(aux).mean() if aux else None, "intermediate": intermediate}
    return {t: out[t] for t in tasks}, state
