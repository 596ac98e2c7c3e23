"""The user's cache: what outlives a run and is shared by every run on this machine (the
warm-started built-in base, merged LoRA adapters, DeepSpeed's JIT-built ops). No heavy imports:
the driver and every role read it."""
from __future__ import annotations

import hashlib
import os
import sys


def cache_dir() -> str:
    """GRPO_RAY_CACHE_DIR, else $XDG_CACHE_HOME/grpo-ray, else ~/.cache/grpo-ray. Not beside the
    run directories: every run with another run.output_dir (each `ray job submit` with a fresh
    path, each benchmark) redid the ~2 minute warm start. Entries are keyed by everything that
    determines them and written atomically (warmstart.builtin_model)."""
    root = os.environ.get("GRPO_RAY_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "grpo-ray")
    return os.path.abspath(root)


def torch_extensions_dir(prefix: str | None = None, torch_version: str | None = None) -> str:
    """Where DeepSpeed JIT-builds its ops (on CPU, the shared-memory collective every learner rank
    loads), one folder per Python environment. torch's default folder is per Python version
    only, and its build.ninja names the environment's include paths: two virtual environments
    on one machine (a checkout and a fresh clone, a CI job) rebuilt the op in turn, ~35 s at
    the next learner start in each."""
    if torch_version is None:
        import torch

        torch_version = torch.__version__
    key = f"{os.path.realpath(prefix or sys.prefix)}|{torch_version}"
    name = f"py{sys.version_info.major}{sys.version_info.minor}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"
    return os.path.join(cache_dir(), "torch_extensions", name)
