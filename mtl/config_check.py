"""Config validation before any data is touched: unknown keys and wrong types, with their paths.

Hydra refuses overrides of keys that do not exist, but a typo inside an experiment file, or a
value of the wrong type, would otherwise surface minutes later as a ``TypeError`` deep inside
a constructor. :func:`check_config` walks every node with a ``_target_``, imports the target and
checks its keys against the signature and its values against the annotations (simple types:
``int``, ``float``, ``bool``, ``str``, sequences, mappings, ``Optional``/unions, ``Literal``).
A value that is itself a ``_target_`` node must build what the annotation asks for: a class that
is a subclass of the annotated class (``_partial_``: of the return type of an annotated
``Callable[..., T]``), e.g. a model's backbone a :class:`~mtl.contracts.Backbone` and its decoder a
:class:`~mtl.contracts.Decoder` (their compatibility in detail is checked when the model is built,
before any data is read).
"""

from __future__ import annotations

import enum
import inspect
import os
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import PurePath
from typing import Any

from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

_HYDRA_KEYS = {"_target_", "_partial_", "_convert_", "_recursive_", "_args_"}


class ConfigError(ValueError):
    """One or more config values do not fit the classes they configure."""


def _nodes(node: Any, path: str) -> Iterator[tuple[str, DictConfig]]:
    if isinstance(node, DictConfig):
        if "_target_" in node:
            yield path, node
        for k in node:
            if k == "hydra":
                continue
            yield from _nodes(node._get_node(k), f"{path}.{k}" if path else str(k))
    elif isinstance(node, ListConfig):
        for i in range(len(node)):
            yield from _nodes(node._get_node(i), f"{path}[{i}]")


def _matches(value: Any, hint: Any) -> bool:
    """Whether a (resolved, plain) config value fits a type hint; unknown hints always match."""
    if hint is Any or hint is inspect.Parameter.empty:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if isinstance(value, dict) and "_target_" in value:
        return True  # an object built from the config: its own node is checked separately
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    base = origin or hint
    if base in (list, tuple, Sequence, typing.Sequence):
        return isinstance(value, list | tuple)
    if base in (dict, Mapping, typing.Mapping):
        return isinstance(value, dict)
    if inspect.isclass(base) and isinstance(value, str | int | float | bool):
        if issubclass(base, os.PathLike | PurePath | enum.Enum):
            return isinstance(value, str)
        return isinstance(value, base)  # e.g. a string where a tensor or a module is expected
    return True


