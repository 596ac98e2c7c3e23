"""One GRPO step and its phases, each a named call on the actors (OpenRLHF's and verl's drivers
split the same way):

    generate -> verify -> advantages -> reference logprobs -> learner update -> weight sync

(the reference pass itself is queued behind the sampling; its phase is the wait for it)

train.py runs these steps in a loop and does what a run does between them (evaluate, checkpoint,
watch the KL, roll back, reset the reference).
"""
from __future__ import annotations

import math
import sys
import time
from contextlib import contextmanager

import ray
import torch

from ..roles.actors import Roles
from ..core.algorithm import group_advantages, informative_groups, loss_normalizer, overlong_penalty
from ..config import Config, overlong_buffer
from ..data.datasets import PromptSampler
from .evaluation import correctness
from ..core.metrics import advantage_variance, combine_parts, reward_stats
from ..core.records import Rollout, TrainBatch
from .rollout import InFlight, launch, split

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
    G, timer, sampling, ref_ahead = cfg.algo.group_size, PhaseTimer(started), {}, None
    if cfg.rollout.asynchronous:  # generate (started last step) + verify; starts the next rollout
        records, rollout, scores, ahead, ref_ahead = collect_ahead(step, cfg, roles, sampler, timer, ahead)
    else:  # generate + verify; the reference pass is queued behind the sampling, beside verify
        records, rollout, scores, sampling, ref_ahead = collect_rollout(step, cfg, roles, sampler, timer, pad_id)
    rewards, shaping = shaped_rewards(cfg, rollout, scores)
    advantages = group_advantages(rewards, G, estimator=cfg.algo.estimator)
    batch = TrainBatch.from_rollout(rollout, advantages, pad_id)
    if cfg.algo.overlong == "mask":  # DAPO overlong filtering: truncated answers teach nothing
        batch.response_mask[torch.tensor(rollout.truncated, dtype=torch.bool)] = 0.0
    with timer("reference"):
        batch.ref_logprobs = reference_logprobs(roles, batch, ref_ahead)
        if ahead is not None and not ref_reset_due(cfg, step):  # a reset replaces the reference actor
            ahead.ref_logprobs = queue_reference(roles, pad_id, ahead.refs)
    with timer("learner"):  # the generators' weight load is queued behind the update, not awaited
        pending, weights = update_policy(roles, cfg, batch)
        pushed = push_weights(roles, weights, version=step)
        stats = combine_parts(ray.get(pending))
    if ahead is not None:  # the generators take new weights once the next rollout is sampled
        with timer("generate"):
            ahead.wait()
    with timer("sync"):  # not awaited: the load runs while the driver logs this step (see finish_sync)
        finish_sync(roles, pushed, version=step, wait=False)
    metrics = {"step": step, **rollout_metrics(rollout, rewards, advantages, G, scores), **component_means(scores),
               **shaping, **sampling, **stats, "verify/retries": roles.verifier.retries, **timer.metrics(),
               "time/generate_queued": rollout.queued_s,  # sync mode: the load's share of generate
               "time/generate_sampling": rollout.sample_s}  # the generators' busy time (async: hidden)
    return metrics, spot_samples(records, rollout, scores, advantages, G, cfg.train.spot_check_samples), ahead


