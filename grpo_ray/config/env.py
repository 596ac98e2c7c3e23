"""The env section: multi-turn rollouts with an environment (grpo_ray/envs)."""
from __future__ import annotations

from typing import Any

from pydantic import field_validator, model_validator

from .fields import Float, Section, Text, _f, fail


class EnvConfig(Section):
    """Multi-turn, tool-using rollouts: the environment each trajectory runs (none: single-turn)."""
    name: Text = _f("", "python (a sandboxed Python tool), code_feedback (visible tests fed back), or module:Class "
                        "of your own; empty = single-turn rollouts. A row may name its own in an `env` field")
    options: dict[str, Any] = _f({}, "keyword arguments of the environment's class")
    max_turns: int = _f(4, "model turns per trajectory at most", ge=1)
    turn_tokens: int = _f(0, "tokens per model turn at most; 0 = rollout.max_new_tokens (the whole trajectory "
                             "after the prompt, observations included, is held to rollout.max_new_tokens)", ge=0)
    hosts: int = _f(1, "CPU actors that run the environments' reset/step (tool calls go on to the sandbox pool)",
                    ge=1)
    host_cpus: Float = _f(0.1, "CPUs each env host asks Ray for", gt=0.0)
    concurrency: int = _f(64, "env calls each host runs at once (threads: a call mostly waits on its tool)", ge=1)
    call_timeout_s: Float = _f(60.0, "a reset or step that takes longer ends its trajectory with reward 0", gt=0.0)

    @field_validator("name")
    @classmethod
    def _resolves(cls, name: str) -> str:
        if not name:
            return name
        from ..envs import EnvError, env_class

        try:
            env_class(name)
        except EnvError as e:
            raise fail(f"env.name={name!r}: {e}", "env.name") from None
        return name

    @model_validator(mode="after")
    def _options_need_name(self) -> EnvConfig:
        if self.options and not self.name:
            raise fail(f"env.options={self.options!r} without env.name: name the environment they are for",
                       "env.options", "env.name")
        return self
