"""Optimisation strategies: how per-task losses become one parameter update (see ``base.py``)."""

from mtl.strategies.adaptive import (
    DynamicWeightAverage,
    GeometricLoss,
    RandomLossWeighting,
    UncertaintyWeighting,
)
from mtl.strategies.aggregation import GradientAggregation, weights_from_gramian
from mtl.strategies.base import Strategy
from mtl.strategies.dbmtl import DBMTL
from mtl.strategies.famo import FAMO
from mtl.strategies.fmtl import FlatMTL
from mtl.strategies.gradnorm import GradNorm
from mtl.strategies.jacobian import PerTaskGradients
from mtl.strategies.sam import SAM
from mtl.strategies.weighting import FixedWeights

__all__ = [
    "DBMTL",
    "FAMO",
    "SAM",
    "DynamicWeightAverage",
    "FixedWeights",
    "FlatMTL",
    "GeometricLoss",
    "GradNorm",
    "GradientAggregation",
    "PerTaskGradients",
    "RandomLossWeighting",
    "Strategy",
    "UncertaintyWeighting",
    "weights_from_gramian",
]
