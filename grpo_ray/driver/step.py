"""One GRPO step and its phases, each a named call on the actors (OpenRLHF's and verl's drivers
split the same way):

    generate -> verify -> advantages -> reference logprobs -> learner update -> weight sync

(the reference pass itself is queued behind the sampling; its phase is the wait for it). The
generate and verify phases are in rollout.py, and hand the rest of the step one `Collected`.

train.py runs these steps in a loop and does what a run does between them (evaluate, checkpoint,
watch the KL, roll back, reset the reference).
"""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager

import torch

from ..config import Config, ConfigError, overlong_buffer
from ..core.algorithm import group_advantages, overlong_penalty
from ..core.metrics import advantage_variance, mismatch_by_generator, reward_stats
from ..core.records import Rollout, TrainBatch, padded_batch
from ..data.datasets import PromptSampler
from ..roles.actors import Roles, restart_reference
from ..roles.reference_host import ReferencePass
from ..roles.waiting import Stalled
from .evaluation import correctness
from .parity import PARITY
from .rollout import ENV_ERROR, Collected, InFlight, collect_ahead, collect_rollout


class PhaseTimer:
    def __init__(self, start: float | None = None):
        """start: when the step's time began (default now); the loop passes the moment the step
        before returned, so the driver's bookkeeping in between counts as overhead."""
        self.times: dict[str, float] = {}
        self._start = time.perf_counter() if start is None else start

    @contextmanager
    def __call__(self, name: str):
        """Time a phase; a phase entered again (dynamic sampling's extra rounds) adds up."""
        t = time.perf_counter()
        yield
        key = f"time/{name}"
        self.times[key] = self.times.get(key, 0.0) + time.perf_counter() - t

    def metrics(self) -> dict[str, float]:
        step = time.perf_counter() - self._start
        return {**self.times, "time/step": step, "time/overhead": step - sum(self.times.values())}


# ---------------------------------------------------------------- the step
def train_step(step: int, cfg: Config, roles: Roles, sampler: PromptSampler, pad_id: int,
               ahead: InFlight | None = None, started: float | None = None) -> tuple[dict, list, InFlight | None]:
    """One GRPO step; returns its metrics, a few samples for the spot-check files, and with
    rollout.asynchronous the next step's rollout, sampling while this step trains."""
    G, timer = cfg.algo.group_size, PhaseTimer(started)
    if cfg.rollout.asynchronous:  # generate (started last step) + verify; starts the next rollout
        got, ahead = collect_ahead(step, cfg, roles, sampler, timer, ahead)
    else:  # generate + verify; the reference pass is queued behind the sampling, beside verify
        got = collect_rollout(step, cfg, roles, sampler, timer, pad_id)
    rewards, shaping = shaped_rewards(cfg, got.rollout, got.scores)
    advantages = group_advantages(rewards, G, estimator=cfg.algo.estimator)
    batch = training_batch(cfg, got.rollout, advantages, pad_id)
    with timer("reference"):
        batch.ref_logprobs = reference_logprobs(roles, batch, got.ref_logprobs, cfg.algo.group_size)
        if ahead is not None and not ref_reset_due(cfg, step):  # a reset replaces the reference actor
            ahead.queue_reference(roles.reference, pad_id, cfg.algo.group_size)
    with timer("learner"):  # the generators' weight load is queued behind the update, not awaited
        update = roles.learners.update(batch, mini_batches=cfg.algo.mini_batches, aggregation=cfg.algo.aggregation,
                                       max_tokens=cfg.rollout.max_new_tokens, epochs=cfg.algo.ppo_epochs)
        roles.fleet.push(update.weights, version=step, broadcast=update.broadcast)
        stats, mismatch = roles.learners.results(update)
    if ahead is not None:  # the generators take new weights once the next rollout is sampled
        with timer("generate"):
            roles.fleet.wait_sampled(ahead.launch)
    with timer("sync"):  # the load runs while the driver logs this step (GeneratorFleet.settle)
        roles.fleet.settle(keep_latest=True)
    metrics = {"step": step, **rollout_metrics(got.rollout, rewards, advantages, G, got.scores),
               **env_metrics(got.rollout),
               **component_means(got.scores), REWARD_ERRORS: reward_errors(got.scores), **shaping, **got.stats, **stats,
               PARITY: mismatch_by_generator(mismatch, got.rollout.generators),
               "verify/retries": got.retries, **timer.metrics(),
               "time/generate_queued": got.rollout.queued_s,  # sync mode: the load's share of generate
               "time/generate_sampling": got.rollout.sample_s}  # the generators' busy time (async: hidden)
    return metrics, spot_samples(got, advantages, G, cfg.train.spot_check_samples), ahead


