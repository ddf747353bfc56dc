"""Metrics pooled over a whole split, with sum-reduced states so DDP synchronises exactly."""

from mtl.metrics.binary import ApproxEdgeF, SaliencyMaxF
from mtl.metrics.confusion import ConfusionMatrixMetric
from mtl.metrics.pixelwise import DepthMetric, NormalsMetric

__all__ = ["ApproxEdgeF", "ConfusionMatrixMetric", "DepthMetric", "NormalsMetric", "SaliencyMaxF"]
