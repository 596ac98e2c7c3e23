"""Multi-turn sampling inside a generator (env.name set): each trajectory alternates model turns
and environment observations, and advances on its own.

The loop drives the vLLM engine a step at a time. A turn that ends (EOS, a stop string of its
environment, or the per-turn limit) goes to its env host as a call that is not awaited; the
engine keeps sampling the other trajectories meanwhile, and a trajectory whose observation comes
back is queued again with the observation's tokens appended. So no trajectory waits for a
batch-wide turn barrier, and tool time is on the critical path only when nothing is left to
sample (`Rollout.env_s`).

Token fidelity: the model's tokens are kept exactly as sampled, each turn's request is the
previous token ids plus the observation's (never the decoded text tokenised again, which drifts
from what the sampler's logprobs refer to); observation tokens get logprob 0 and are marked
(Trajectory.observations) so that they carry no loss.
"""
from __future__ import annotations

import time
import uuid
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field

from ..core.records import Trajectory
from ..envs import EnvSpec, EnvStep, resolve_spec
from .env_host import EnvReply

TURN_SEED_STRIDE = 10**15  # turn t of a completion samples with its seed + t * stride: distinct streams


@dataclass(frozen=True)
class EnvRollout:
    """What a generator needs to sample multi-turn: the env hosts (Ray actors, or EnvHost objects
    in this process) and the env section's limits."""
    hosts: tuple
    spec: EnvSpec | None          # env.name with env.options: the environment of rows without their own
    max_turns: int = 4
    turn_tokens: int = 0          # 0: the whole budget (max_new_tokens)
    call_timeout_s: float = 60.0


class _Calls:
    """Env calls on hosts that are Ray actors or plain objects (tests, no Ray), not awaited."""

    def __init__(self, hosts: tuple):
        self.hosts, self.remote = hosts, bool(hosts) and hasattr(hosts[0].step, "remote")
        self.pool = None if self.remote else ThreadPoolExecutor(max_workers=16, thread_name_prefix="env")

    def reset(self, by_host: dict[int, list], timeout: float) -> dict[int, list[EnvReply]]:
        """Each host's replies; a host that fails or does not answer within timeout gets an
        error for each of its trajectories."""
        if not self.remote:
            return {h: self.hosts[h].reset(items) for h, items in by_host.items()}
        import ray

        refs = {h: self.hosts[h].reset.remote(items) for h, items in by_host.items()}
        ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout)
        out = {}
        for h, ref in refs.items():
            try:
                out[h] = ray.get(ref, timeout=0)
            except Exception as e:  # noqa: BLE001 - a dead or stuck host ends its trajectories only
                why = "no answer within env.call_timeout_s" if isinstance(e, ray.exceptions.GetTimeoutError) else \
                    f"{type(e).__name__}: {str(e)[:200]}"
                out[h] = [EnvReply(error=f"the env host's reset failed ({why})")] * len(by_host[h])
        return out

    def step(self, host: int, key: str, completion: str):
        if self.remote:
            return self.hosts[host].step.remote(key, completion)
        return self.pool.submit(self.hosts[host].step, key, completion)

    def ready(self, handles: list, timeout: float | None) -> list:
        """The handles done within timeout (None: at least one, however long)."""
        if not handles:
            return []
        if self.remote:
            import ray

            done, rest = ray.wait(handles, num_returns=1, timeout=timeout)
            more, _ = ray.wait(rest, num_returns=len(rest), timeout=0) if done and rest else ([], rest)
            return done + more
        return list(futures_wait(handles, timeout=timeout, return_when=FIRST_COMPLETED).done)

    def result(self, handle) -> EnvReply:
        if self.remote:
            import ray

            return ray.get(handle)
        return handle.result()

    def close(self, by_host: dict[int, list[str]]) -> None:
        for h, keys in by_host.items():
            if self.remote:
                self.hosts[h].close.remote(keys)
            else:
                self.hosts[h].close(keys)
        if self.pool is not None:
            self.pool.shutdown(wait=False)


@dataclass
class _Traj:
    index: int
    key: str
    host: int
    spec: EnvSpec | None
    prompt_ids: list[int]
    seed: int | None
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    stop: tuple[str, ...] = ()
    truncated: bool = False
    done: bool = False
    info: Trajectory = field(default_factory=lambda: Trajectory(turns=0))