# ---------------------------------------------------------------- the phases
def training_batch(cfg: Config, rollout: Rollout, advantages: torch.Tensor, pad_id: int) -> TrainBatch:
    """The padded batch the reference and the learner see (records.padded_batch)."""
    batch = padded_batch([rollout], pad_id, advantages)
    if cfg.algo.overlong == "mask":  # DAPO overlong filtering: truncated answers teach nothing
        batch.response_mask[torch.tensor(rollout.truncated, dtype=torch.bool)] = 0.0
    return batch


def reference_logprobs(roles: Roles, batch: TrainBatch, queued: ReferencePass | None,
                       group: int) -> torch.Tensor | None:
    """ref_logprobs [B, T]: the pass queued behind the rollout's sampling, or run now; None
    without a reference (the loss then has no KL term and the learner logs no kl).
    The queued pass saw the response mask before overlong masking, hence the product. A
    reference actor that stalls (run.stall_timeout_s) is restarted and the pass run again
    (one in the learner ranks is not: the run stops, as for a stalled learner)."""
    if roles.reference is None:
        return None
    for attempt in range(2):
        running = roles.reference.batch_pass(batch, group) if queued is None else queued
        try:
            out = running.result(roles.bound)
            return out if queued is None else out * batch.response_mask
        except Stalled as e:
            if attempt or not roles.reference.restartable:
                raise
            print(f"{e}; restarting it and running the pass again", file=sys.stderr)
            restart_reference(roles)
            queued = None


