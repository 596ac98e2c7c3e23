"""One entry point for every reward: `verify(record, response) -> Score`.

The record's `task` field picks the verifier: "math", or a user function named by dotted path
("my_pkg.rewards:score", called as fn(record, response) -> Score | float). Bad input never raises:
it scores 0 with the reason, so one malformed row cannot kill a training step.
"""
from __future__ import annotations

import importlib

from ..records import Score
from .code import score_code
from .math import score_math

_BUILTIN = {"math": score_math, "code": score_code}


def _user_verifier(spec: str):
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def verify(record: dict, response: str) -> Score:
    if not isinstance(record, dict):
        return Score(0.0, f"record is {type(record).__name__}, expected a dict")
    if not isinstance(response, str):
        return Score(0.0, f"response is {type(response).__name__}, expected str")
    if not response.strip():
        return Score(0.0, "empty response")
    task = record.get("task", "math")
    try:
        if task in _BUILTIN:
            return _BUILTIN[task](record, response)
        if isinstance(task, str) and ":" in task:
            out = _user_verifier(task)(record, response)
            return out if isinstance(out, Score) else Score(float(out), "user verifier")
    except Exception as e:  # a verifier bug must not kill the step; the reason says what broke
        return Score(0.0, f"verifier error: {type(e).__name__}: {e}")
    return Score(0.0, f"unknown task {task!r}; known: {', '.join(_BUILTIN)} or 'module:function'")


class Verifier:
    """Verifier role: scores a batch of (record, response) pairs. A plain class; Ray wraps it."""

    def score(self, records: list[dict], responses: list[str]) -> list[Score]:
        return [verify(r, t) for r, t in zip(records, responses)]
