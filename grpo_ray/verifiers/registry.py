"""The table of built-in tasks (verifiers): name -> score function, its options section, and what a
row needs. Everything that knows the built-in names asks here: verify() (grpo_ray.verifiers), the
dataset checks (data.datasets.task_problem), the verifier pool (which replicas need a sandbox) and
the config (data.verifier).

Adding a built-in verifier: write grpo_ray/verifiers/<name>.py with
`score_<name>(record, response, **options) -> Score`, and add one `Task` to BUILTIN below. Its
keyword options come from the reward config's section named by `Task.section` (reward.<section>)
when the config has one; a task without options needs none.

A row's task may also be a user function, "module:function" (fn(record, response) -> Score | float),
which resolve() imports.

Cheap to import: the score functions are named as "module:function" strings and imported on first
use, so the config can ask for builtin_names() without loading the sandbox or math-verify.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

_PKG = __package__  # grpo_ray.verifiers


@dataclass(frozen=True)
class Task:
    """One built-in verifier."""
    score: str                  # "module:function": fn(record, response, **options) -> Score
    section: str                # its keyword options: the reward config's reward.<section>
    needs_answer: bool = True   # rows need data.answer_key (else the answer is optional)
    fields: tuple[tuple[str, str], ...] = ()  # (field, what it holds): string fields a row needs
    needs_sandbox: bool = False  # runs untrusted code: a replica without a working bubblewrap
    #                              refuses to start unless reward.<section>.allow_unsandboxed
    takes_deadline: bool = False  # score() accepts deadline=time.monotonic() (the pool's request budget)
    warm_up: str | None = None  # "module:function" a verifier replica calls once when it starts


BUILTIN: dict[str, Task] = {
    "math": Task(f"{_PKG}.math:score_math", section="math", takes_deadline=True,
                 warm_up=f"{_PKG}.math:warm_up"),
    # a code row is scored by its tests: an answer (MBPP's and HumanEval's reference solution) is optional
    "code": Task(f"{_PKG}.code:score_code", section="code", needs_answer=False,
                 fields=(("tests", "Python asserts, or HumanEval's check(candidate)"),), needs_sandbox=True),
}

DEFAULT_TASK = "math"  # a record without a `task` field


def builtin_names() -> tuple[str, ...]:
    """The names a row's `task` (or data.verifier) may take besides 'module:function'."""
    return tuple(BUILTIN)


def sections() -> tuple[str, ...]:
    """The reward config sections that hold built-in verifiers' options (reward.math, reward.code)."""
    return tuple(dict.fromkeys(t.section for t in BUILTIN.values()))


def get(name) -> Task | None:
    """The built-in task of that name, or None. Raises TypeError for an unhashable name (verify()
    reports it as a verifier error, as any malformed row)."""
    return BUILTIN.get(name)


def is_user_spec(name) -> bool:
    """Whether `name` names a user function ('module:function') rather than a built-in."""
    return isinstance(name, str) and ":" in name


_LOADED: dict[str, Callable] = {}  # built-in score functions, once imported


def resolve(name: str) -> Callable[..., Any]:
    """The score function of a built-in task, or the function a 'module:function' spec names.
    Raises ValueError for a name that is neither, ImportError (ModuleNotFoundError) or
    AttributeError naming the spec when it does not resolve, TypeError when it is not callable."""
    task = get(name)
    if task is not None:
        if task.score not in _LOADED:
            _LOADED[task.score] = load_function(task.score)
        return _LOADED[task.score]
    if not is_user_spec(name):
        raise ValueError(unknown_task(name))
    return load_function(name)


def unknown_task(name) -> str:
    return f"unknown task {name!r}; known: {', '.join(BUILTIN)} or 'module:function'"


def load_function(spec: str) -> Callable[..., Any]:
    """The function 'package.module:function' names (imported now; Python caches the module)."""
    module, _, attr = spec.partition(":")
    try:
        mod = importlib.import_module(module)
    except ImportError as e:  # ModuleNotFoundError stays one: callers and tests match its name
        cls = ModuleNotFoundError if isinstance(e, ModuleNotFoundError) else ImportError
        raise cls(f"cannot import {module!r} for {spec!r}: {e}", name=e.name, path=e.path) from e
    try:
        fn = getattr(mod, attr)
    except AttributeError:
        raise AttributeError(f"module {module!r} has no attribute {attr!r} (from {spec!r})") from None
    if not callable(fn):
        raise TypeError(f"{spec!r} is a {type(fn).__name__}, not a function")
    return fn


def options(reward) -> dict[str, dict]:
    """Each built-in's keyword options from a reward config section (config.RewardConfig or any
    object with one attribute per section): {"math": {...}, "code": {...}}. A section the config
    lacks gives no options."""
    return {s: _as_dict(getattr(reward, s)) for s in sections() if getattr(reward, s, None) is not None}


def _as_dict(section) -> dict:
    """A config section's fields: a pydantic model's model_dump(), a dataclass's or plain object's vars()."""
    dump = getattr(section, "model_dump", None)
    return dict(dump()) if callable(dump) else dict(vars(section))


def needs_answer(task) -> bool:
    """Whether a row of that task must carry an answer (user functions: yes, as math)."""
    t = BUILTIN.get(task) if isinstance(task, str) else None
    return t.needs_answer if t is not None else True


def row_problem(record: dict) -> str | None:
    """Why no verifier could score this row (every completion would score 0), or None: an unknown
    task, a 'module:function' that does not resolve to a function, or a field a built-in needs."""
    task = record.get("task", DEFAULT_TASK)
    t = BUILTIN.get(task) if isinstance(task, str) else None
    if t is not None:
        for field, what in t.fields:
            if not isinstance(record.get(field), str):
                return f"a {task} row needs a '{field}' field ({what})"
        return None
    if not is_user_spec(task):
        return (f"task {task!r}: expected {', '.join(BUILTIN)}, or module:function "
                "(data.verifier for rows without one)")
    try:
        resolve(task)  # as verify() will
    except (ImportError, AttributeError, TypeError, ValueError) as e:
        return f"task {task!r}: {type(e).__name__}: {e}"
    return None
