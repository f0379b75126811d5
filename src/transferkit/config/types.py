"""Refuse a config value of the wrong type before any work, naming the key, the value and the type.

The types are not written twice: a node with `_target_` is checked against the type hints of
what it builds (a class's constructor, through the classes it passes **kwargs on to, or a
function), and a task's own keys against its settings (`transferkit.tasks.settings`). Values
Hydra cannot resolve yet, or hints no config value can be checked against, are left to the
object that takes them.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import os
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import PurePath
from typing import Any, Literal, Union

from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from transferkit.errors import ConfigError

_MISSING = object()  # a value that cannot be read yet (???, an interpolation Hydra resolves later)
_SEQUENCES = (list, tuple, Sequence)
_MAPPINGS = (dict, Mapping)
_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
_PLURALS = {bool: "true or false values", int: "integers", float: "numbers", str: "strings"}


@dataclasses.dataclass(frozen=True)
class Parameter:
    hint: Any
    owner: str  # who takes it, for the message: lightning.pytorch.Trainer, train.py
    prefix: str = ""  # a task's nested key: export.py's parity.count


def check_types(
    cfg: DictConfig,
    settings: type | None = None,
    task: str = "the task",
    passed_on: Mapping[str, Callable[..., Any]] | None = None,
) -> None:
    """Raise ConfigError for the first value whose type what takes it does not accept; the task's
    own keys are checked against `settings` (a dataclass), and the keys of a node in `passed_on`
    (`model.head`) also against the callable its builder hands them to as a dict or **kwargs."""
    _check_node(cfg, "", _parameters(settings, task) if settings else {}, passed_on or {})


def _check_node(
    node: DictConfig, path: str, parameters: dict[str, Parameter], passed_on: Mapping[str, Callable[..., Any]]
) -> None:
    for key in node:
        key = str(key)
        if key.startswith("_"):
            continue
        full_key, value = f"{path}{key}", _read(node, key)
        parameter = parameters.get(key)
        if parameter is not None and value is not _MISSING and not accepts(parameter.hint, value):
            raise ConfigError(
                f"{full_key}={_shown(value)}: expected {describe(parameter.hint)} "
                f"({parameter.owner}'s {parameter.prefix}{key}), got {_kind(value)}."
            )
        if isinstance(value, DictConfig):
            inner = _node_parameters(value, parameter, full_key)
            if full_key in passed_on:
                taker = passed_on[full_key]
                inner = {**_parameters(taker, f"{taker.__module__}.{taker.__qualname__}"), **inner}
            _check_node(value, f"{full_key}.", inner, passed_on)
        elif isinstance(value, ListConfig):
            for index, item in enumerate(_items(value)):
                if isinstance(item, DictConfig):
                    _check_node(
                        item, f"{full_key}[{index}].", _node_parameters(item, None, full_key), passed_on
                    )


def _read(node: DictConfig | ListConfig, key: str | int) -> Any:
    try:
        return node[key]
    except OmegaConfBaseException:  # ??? or an interpolation not resolvable here: its builder says
        return _MISSING


def _node_parameters(node: DictConfig, parameter: Parameter | None, path: str) -> dict[str, Parameter]:
    """What the node's keys are checked against: its `_target_`'s parameters, or those of the
    settings dataclass the key holding it names, else nothing (only nested targets)."""
    if "_target_" in node:
        target = node._get_node("_target_")._value()
        try:
            return _parameters(get_object(target), target) if isinstance(target, str) else {}
        except Exception:  # not importable (an extra not installed): building it says why
            return {}
    hint = parameter.hint if parameter else None
    settings = [arm for arm in _arms(hint) if dataclasses.is_dataclass(arm)]
    return _parameters(settings[0], parameter.owner, f"{path}.") if parameter and settings else {}


def _parameters(target: Any, owner: str, prefix: str = "") -> dict[str, Parameter]:
    """Named parameters and their type hints: a dataclass's fields; a class's constructor and,
    while it passes **kwargs on, its bases' constructors; a function's arguments."""
    if dataclasses.is_dataclass(target):
        return {k: Parameter(h, owner, prefix) for k, h in _hints(target).items()}
    functions = (
        [c.__init__ for c in target.__mro__ if "__init__" in vars(c)]
        if isinstance(target, type)
        else [target]
    )
    found: dict[str, Parameter] = {}
    for function in functions:
        try:
            signature = inspect.signature(function)
        except (TypeError, ValueError):
            break
        hints = _hints(function)
        for name, p in signature.parameters.items():
            if name in hints and name not in found and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                hint = hints[name] | None if p.default is None else hints[name]  # `x: int = None`
                found[name] = Parameter(hint, owner)
        if not any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
            break
    return found


def _hints(target: Any) -> dict[str, Any]:
    """Resolved type hints; one by one where some name only exists for type checkers."""
    try:
        return typing.get_type_hints(target)
    except Exception:
        pass
    namespace = getattr(target, "__globals__", None) or vars(inspect.getmodule(target) or object)
    hints = {}
    for name, annotation in getattr(target, "__annotations__", {}).items():
        try:
            hints[name] = eval(annotation, dict(namespace)) if isinstance(annotation, str) else annotation
        except Exception:
            continue
    return hints


def _arms(hint: Any) -> tuple[Any, ...]:
    return typing.get_args(hint) if typing.get_origin(hint) in (Union, types.UnionType) else (hint,)


def accepts(hint: Any, value: Any) -> bool:
    """Whether a config value can be what `hint` asks for. A node with `_target_` builds an
    object of a type not known here, and a hint with no meaning for config values accepts all."""
    if isinstance(value, DictConfig) and "_target_" in value:
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return any(accepts(arm, value) for arm in args)
    if origin is Literal:
        return any(type(value) is type(choice) and value == choice for choice in args)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is type(None):
        return value is None
    if origin in _SEQUENCES or hint in _SEQUENCES:
        items = isinstance(value, (ListConfig, list, tuple))
        return items and (not args or all(v is _MISSING or accepts(args[0], v) for v in _items(value)))
    if origin in _MAPPINGS or hint in _MAPPINGS:
        return isinstance(value, (DictConfig, dict))
    if isinstance(hint, type):
        if issubclass(hint, (PurePath, os.PathLike, enum.Enum)):  # built from a string
            return isinstance(value, str)
        if isinstance(value, DictConfig):  # its keys: checked against the class's parameters
            return True
        return isinstance(value, hint)  # torch.Tensor, Accelerator: no other config value is one
    return True  # Any, Callable, a TypeVar: not checkable here


def _items(value: Any) -> list[Any]:
    if not isinstance(value, ListConfig):
        return list(value)
    return [_read(value, index) for index in range(len(value))]


def describe(hint: Any) -> str:
    """A type as a user writes values: `an integer or null`, `one of onnx, torchscript`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        choices = [
            _shown(c) for arm in args if typing.get_origin(arm) is Literal for c in typing.get_args(arm)
        ]
        described = ["one of " + ", ".join(dict.fromkeys(choices))] if choices else []
        settable = [arm for arm in args if typing.get_origin(arm) is not Literal and _settable(arm)]
        described += [describe(arm) for arm in settable or args if typing.get_origin(arm) is not Literal]
        described = [d for d in dict.fromkeys(described) if d != "null"] + (
            ["null"] if type(None) in args else []
        )
        return described[0] if len(described) == 1 else ", ".join(described[:-1]) + " or " + described[-1]
    if origin is Literal:
        return "one of " + ", ".join(dict.fromkeys(_shown(choice) for choice in args))
    if hint in _NAMES:
        return _NAMES[hint]
    if hint is type(None):
        return "null"
    if origin in _SEQUENCES or hint in _SEQUENCES:
        return f"a list of {_PLURALS[args[0]]}" if args and args[0] in _PLURALS else "a list"
    if origin in _MAPPINGS or hint in _MAPPINGS or dataclasses.is_dataclass(hint):
        return "a mapping"
    if isinstance(hint, type) and issubclass(hint, (PurePath, os.PathLike)):
        return "a path"
    return f"a {getattr(hint, '__name__', hint)}"


def _settable(hint: Any) -> bool:
    """Whether a config value can be one (a Tensor or an Accelerator cannot: not worth naming)."""
    plain = not isinstance(hint, type) or issubclass(
        hint, (*_PLURALS, type(None), PurePath, os.PathLike, enum.Enum)
    )
    return plain or typing.get_origin(hint) is not None


def _shown(value: Any) -> str:
    if isinstance(value, (DictConfig, ListConfig)):
        try:
            value = OmegaConf.to_container(value, resolve=True)
        except OmegaConfBaseException:  # an item resolved later: shown as written
            value = OmegaConf.to_container(value, resolve=False)
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    return str(value)


def _kind(value: Any) -> str:
    if isinstance(value, ListConfig):
        return "a list"
    if isinstance(value, DictConfig):
        return "a mapping"
    return _NAMES.get(type(value), "null" if value is None else type(value).__name__)
