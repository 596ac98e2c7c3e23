"""ConfigError, and pydantic's validation errors in words: every message names the dotted key,
the value, where the value came from (file:line, command line or default) and what is allowed;
an unknown key gets a did-you-mean."""
from __future__ import annotations

import difflib
import typing
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from .sections import Config

Path = typing.Tuple[str, ...]

_TYPES = {"int_type": "int", "float_type": "float", "string_type": "str", "bool_type": "bool",
          "list_type": "list", "dict_type": "mapping"}
_BOUNDS = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}


class ConfigError(ValueError):
    pass


class Sources(dict):
    """Where each value came from: key path (a tuple) -> 'file:line' or 'command line'. A path
    without an entry takes its closest listed parent's; the rest are defaults."""

    def of(self, path: Path) -> str:
        for n in range(len(path), 0, -1):
            if tuple(path[:n]) in self:
                return self[tuple(path[:n])]
        return "default"

    def set(self, path: Path, source: str) -> None:
        """`path` now holds a new value: what was recorded below it is gone."""
        for p in [p for p in self if p[:len(path)] == path]:
            del self[p]
        self[path] = source


def field_info(path: Path) -> tuple[Any, Any]:
    """(model class holding the last key, its FieldInfo) for a key path, or (None, None)."""
    model: Any = Config
    for i, part in enumerate(path):
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None, None
        info = model.model_fields[part]
        if i == len(path) - 1:
            return model, info
        model = info.annotation
    return None, None


def is_mapping_field(annotation: Any) -> bool:
    return typing.get_origin(annotation) is dict


def split_key(key: str) -> Path:
    """A dotted key as a key path. Below a mapping field the rest is one key, so a component
    named by its module path stays whole: reward.components.mypkg.rewards:fn ->
    ('reward', 'components', 'mypkg.rewards:fn')."""
    parts = key.strip().split(".")
    model: Any = Config
    for i, part in enumerate(parts[:-1]):
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            break
        model = model.model_fields[part].annotation
        if is_mapping_field(model):
            return tuple(parts[:i + 1]) + (".".join(parts[i + 1:]),)
    return tuple(parts)


def walk_loc(loc: tuple) -> tuple[Path, int | None, Any]:
    """pydantic's error location -> (key path, list index or None, the model class whose key set
    the last part falls outside of, if it does). Union-branch tags in the location are skipped."""
    model: Any = Config
    path: list[str] = []
    for part in loc:
        if isinstance(model, type) and issubclass(model, BaseModel):
            if part not in model.model_fields:
                return tuple(path) + (str(part),), None, model
            path.append(part)
            model = model.model_fields[part].annotation
        elif is_mapping_field(model) and isinstance(part, str):
            path.append(part)
            model = None
        elif isinstance(part, int):
            return tuple(path), part, None
    return tuple(path), None, None


def _leaf_keys(model: Any = Config, prefix: str = "") -> list[str]:
    out = []
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += _leaf_keys(ann, f"{prefix}{name}.")
        else:
            out.append(prefix + name)
    return out


def unknown_key(path: Path, model: Any, source: str) -> str:
    key, name, fields = ".".join(path), path[-1], list(model.model_fields)
    prefix = key[:len(key) - len(name)]
    close = difflib.get_close_matches(name, fields, n=1)
    if close:
        hint = f"; did you mean '{prefix}{close[0]}'?"
    else:
        elsewhere = [k for k in _leaf_keys() if k.rsplit(".", 1)[-1] == name]
        hint = f"; did you mean '{elsewhere[0]}'?" if elsewhere else f"; known keys: {', '.join(fields)}"
    return f"unknown config key '{key}' ({source}){hint}"


def _allowed(path: Path, value: Any) -> str:
    _, info = field_info(path)
    args = typing.get_args(info.annotation) if info is not None and typing.get_origin(info.annotation) is Literal \
        else ()
    if not args:
        return "not one of the allowed values"
    close = [a for a in map(str, args) if a.startswith(str(value))] or \
        difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
    return f"allowed values are {', '.join(map(repr, args))}" + (f"; did you mean {close[0]!r}?" if close else "")


def _doc(path: Path) -> str:
    _, info = field_info(path)
    return f" ({info.description})" if info is not None and info.description else ""


def _nullable(path: Path) -> bool:
    _, info = field_info(path)
    return info is not None and type(None) in typing.get_args(info.annotation)


def _what(err: dict, path: Path) -> str:
    """What is wrong and what is allowed."""
    kind, ctx, value = err["type"], err.get("ctx") or {}, err["input"]
    if kind == "literal_error":
        return _allowed(path, value)
    if kind in _TYPES:
        return f"expected {_TYPES[kind]}{' or null' if _nullable(path) else ''}, got {type(value).__name__}"
    if kind in _BOUNDS:
        bound = next(iter(ctx.values()))
        return f"must be {_BOUNDS[kind]} {bound}{_doc(path)}"
    if kind == "finite_number":
        return f"must be a finite number{_doc(path)}"
    if kind == "too_short":
        return f"expected at least {ctx.get('min_length')} item(s){_doc(path)}"
    return err["msg"]


def _get(data: Any, path: Path) -> Any:
    for part in path:
        data = data.get(part) if isinstance(data, dict) else None
    return data


def describe(err: dict, data: dict, sources: Sources) -> str:
    """One pydantic error as a config error message."""
    if err["type"] == "config":  # a validator's message names its keys and values already
        keys = (err.get("ctx") or {}).get("keys") or []
        where = "; ".join(f"{k}: {sources.of(split_key(k))}" for k in keys)
        return f"{err['msg']} [{where}]" if where else err["msg"]
    path, index, outside = walk_loc(err["loc"])
    key, source = ".".join(path) or "config", sources.of(path)
    if outside is not None:
        return unknown_key(path, outside, source)
    if err["type"] in ("model_type", "model_attributes_type"):
        return f"{key} ({source}): expected a mapping, got {err['input']!r}"
    if index is not None:
        return f"{key}={_get(data, path)!r} ({source}): item {index}: {_what(err, path)}"
    return f"{key}={err['input']!r} ({source}): {_what(err, path)}"


def config_error(exc: ValidationError, data: dict, sources: Sources) -> ConfigError:
    """All of a validation's errors, one a line."""
    seen: list[str] = []
    for err in exc.errors():
        msg = describe(err, data, sources)
        if msg not in seen:
            seen.append(msg)
    return ConfigError("\n".join(seen))
