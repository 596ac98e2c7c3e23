"""The table of built-in tasks (verifiers): name -> score function and its options section.
(Skeleton: filled in by the registries change of issue 22.)"""
from __future__ import annotations

BUILTIN_NAMES = ("math", "code")


def builtin_names() -> tuple[str, ...]:
    """The names a row's `task` (or data.verifier) may take besides 'module:function'."""
    return BUILTIN_NAMES
