"""A new backbone: a small strided CNN with three feature levels (strides 4, 8, 16)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mtl.contracts import Backbone, Features


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True)
    )


class TinyCNN(Backbone):
    """Stem of stride 4, then two stages of stride 2; every stage's output is a feature level.

    Args:
        widths: channels of the three levels.
    """

    def __init__(self, *, widths: Sequence[int] = (16, 32, 64)) -> None:
        super().__init__()
        c1, c2, c3 = widths
        self.stages = nn.ModuleList(
            [nn.Sequential(_block(3, c1, 2), _block(c1, c1, 2)), _block(c1, c2, 2), _block(c2, c3, 2)]
        )
        # what the decoder is built from: channels and stride of each level
        self.feature_info = [{"channels": c, "stride": s} for c, s in zip(widths, (4, 8, 16), strict=True)]

    def features(self, x: torch.Tensor, tasks: Sequence[str]) -> Features:
        maps = []
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return Features(shared=maps)  # one list every task reads
