"""The table of built-in environments and the resolution of a user's `module:Class`.

Adding a built-in environment: write grpo_ray/envs/<name>.py with the class (reset/step, see
grpo_ray/envs/__init__.py) and add one entry to BUILTIN below. A config's env.name, or a row's
`env` field, names a built-in or a user class as "module:Class" (imported on the generator's
env hosts; the module must be importable there, e.g. shipped with `ray job submit
--working-dir`).
"""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field

_PKG = __package__  # grpo_ray.envs

BUILTIN: dict[str, str] = {
    "python": f"{_PKG}.python_tool:PythonTool",
    "code_feedback": f"{_PKG}.code_feedback:CodeFeedback",
}


class EnvError(ValueError):
    """An environment name that does not resolve to a usable class."""


@dataclass(frozen=True)
class EnvSpec:
    """Which environment a trajectory runs: a name (built-in or module:Class) and its options."""
    name: str
    options: dict = field(default_factory=dict, hash=False)


def env_class(name: str) -> type:
    """The class a name stands for; EnvError says what is wrong (unknown name, a module that does
    not import, a missing class, no reset/step)."""
    if not isinstance(name, str) or not name:
        raise EnvError(f"{name!r} is not an environment name: use {', '.join(BUILTIN)} or module:Class")
    spec = BUILTIN.get(name, name)
    if ":" not in spec:
        raise EnvError(f"unknown environment {name!r}: the built-ins are {', '.join(BUILTIN)}; a class of "
                       "your own is given as module:Class")
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's to see, with its reason
        raise EnvError(f"{name!r}: module {module_name!r} does not import ({type(e).__name__}: {e})") from None
    cls = getattr(module, attr, None)
    if cls is None:
        raise EnvError(f"{name!r}: module {module_name!r} has no {attr!r}")
    missing = [m for m in ("reset", "step") if not callable(getattr(cls, m, None))]
    if not inspect.isclass(cls) or missing:
        raise EnvError(f"{name!r} is not an environment class: it needs reset(record) -> str and "
                       f"step(completion) -> EnvStep (missing: {', '.join(missing) or 'a class'})")
    return cls


def resolve_spec(row_env, default: EnvSpec | None) -> EnvSpec | None:
    """The environment of a row: its own `env` field (a name, or {"name", "options"}), else the
    config's default (env.name with env.options). A row naming the default's class gets its options."""
    if row_env in (None, ""):
        return default
    if isinstance(row_env, dict):
        unknown = set(row_env) - {"name", "options"}
        if unknown or not isinstance(row_env.get("options", {}), dict):
            raise EnvError(f"a row's env {row_env!r}: expected a name or {{'name': ..., 'options': {{...}}}}")
        return EnvSpec(row_env.get("name", ""), dict(row_env.get("options", {})))
    if default is not None and row_env == default.name:
        return default
    return EnvSpec(row_env, {})
