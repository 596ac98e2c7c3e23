"""reward.pool.mode=local: the verifier role in the driver's own process, behind the same
interface as the Serve pool (verifier_pool.VerifierPool: submit, collect, cancel, score).

The same VerifierReplica scores, on reward.pool.max_ongoing_requests threads, with the same
budgets and sandbox. What it leaves out: a Serve controller and a replica to start (with Serve's
import in the driver, ~5 CPU-s of a 2-core start-up: benchmarks/RESULTS.md), autoscaling,
replicas on `verifier` nodes, and replica restarts. For quick runs on one machine, as TRL and
verl score in-process. User reward functions still run in worker processes of their own
(verifiers/user.py), and code checks in the sandbox.
"""
from __future__ import annotations

import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..verifiers import options as verifier_options
from .verifier_pool import Scores, VerifierReplica, request_budget

if TYPE_CHECKING:
    from ..config import RewardConfig


@dataclass
class LocalPending:
    """Checks handed to the thread pool and not yet awaited (LocalVerifierPool.submit)."""
    future: Future          # -> (scores, seconds)
    deadline: float         # time.monotonic() by which the answer is due


class LocalVerifierPool:
    app = None  # no Serve application: environments' tool calls need the Serve pool (config.checks refuses)

    def __init__(self, reward: RewardConfig, *, task: str):
        self.cfg = reward.pool
        self.replica = VerifierReplica(reward.components, verifier_options(reward), self.cfg.max_ongoing_requests,
                                       task, request_budget(reward))

    def score(self, records: list[dict], responses: list[str], group_size: int = 1) -> Scores:
        """Scores for each response, in order: response i answers records[i // group_size]."""
        return self.collect([self.submit(records, responses, group_size)])

    def submit(self, records: list[dict], responses: list[str], group_size: int = 1) -> LocalPending:
        if len(records) * group_size != len(responses):
            raise ValueError(f"{len(records)} records x group_size {group_size} != {len(responses)} responses")
        rows = [r for r in records for _ in range(group_size)]
        now = time.monotonic()
        budget = now + self.replica.budget_s if self.replica.budget_s is not None else None
        return LocalPending(self.replica.executor.submit(self.replica._timed, rows, responses, budget),
                            now + self.cfg.request_timeout_s)

    def collect(self, pending: list[LocalPending]) -> Scores:
        """The scores of submitted checks, in order. Checks that outlive request_timeout_s fail
        the step, naming the key (there is no other replica to resend them to)."""
        out = Scores()
        for p in pending:
            try:
                out.extend(p.future.result(timeout=max(p.deadline - time.monotonic(), 0.001))[0])
            except FutureTimeout:
                p.future.cancel()
                raise RuntimeError(f"the verifiers (reward.pool.mode=local) gave no answer within "
                                   f"{self.cfg.request_timeout_s:g}s (reward.pool.request_timeout_s); raise it, or "
                                   "use reward.pool.mode=serve to run them on replicas") from None
        return out

    def cancel(self, pending: list[LocalPending]) -> None:
        """Drop submitted checks whose scores are no longer wanted (one already running finishes)."""
        for p in pending:
            p.future.cancel()

    def replicas(self) -> dict[str, int]:
        return {"RUNNING": 1}

    def running(self) -> int:
        return 1

    def shutdown(self) -> None:
        self.replica.executor.shutdown(wait=False, cancel_futures=True)


def start_verifier(reward: RewardConfig, env: dict, *, task: str, name: str):
    """The verifier role reward.pool.mode asks for: the Serve pool (blocks until its replicas
    run) or the local one."""
    if reward.pool.mode == "local":
        return LocalVerifierPool(reward, task=task)
    from .verifier_pool import VerifierPool

    return VerifierPool(reward, env, task=task, name=name)
