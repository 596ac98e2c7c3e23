"""The generator fleet: the driver's one handle on the vLLM generator actors.

It owns what belongs to all of them together: the weight version they hold (the learner step
whose weights were last pushed; the one meaning of "version" in the code), the weight loads
queued on them and not yet awaited, and the stale-version retry: a generator that Ray
restarted after a crash comes back with the weights it started with, its part of a rollout
carries another version, and the fleet pushes the current weights (from the learner group)
and samples again, so that no sample from stale weights reaches the learner.

Sampling is streamed (`stream`): the caller sees each launch and each generator's part as it
arrives, so it can queue work behind the sampling (the reference pass) and score the parts
that finish first while the slowest generator still samples, without the fleet calling back
into the driver.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import ray

from ..core.records import Rollout
from .collective import GroupAddress
from .multiturn import EnvRollout
from .waiting import Bound, Stalled, locations, wait_all, wait_any

MAX_RESYNCS = 3  # pushes of the current weights before a rollout that keeps coming back stale fails


@dataclass(frozen=True)
class Sampling:
    """How to sample a rollout: n completions per prompt (the group size)."""
    n: int
    temperature: float
    max_new_tokens: int
    top_p: float = 1.0
    env: EnvRollout | None = None  # multi-turn: the env hosts and limits (env.name); None: one turn


@dataclass
class Launch:
    """Prompts sent to the generators, not awaited: one ObjectRef[Rollout] per generator, in
    prompt order, and the weight version every part must come from."""
    refs: list
    version: int
    prompts: list[str]
    sampling: Sampling
    seed: int
    records: list[dict] | None = None  # the prompts' rows (multi-turn: the environments are reset with them)


@dataclass
class Arrived:
    """One generator's part, sampled with the launch's weights (stale parts are not shown)."""
    index: int
    part: Rollout


@dataclass
class Sampled:
    """The whole rollout, every part from the launch's weights: the stream's last event."""
    rollout: Rollout


@dataclass(frozen=True)
class CollectiveSync:
    """sync.method=collective (roles/collective.py): how the fleet's weight-sync group is made."""
    tensor_parallel: int  # workers per generator: each is a member of the group
    backend: str          # nccl | gloo
    timeout_s: float


@dataclass
class Push:
    """A weight push, not yet awaited: each generator's load, and with a collective sync the
    learner's broadcast. A collective push's loads and broadcast are queued together once the
    generators are free to receive it (GeneratorFleet._start_broadcasts)."""
    version: int
    weights: ray.ObjectRef               # a ref to buckets, or to their layouts (collective)
    loads: list = field(default_factory=list)  # one ObjectRef per generator, once queued
    broadcast: ray.ObjectRef | None = None
    collective: bool = False


def split(items: list, parts: int) -> list[list]:
    """Contiguous, near-equal chunks (empty ones dropped)."""
    size, rem = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (i < rem)
        out.append(items[start:end])
        start = end
    return [c for c in out if c]


