"""Optimisation strategies: how per-task losses become one parameter update."""

from mtl.strategies.base import Strategy
from mtl.strategies.weighting import FixedWeights

__all__ = ["FixedWeights", "Strategy"]
