"""Metrics pooled over a whole split, with sum-reduced states so DDP synchronises exactly.

Names are imported lazily so that the boundary-evaluation worker processes, which only need
:mod:`mtl.metrics.seism` (numpy, scipy, pyEdgeEval), start without importing torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ApproxEdgeF": "binary",
    "SaliencyMaxF": "binary",
    "ConfusionMatrixMetric": "confusion",
    "DepthMetric": "pixelwise",
    "NormalsMetric": "pixelwise",
    "SEISMEdgeF": "edge_eval",
    "delta_m": "delta_m",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"mtl.metrics.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'mtl.metrics' has no attribute {name!r}")
