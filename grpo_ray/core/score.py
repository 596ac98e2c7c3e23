"""A verifier's verdict on one completion. Its own module, without torch, so that a user's
reward function can return one (`from grpo_ray.verifiers import Score`) without importing torch
into every process that runs user functions (verifiers/user.py)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Score:
    reward: float
    reason: str
    components: dict[str, float] = field(default_factory=dict)
    # component -> what went wrong, naming the function: a raise, a timeout or a non-finite value
    # (each scores 0); the driver counts them per step (reward/<name>/errors) and says the first
    errors: dict[str, str] = field(default_factory=dict)