def _built_type(hint: Any, partial: bool) -> list[type]:
    """The classes a ``_target_`` value for ``hint`` may build (empty: anything)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        out = [_built_type(h, partial) for h in typing.get_args(hint) if h is not type(None)]
        return [] if any(not o for o in out) else [c for o in out for c in o]
    if partial:
        if origin in (Callable, typing.Callable) and typing.get_args(hint):
            return _built_type(typing.get_args(hint)[-1], partial=False)
        return []
    return [hint] if inspect.isclass(hint) and hint is not object else []


def _target_problem(value: dict, hint: Any) -> str | None:
    """Why the ``_target_`` node ``value`` does not build what ``hint`` asks for (``None``: it may)."""
    wanted = _built_type(hint, bool(value.get("_partial_")))
    try:
        built = get_object(value["_target_"])
    except Exception:  # noqa: BLE001 — reported by the node's own check
        return None
    if not wanted or not inspect.isclass(built) or issubclass(built, tuple(wanted)):
        return None
    names = " or ".join(f"{c.__module__}.{c.__qualname__}" for c in wanted)
    return f"'{value['_target_']}' is not a {names}"


def _describe(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def check_node(path: str, node: DictConfig) -> list[str]:
    """Problems of one ``_target_`` node: keys the target does not accept, values of the wrong type."""
    target = node["_target_"]
    try:
        obj = get_object(target)
    except Exception as err:  # noqa: BLE001 — any import failure is a config problem to report
        return [f"{path}._target_: cannot import '{target}' ({type(err).__name__}: {err})"]
    func = obj.__init__ if inspect.isclass(obj) else obj
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):
        return []
    try:
        hints = typing.get_type_hints(func)
    except Exception:  # noqa: BLE001 — unresolvable annotations: check names only
        hints = {}
    params = {k: p for k, p in sig.parameters.items() if k not in ("self", "cls")}
    open_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    problems = []
    for key in node:
        if key in _HYDRA_KEYS:
            continue
        where = f"{path}.{key}" if path else str(key)
        if key not in params:
            if not open_kwargs:
                accepted = ", ".join(k for k, p in params.items() if p.kind is not p.VAR_POSITIONAL)
                problems.append(f"{where}: '{target}' has no parameter '{key}' (it accepts: {accepted})")
            continue
        if OmegaConf.is_missing(node, key):
            continue
        try:
            value = OmegaConf.to_container(node, resolve=True)[key]
        except Exception:  # noqa: BLE001 — interpolations that need runtime context
            continue
        if key in hints and isinstance(value, dict) and "_target_" in value:
            problem = _target_problem(value, hints[key])
            if problem:
                problems.append(f"{where}: {problem} ('{target}' expects {_describe(hints[key])})")
            continue
        if key in hints and not _matches(value, hints[key]):
            problems.append(f"{where} = {value!r}: '{target}' expects {_describe(hints[key])}")
    return problems


# Values that fit their type but not their meaning; each reported with its key before anything is built.
_RANGES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("optimizer.lr", lambda v: v > 0, "a learning rate > 0"),
    ("optimizer.weight_decay", lambda v: v >= 0, "a weight decay >= 0"),
    (
        "module.grad_clip",
        lambda v: v is None or v >= 0,
        "a max gradient norm > 0, or null / 0 for no clipping",
    ),
    ("data.batch_size", lambda v: v >= 1, "a batch size >= 1"),
    ("data.eval_batch_size", lambda v: v >= 1, "a batch size >= 1 (or null: data.batch_size)"),
    ("trainer.accumulate_grad_batches", lambda v: v >= 1, "micro-batches per step >= 1"),
)


def value_problems(cfg: DictConfig) -> list[str]:
    """Numbers out of their range (e.g. a negative learning rate), each naming its key."""
    problems = []
    for key, ok, wanted in _RANGES:
        try:
            value = OmegaConf.select(cfg, key, throw_on_missing=False)
        except Exception:  # noqa: BLE001 — an interpolation that needs runtime context
            continue
        if value is None or isinstance(value, bool) or not isinstance(value, int | float):
            continue  # absent (the default), or a type problem reported by the node's check
        if not ok(value):
            problems.append(f"{key} = {value!r}: expected {wanted}")
    return problems


def data_root_problems(cfg: DictConfig) -> list[str]:
    """An on-disk dataset whose ``data.dataset.root`` is not a folder (before a ViT-L is built)."""
    from mtl.data.base import require_root

    target = OmegaConf.select(cfg, "data.dataset._target_", default=None)
    if not target:
        return []
    try:
        require_root(str(target), OmegaConf.select(cfg, "data.dataset.root", default=None))
    except FileNotFoundError as err:
        return [str(err)]
    except Exception:  # noqa: BLE001 — an unresolvable interpolation: the dataset reports it itself
        return []
    return []


def check_config(cfg: DictConfig, groups: Sequence[str] | None = None) -> None:
    """Raises :class:`ConfigError` listing every problem in ``cfg``'s ``_target_`` nodes.

    Args:
        cfg: the composed config.
        groups: top-level keys to check (default: all but ``hydra``).
    """
    problems: list[str] = []
    for key in groups or [k for k in cfg if k != "hydra"]:
        if key in cfg:
            for path, node in _nodes(cfg._get_node(key), str(key)):
                problems.extend(check_node(path, node))
    if groups is None:
        problems.extend(value_problems(cfg))
        problems.extend(data_root_problems(cfg))
    if problems:
        raise ConfigError("config errors (nothing was loaded or trained):\n  " + "\n  ".join(problems))
