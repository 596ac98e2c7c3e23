"""Where a run's start-up and shut-down time goes: a clock each role keeps in its own process, and
the driver's timeline of phases (benchmarks/bench_startup.py prints it; every run writes it to
timings.json and says its total in one line).

All times are epoch seconds (time.time()), so marks taken in different processes on one node line
up; the zero of a timeline is when the driver's process started.
"""
from __future__ import annotations

import atexit
import contextlib
import functools
import gc
import json
import os
import time


def process_started() -> float:
    """Epoch seconds at which this process started (the interpreter's own start-up included)."""
    try:
        import psutil  # a Ray dependency

        return psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - no /proc: count from now
        return time.time()


@contextlib.contextmanager
def gc_paused():
    """Python's cyclic collector off for a role's start-up: its imports and engine build allocate
    objects that live as long as the process, and each automatic collection would rescan them
    (benchmarks/RESULTS.md, sixteenth session). At a good end: one collection for what the
    start-up left as garbage, then the survivors frozen (later collections skip them; vLLM freezes
    its engine the same way). After an error nothing is frozen. Either way the collector's state
    is restored."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
        gc.collect()
        gc.freeze()
        # back in reach at exit, so the interpreter's last collection finalises them (nanobind
        # otherwise reports vLLM's objects as leaked when a process that built an engine exits)
        atexit.unregister(gc.unfreeze)
        atexit.register(gc.unfreeze)
    finally:
        if enabled:
            gc.enable()


def in_own_process(cls: type) -> type:
    """cls as a Ray actor class (an actor has a process of its own): a subclass of the same name
    whose constructor runs under gc_paused(). The role classes themselves leave the collector
    alone: built in a caller's process (a test, a notebook, a learner rank's hosted reference
    reloaded mid-run), freezing that process's heap is not theirs to do."""
    @functools.wraps(cls.__init__)
    def __init__(self, *args, **kwargs):
        with gc_paused():
            cls.__init__(self, *args, **kwargs)
    return type(cls.__name__, (cls,), {"__init__": __init__, "__doc__": cls.__doc__, "__module__": cls.__module__})


class StartupClock:
    """A role's marks: `process` (its worker process started), `init` (its constructor entered:
    Ray's worker start and the module imports lie between), then whatever the role marks, and
    `ready` (its constructor returned)."""

    def __init__(self):
        self.marks = {"process": process_started(), "init": time.time()}

    def mark(self, name: str) -> None:
        self.marks[name] = time.time()


class Timeline:
    """Named phases of one driver process, each (start, end) in epoch seconds; overlapping phases
    are fine (the actors start together). `zero`: the process start."""

    def __init__(self, zero: float | None = None):
        self.zero = process_started() if zero is None else zero
        self.phases: list[tuple[str, float, float]] = []

    @contextlib.contextmanager
    def phase(self, name: str):
        t = time.time()
        try:
            yield
        finally:
            self.add(name, t, time.time())

    def add(self, name: str, start: float, end: float) -> None:
        self.phases.append((name, start, end))

    def add_role(self, name: str, created: float, marks: dict[str, float]) -> None:
        """One actor's start as phases: from its creation call to its process, to its constructor,
        then between its own marks in order."""
        points = [("created", created)] + sorted(marks.items(), key=lambda kv: kv[1])
        labels = {"process": "worker process start", "init": "worker start, imports"}
        for (_, a), (label, b) in zip(points, points[1:]):
            self.add(f"{name}: {labels.get(label, label)}", a, b)

    def at(self, name: str) -> float | None:
        """Seconds from the zero to the end of the first phase called `name`."""
        return next((end - self.zero for n, _, end in self.phases if n == name), None)

    def rows(self) -> list[dict]:
        return [{"phase": n, "start_s": round(a - self.zero, 3), "seconds": round(b - a, 3)}
                for n, a, b in sorted(self.phases, key=lambda p: p[1])]

    def table(self) -> str:
        lines = [f"{'phase':<52}{'from s':>8}{'took s':>8}"]
        lines += [f"{r['phase'][:51]:<52}{r['start_s']:>8.2f}{r['seconds']:>8.2f}" for r in self.rows()]
        return "\n".join(lines)

    def save(self, path: str, **extra) -> None:
        """timings.json, written atomically: the phases and `extra` (e.g. time_to_first_step_s)."""
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump({**extra, "phases": self.rows()}, f, indent=1)
        os.replace(tmp, path)
