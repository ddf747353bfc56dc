"""Dense prediction tasks, one file each, in an open registry (:mod:`mtl.tasks.registry`).

``TASKS`` maps the registered task names to their classes; :func:`register_task` adds one, and
``task_options.<name>._target_`` builds a task that is not registered from its import path.
"""

from __future__ import annotations

from mtl.tasks.base import Task
from mtl.tasks.depth import Depth
from mtl.tasks.edge import Edge
from mtl.tasks.human_parts import HumanParts
from mtl.tasks.normals import Normals
from mtl.tasks.registry import TASKS, build_tasks, register_task, task_class
from mtl.tasks.saliency import Saliency
from mtl.tasks.semseg import SemSeg

__all__ = [
    "TASKS",
    "Depth",
    "Edge",
    "HumanParts",
    "Normals",
    "Saliency",
    "SemSeg",
    "Task",
    "build_tasks",
    "register_task",
    "task_class",
]
