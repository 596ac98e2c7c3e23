"""Bounded waits on the roles: no remote call the driver waits on may go without progress for
longer than run.stall_timeout_s. A wait that runs out says which role stalled, where its actor
runs (node, pid), in which call, and for how long; a heartbeat line every heartbeat_s says what
a slow wait is waiting for. (A frozen actor otherwise made the driver wait without a word for as
long as it stayed frozen: measured with SIGSTOP on a generator.)"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import ray

HEARTBEAT_S = 30.0


class Stalled(RuntimeError):
    """A remote call made no progress within its bound."""

    def __init__(self, owners: list[str], call: str, waited_s: float, indices: list[int]):
        self.owners, self.call, self.waited_s, self.indices = owners, call, waited_s, indices
        super().__init__(f"{', '.join(owners)} stalled: {call} made no progress for {waited_s:.0f} s "
                         "(run.stall_timeout_s)")


@dataclass
class Bound:
    """How long a wait may go without progress, and how often it says it is still waiting."""
    stall_s: float | None          # None: no bound
    heartbeat_s: float = HEARTBEAT_S


def locations(actors: list) -> list[str]:
    """'node <ip>, pid <pid>' of each live actor, in one round trip (asked when they are ready:
    a frozen actor cannot answer)."""
    here = [a.__ray_call__.remote(lambda self: (ray.util.get_node_ip_address(), os.getpid())) for a in actors]
    return [f"node {ip}, pid {pid}" for ip, pid in ray.get(here)]


def wait_all(refs: list, owners: list[str], call: str, bound: Bound, fetch: bool = True) -> list | None:
    """ray.get(refs), where refs[i] is a call on owners[i] (e.g. "generator 1 (node 10.0.0.2,
    pid 4242)"). Raises Stalled naming the owners of the refs still pending when none has
    finished for bound.stall_s; logs a heartbeat line every bound.heartbeat_s while waiting.
    fetch=False: only wait (the results stay in the object store)."""
    pending, index = list(refs), {ref: i for i, ref in enumerate(refs)}
    start = last = time.monotonic()
    while pending:
        left = bound.heartbeat_s if bound.stall_s is None else min(bound.heartbeat_s,
                                                                      bound.stall_s - (time.monotonic() - last))
        done, pending = ray.wait(pending, num_returns=len(pending), timeout=max(left, 0.0), fetch_local=False)
        now = time.monotonic()
        if done:
            last = now
        elif bound.stall_s is not None and now - last >= bound.stall_s:
            stuck = sorted(index[r] for r in pending)
            raise Stalled([owners[i] for i in stuck], call, now - last, stuck)
        elif now - last >= bound.heartbeat_s - 0.5:
            print(f"still waiting for {call} on {', '.join(owners[index[r]] for r in pending)} "
                  f"({now - start:.0f} s)", file=sys.stderr)
    return ray.get(refs) if fetch else None


def wait_any(pending: list, owners: list[str], call: str, bound: Bound, grace_s: float = 0.0) -> tuple[list, list]:
    """ray.wait for at least one of `pending` (owners[i] runs pending[i]); returns (done,
    still pending). Raises Stalled naming the owners of all of them when none finishes within
    bound.stall_s + grace_s (grace: an actor just restarted starts its engine first)."""
    start = time.monotonic()
    limit = None if bound.stall_s is None else bound.stall_s + grace_s
    while True:
        left = bound.heartbeat_s if limit is None else min(bound.heartbeat_s, limit - (time.monotonic() - start))
        done, rest = ray.wait(pending, num_returns=1, timeout=max(left, 0.0))
        if done:
            return done, rest
        waited = time.monotonic() - start
        if limit is not None and waited >= limit:
            raise Stalled(owners, call, waited, list(range(len(pending))))
        print(f"still waiting for {call} on {', '.join(owners)} ({waited:.0f} s)", file=sys.stderr)
