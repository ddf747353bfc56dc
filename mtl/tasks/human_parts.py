"""Human-part segmentation (PASCAL-Context, 6 parts + background).

Cross-entropy ignoring 255 with weight 2, as in ATRC / InvPT / TaskExpert. Images without
a person carry an all-255 map and contribute nothing (loss and metric skip them).
"""

from __future__ import annotations

from mtl.tasks.registry import register_task
from mtl.tasks.semseg import SemSeg


@register_task
class HumanParts(SemSeg):
    """Human parts: same maths as semantic segmentation, different default weight."""

    name = "human_parts"
    default_weight = 2.0
