"""One entry point for every reward: `verify(record, response) -> Score`.

The record's `task` field picks the verifier: a built-in of the table in registry.py ("math",
"code"), or a user function named by dotted path ("my_pkg.rewards:score", called as
fn(record, response) -> Score | float). Bad input never raises: it scores 0 with the reason, so one
malformed row cannot kill a training step.

Multi-faceted rewards: `combine(record, response, weights)` is the weighted sum of named
components: "correct" (the task's verifier above), "format" (the example below), or any
"module:function". Each component's score is kept in Score.components so the driver logs
reward/<name>/mean separately, which is how reward hacking of one facet shows up.

User functions run under a time limit (reward.user.timeout_s; user.py: a worker process killed
on a timeout). A component that raises, times out or returns NaN/inf scores 0; Score.errors
keeps what went wrong, naming the function, so the driver counts it (reward/<name>/errors), says
the first and stops a run whose component fails on every completion of a step.
"""
from __future__ import annotations

import math as math_  # `math` becomes the math verifier's submodule once it is imported
import re

from ..core.score import Score
from . import registry
from . import user as user_fns

USER = "user"  # the options section of the user functions: {"timeout_s": ...} (reward.user)


def _known() -> tuple[str, ...]:
    return (*registry.sections(), USER)


def options(reward) -> dict[str, dict]:
    """The verifiers' options by section from the reward config: the built-ins' (registry.options)
    and the user functions' time limit (reward.user)."""
    out = registry.options(reward)
    if getattr(reward, USER, None) is not None:
        out[USER] = registry._as_dict(getattr(reward, USER))
    return out


def _sections(options: dict | None, keywords: dict) -> dict[str, dict]:
    """Options by section: `options` ({"math": {...}}) updated by the keyword form (math={...});
    an unknown section name is a TypeError, as an unknown keyword argument was."""
    if not keywords:
        if not options:
            return {}
        if options.keys() <= set(_known()):
            return options
    unknown = [k for k in (options or {}).keys() | keywords.keys() if k not in _known()]
    if unknown:
        raise TypeError(f"unknown verifier option section(s) {', '.join(map(repr, sorted(unknown)))}; "
                        f"known: {', '.join(_known())}")
    return {**(options or {}), **keywords}


def verify(record: dict, response: str, options: dict[str, dict] | None = None, **sections: dict | None) -> Score:
    """Score one response. `options` maps a built-in's options section (registry.Task.section, the
    reward config's reward.<section>) to its score function's keyword options, e.g.
    {"math": {"extraction": ..., "timeout_s": ...}, "code": {"timeout_s": ..., "memory_mb": ...,
    "partial_credit": ...}, "user": {"timeout_s": ..., "deadline": ...}}; the same may be given as
    keywords: verify(rec, text, code={...}). A built-in's or user function's failure (a raise, a
    timeout) is in Score.errors, keyed by the task."""
    options = _sections(options, sections)
    if not isinstance(record, dict):
        return Score(0.0, f"record is {type(record).__name__}, expected a dict")
    if not isinstance(response, str):
        return Score(0.0, f"response is {type(response).__name__}, expected str")
    if not response.strip():
        return Score(0.0, "empty response")
    task = record.get("task", registry.DEFAULT_TASK)
    try:
        builtin = registry.get(task)  # inside the try: an unhashable task is a verifier error
        if builtin is not None:
            return registry.resolve(task)(record, response, **(options.get(builtin.section) or {}))
        if registry.is_user_spec(task):
            return user_score(task, record, response, options.get(USER))
    except Exception as e:  # a verifier bug must not kill the step; the reason says what broke
        return _failed(task, f"verifier error: {type(e).__name__}: {e}",
                       f"raised {type(e).__name__}: {e}")
    return Score(0.0, registry.unknown_task(task))


def user_score(spec: str, record: dict, response: str, limits: dict | None = None) -> Score:
    """A user function's score, called in a worker process under its time limit (`limits`: the
    user section, {"timeout_s": ..., "deadline": ...}). A raise, a timeout or a value that is not a
    finite number scores 0 with the reason and the error."""
    limits = limits or {}
    try:
        out = user_fns.call(spec, record, response, limits.get("timeout_s", user_fns.DEFAULT_TIMEOUT_S),
                            limits.get("deadline"))
    except user_fns.UserFunctionError as e:
        return _failed(spec, e.reason, str(e))
    try:
        return _finite(out, spec)
    except (TypeError, ValueError) as e:  # float() of something else
        return _failed(spec, f"verifier error: {type(e).__name__}: {e}",
                       f"returned {type(out).__name__} {str(out)[:60]!r}, not a number")


