"""Budget- and preference-conditioned search for a width configuration.

Aich et al., "Efficient Controllable Multi-Task Architectures", ICCV 2023: given a compute
budget and how much each task matters, pick the decoder widths (more width for more
preferred tasks) and the encoder width that maximise multi-task performance within the
budget, from performances measured per configuration on the validation split.

Our exact rule (the paper's is not in what we hold):

- The performance table holds, per task, its main metric at every (encoder width, decoder
  width) pair: a task's prediction depends only on the encoder and its own decoder, so
  ``|W|²`` validation passes (all decoders at one width per pass) measure every configuration.
- A task's score is its metric normalised by the full model's, direction-corrected:
  ``m / m_full`` when higher is better, ``m_full / m`` when lower is better (1.0 = full model).
- Candidates: every encoder width × every assignment of decoder widths that is *monotone in
  the preference* (``p_i > p_j`` ⇒ ``d_i ≥ d_j``), with cost ≤ budget.
- Objective: the preference-weighted mean score ``Σ p_t · score_t / Σ p_t``; ties go to the
  cheaper configuration. If nothing fits the budget, a ``ValueError`` names the cheapest cost.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence

from mtl.control.cost import WidthConfig

PerfTable = Mapping[str, Mapping[tuple[float, float], float]]
"""task → {(encoder width, decoder width): main metric}."""


def scores(table: PerfTable, config: WidthConfig, higher_is_better: Mapping[str, bool]) -> dict[str, float]:
    """Direction-corrected score of each task under ``config`` relative to the full model."""
    out = {}
    for task, perf in table.items():
        full = perf[(1.0, 1.0)]
        m = perf[(config.encoder, config.decoders[task])]
        out[task] = m / full if higher_is_better[task] else full / m
    return out


def monotone_assignments(tasks: Sequence[str], widths: Sequence[float], preference: Mapping[str, float]):
    """Decoder-width assignments in which a more preferred task never gets less width."""
    for combo in itertools.product(sorted(widths), repeat=len(tasks)):
        assign = dict(zip(tasks, combo, strict=True))
        if all(assign[a] >= assign[b] for a in tasks for b in tasks if preference[a] > preference[b]):
            yield assign


def search(
    *,
    budget: float,
    preference: Mapping[str, float],
    widths: Sequence[float],
    table: PerfTable,
    cost: Callable[[WidthConfig], float],
    higher_is_better: Mapping[str, bool],
) -> tuple[WidthConfig, dict]:
    """The best configuration within ``budget`` (GFLOPs) for ``preference``.

    Returns:
        The configuration and a report (``cost``, ``objective``, per-task ``scores``,
        ``candidates`` considered).
    """
    tasks = list(table)
    if set(preference) != set(tasks):
        raise ValueError(f"preference must name exactly the tasks {tasks}, got {sorted(preference)}")
    if any(p < 0 for p in preference.values()) or sum(preference.values()) <= 0:
        raise ValueError(f"preference weights must be >= 0 with a positive sum, got {dict(preference)}")
    total_p = sum(preference.values())
    best, best_key, cheapest, n = None, None, float("inf"), 0
    for enc in sorted(widths):
        for assign in monotone_assignments(tasks, widths, preference):
            config = WidthConfig(enc, assign)
            c = cost(config)
            cheapest = min(cheapest, c)
            if c > budget:
                continue
            n += 1
            s = scores(table, config, higher_is_better)
            objective = sum(preference[t] * s[t] for t in tasks) / total_p
            key = (objective, -c)
            if best_key is None or key > best_key:
                best, best_key = (config, {"cost": c, "objective": objective, "scores": s}), key
    if best is None:
        raise ValueError(
            f"no configuration fits the budget {budget:.4g} GFLOPs per image; the cheapest costs "
            f"{cheapest:.4g} GFLOPs per image"
        )
    best[1]["candidates"] = n
    return best