# ---------------------------------------------------------------- the phases
def collect_rollout(step: int, cfg: Config, roles: Roles, sampler: PromptSampler, timer: PhaseTimer, pad_id: int):
    """Sample G completions for each of prompts_per_step prompts and score them (each
    generator's part as soon as it is sampled, see generate). Without dynamic
    sampling the frozen reference's pass is queued behind the sampling (returned as a ref), so it
    runs while the driver scores, not after (on code tasks scoring takes seconds; with
    algo.overlong=mask it also runs on the truncated rows, masked later). With DAPO's
    dynamic sampling (algo.dynamic_sampling), groups whose rewards are all equal (zero advantage,
    no gradient) are dropped and new prompts sampled, up to dynamic_sampling_rounds extra rounds.
    The batch is then the first prompts_per_step informative groups, trimmed to a size every
    learner rank and mini-batch can share (or the last round whole, if none was informative)."""
    G, P, a = cfg.algo.group_size, cfg.rollout.prompts_per_step, cfg.algo
    kept, seen, waited = [], 0, [0.0, 0.0]
    for rounds in range(1 + (a.dynamic_sampling_rounds if a.dynamic_sampling else 0)):
        records = sampler.next(P)
        with timer("generate"):  # dynamic sampling keeps a subset of the rounds: no queued pass
            rollout, ref_ahead, scoring = generate(roles, cfg, records, seed=step_seed(cfg, step, rounds),
                                                   pad_id=None if a.dynamic_sampling else pad_id, score=True)
        with timer("verify"):  # what is left of the scoring once the last part is sampled
            scores = roles.verifier.collect(scoring)
        if not a.dynamic_sampling:
            return records, rollout, scores, {}, ref_ahead
        waited = [waited[0] + rollout.queued_s, waited[1] + rollout.sample_s]  # rounds run one after another
        useful = informative_groups(torch.tensor([s.reward for s in scores]), G).tolist()
        kept += [(records[i], rollout.select_groups([i], G), scores[i * G:(i + 1) * G])
                 for i, u in enumerate(useful) if u]
        seen += P
        if len(kept) >= P:
            break
    parts = a.mini_batches * cfg.learner.num_ranks
    unit = parts // math.gcd(G, parts)  # groups per batch must make rows divisible by parts
    n = min(len(kept), P) // unit * unit
    stats = {"dynamic/frac_dropped": 1.0 - len(kept) / seen, "dynamic/rounds": float(rounds + 1),
             "dynamic/groups": float(n)}  # informative groups trained on (0: none found, last round used)
    if n:
        records, rollout, scores = ([rec for rec, _, _ in kept[:n]], Rollout.concat([r for _, r, _ in kept[:n]]),
                                    [s for _, _, group in kept[:n] for s in group])
    rollout.queued_s, rollout.sample_s = waited
    return records, rollout, scores, stats, None


def collect_ahead(step: int, cfg: Config, roles: Roles, sampler: PromptSampler, timer: PhaseTimer,
                  ahead: InFlight | None):
    """rollout.asynchronous: this step's rollout was started during the previous step (or now: at
    the first step, after a resume or a rollback), and the next step's is started before this one
    is scored and trained on, so generation overlaps verification, reference and learner. The
    samples are then one update behind the learner; old_logprobs stay the sampler's, so the
    ratio exp(logp - old_logp) corrects for that lag (one-step off-policy, as in PPO's epochs).
    The reference is frozen, so train_step queues the next rollout's reference pass behind its
    sampling: it runs beside this step's learner, not after it. Returns that pass's ref too."""
    if ahead is None or ahead.step != step:
        ahead = start_rollout(step, cfg, roles, sampler)
    with timer("generate"):
        rollout = receive(roles, cfg, ahead)
    following = start_rollout(step + 1, cfg, roles, sampler) if step < cfg.train.steps else None
    with timer("verify"):
        scores = roles.verifier.score([r for r in ahead.records for _ in range(cfg.algo.group_size)], rollout.texts)
    return ahead.records, rollout, scores, following, ahead.ref_logprobs


def queue_reference(roles: Roles, pad_id: int, refs: list) -> ray.ObjectRef | None:
    """The reference pass on the generators' parts (ObjectRefs, still sampling), queued behind
    them; None when no reference runs (Config.uses_reference)."""
    return None if roles.reference is None else roles.reference.rollout_logprobs.remote(pad_id, *refs)


def reference_logprobs(roles: Roles, batch: TrainBatch, ahead: ray.ObjectRef | None) -> torch.Tensor | None:
    """ref_logprobs [B, T]: the pass queued behind the rollout's sampling, or run now; None
    without a reference (the loss then has no KL term and the learner logs no kl).
    The queued pass saw the response mask before overlong masking, hence the product."""
    if roles.reference is None:
        return None
    if ahead is None:
        return ray.get(roles.reference.logprobs.remote(batch))
    return ray.get(ahead) * batch.response_mask


def start_rollout(step: int, cfg: Config, roles: Roles, sampler: PromptSampler) -> InFlight:
    """Draw the step's prompts and start sampling them with the generators' current weights."""
    before = sampler.state_dict()
    records, r = sampler.next(cfg.rollout.prompts_per_step), cfg.rollout
    refs = launch(roles.generators, [x["prompt"] for x in records], n=cfg.algo.group_size, temperature=r.temperature,
                  max_new_tokens=r.max_new_tokens, top_p=r.top_p, seed=step_seed(cfg, step))
    return InFlight(step, records, refs, roles.weight_version, before)


