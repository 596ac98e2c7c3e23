"""The env host role: a CPU actor that holds the environments of the trajectories being sampled
(one instance each, grpo_ray/envs) and runs their reset and step calls for the generators.

Why not in the generator: a user's environment is arbitrary Python (it may block, crash or
leak), and tool calls are sandboxed work for the verifier pool's CPU nodes; the generator's
process only samples, and keeps sampling the other trajectories while a call is out. A host
runs `env.concurrency` calls at once in threads (Ray's threaded actor): a call mostly waits on
its tool, which runs on the pool (envs/tools.py), not here.

Failures stay with their trajectory: a reset or step that raises, or returns the wrong type,
answers an `EnvReply` with the error, and the generator ends that trajectory with reward 0 and
the reason. A plain class: Ray wraps it where actors are created (actors.start_env_hosts).
"""
from __future__ import annotations

import inspect
import math
import threading
import time
import traceback
from dataclasses import dataclass

from ..envs import EnvSpec, EnvStep, env_class
from ..envs import tools


@dataclass
class EnvReply:
    """A host's answer to one reset or step: what the environment said, or why it failed."""
    step: EnvStep | None = None        # reset: the observation to append before turn 1
    stop: tuple[str, ...] = ()         # reset: the strings that end a model turn
    error: str | None = None


def _failure(what: str, e: BaseException) -> str:
    frame = traceback.extract_tb(e.__traceback__)[-1:] if e.__traceback__ else []
    where = f" ({frame[0].filename.rsplit('/', 1)[-1]}:{frame[0].lineno})" if frame else ""
    return f"{what} raised {type(e).__name__}: {str(e)[:300]}{where}"


def _stop_strings(env) -> tuple[str, ...]:
    """The environment's `stop`: a string or a sequence of strings (a lone string is one stop
    string, not one per character)."""
    stop = getattr(env, "stop", ()) or ()
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    if not all(isinstance(s, str) and s for s in stop):
        raise TypeError(f"stop must be a string or a tuple of non-empty strings, got {stop!r:.80}")
    return stop


def _check_step(out, who: str) -> str | None:
    """Why a step's return value is unusable (None: it is an EnvStep of the right field types)."""
    if not isinstance(out, EnvStep):
        return f"{who}.step returned {type(out).__name__}, not EnvStep"
    fields = {"observation": isinstance(out.observation, str),
              "reward": out.reward is None or (isinstance(out.reward, (int, float)) and not isinstance(out.reward, bool)
                                               and math.isfinite(out.reward)),
              "done": isinstance(out.done, (bool, int)),
              "tool_calls": isinstance(out.tool_calls, int) and out.tool_calls >= 0,
              "tool_errors": isinstance(out.tool_errors, int) and out.tool_errors >= 0}
    bad = [f"{k}={getattr(out, k)!r:.60}" for k, ok in fields.items() if not ok]
    return (f"{who}.step returned EnvStep({', '.join(bad)}): observation must be str, reward a finite number "
            "or None, done a bool, tool_calls and tool_errors counts") if bad else None


class EnvHost:
    def __init__(self, tool_pool: str | None = None, max_turns: int = 4, idle_s: float = 600.0):
        """tool_pool: the verifier pool's Serve application that runs the tools (None: here);
        max_turns: env.max_turns, given to environments whose constructor takes `max_turns`;
        idle_s: an environment untouched that long is dropped (its trajectory's generator was
        restarted mid-rollout and will never close it)."""
        tools.connect(tool_pool)
        self.max_turns, self.idle_s = max_turns, idle_s
        self.envs: dict[str, object] = {}
        self.touched: dict[str, float] = {}
        self.lock = threading.Lock()

    def _make(self, spec: EnvSpec):
        cls = env_class(spec.name)
        options = dict(spec.options)
        if "max_turns" in inspect.signature(cls).parameters and "max_turns" not in options:
            options["max_turns"] = self.max_turns
        return cls(**options)

    def reset(self, items: list[tuple[str, EnvSpec, dict]]) -> list[EnvReply]:
        """A new environment for each (key, spec, record) and its reset: the text to append after
        the prompt, and its stop strings."""
        self._sweep()
        replies = []
        for key, spec, record in items:
            try:
                env = self._make(spec)
                text = env.reset(dict(record))
                if not isinstance(text, str):
                    raise TypeError(f"reset returned {type(text).__name__}, not str")
                stop = _stop_strings(env)
                with self.lock:
                    self.envs[key], self.touched[key] = env, time.monotonic()
                replies.append(EnvReply(EnvStep(observation=text), stop))
            except Exception as e:  # noqa: BLE001 - the user's code: ends this trajectory, with why
                replies.append(EnvReply(error=_failure(f"{spec.name}: reset", e)))
        return replies

    def step(self, key: str, completion: str) -> EnvReply:
        env = self.envs.get(key)
        if env is None:
            return EnvReply(error=f"no environment for trajectory {key} on this host (restarted?)")
        self.touched[key] = time.monotonic()
        try:
            out = env.step(completion)
        except Exception as e:  # noqa: BLE001
            return EnvReply(error=_failure(f"{type(env).__name__}.step", e))
        problem = _check_step(out, type(env).__name__)
        return EnvReply(error=problem) if problem else EnvReply(out)

    def _sweep(self) -> None:
        now = time.monotonic()
        self.close([k for k, t in list(self.touched.items()) if now - t > self.idle_s])

    def close(self, keys: list[str]) -> None:
        """Drop the environments of finished trajectories (their close(), if they have one)."""
        with self.lock:
            envs = [self.envs.pop(k) for k in keys if k in self.envs]
            for k in keys:
                self.touched.pop(k, None)
        for env in envs:
            try:
                getattr(env, "close", lambda: None)()
            except Exception:  # noqa: BLE001 - nothing to do about a failing close
                pass

    def open(self) -> int:
        """Environments held (finished trajectories are closed: 0 between rollouts)."""
        return len(self.envs)
