"""The open task registry: built-in tasks register by name, any other one enters by import path.

A task class joins the registry with the :func:`register_task` decorator (every built-in task
does); a task that is not registered is named in the config by its class's import path::

    data:
      tasks: [semseg, mytask]
    task_options:
      mytask: {_target_: mypkg.tasks.MyTask, weight: 2.0}

:func:`build_tasks` then builds it like a built-in one (the other keys are its constructor's
keyword arguments).
"""

from __future__ import annotations

import pkgutil
from collections.abc import Mapping, Sequence
from typing import TypeVar

from mtl.tasks.base import Task

#: registered task name → its class (open: see :func:`register_task`)
TASKS: dict[str, type[Task]] = {}

T = TypeVar("T", bound=type[Task])


def register_task(cls: T) -> T:
    """Class decorator: registers a :class:`Task` subclass under its ``name``.

    Raises:
        TypeError: ``cls`` is not a :class:`Task` subclass.
        ValueError: it has no ``name``, or another class is registered under that name.
    """
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise TypeError(f"register_task takes a Task subclass, got {cls!r}")
    if not cls.name:
        raise ValueError(f"task class {cls.__qualname__} sets no `name`")
    known = TASKS.get(cls.name)
    if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(
            f"task name '{cls.name}' is already registered by {known.__module__}.{known.__qualname__}; "
            f"cannot register {cls.__module__}.{cls.__qualname__} under it"
        )
    TASKS[cls.name] = cls
    return cls


def _import_task(name: str, target: str) -> type[Task]:
    try:
        cls = pkgutil.resolve_name(target)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"task_options.{name}._target_: cannot import '{target}' ({err})") from err
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise TypeError(f"task_options.{name}._target_: '{target}' is {cls!r}, not a mtl.tasks.Task subclass")
    if cls.name != name:
        raise ValueError(
            f"task_options.{name}._target_: {target} is task '{cls.name}', not '{name}' "
            "(its `name` is the key of its targets in batches and of its metrics)"
        )
    return cls


def task_class(name: str, options: Mapping | None = None) -> type[Task]:
    """The class of task ``name``: ``options["_target_"]`` (an import path) if given, else the
    registered one.

    Raises:
        ValueError: an unknown task (naming the registered ones) or a bad ``_target_``.
    """
    target = (options or {}).get("_target_")
    if target is not None:
        return _import_task(name, str(target))
    if name not in TASKS:
        raise ValueError(
            f"unknown task '{name}'; valid tasks: {sorted(TASKS)} (or give task_options.{name}._target_, "
            "the import path of a Task subclass)"
        )
    return TASKS[name]


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
        options: optional per-task keyword arguments (e.g. ``{"edge": {"pos_weight": 0.95}}``);
            ``_target_`` names the class of a task that is not registered (module docstring).

    Raises:
        ValueError: an unknown or repeated task name, options for a task not in the list, a
            bad ``_target_``, or a task that needs ``num_classes`` the dataset does not give.
    """
    num_classes = dict(num_classes or {})
    options = {k: dict(v) for k, v in (options or {}).items()}
    if not names:
        raise ValueError(f"no tasks given; valid tasks: {sorted(TASKS)}")
    unknown = [n for n in names if n not in TASKS and "_target_" not in options.get(n, {})]
    if unknown:
        raise ValueError(
            f"unknown task(s) {unknown}; valid tasks: {sorted(TASKS)} (or give task_options.<name>._target_, "
            "the import path of a Task subclass)"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"task list has duplicates: {list(names)}")
    stray = sorted(set(options) - set(names))
    if stray:
        raise ValueError(f"task options given for {stray}, which are not in the task list {list(names)}")
    tasks: dict[str, Task] = {}
    for name in names:
        kwargs = options.get(name, {})
        cls = task_class(name, kwargs)
        kwargs.pop("_target_", None)
        if cls.needs_num_classes:
            if name not in num_classes:
                raise ValueError(f"task '{name}' needs num_classes; the dataset gives {num_classes}")
            kwargs.setdefault("num_classes", int(num_classes[name]))
        tasks[name] = cls(**kwargs)
    return tasks
