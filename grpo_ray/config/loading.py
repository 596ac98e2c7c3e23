"""Loading: defaults <- YAML file <- dotted command-line overrides, with where each value came
from (for error messages and `grpo-ray config show`), then one validation of the result."""
from __future__ import annotations

import json
import os
import typing
from typing import Any, Callable, Literal

import yaml
from pydantic import BaseModel, ValidationError

from .errors import ConfigError, Path, Sources, config_error, field_info, split_key
from .sections import Config


class _UniqueKeys(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping: PyYAML keeps the last silently,
    so a second `algo:` block would drop every key of the first."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping (line {key_node.start_mark.line + 1}); "
                    "merge the two", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _key_lines(node: Any, prefix: Path, out: dict) -> None:
    """Line (1-based) of every key in a YAML mapping node, by key path."""
    if not isinstance(node, yaml.MappingNode):
        return
    for key_node, value_node in node.value:
        path = prefix + (str(key_node.value),)
        out[path] = key_node.start_mark.line + 1
        _key_lines(value_node, path, out)


def read_yaml(path: str) -> tuple[Any, dict]:
    """(the file's data, line of each key path)."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    with open(path) as f:
        loader = _UniqueKeys(f)
        try:
            node = loader.get_single_node()
            data = loader.construct_document(node) if node is not None else None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path!r} is not valid YAML: {e}") from None
        finally:
            loader.dispose()
    lines: dict = {}
    _key_lines(node, (), lines)
    return ({} if data is None else data), lines


def field_type(key: str) -> Any:
    """The annotation of a dotted config key ("run.name" -> str), or None for a key that is not
    a field (unknown keys, and keys inside a mapping such as reward.components.format)."""
    _, info = field_info(tuple(key.strip().split(".")))
    return None if info is None else info.annotation


def _is_text(typ: Any) -> bool:
    """str, or a Literal of strings (algo.aggregation)."""
    return typ is str or (typing.get_origin(typ) is Literal and all(isinstance(a, str) for a in typing.get_args(typ)))


def parse_override(text: str, typ: Any = None) -> tuple[str, Any]:
    """(dotted key, value). The value is YAML (numbers, lists, null), except for a key whose type
    `typ` is text: YAML read run.name=0123 as 83 and data.prompt_template=Q: {prompt} as a mapping,
    so text keys take the characters as typed; a quoted value is unquoted as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected dotted.key=value, e.g. algo.beta=0.01")
    key, raw = text.split("=", 1)
    if _is_text(typ) and not (len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\""):
        return key.strip(), raw
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({e})") from None
    return key.strip(), value


def _merge(base: dict, layer: dict, prefix: Path, source: Callable[[Path], str], sources: Sources) -> None:
    """Mappings merge key by key (reward.components.format=0.1 keeps `correct`); anything else replaces."""
    for k, v in layer.items():
        k = str(k)
        path = prefix + (k,)
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v, path, source, sources)
            continue
        sources.set(path, source(path))
        base[k] = {} if isinstance(v, dict) else v
        if isinstance(v, dict):
            _merge(base[k], v, path, source, sources)


def _nest(path: Path, value: Any) -> dict:
    out: Any = value
    for part in reversed(path):
        out = {part: out}
    return out


def resolve(path: str | None = None, overrides: typing.Sequence[str] = ()) -> tuple[Config, Sources]:
    """The config and where each value came from: defaults <- YAML file <- overrides, in order."""
    data, sources = Config().model_dump(), Sources()
    if path:
        layer, lines = read_yaml(path)
        if not isinstance(layer, dict):
            raise ConfigError(f"config ({path}): expected a mapping of sections, got {layer!r}")
        _merge(data, layer, (), lambda p: f"{path}:{lines[p]}" if p in lines else path, sources)
    for text in overrides:
        key, value = parse_override(text, field_type(text.split("=", 1)[0]))
        _merge(data, _nest(split_key(key), value), (), lambda p: "command line", sources)
    try:
        return Config.model_validate(data), sources
    except ValidationError as e:
        raise config_error(e, data, sources) from None


def load_config(path: str | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults <- YAML file <- overrides; every value checked, errors name the key and its source."""
    return resolve(path, overrides)[0]


def json_schema() -> dict:
    """The JSON Schema of the whole tree (types, bounds, allowed values, defaults, descriptions),
    for editors: completion and checking of configs/*.yaml."""
    schema = _bounds_as_keywords(Config.model_json_schema())
    schema["title"] = "grpo-ray config"
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


_KEYWORDS = {"ge": "minimum", "gt": "exclusiveMinimum", "le": "maximum", "lt": "exclusiveMaximum"}


def _bounds_as_keywords(node: Any) -> Any:
    """pydantic writes a nullable field's bounds as ge/gt/le (anyOf [number, null]): JSON Schema's names."""
    if isinstance(node, list):
        return [_bounds_as_keywords(n) for n in node]
    if not isinstance(node, dict):
        return node
    typed = "type" in node
    return {(_KEYWORDS.get(k, k) if typed else k): _bounds_as_keywords(v) for k, v in node.items()}


def _scalar(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=float("inf"), allow_unicode=True)
    text = text[:-len("...\n")] if text.endswith("\n...\n") else text
    text = text.strip()
    return json.dumps(value) if "\n" in text else text


def show(cfg: Config, sources: Sources) -> str:
    """The resolved config as YAML, each value with its source as a trailing comment."""
    lines: list[str] = []

    def emit(model: BaseModel, prefix: Path, indent: str) -> None:
        for name in type(model).model_fields:
            value, path = getattr(model, name), prefix + (name,)
            if isinstance(value, BaseModel):
                lines.append(f"{indent}{name}:")
                emit(value, path, indent + "  ")
            elif isinstance(value, dict) and value:
                lines.append(f"{indent}{name}:")
                lines.extend(f"{indent}  {_scalar(k)}: {_scalar(v)}  # {sources.of(path + (k,))}"
                             for k, v in value.items())
            else:
                lines.append(f"{indent}{name}: {_scalar(value)}  # {sources.of(path)}")

    emit(cfg, (), "")
    return "\n".join(lines) + "\n"
