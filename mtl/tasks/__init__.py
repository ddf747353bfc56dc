"""Dense prediction tasks, one file each. ``TASKS`` maps task names to their classes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from mtl.tasks.base import Task
from mtl.tasks.depth import Depth
from mtl.tasks.edge import Edge
from mtl.tasks.human_parts import HumanParts
from mtl.tasks.normals import Normals
from mtl.tasks.saliency import Saliency
from mtl.tasks.semseg import SemSeg

TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (SemSeg, HumanParts, Saliency, Normals, Depth, Edge)}
CLASSIFICATION = ("semseg", "human_parts")


def build_tasks(
    names: Sequence[str],
    *,
    num_classes: Mapping[str, int] | None = None,
    options: Mapping[str, Mapping] | None = None,
) -> dict[str, Task]:
    """Builds the task objects of an experiment, in the given order.

    Args:
        names: task names, e.g. ``["semseg", "depth"]``.
        num_classes: classes of the classification tasks (from the dataset).
        options: optional per-task keyword arguments (e.g. ``{"edge": {"pos_weight": 0.95}}``).

    Raises:
        ValueError: an unknown or repeated task name, or a classification task whose number
            of classes the dataset does not give.
    """
    num_classes = dict(num_classes or {})
    options = {k: dict(v) for k, v in (options or {}).items()}
    if not names:
        raise ValueError(f"no tasks given; valid tasks: {sorted(TASKS)}")
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; valid tasks: {sorted(TASKS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"task list has duplicates: {list(names)}")
    stray = sorted(set(options) - set(names))
    if stray:
        raise ValueError(f"task options given for {stray}, which are not in the task list {list(names)}")
    tasks: dict[str, Task] = {}
    for name in names:
        kwargs = options.get(name, {})
        if name in CLASSIFICATION:
            if name not in num_classes:
                raise ValueError(f"task '{name}' needs num_classes; the dataset gives {num_classes}")
            kwargs.setdefault("num_classes", int(num_classes[name]))
        tasks[name] = TASKS[name](**kwargs)
    return tasks


__all__ = ["TASKS", "Task", "build_tasks"] + [c.__name__ for c in TASKS.values()]