class GeneratorFleet:
    def __init__(self, actors: list, learners=None, bound: Bound | None = None, start_s: float = 0.0,
                 collective: CollectiveSync | None = None):
        """actors: the Generator actors; learners: the LearnerGroup the current weights come
        from when a restarted generator must be brought up to date (None: sampling only, as in
        `grpo-ray eval`, where every generator holds the model it started from). bound: how long
        a call may go without progress (run.stall_timeout_s) before the generators that made
        none are restarted; start_s: how long the engines took to start, added to the bound
        while a restarted one starts again. collective: pushes go by broadcast from the learners'
        rank 0 (sync.method=collective; form_group() makes the group)."""
        self.actors, self.learners = actors, learners
        self.bound, self.start_s = bound or Bound(None), start_s
        self.names = [f"generator {i}" for i in range(len(actors))]  # with node and pid once ready
        self.version = 0  # what every generator holds once the queued loads run
        self._loading: list[Push] = []  # weight pushes queued, not yet awaited
        self.collective, self._group, self._generation = collective, None, 0

    def __len__(self) -> int:
        return len(self.actors)

    # ------------------------------------------------------------ sampling
    def launch(self, prompts: list[str], sampling: Sampling, seed: int, records: list[dict] | None = None) -> Launch:
        """Split the prompts across the generators and start sampling; nothing waits. Prompt j's
        completions sample with seeds seed + j*n + k wherever it lands. Each generator runs
        the call after the weight loads queued on it, so it samples with `self.version`.
        records: the prompts' rows, which a multi-turn rollout's environments are reset with."""
        self._start_broadcasts()  # weights pushed by broadcast load before this rollout samples
        refs, offset = [], 0
        rows = records if sampling.env is not None else None
        for gen, chunk in zip(self.actors, split(prompts, len(self.actors))):
            refs.append(gen.generate.remote(chunk, n=sampling.n, temperature=sampling.temperature,
                                            max_new_tokens=sampling.max_new_tokens, top_p=sampling.top_p,
                                            seed=seed + offset * sampling.n, sent=time.time(),
                                            **({"records": rows[offset:offset + len(chunk)], "env": sampling.env}
                                               if rows is not None else {})))
            offset += len(chunk)
        return Launch(refs, self.version, list(prompts), sampling, seed, rows)

    def stream(self, prompts: list[str], sampling: Sampling, seed: int, first: Launch | None = None,
               records: list[dict] | None = None) -> Iterator[Launch | Arrived | Sampled]:
        """Sample with the current weights, as events: a Launch (again after each resync: what
        was queued behind the previous one is for stale samples), an Arrived per part sampled
        with the launch's weights, in the order they finish, and a last Sampled. `first`: a
        launch already made (rollout.asynchronous), taken as the first attempt, with its own
        version as the one expected. records: the prompts' rows (multi-turn rollouts)."""
        launch = first
        for attempt in range(MAX_RESYNCS + 1):
            if launch is None:
                launch = self.launch(prompts, sampling, seed, records)
                yield launch
            parts, waiting, grace = [None] * len(launch.refs), list(launch.refs), 0.0
            while waiting:
                try:
                    done, waiting = wait_any(waiting, [self.names[launch.refs.index(r)] for r in waiting],
                                             "generate", self.bound, grace)
                except Stalled as e:
                    self.restart([launch.refs.index(waiting[j]) for j in e.indices], e)
                    grace = self.start_s  # the retried call runs once the engine is up again
                    continue
                i = launch.refs.index(done[0])
                parts[i] = ray.get(done[0])
                if parts[i].weight_version == launch.version:
                    yield Arrived(i, parts[i])
            if all(p.weight_version == launch.version for p in parts):
                yield Sampled(Rollout.concat(parts))
                return
            if attempt < MAX_RESYNCS:
                print(f"generator weights at versions {sorted({p.weight_version for p in parts})}, expected "
                      f"{launch.version} (a restarted generator?): pushing the current weights (version "
                      f"{self.version}) and sampling again", file=sys.stderr)
                self.resync()
            launch = None
        raise RuntimeError(f"generators keep returning stale weight versions after {MAX_RESYNCS} weight pushes")

    def sample(self, prompts: list[str], sampling: Sampling, seed: int, first: Launch | None = None,
               records: list[dict] | None = None) -> Rollout:
        """stream() without the events: the rollout, every part from the current weights (or
        from `first`'s, when its parts all came from them)."""
        for event in self.stream(prompts, sampling, seed, first, records):
            if isinstance(event, Sampled):
                return event.rollout
        raise AssertionError("stream ended without a rollout")

    # ------------------------------------------------------------ weights
    def push(self, weights: ray.ObjectRef, version: int, broadcast: bool = False) -> None:
        """Queue the load of `weights` (a ref to the learner's buckets: each generator reads the
        one stored copy) on every generator, behind any rollout already queued there; from now
        on launches sample with `version`. Not awaited: see settle(). broadcast: `weights` holds
        the layouts of buckets the learners' rank 0 kept and sends by broadcast; the loads are
        queued with the broadcast, once the generators are free (the next settle, launch or
        wait_sampled)."""
        push = Push(version, weights, collective=broadcast)
        if not broadcast:
            push.loads = [g.update_weights.remote(weights, version) for g in self.actors]
        self._loading.append(push)
        self.version = version

    def _start_broadcasts(self) -> None:
        """Queue each pending collective push: every generator's receive and the learner's
        broadcast together, so the group's timeout is not spent waiting for a rollout to finish;
        with no group (one that failed, or a generator restarted since), through the object store."""
        for push in self._loading:
            if not push.collective or push.loads:
                continue
            if self._group is None:
                print(f"weight sync of version {push.version}: no weight-sync group (sync.method=collective) since "
                      "the last failure or restart; sending it through the object store", file=sys.stderr)
                push.weights, push.collective = self.learners.kept_buckets(), False
            push.loads = [g.update_weights.remote(push.weights, push.version) for g in self.actors]
            if push.collective:
                push.broadcast = self.learners.broadcast()

    def settle(self, keep_latest: bool = False) -> None:
        """Await the queued weight loads, raising any error they had. keep_latest leaves the
        newest push running: in sync mode it loads while the driver logs the step and sends
        the next prompts, in async mode behind the rollout sampling ahead (a generator runs its
        calls in order, so the next rollout still starts on the new weights); the next
        settle() awaits it."""
        self._start_broadcasts()
        newest = self._loading[-1:] if keep_latest else []
        older, self._loading = self._loading[:len(self._loading) - len(newest)], newest
        try:
            for push in older:
                self._await(push)
        except Stalled as e:  # a frozen load: restart it; resync() gives it the current weights
            self.restart(sorted(set(e.indices) & set(range(len(self.actors)))), e)
            self.resync()

    def _await(self, push: Push) -> None:
        """One push's loads. A broadcast that fails (the group's timeout): when every generator
        answered and some were restarted since the group formed (their load finds no group and
        loads nothing), the current weights go through the object store and a new group forms;
        otherwise the error names the generators that never took it (frozen, or gone)."""
        if push.broadcast is None:
            wait_all(push.loads, self.names, "update_weights (loading the new weights)", self.bound)
            return
        try:  # the group's timeout bounds the broadcast: a member that never arrives fails it
            wait_all([push.broadcast], ["learner rank 0"], "the weight broadcast", self.bound)
        except (ray.exceptions.RayError, Stalled) as e:
            self._group = None
            if isinstance(e, ray.exceptions.RayActorError):
                raise  # learner rank 0 died: the run stops with its resume hint (train.py)
            # a restarted generator answers once its engine is up again
            _, pending = ray.wait(push.loads, num_returns=len(push.loads), timeout=self.start_s + 5.0)
            answered = [i for i, ref in enumerate(push.loads) if ref not in pending and not _failed(ref)]
            restarted = [i for i in answered if ray.get(push.loads[i]) == 0]
            if restarted and not pending:
                print(f"the weight broadcast of version {push.version} failed: "
                      f"{', '.join(self.names[i] for i in restarted)} restarted since the weight-sync group formed; "
                      "pushing the current weights through the object store and forming a new group", file=sys.stderr)
                self.resync()
                return
            missing = [self.names[i] for i, ref in enumerate(push.loads) if ref in pending] or [
                self.names[i] for i in range(len(push.loads)) if i not in answered]
            raise RuntimeError(f"the weight sync of version {push.version} (sync.method=collective) did not reach "
                               f"{', '.join(missing) or 'every generator'} within sync.timeout_s="
                               f"{self.collective.timeout_s:g}: {_first_line(e)}") from e
        wait_all(push.loads, self.names, "update_weights (the weight broadcast)", self.bound)

    def form_group(self) -> bool:
        """Make a new weight-sync group of the learners' rank 0 and every generator worker (at
        start, and after a generator restart: the members of the old one are not all there).
        False, with a line saying why, when it does not form within sync.timeout_s: pushes then
        go through the object store until the next try."""
        c = self.collective
        self._group, self._generation = None, self._generation + 1
        host, port = self.learners.sync_address()
        address = GroupAddress(host, port, 1 + c.tensor_parallel * len(self.actors), c.backend, c.timeout_s,
                               self._generation)
        refs = [self.learners.join_sync_group(address)] + [
            g.join_sync_group.remote(address, 1 + i * c.tensor_parallel) for i, g in enumerate(self.actors)]
        try:
            wait_all(refs, ["learner rank 0"] + self.names, "joining the weight-sync group", Bound(c.timeout_s))
        except (Stalled, ray.exceptions.RayError) as e:
            print(f"the weight-sync group (sync.method=collective) did not form: {_first_line(e)}; weights go "
                  "through the object store until a generator restart makes it try again", file=sys.stderr)
            return False
        self._group = address
        return True

    def resync(self, version: int | None = None) -> None:
        """Every generator to the learners' current weights, awaited (a generator restart, a
        resume, a rollback). version: what to call them (default: the fleet's current)."""
        if self.learners is None:
            raise RuntimeError("a generator came back with other weights and this fleet has no learners to "
                               "take the current ones from")
        self.settle()
        self.push(self.learners.weight_buckets(), self.version if version is None else version)
        self.settle()
        if self.collective is not None:  # a restarted generator is in no group: make a new one
            self.form_group()

    def wait_sampled(self, launch: Launch) -> None:
        """Until every part of `launch` is sampled, without fetching them (async mode: the next
        rollout, before the new weights are loaded behind it). A generator that stalls is
        restarted; stream() then samples its part again with the current weights."""
        try:
            wait_all(launch.refs, self.names[:len(launch.refs)], "generate", self.bound, fetch=False)
        except Stalled as e:
            self.restart(e.indices, e)
        self._start_broadcasts()  # the generators are free: their loads of the weights pushed meanwhile

    def restart(self, indices: list[int], stalled: Stalled) -> None:
        """Kill the generators that stalled; Ray starts them again (resources.actor_restarts)
        and runs their pending call again, on the weights they start with, which the stale-
        version retry then replaces with the current ones."""
        for i in indices:
            print(f"{self.names[i]} stalled: {stalled.call} made no progress for {stalled.waited_s:.0f} s "
                  "(run.stall_timeout_s); restarting it, then sampling again with the current weights",
                  file=sys.stderr)
            ray.kill(self.actors[i], no_restart=False)
            self.names[i] = f"generator {i} (restarted)"
            self._group = None  # it comes back in no weight-sync group

    def close(self, timeout_s: float = 10.0) -> None:
        """Ask every generator to remove what it wrote on its node (best effort: a generator
        that does not answer in time is killed with its files left)."""
        try:
            ray.wait([g.close.remote() for g in self.actors], num_returns=len(self.actors), timeout=timeout_s)
        except Exception:  # noqa: BLE001 - dead actors or a cluster going away: nothing more to clean
            pass

    def ready(self) -> None:
        """Wait until every engine is up, then locate them."""
        ray.get([g.ready.remote() for g in self.actors])
        self.locate()

    def pad_id(self) -> int:
        """The model's padding id (Generator.pad_token_id), for the batches built from its rollouts."""
        return ray.get(self.actors[0].pad_token_id.remote())

    def locate(self) -> None:
        """Note where each generator runs, for the stall messages (the engines are up)."""
        self.names = [f"generator {i} ({at})" for i, at in enumerate(locations(self.actors))]


def _failed(ref) -> bool:
    try:
        ray.get(ref, timeout=0)
        return False
    except Exception:  # noqa: BLE001 - any error of the call: it did not load
        return True


def _first_line(e: BaseException) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    return lines[-1] if lines else type(e).__name__
