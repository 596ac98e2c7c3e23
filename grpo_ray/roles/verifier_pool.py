"""The verifier pool: the Verifier role (grpo_ray.verifiers) as a Ray Serve deployment that
autoscales with load, and the client the driver uses to score a step's completions.

Why Serve: code checks cost 50 ms to seconds each and arrive in bursts (one per step), math
checks cost microseconds. Serve's autoscaler adds replicas while requests queue up and removes
them when idle (reward.pool: min/max_replicas, target_ongoing_requests), and schedules them on
nodes that offer the custom resource `verifier` when the cluster defines one (so CPU-only
verifier nodes can be added or autoscaled without touching the GPU nodes).

Failure handling: completions travel in chunks (reward.pool.chunk_size), all sent at once and
gathered concurrently. A chunk whose replica dies, or that is not answered within
request_timeout_s, is sent again, up to max_retries: a crashed replica costs a retry, never a
lost sample or a hung step. Only when the retries run out does the step fail, with the reason.
Slow answers cannot cause that: a replica stops comparing math answers when the request's budget
(request_budget) is spent and scores the rest 0 with the reason, since a resent request of the
same slow answers would time out the same way.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import ray

from ..core.score import Score  # not core.records: the replicas would import torch (~1 CPU-s each)
from ..verifiers import Verifier, options as verifier_options, registry

if TYPE_CHECKING:
    from ..config import RewardConfig, VerifierPoolConfig

log = logging.getLogger(__name__)

# A busy 2-core node answers Serve's queue-length probes late (default deadline 0.1 s): that only
# costs a warning per probe, but the warnings flood the log.
os.environ.setdefault("RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S", "1.0")


class VerifierReplica:
    """One replica: scores chunks in a thread pool, so a replica overlaps `threads` sandboxed
    checks (each mostly waits on its subprocess). A plain class; Serve wraps it.

    `options`: the built-in verifiers' options by section (registry.options(reward config));
    `task`: the default task (data.verifier), whose registry entry says whether the replica needs
    a sandbox."""

    def __init__(self, components: dict, options: dict[str, dict], threads: int,
                 task: str = registry.DEFAULT_TASK, budget_s: float | None = None):
        builtin = registry.get(task)
        if builtin is not None and builtin.needs_sandbox:
            from ..verifiers.code import NOT_ISOLATED
            from ..verifiers.sandbox import bwrap_works

            if not (options.get(builtin.section) or {}).get("allow_unsandboxed") and not bwrap_works():
                # fail at start, naming the node, not with every check scoring 0 in the steps;
                # rows with their own sandboxed task (the default being another) are refused per check
                raise RuntimeError(f"verifier replica on {os.uname().nodename}: {NOT_ISOLATED}")
        self.verifier = Verifier(components, options)
        self.budget_s = budget_s  # per request: answer before the client gives up and resends
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="verify")
        # start what the verifiers load lazily now, off the request path: math-verify's child
        # imports sympy (~1.4 s; a step that first met a LaTeX answer took 1.5 s to verify
        # instead of 0.01 s)
        for t in registry.BUILTIN.values():
            if t.warm_up:
                self.executor.submit(registry.load_function(t.warm_up))

    async def score(self, records: list[dict], responses: list[str]) -> tuple[list[Score], float]:
        """Scores, and the seconds spent computing them (the client sizes its chunks by it)."""
        loop = asyncio.get_running_loop()
        deadline = None if self.budget_s is None else time.monotonic() + self.budget_s
        return await loop.run_in_executor(self.executor, self._timed, records, responses, deadline)

    async def run_tools(self, calls: list[tuple[str, dict]]) -> list:
        """Environments' tool calls (envs/tools.py: (code, limits) each, batched by the env
        host): each run in the sandbox, on the same thread pool as the checks."""
        from ..envs.tools import ToolResult, execute

        loop = asyncio.get_running_loop()
        out = await asyncio.gather(*(loop.run_in_executor(self.executor, execute, code, limits)
                                     for code, limits in calls), return_exceptions=True)
        # a launch that failed (EAGAIN, EMFILE) fails its own call, not the batch's
        return [r if isinstance(r, ToolResult) else ToolResult("", f"error: the sandbox did not start "
                                                                   f"({type(r).__name__}: {r})") for r in out]

    def _timed(self, records: list[dict], responses: list[str], deadline: float | None) -> tuple[list[Score], float]:
        t = time.perf_counter()
        scores = self.verifier.score(records, responses, deadline)
        return scores, time.perf_counter() - t


def request_budget(reward: RewardConfig) -> float:
    """Seconds a replica may spend on one request's math comparisons: request_timeout_s less room
    for one more comparison (the one another thread holds the math-verify process for) and the
    round trip. Cheap math checks travel ~100 to a request; at 5 s per hostile answer, ~24 of them
    overran 120 s, and the resent request failed the same way until the step raised.
    User functions (reward.user.timeout_s) are bounded by the same deadline: each call gets
    min(its time limit, the budget left) and the ones the budget leaves no time for score 0 unrun,
    so a slow or hung user function never makes the pool resend the request."""
    timeout, per_check = reward.pool.request_timeout_s, reward.math.timeout_s
    return max(0.5 * timeout, timeout - 2 * per_check - 1.0)


def needs_verifier_nodes(mode: str, cluster: dict) -> bool:
    """Whether replicas require the custom resource `verifier` (reward.pool.verifier_nodes). In
    auto mode, when the cluster has some now: on an autoscaling cluster whose verifier nodes
    start from zero there is none at the start, and replicas that do not ask for it never make
    the autoscaler add one (they land on the head or a GPU node); `require` asks regardless."""
    return mode == "require" or (mode == "auto" and bool(cluster.get("verifier")))


def deployment_options(p: VerifierPoolConfig, env: dict, has_verifier_resource: bool) -> dict:
    """serve.deployment(...) options from reward.pool."""
    actor = {"num_cpus": p.replica_cpus, "runtime_env": {"env_vars": env}}
    if has_verifier_resource:
        actor["resources"] = {"verifier": p.verifier_resource}
    autoscaling = {"min_replicas": p.min_replicas, "initial_replicas": p.min_replicas,
                   "max_replicas": p.max_replicas, "target_ongoing_requests": p.target_ongoing_requests,
                   "upscale_delay_s": p.upscale_delay_s, "downscale_delay_s": p.downscale_delay_s,
                   # RL steps take seconds: Serve's defaults (10 s metrics, 30 s window) react too late
                   "metrics_interval_s": 0.5, "look_back_period_s": max(1.0, p.upscale_delay_s)}
    return dict(ray_actor_options=actor, max_ongoing_requests=p.max_ongoing_requests,
                autoscaling_config=autoscaling, health_check_period_s=2.0, health_check_timeout_s=30.0,
                # a replica has nothing to drain at the end of a run (the driver has its answers
                # or abandons them): Serve's default shutdown loop waited 2 s of every run's exit
                graceful_shutdown_wait_loop_s=0.1, graceful_shutdown_timeout_s=5.0,
                logging_config=QUIET)


PROBE = 8  # checks in the request that measures a check's cost, when chunk_size is auto
QUIET = {"log_level": "WARNING", "enable_access_log": False}  # not a line per request


class Scores(list):
    """Scores in request order (a list of Score), with the resends they took: the driver logs
    them per step as verify/retries."""
    retries: int = 0


@dataclass
class Pending:
    """Checks sent to the pool and not yet awaited (VerifierPool.submit)."""
    chunks: list            # (records, responses) per request
    sent: dict              # chunk index -> Serve's DeploymentResponse
    deadline: float         # time.monotonic() by which every answer is due
    head: list = field(default_factory=list)  # scores already in (the cost probe's), before the chunks'
    retries: int = 0        # resends the probe needed


class VerifierPool:
    """The driver's handle on the deployment: `score(records, responses)` (or `submit` now,
    `collect` later), `replicas()`, `shutdown()`.

    Built from the reward config section (`reward`: components, the built-ins' option sections,
    pool), the default task of rows without one (`task`: data.verifier), the actors' environment
    and a name for the Serve application (`name`: run.name)."""

    def __init__(self, reward: RewardConfig, env: dict, *, task: str = registry.DEFAULT_TASK, name: str = "run"):
        from ray import serve

        self.cfg = reward.pool
        self.app = f"grpo-verifier-{name}-{uuid.uuid4().hex[:6]}"
        self.check_s: float | None = None  # running mean of seconds per check, for auto chunks
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
        serve.start(proxy_location="Disabled", logging_config=QUIET)  # no HTTP: only our driver calls it
        options = deployment_options(self.cfg, env, needs_verifier_nodes(self.cfg.verifier_nodes,
                                                                        ray.cluster_resources()))
        app = serve.deployment(VerifierReplica, name="verifier", **options).bind(
            reward.components, verifier_options(reward), self.cfg.max_ongoing_requests, task,
            request_budget(reward))
        try:
            self.handle = serve.run(app, name=self.app, route_prefix=None)
        except BaseException:  # a failed start, or a stop (SIGTERM) while it deploys: no app left behind
            try:
                serve.delete(self.app, _blocking=False)
            except Exception as e:  # noqa: BLE001 - the error being raised is the one to say
                log.warning("verifier pool: could not delete %s: %s", self.app, e)
            raise

    def score(self, records: list[dict], responses: list[str], group_size: int = 1) -> Scores:
        """Scores for each response, in order: response i answers records[i // group_size]."""
        return self.collect([self.submit(records, responses, group_size)])

    def submit(self, records: list[dict], responses: list[str], group_size: int = 1) -> Pending:
        """Send the checks to the pool and return at once; collect() awaits them. The driver
        submits each generator's part the moment it is sampled, so scoring runs while the other
        generators still sample. records: one per group of `group_size` responses; each chunk
        refers to a group's record G times, which its request serialises once (pickle keeps one
        copy of an object referred to again)."""
        if len(records) * group_size != len(responses):
            raise ValueError(f"{len(records)} records x group_size {group_size} != {len(responses)} responses")
        records = [r for r in records for _ in range(group_size)]
        head, retries = [], 0
        if self.check_s is None and not self.cfg.chunk_size and len(records) > PROBE:
            # Cost unknown: one small request measures it before the rest is cut into chunks.
            # Without it, a first call of cheap math checks went out as 128 requests of 8, which
            # the autoscaler read as load: 3 more replicas started on a 2-core node and slowed
            # the next steps 2-5x while they booted.
            head = self.collect([self.submit(records[:PROBE], responses[:PROBE])])
            records, responses, retries = records[PROBE:], responses[PROBE:], head.retries
        n = self.chunk_size(len(records))
        chunks = [(records[i:i + n], responses[i:i + n]) for i in range(0, len(records), n)]
        return Pending(chunks, *self._send(chunks, range(len(chunks))), head=head, retries=retries)

    def collect(self, pending: list[Pending]) -> Scores:
        """The scores of submitted checks, in order; a chunk whose replica died or timed out is
        sent again, up to reward.pool.max_retries (Scores.retries counts the resends)."""
        out = Scores()
        out.retries = sum(p.retries for p in pending)
        for p in pending:
            out.retries += self._finish(p, out)
        return out

    def _finish(self, p: Pending, out: list) -> int:
        """Await one submission, appending its scores to `out`; returns the resends it took."""
        results: list = [None] * len(p.chunks)
        failed, reason = self._wait(p.sent, p.deadline, results)
        retries = 0
        for attempt in range(1, self.cfg.max_retries + 1):
            if not failed:
                break
            retries += len(failed)
            log.warning("verifier pool: resending %d request(s) (%s), attempt %d of %d",
                        len(failed), reason, attempt + 1, self.cfg.max_retries + 1)
            failed, reason = self._wait(*self._send(p.chunks, failed), results)
        if failed:
            raise RuntimeError(f"verifier pool {self.app}: {len(failed)} request(s) failed after "
                               f"{self.cfg.max_retries} retries ({reason}); raise reward.pool.max_retries "
                               f"or reward.pool.request_timeout_s")
        out.extend(p.head + [s for part in results for s in part])
        return retries

    def chunk_size(self, total: int) -> int:
        """reward.pool.chunk_size, or when it is 0 (auto), as many checks as take about
        target_request_s of work: a step of cheap math checks travels in one or two requests (each
        round trip costs milliseconds), a step of code checks in many small ones that the
        autoscaler sees queue up and spreads over replicas."""
        if self.cfg.chunk_size:
            return self.cfg.chunk_size
        if self.check_s is None:
            return PROBE  # cost unknown: assume code-like
        return int(min(max(self.cfg.target_request_s / max(self.check_s, 1e-6), 1), max(total, 1)))

    def _send(self, chunks: list, todo) -> tuple[dict, float]:
        """Send chunks[i] for i in todo; returns the responses by index and their deadline."""
        sent = {i: self.handle.score.remote(*chunks[i]) for i in todo}
        return sent, time.monotonic() + self.cfg.request_timeout_s

    def _wait(self, sent: dict, deadline: float, results: list) -> tuple[list[int], str]:
        """Wait for the sent chunks, results[i] for each answered one; returns (failed indices,
        last reason)."""
        failed, reason = [], ""
        for i, response in sent.items():
            try:
                results[i], busy = response.result(timeout_s=max(deadline - time.monotonic(), 0.001))
                per_check = busy / max(len(results[i]), 1)
                self.check_s = per_check if self.check_s is None else 0.8 * self.check_s + 0.2 * per_check
            except TimeoutError:
                response.cancel()
                failed.append(i)
                reason = f"no answer within {self.cfg.request_timeout_s:g}s"
            except Exception as e:  # a replica that died mid-request: RayActorError and kin
                failed.append(i)
                reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        return failed, reason

    def cancel(self, pending: list[Pending]) -> None:
        """Drop submitted checks whose scores are no longer wanted (samples thrown away)."""
        for p in pending:
            for response in p.sent.values():
                response.cancel()

    def replicas(self) -> dict[str, int]:
        """Replica counts by state, e.g. {"RUNNING": 3, "STARTING": 1}."""
        from ray import serve

        app = serve.status().applications.get(self.app)
        return dict(app.deployments["verifier"].replica_states) if app else {}

    def running(self) -> int:
        return self.replicas().get("RUNNING", 0)

    def shutdown(self) -> None:
        from ray import serve

        try:
            self.handle.shutdown()  # this process's router: its metrics task would outlive the app
            serve.delete(self.app)
        except Exception as e:  # the cluster may already be gone; nothing left to clean then
            log.warning("verifier pool: could not delete %s: %s", self.app, e)