def receive(roles: Roles, cfg: Config, ahead: InFlight) -> Rollout:
    """The rollout started ahead; sampled again if a generator restarted meanwhile (it came back
    with other weights: generate() pushes the current ones first)."""
    parts = ray.get(ahead.refs)
    if all(p.weight_version == ahead.version for p in parts):
        return Rollout.concat(parts)
    ahead.drop_reference()  # it scores the samples thrown away
    return generate(roles, cfg, ahead.records, seed=step_seed(cfg, ahead.step))[0]


def spot_samples(records: list[dict], rollout: Rollout, scores: list, advantages: torch.Tensor, G: int,
                 n: int) -> list[dict]:
    """Two completions from each of the first groups (n in all), for reading by hand."""
    rows = [g * G + k for g in range(len(records)) for k in range(min(2, G))][:n]
    return [{"prompt": records[i // G]["prompt"], "response": rollout.texts[i], "reward": scores[i].reward,
             "reason": scores[i].reason, "advantage": float(advantages[i]), "truncated": rollout.truncated[i]}
            for i in rows]


def shaped_rewards(cfg: Config, rollout: Rollout, scores: list) -> tuple[torch.Tensor, dict]:
    """Verifier rewards, plus DAPO's soft overlong penalty when algo.overlong == "penalty"."""
    rewards = torch.tensor([s.reward for s in scores], dtype=torch.float32)
    if cfg.algo.overlong != "penalty":
        return rewards, {}
    lengths = torch.tensor([len(r) for r in rollout.response_ids])
    penalty = overlong_penalty(lengths, cfg.rollout.max_new_tokens, overlong_buffer(cfg),
                               cfg.algo.overlong_penalty_factor)
    return rewards + penalty, {"reward/overlong/mean": float(penalty.mean())}


def step_seed(cfg: Config, step: int, round: int = 0) -> int:
    """Completion k of prompt j at a step samples with seed step_seed + j*G + k: distinct for every
    completion of the run, and the same on a rerun with the same run.seed. Dynamic sampling's
    extra rounds are offset far beyond any step's range."""
    return (cfg.run.seed * 1_000_000_007 + step * cfg.rollout.prompts_per_step * cfg.algo.group_size
            + round * 10**13)


def generate(roles: Roles, cfg: Config, records: list[dict], seed: int, pad_id: int | None = None,
             score: bool = False) -> tuple[Rollout, ray.ObjectRef | None, list]:
    """G completions for each record's prompt from the generators. With a pad_id, the reference
    pass on them, queued behind the sampling (Reference.rollout_logprobs). With score, each
    generator's part goes to the verifier pool the moment it is sampled, so scoring runs while
    the other generators still sample (code checks take seconds, and on a cluster the parts
    finish at different times); the pool's pending requests are returned, for
    roles.verifier.collect. A generator that Ray restarted after a crash comes back with the
    weights it started with: its rollout carries another weight version, so the current weights
    are pushed to every generator and the prompts sampled again (same seeds), and no sample from
    stale weights reaches the learner."""
    r = cfg.rollout
    for _ in range(3):
        refs = launch(roles.generators, [x["prompt"] for x in records], n=cfg.algo.group_size,
                      temperature=r.temperature, max_new_tokens=r.max_new_tokens, top_p=r.top_p, seed=seed)
        ref_pass = None if pad_id is None else queue_reference(roles, pad_id, refs)
        parts, scoring = arrivals(roles, refs, split(records, len(roles.generators)) if score else None,
                                  cfg.algo.group_size)
        if all(p.weight_version == roles.weight_version for p in parts):
            return Rollout.concat(parts), ref_pass, scoring
        roles.verifier.cancel(scoring)  # they score samples about to be thrown away
        if ref_pass is not None:
            ray.cancel(ref_pass)
        print(f"generator weights at versions {sorted({p.weight_version for p in parts})}, expected "
              f"{roles.weight_version} (a restarted generator?): pushing the current weights and resampling",
              file=sys.stderr)
        sync_weights(roles, cfg, roles.weight_version)
    raise RuntimeError("generators keep returning stale weight versions after 3 weight pushes")


def arrivals(roles: Roles, refs: list, by_part: list[list[dict]] | None, G: int) -> tuple[list[Rollout], list]:
    """The generators' parts, in order, taken as each finishes; with by_part (each part's
    records, as launch split the prompts), a part sampled with the current weights is submitted
    for scoring on arrival. Returns the parts and the pool's pending requests in part order."""
    parts, pending, waiting = [None] * len(refs), {}, list(refs)
    while waiting:
        done, waiting = ray.wait(waiting, num_returns=1)
        i = refs.index(done[0])
        parts[i] = ray.get(done[0])
        if by_part is not None and parts[i].weight_version == roles.weight_version:
            pending[i] = roles.verifier.submit([rec for rec in by_part[i] for _ in range(G)], parts[i].texts)
    return parts, [pending[i] for i in sorted(pending)]


def update_policy(roles: Roles, cfg: Config, batch: TrainBatch) -> tuple[list, ray.ObjectRef]:
    """Start the update: algo.mini_batches optimizer steps per pass, algo.ppo_epochs passes.
    Mini-batch j is a contiguous 1/mini_batches of the batch (whole groups when they divide
    evenly); with M learner ranks each takes a contiguous 1/M of every mini-batch. All divide by
    the normaliser of the WHOLE mini-batch, so the gradient does not depend on the split across
    ranks and micro-batches. Returns the ranks' metrics refs and rank 0's new weights (a ref to
    its buckets, packed in the same call; every rank packs under ZeRO-3, which gathers)."""
    shares: list[list[TrainBatch]] = [[] for _ in roles.learners]
    normalizers = []
    for mb_rows in split(list(range(batch.size)), cfg.algo.mini_batches):
        mb = batch.select(slice(mb_rows[0], mb_rows[-1] + 1))
        normalizers.append(loss_normalizer(mb.response_mask, cfg.algo.aggregation, cfg.rollout.max_new_tokens))
        for share, rows in zip(shares, split(list(range(mb.size)), len(roles.learners))):
            share.append(mb.select(slice(rows[0], rows[-1] + 1)))
    packing = len(gathering_ranks(roles, cfg))
    pending, weights = [], []
    for rank, (lr, share) in enumerate(zip(roles.learners, shares)):
        if rank < packing:
            stats, buckets = lr.update_then_pack.options(num_returns=2).remote(
                share, normalizers, cfg.algo.ppo_epochs, cfg.model.dtype)
            weights.append(buckets)
        else:
            stats = lr.update.remote(share, normalizers, cfg.algo.ppo_epochs)
        pending.append(stats)
    return pending, weights[0]


def push_weights(roles: Roles, weights: ray.ObjectRef, version: int) -> list:
    """Queue the weight load on every generator (each reads the one stored copy of the buckets;
    no per-parameter calls). A generator runs it after any rollout already queued on it."""
    return [g.update_weights.remote(weights, version) for g in roles.generators]


def finish_sync(roles: Roles, pushed: list, version: int, wait: bool = True) -> None:
    """The generators hold `version` once `pushed` (their weight loads) is done. wait=False
    leaves the load running: in sync mode while the driver logs the step and sends the next
    prompts (the tiny model's ~18 ms load then overlaps that work instead of adding to it); in
    async mode behind the rollout already sampled, while the next step verifies and runs the
    reference pass. An actor
    runs its calls in order, so the next rollout still starts on the new weights, and any load
    time left over shows in the next generate phase. The next sync (or an evaluation) awaits the
    load and raises any error it had."""
    ray.get(roles.loading + (pushed if wait else []))
    roles.loading = [] if wait else pushed
    roles.weight_version = version


def sync_weights(roles: Roles, cfg: Config, version: int) -> None:
    """Learner weights -> every generator, outside a step (resampling, rollback)."""
    buckets = [lr.weight_buckets.remote(cfg.model.dtype) for lr in gathering_ranks(roles, cfg)][0]
    finish_sync(roles, push_weights(roles, buckets, version), version)


def ref_reset_due(cfg: Config, step: int) -> bool:
    return bool(cfg.algo.ref_reset_every) and step % cfg.algo.ref_reset_every == 0


def gathering_ranks(roles: Roles, cfg: Config) -> list:
    """Learner ranks that must take part in reading full weights: all under ZeRO-3, else rank 0."""
    return roles.learners if cfg.learner.zero_stage == 3 else roles.learners[:1]


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


def component_means(scores: list) -> dict:
    """reward/<name>/mean for each reward component (multi-faceted rewards, logged separately)."""
    names = scores[0].components if scores else {}
    return {f"reward/{n}/mean": sum(s.components.get(n, 0.0) for s in scores) / len(scores) for n in names}
