"""Environments for multi-turn, tool-using rollouts (agentic RL).

An environment is a plain class, one instance per trajectory, with a gym-like interface:

    from grpo_ray.envs import EnvStep

    class MyEnv:
        stop = ("```output",)          # optional: strings that end a model turn (besides EOS)
        def __init__(self, **options): ...           # env.options
        def reset(self, record: dict) -> str: ...    # text appended after the prompt ("" for none)
        def step(self, completion: str) -> EnvStep: ...  # the model's latest turn, as text

The generator samples a turn, hands its text to `step`, appends the observation's tokens (they
carry no loss) and samples the next turn, until `done`, env.max_turns or the context limit.
A `done` step with a reward gives the task reward; otherwise the row's verifier scores the
whole trajectory's text. Built-ins: `python` (a sandboxed Python tool) and `code_feedback`
(visible tests' failures fed back, full tests as the reward); see docs/environments.md.

Cheap to import (no torch, no Ray): the config imports it to check env.name.
"""
from __future__ import annotations

from dataclasses import dataclass

from .registry import BUILTIN, EnvError, EnvSpec, env_class, resolve_spec

__all__ = ["BUILTIN", "EnvError", "EnvSpec", "EnvStep", "env_class", "resolve_spec"]


@dataclass
class EnvStep:
    """What an environment returns for one model turn."""
    observation: str = ""        # appended to the context (no loss on its tokens); ignored when done
    reward: float | None = None  # with done: the task reward (None: the row's verifier scores)
    done: bool = False
    tool_calls: int = 0          # tools this step ran (env/tool_calls/mean)
    tool_errors: int = 0         # of which failed: raised, timed out, hit a limit (env/tool_errors/frac)