def spot_samples(got: Collected, advantages: torch.Tensor, G: int, n: int) -> list[dict]:
    """Two completions from each of the first groups (n in all), for reading by hand."""
    records, rollout, scores = got.records, got.rollout, got.scores
    rows = [g * G + k for g in range(len(records)) for k in range(min(2, G))][:n]
    return [{"prompt": records[i // G]["prompt"], "response": rollout.texts[i], "reward": scores[i].reward,
             "reason": scores[i].reason, "advantage": float(advantages[i]), "truncated": rollout.truncated[i],
             **({"turns": [{"role": who, "text": text} for who, text in rollout.trajectories[i].segments]}
                if rollout.trajectories else {})}
            for i in rows]


def shaped_rewards(cfg: Config, rollout: Rollout, scores: list) -> tuple[torch.Tensor, dict]:
    """Verifier rewards, plus DAPO's soft overlong penalty when algo.overlong == "penalty". In
    float64: float32 holds 7 digits, so a large component (1e9) erased the differences between
    answers (1e9 + 1 == 1e9), and with them every advantage."""
    rewards = torch.tensor([s.reward for s in scores], dtype=torch.float64)
    if cfg.algo.overlong != "penalty":
        return rewards, {}
    lengths = torch.tensor([len(r) for r in rollout.response_ids])
    penalty = overlong_penalty(lengths, cfg.rollout.max_new_tokens, overlong_buffer(cfg),
                               cfg.algo.overlong_penalty_factor)
    return rewards + penalty, {"reward/overlong/mean": float(penalty.mean())}


def ref_reset_due(cfg: Config, step: int) -> bool:
    return bool(cfg.algo.ref_reset_every) and step % cfg.algo.ref_reset_every == 0


def rollout_metrics(rollout: Rollout, rewards: torch.Tensor, advantages: torch.Tensor, group_size: int,
                    scores: list) -> dict:
    lengths = torch.tensor([len(r) for r in rollout.response_ids], dtype=torch.float32)
    correct = torch.tensor([correctness(s) for s in scores])  # all solved / all failed, whatever the bonuses
    return {**reward_stats(rewards, group_size, correct),
            "advantage/variance": advantage_variance(advantages),
            "response_length/mean": float(lengths.mean()), "response_length/max": float(lengths.max()),
            "response_length/min": float(lengths.min()),
            "truncated/frac": sum(rollout.truncated) / max(len(rollout), 1),
            "weight_version": rollout.weight_version}


def env_metrics(rollout: Rollout) -> dict:
    """Multi-turn rollouts' turns, tool use and failures, and the tools' share of the critical
    path (time/env: the generators waited on environments with nothing to sample); {} without."""
    trajs = rollout.trajectories
    if not trajs:
        return {}
    n, calls = len(trajs), sum(t.tool_calls for t in trajs)
    model_tokens = sum(len(r) for r in rollout.response_ids) - sum(t.observation_tokens for t in trajs)
    return {"env/turns/mean": sum(t.turns for t in trajs) / n, "env/tool_calls/mean": calls / n,
            "env/tool_errors/frac": sum(t.tool_errors for t in trajs) / max(calls, 1),
            "env/observation_tokens/mean": sum(t.observation_tokens for t in trajs) / n,
            "env/model_tokens/mean": model_tokens / n, "env/errors/frac": sum(bool(t.error) for t in trajs) / n,
            "time/env": rollout.env_s}


def component_means(scores: list) -> dict:
    """reward/<name>/mean for each reward component (multi-faceted rewards, logged separately),
    and reward/<name>/errors: the completions it failed on (a raise, a timeout, NaN: each scored 0)."""
    names = scores[0].components if scores else {}
    return {**{f"reward/{n}/mean": sum(s.components.get(n, 0.0) for s in scores) / len(scores) for n in names},
            **{f"reward/{n}/errors": sum(n in s.errors for s in scores) for n in names}}


# the step's reward errors travel in train_step's metrics under this key, for Run.loop to pop
# (reward_error_messages), never logged as a metric: {component: (failed, completions, first error)}
REWARD_ERRORS = "reward_errors"


class RewardFunctionError(ConfigError):
    """A reward component failed on every completion of a step (the user's code or config: the
    CLI prints it in one line)."""


def reward_errors(scores: list) -> dict[str, tuple[int, int, str]]:
    """{component: (completions it failed on, completions, its first error)} for the components
    that failed on any."""
    out: dict[str, tuple[int, int, str]] = {}
    for s in scores:
        for name, text in getattr(s, "errors", {}).items():
            n, _, first = out.get(name, (0, 0, text))
            out[name] = (n + 1, len(scores), first)
    return out


def reward_error_messages(step: int, errors: dict, said: set) -> tuple[list[str], str | None]:
    """What to say about a step's reward errors (reward_errors): a warning for each component's
    first failure in the run (`said` holds the components already named; updated), and the
    message to stop with when a component failed on every completion of the step (all its
    rewards were 0: the run would learn nothing from it, and exit 0 as if it had)."""
    messages, stop = [], None
    for name, (n, total, first) in errors.items():
        if name == ENV_ERROR:  # an environment's reset/step failed (envs: the trajectory scored 0)
            if name not in said:
                said.add(name)
                messages.append(f"environment error: {first} (first of {n} of {total} trajectories in step {step}; "
                                "each ended with reward 0, counted in env/errors/frac and not repeated here)")
            if n == total and stop is None:
                stop = (f"the environment failed on every trajectory of step {step} ({n} of {total}): {first}; "
                        "fix its reset/step (env.name, or the rows' env) and run again")
            continue
        what = first if first.startswith(name) else f"{name}: {first}"
        if name not in said:
            said.add(name)
            messages.append(f"reward component {what} (first of {n} of {total} completions in step {step}; each "
                            f"scored 0, counted in reward/{name}/errors and not repeated here)")
        if n == total and stop is None:
            stop = (f"reward component {name} failed on every completion of step {step} ({n} of {total}): "
                    f"{first}; fix it, or take it out of reward.components (or the rows' task), and run again")
    return messages, stop
