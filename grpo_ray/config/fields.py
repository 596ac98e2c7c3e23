"""The building blocks of the config sections: strict pydantic models whose unknown keys are
errors, fields with their bounds and descriptions, and the config error a validator raises."""
from __future__ import annotations

import copy
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError


def _number(value: Any) -> Any:
    """Float fields take ints (beta: 1) and YAML 1.1's dotless exponents, which it reads as text (1e-3)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _text(value: Any) -> Any:
    """Text fields take numbers as text (run.name: 123 in a file)."""
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


Float = Annotated[float, BeforeValidator(_number)]
Text = Annotated[str, BeforeValidator(_text)]


def _f(default: Any, doc: str = "", *, ge: Any = None, gt: Any = None, le: Any = None) -> Any:
    """A field with its description and bounds (ge: >=, gt: >, le: <=)."""
    kw = {"ge": ge, "gt": gt, "le": le, "description": doc or None}
    if isinstance(default, (list, dict)):
        return Field(default_factory=lambda: copy.deepcopy(default), **kw)
    return Field(default, **kw)


def fail(message: str, *keys: str) -> PydanticCustomError:
    """A config error of a validator; `keys` (dotted) are the keys whose sources the message names."""
    return PydanticCustomError("config", message, {"keys": list(keys)})


class Section(BaseModel):
    """Unknown keys are errors; no silent coercion (ints for floats and numbers for text aside)."""
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
