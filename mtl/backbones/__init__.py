"""Backbones: ``forward(x) -> list[Tensor]`` (NCHW) and ``feature_info`` per level."""

from mtl.backbones.timm_backbone import TimmBackbone

__all__ = ["TimmBackbone"]
