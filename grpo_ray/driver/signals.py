"""SIGTERM and SIGINT during a run: `ray job stop`, Kubernetes and Slurm send SIGTERM, which
Ray's own handler turned into a C++ abort (exit 134) that left Ray processes behind."""
from __future__ import annotations

import contextlib
import signal
import threading


class Stopped(KeyboardInterrupt):
    """SIGTERM (`ray job stop`, Kubernetes, Slurm) or SIGINT during a run: raised in the main
    thread like Ctrl-C's KeyboardInterrupt, so that train()'s `finally` releases the actors and
    the placement group. Every save is atomic (temp folder + rename), so any point is a safe one
    to stop at: the newest complete checkpoint is what a resume finds. `where` (set by train())
    says where the run stopped and how to resume; the CLI exits 128 + signum."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.where = signum, ""


@contextlib.contextmanager
def stop_on_signals():
    """SIGTERM and SIGINT raise Stopped, once: while the actors are released a repeated SIGTERM is
    ignored (a job manager sends SIGKILL next if it will not wait), a second Ctrl-C interrupts
    the release. The previous handlers come back on exit. Only the main thread can set handlers.
    Set after ray.init: Ray's own SIGTERM handler exits from inside a call (a C++ abort, exit 134)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = []

    def handler(signum, frame):
        if not fired:
            fired.append(signum)
            raise Stopped(signum)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)
