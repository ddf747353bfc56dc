"""Backbones: :class:`~mtl.contracts.Backbone` — ``features(x, tasks) -> Features`` and ``feature_info``."""

from mtl.backbones.timm_backbone import TimmBackbone

__all__ = ["TimmBackbone"]