def _failed(name, reason: str, what: str) -> Score:
    """0 with the reason, and the error (what happened, naming the function) under its name."""
    sep = " " if what.startswith(("raised", "returned")) else ": "
    return Score(0.0, reason, errors={str(name): f"{name}{sep}{what}"})


def _finite(out, name: str) -> Score:
    """A user function's Score or number, as a Score; NaN or inf scores 0 with the reason (an
    error): one NaN reward would make its group's advantages, and then the whole update, NaN."""
    score = out if isinstance(out, Score) else Score(float(out), "user verifier")
    if not math_.isfinite(score.reward):
        what = f"returned {score.reward!r}, not a finite number"
        return _failed(name, f"verifier {name} {what}", what)
    return score


_FORMAT = re.compile(r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", re.DOTALL)


def format_reward(record: dict, response: str) -> Score:
    """1 for the DeepSeek-R1 template `<think>...</think><answer>...</answer>` and nothing else."""
    ok = isinstance(response, str) and bool(_FORMAT.match(response))
    return Score(1.0 if ok else 0.0, "format ok" if ok else "not <think>...</think><answer>...</answer>")


_COMPONENTS = {"correct": verify, "format": format_reward}


def combine(record: dict, response: str, weights: dict[str, float], options: dict | None = None) -> Score:
    """Weighted sum of the named components; the reason is the first component's. `options`
    (by section, as verify()'s: {"math": {...}, "code": {...}}) goes to verify() for the "correct"
    component."""
    parts = {}
    for name in weights:
        fn = _COMPONENTS.get(name)
        try:
            if name == "correct":
                parts[name] = _finite(verify(record, response, options), name)
            elif fn is not None:
                parts[name] = _finite(fn(record, response), name)
            else:  # a 'module:function' component, under its time limit
                parts[name] = user_score(name, record, response, (options or {}).get(USER))
        except Exception as e:  # as in verify(): a broken component scores 0, the step goes on
            parts[name] = _failed(name, f"verifier error in {name}: {type(e).__name__}: {e}",
                                  f"raised {type(e).__name__}: {e}")
    total = sum(weights[n] * parts[n].reward for n in weights)
    errors = {n: next(iter(p.errors.values())) for n, p in parts.items() if p.errors}  # by component
    return Score(total, next(iter(parts.values())).reason, {n: p.reward for n, p in parts.items()}, errors)


def check_components(weights: dict) -> None:
    """Config-time check: every key is a built-in component or a 'module:function'."""
    for name, w in weights.items():
        if name not in _COMPONENTS and ":" not in str(name):
            raise ValueError(f"reward.components key {name!r}: use one of {', '.join(_COMPONENTS)} "
                             f"or 'module:function'")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math_.isfinite(w):
            raise ValueError(f"reward.components.{name}={w!r}: the weight must be a finite number")
    if weights and all(w == 0 for w in weights.values()):
        raise ValueError(f"reward.components={weights}: every weight is 0, so no completion could earn a "
                         "reward; give one component (e.g. correct) a nonzero weight")


class Verifier:
    """Verifier role: scores a batch of (record, response) pairs. A plain class; Ray Serve runs it
    in its replicas (verifier_pool.VerifierReplica). `options`: each built-in's options by section,
    as verify()'s (or as keywords: Verifier(code={...}))."""

    def __init__(self, components: dict[str, float] | None = None, options: dict[str, dict] | None = None,
                 **sections: dict | None):
        self.components = {n: w for n, w in (components or {"correct": 1.0}).items() if w != 0}
        self.options = _sections(options, sections)

    def score(self, records: list[dict], responses: list[str], deadline: float | None = None) -> list[Score]:
        """`deadline` (time.monotonic()) bounds the checks of the built-ins that take one
        (registry.Task.takes_deadline: the math comparisons, score_math): an answer that meets it
        unchecked scores 0 with the reason, so the request still answers in time. It bounds the
        user functions' calls too: each within min(reward.user.timeout_s, the time left)."""
        options = self.options
        if deadline is not None:
            timed = [t.section for t in registry.BUILTIN.values() if t.takes_deadline] + [USER]
            options = {**options, **{s: {**(options.get(s) or {}), "deadline": deadline} for s in timed}}
        return [combine(r, t, self.components, options) for r, t in zip(records, responses)]