@dataclass
class TurnResult:
    """The trajectories of one generate call, in completion order (prompt j's at j*n .. j*n+n-1)."""
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    logprobs: list[list[float]]
    truncated: list[bool]
    trajectories: list[Trajectory]
    env_s: float


class TurnLoop:
    def __init__(self, llm, tokenizer, env: EnvRollout, *, temperature: float, top_p: float, max_new_tokens: int,
                 lora_request=None):
        self.llm, self.tok, self.env = llm, tokenizer, env
        self.temperature, self.top_p, self.budget = temperature, top_p, max_new_tokens
        self.lora_request = lora_request
        self.calls = _Calls(env.hosts)
        self.live: dict[str, _Traj] = {}   # vLLM request id -> trajectory
        self.waiting: dict = {}            # env call handle -> (trajectory, sent at)

    def run(self, prompts: list[str], records: list[dict], n: int, seed: int | None) -> TurnResult:
        self.trajs: list[_Traj] = []  # filled by _start before any reset: the finally closes what was made
        env_s, engine = 0.0, self.llm.llm_engine
        try:
            trajs = self._start(prompts, records, n, seed)
            while engine.has_unfinished_requests() or self.waiting:
                if engine.has_unfinished_requests():
                    for out in engine.step():
                        if out.finished:
                            self._end_turn(self.live.pop(out.request_id), out.outputs[0])
                    timeout = 0.0
                else:  # nothing to sample: the environments are the critical path
                    timeout = max(0.0, min(sent for _, sent in self.waiting.values())
                                  + self.env.call_timeout_s - time.monotonic())
                t = time.perf_counter()
                self._collect(timeout)
                env_s += (time.perf_counter() - t) if timeout else 0.0
        finally:  # also on an error: no request left in the engine for its next call
            if self.live:
                engine.abort_request(list(self.live))
            self.live.clear()
            self.waiting.clear()
            self.calls.close({h: [t.key for t in self.trajs if t.host == h and t.spec is not None]
                              for h in range(len(self.env.hosts))})
        return TurnResult([t.prompt_ids for t in trajs], [t.ids for t in trajs], [t.logprobs for t in trajs],
                          [t.truncated for t in trajs], [t.info for t in trajs], env_s)

    def _start(self, prompts: list[str], records: list[dict], n: int, seed: int | None) -> list[_Traj]:
        """One trajectory per completion, its environment reset on its host, its first turn queued."""
        run, hosts = uuid.uuid4().hex[:8], max(1, len(self.env.hosts))
        trajs = []
        for j, (prompt, record) in enumerate(zip(prompts, records)):
            spec = resolve_spec(record.get("env"), self.env.spec)
            ids = self.tok(prompt)["input_ids"]
            for k in range(n):
                i = j * n + k
                trajs.append(_Traj(i, f"{run}-{i}", i % hosts, spec, list(ids),
                                   None if seed is None else seed + i))
        self.trajs = trajs
        by_host: dict[int, list] = {}  # host -> [(trajectory, (key, spec, record))]
        for t in trajs:
            if t.spec is not None:
                by_host.setdefault(t.host, []).append((t, (t.key, t.spec, records[t.index // n])))
        replies = self.calls.reset({h: [item for _, item in pairs] for h, pairs in by_host.items()},
                                   self.env.call_timeout_s)
        for h, pairs in by_host.items():
            for (traj, _), reply in zip(pairs, replies[h]):
                if reply.error:
                    self._finish(traj, error=reply.error)
                else:
                    traj.stop = reply.stop
                    self._observe(traj, reply.step.observation)
        for t in trajs:
            if not t.done:
                self._queue_turn(t)
        return trajs

    def _queue_turn(self, t: _Traj) -> None:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        room = self.budget - len(t.ids)
        if room <= 0:  # the context is full
            t.truncated = True
            self._finish(t)
            return
        limit = min(room, self.env.turn_tokens or room) if t.spec is not None else room
        params = SamplingParams(n=1, temperature=self.temperature, top_p=self.top_p, max_tokens=limit, logprobs=0,
                                flat_logprobs=True, stop=list(t.stop) or None, detokenize=bool(t.stop),
                                seed=None if t.seed is None else t.seed + t.info.turns * TURN_SEED_STRIDE,
                                output_kind=RequestOutputKind.FINAL_ONLY)
        request_id = f"{t.key}-t{t.info.turns}"
        self.live[request_id] = t
        self.llm.llm_engine.add_request(request_id, self._render(t.prompt_ids + t.ids), params,
                                        lora_request=self.lora_request)

    def _render(self, ids: list[int]):
        """The engine's input for token ids, rendered as vLLM's own entry points do (a raw
        {"prompt_token_ids"} prompt works too, with a deprecation warning per process)."""
        engine = self.llm.llm_engine
        try:
            from vllm.renderers.inputs.preprocess import parse_model_prompt

            parsed = parse_model_prompt(engine.model_config, {"prompt_token_ids": ids})
            return engine.renderer.render_cmpl([parsed], engine.renderer.default_cmpl_tok_params)[0]
        except (ImportError, AttributeError):  # another vLLM: the raw prompt
            return {"prompt_token_ids": ids}

    def _end_turn(self, t: _Traj, out) -> None:
        """A model turn is sampled: keep its tokens and logprobs as they are, then ask the environment."""
        ids = list(out.token_ids)
        if list(out.logprobs.token_ids) != ids:
            raise RuntimeError("vLLM returned logprobs for other tokens than the sampled ones")
        t.ids += ids
        t.logprobs += list(out.logprobs.logprobs)
        t.info.turns += 1
        text = self.tok.decode(ids, skip_special_tokens=True)
        t.info.segments.append(("model", text))
        if len(t.ids) >= self.budget and out.finish_reason == "length":
            t.truncated = True  # the context is full: algo.overlong applies
            self._finish(t)
        elif t.spec is None:
            self._finish(t)
        else:
            self.waiting[self.calls.step(t.host, t.key, text)] = (t, time.monotonic())

    def _collect(self, timeout: float) -> None:
        """Take in the environments' replies that are ready (waiting up to timeout); end the
        trajectories whose call is overdue (env.call_timeout_s)."""
        for handle in self.calls.ready(list(self.waiting), timeout):
            t, _ = self.waiting.pop(handle)
            try:
                reply = self.calls.result(handle)
            except Exception as e:  # noqa: BLE001 - a host that died: this trajectory ends, the others go on
                reply = EnvReply(error=f"the env host failed: {type(e).__name__}: {str(e)[:200]}")
            self._on_reply(t, reply)
        now = time.monotonic()
        for handle, (t, sent) in list(self.waiting.items()):
            if now - sent > self.env.call_timeout_s:
                del self.waiting[handle]
                self._finish(t, error=f"the environment's step took longer than env.call_timeout_s="
                                      f"{self.env.call_timeout_s:g}")

    def _on_reply(self, t: _Traj, reply: EnvReply) -> None:
        if reply.error:
            self._finish(t, error=reply.error)
            return
        step: EnvStep = reply.step
        t.info.tool_calls += int(step.tool_calls)
        t.info.tool_errors += int(step.tool_errors)
        if step.done or t.info.turns >= self.env.max_turns:
            self._finish(t, reward=None if step.reward is None else float(step.reward))
            return
        self._observe(t, step.observation)
        if not t.done:
            self._queue_turn(t)

    def _observe(self, t: _Traj, text: str) -> None:
        """Append an observation's tokens (no loss); a context too full for another turn ends it."""
        if not text:
            return
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        room = self.budget - len(t.ids)
        start = len(t.ids)
        t.ids += ids[:room]
        t.logprobs += [0.0] * min(len(ids), room)
        if len(t.ids) > start:
            t.info.observations.append((start, len(t.ids)))
        t.info.segments.append(("env", text if len(ids) <= room else self.tok.decode(ids[:room])))
        if len(ids) >= room:
            t.truncated = True
            self._finish(t)

    def _finish(self, t: _Traj, reward: float | None = None, error: str | None = None) -> None:
        t.done, t.info.reward, t.info.error = True, reward, error
