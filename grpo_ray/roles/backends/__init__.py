"""Training backends of the learner, by name (learner `backend=`). Importing this package, and
asking full_params_need_all_ranks, imports no training framework: a backend's module imports
its framework only when a backend is built."""
from __future__ import annotations

import importlib

from .base import BackendSettings, TrainingBackend

BACKENDS: dict[str, str] = {
    "deepspeed": "grpo_ray.roles.backends.deepspeed:DeepSpeedBackend",
}


def get_backend(name: str) -> type[TrainingBackend]:
    """The backend class registered as `name` (its module is imported now)."""
    try:
        target = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown learner backend {name!r}; known: {', '.join(sorted(BACKENDS))}") from None
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def full_params_need_all_ranks(backend: str, zero_stage: int = 0) -> bool:
    """Whether reading the full parameters (Learner.weight_buckets, Learner.save_pretrained) is a
    collective that every learner rank must join (DeepSpeed ZeRO-3), rather than rank 0 alone."""
    return get_backend(backend).full_params_need_all_ranks(zero_stage=zero_stage)


__all__ = ["BACKENDS", "BackendSettings", "TrainingBackend", "full_params_need_all_ranks", "get_backend"]
