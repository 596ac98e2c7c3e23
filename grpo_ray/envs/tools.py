"""Tools the environments call: Python in the sandbox, and the row's code checks.

Where they run: on the verifier pool's replicas (the autoscaling Ray Serve deployment, on CPU
nodes apart from the GPUs, with the sandbox's isolation: no network, uid 65534, rlimits, a wall
clock, bounded output), once an env host has `connect`ed to it; in this process otherwise (the
plain classes' tests, a local debug session). An environment of your own can call them too:
`from grpo_ray.envs.tools import run_python`.
"""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

_POOL: dict = {"app": None, "handle": None, "batcher": None}
_LOCK = threading.Lock()
# the pool may queue a call behind others: its own limit plus this much before it counts as lost
_POOL_SLACK_S = 30.0


@dataclass
class ToolResult:
    output: str               # stdout of a run that finished, else ""
    error: str | None = None  # why it failed: the exception's last line, a limit, a timeout
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


def connect(app: str | None) -> None:
    """Send tool calls to the verifier pool of that Serve application (None: run them here).
    Once per process (an env host connects when it starts)."""
    with _LOCK:
        _POOL.update(app=app, handle=None, batcher=_Batcher() if app else None)


def _handle():
    if _POOL["handle"] is None:
        from ray import serve

        _POOL["handle"] = serve.get_deployment_handle("verifier", app_name=_POOL["app"])
    return _POOL["handle"]


def run_python(code: str, *, timeout_s: float = 5.0, memory_mb: int = 256, max_output_bytes: int = 8192,
               allow_unsandboxed: bool = False, warm: bool = True) -> ToolResult:
    """Run `code` as a Python program in the sandbox; its stdout, or why it failed. warm: in a
    fork of a warm sandbox (verifiers/warm_sandbox.py), else in a fresh sandbox per call."""
    limits = dict(timeout_s=timeout_s, memory_mb=memory_mb, max_output_bytes=max_output_bytes,
                  allow_unsandboxed=allow_unsandboxed, warm=warm)
    if _POOL["app"] is None:
        return execute(code, limits)
    # the batch the call goes in answers it, with an error when the pool fails or passes the
    # batch's time; this bound only guards against a batcher that stopped
    start, bound = time.monotonic(), (timeout_s + _POOL_SLACK_S) * 8
    try:
        return _POOL["batcher"].call(code, limits).result(timeout=bound)
    except TimeoutError:
        return ToolResult("", f"the tool pool did not answer within {bound:g} s", time.monotonic() - start)


class _Batcher:
    """Tool calls from this process's threads (an env host runs a step per thread) go to the
    pool in batches: the calls that arrive while `max_inflight` batches are out go together in
    the next one, which a replica runs on its thread pool.

    Why: one Serve request per call, from 64 threads at once, overfilled the replicas'
    max_ongoing_requests, and Serve's router then retried with growing back-off: 9 calls/s from
    one replica instead of ~80 (benchmarks/RESULTS.md). Batches keep the requests in flight
    few, and the calls beyond them wait here, not in back-off."""

    def __init__(self, max_inflight: int = 4, max_batch: int = 16, replica_threads: int = 4):
        self.todo: queue.Queue = queue.Queue()
        self.slots = threading.Semaphore(max_inflight)
        self.max_batch, self.threads = max_batch, replica_threads
        threading.Thread(target=self._send, daemon=True, name="tool-batcher").start()

    def call(self, code: str, limits: dict) -> Future:
        done: Future = Future()
        self.todo.put((code, limits, done))
        return done

    def _send(self) -> None:
        while True:
            batch = [self.todo.get()]
            self.slots.acquire()  # wait for a free slot: meanwhile the calls queue up into this batch
            while len(batch) < self.max_batch and not self.todo.empty():
                batch.append(self.todo.get_nowait())
            threading.Thread(target=self._run, args=(batch,), daemon=True).start()

    def _run(self, batch: list) -> None:
        # a replica runs reward.pool.max_ongoing_requests (4 by default) calls at a time: a batch
        # of hung calls takes its limit once per round
        rounds = -(-len(batch) // self.threads)
        try:
            results = _handle().run_tools.remote([(c, lim) for c, lim, _ in batch]).result(
                timeout_s=max(lim["timeout_s"] for _, lim, _ in batch) * rounds + _POOL_SLACK_S)
        except Exception as e:  # noqa: BLE001 - a lost request fails its calls, not the host
            results = [ToolResult("", f"the tool pool failed: {type(e).__name__}: {str(e)[:200]}")] * len(batch)
        finally:
            self.slots.release()
        for (_, _, done), result in zip(batch, results):
            done.set_result(result)


def check_code(record: dict, response: str) -> tuple[float, str]:
    """(reward, reason) of the row's tests on `response` (the code verifier: its options are the
    run's reward.code), on the pool when connected."""
    record = {**record, "task": "code"}
    if _POOL["app"] is None:
        from ..verifiers import verify

        score = verify(record, response)
    else:
        scores, _ = _handle().score.remote([record], [response]).result(timeout_s=120.0)
        score = scores[0]
    return score.reward, score.reason


def execute(code: str, limits: dict) -> ToolResult:
    """Run the code here, in the sandbox (what a pool replica does with a tool call)."""
    from ..verifiers import sandbox, warm_sandbox
    from ..verifiers.code import NOT_ISOLATED

    start = time.monotonic()
    if not limits.get("allow_unsandboxed") and not sandbox.bwrap_works():
        return ToolResult("", NOT_ISOLATED.replace("reward.code.allow_unsandboxed", "env.options.allow_unsandboxed"))
    try:
        run = warm_sandbox.run_python if limits.get("warm", True) else sandbox.run_python
        res = run(code, timeout_s=limits["timeout_s"], memory_mb=limits["memory_mb"],
                  max_output_bytes=limits["max_output_bytes"])
    except ValueError as e:  # source too long
        return ToolResult("", str(e), time.monotonic() - start)
    return ToolResult(res.stdout if res.returncode == 0 and not res.killed_reason else "", _error(res), res.wall_s)


def _error(res) -> str | None:
    """The failure as a model would see it in a terminal: the exception's last line, or the limit."""
    if res.killed_reason:
        return {"output limit": "error: the output passed its size limit"}.get(
            res.killed_reason, f"error: {res.killed_reason}")
    if res.returncode == 0:
        return None
    lines = res.stderr.strip().splitlines()
    return lines[-1] if lines else f"error: exit code {res.returncode}"
