"""The rollout phases of a step: draw prompts, sample G completions each through the generator
fleet, score them in the verifier pool, and queue the frozen reference's pass behind the
sampling. Both modes hand the step one contract, `Collected`:

- sync (collect_rollout): each generator's part is scored the moment it is sampled, and the
  reference pass runs while the driver scores; with DAPO's dynamic sampling, extra rounds;
- async (collect_ahead, rollout.asynchronous): this step's rollout was started during the
  previous step (`InFlight`), and the next one is started before this one is trained on.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..config import Config
from ..core.algorithm import informative_groups
from ..core.records import Rollout, Score
from ..data.datasets import PromptSampler
from ..roles.fleet import Arrived, Launch, Sampled, Sampling, split
from ..roles.multiturn import EnvRollout
from ..roles.reference_host import ReferencePass
from ..roles.verifier_pool import Pending, Scores


@dataclass
class Collected:
    """A step's rollout, scored: what the generate and verify phases hand the rest of the step."""
    records: list[dict]     # [P] the prompts' rows
    rollout: Rollout        # [P*G] completions, group p at rows p*G:(p+1)*G
    scores: list[Score]     # [P*G] the verifier's
    # the reference pass queued behind the sampling ([P*G, T] once done), or None: run it now
    # (dynamic sampling, a resampled async rollout) or no reference at all
    ref_logprobs: ReferencePass | None = None
    stats: dict = field(default_factory=dict)  # dynamic sampling's
    retries: int = 0        # requests the verifier pool sent again (a replica died or timed out)


@dataclass
class InFlight:
    """A step's rollout sampled ahead, while the learner trains on the step before
    (rollout.asynchronous): its prompts are drawn and its generation started, not awaited."""
    step: int
    records: list[dict]
    launch: Launch          # the fleet's launch: the parts (ObjectRefs) and the weights they sample with
    sampler_state: dict     # the prompt sampler before these records were drawn: what a checkpoint saves
    ref_logprobs: ReferencePass | None = None  # its reference pass, once queued

    def queue_reference(self, reference, pad_id: int, group: int) -> None:
        """Queue this rollout's reference pass behind its sampling (after the pass of the step
        being trained, which the reference runs first). group: algo.group_size."""
        if reference is not None:
            self.ref_logprobs = reference.rollout_pass(pad_id, self.launch.refs, group)

    def drop_reference(self) -> None:
        """Cancel the queued reference pass (its samples are thrown away): left running, it
        would delay the reference pass the step then waits for."""
        if self.ref_logprobs is not None:
            self.ref_logprobs.cancel()
        self.ref_logprobs = None


def sampling(cfg: Config, env: EnvRollout | None = None) -> Sampling:
    r = cfg.rollout
    return Sampling(n=cfg.algo.group_size, temperature=r.temperature, max_new_tokens=r.max_new_tokens, top_p=r.top_p,
                    env=env)


@dataclass
class PartChecks:
    """One generator's part sent for scoring: the verifier's request for the rows it scores, and
    the scores of the rows a multi-turn environment ended (its reward, or its failure: 0)."""
    pending: Pending | None
    rows: list[int]            # the part's rows the verifier scores, in order
    given: dict[int, Score]    # row -> the environment's score
    size: int


def submit_part(verifier, records: list[dict], part: Rollout, group_size: int) -> PartChecks:
    """Send a part's checks to the verifier pool (records: one per group of the part)."""
    if not part.trajectories:
        return PartChecks(verifier.submit(records, part.texts, group_size), list(range(len(part))), {}, len(part))
    given = {i: env_score(t) for i, t in enumerate(part.trajectories) if t.reward is not None or t.error}
    rows = [i for i in range(len(part)) if i not in given]
    pending = verifier.submit([records[i // group_size] for i in rows], [part.texts[i] for i in rows], 1) if rows else None
    return PartChecks(pending, rows, given, len(part))


ENV_ERROR = "environment"  # the Score.errors key of a trajectory whose environment failed


def env_score(t) -> Score:
    """The score of a trajectory its environment ended: its reward, or 0 with why it failed
    (under Score.errors, so that the step warns once and stops when every trajectory fails)."""
    if t.error:
        return Score(0.0, f"environment error: {t.error}", errors={ENV_ERROR: t.error})
    return Score(float(t.reward), f"environment reward {t.reward:g}")


def collect_scores(verifier, parts: list[PartChecks]) -> Scores:
    """The scores of submitted parts, in row order (Scores.retries: the pool's resends)."""
    out = Scores()
    for p in parts:
        got = verifier.collect([p.pending]) if p.pending is not None else Scores()
        out.retries += got.retries
        by_row = {**dict(zip(p.rows, got)), **p.given}
        out.extend(by_row[i] for i in range(p.size))
    return out


def step_seed(cfg: Config, step: int, round: int = 0) -> int:
    """Completion k of prompt j at a step samples with seed step_seed + j*G + k: distinct for every
    completion of the run, and the same on a rerun with the same run.seed. Dynamic sampling's
    extra rounds are offset far beyond any step's range."""
    return (cfg.run.seed * 1_000_000_007 + step * cfg.rollout.prompts_per_step * cfg.algo.group_size
            + round * 10**13)


def sample_and_score(roles, cfg: Config, records: list[dict], seed: int, pad_id: int | None = None):
    """G completions for each record's prompt; each generator's part goes to the verifier pool
    the moment it is sampled, so scoring runs while the other generators still sample (code
    checks take seconds, and on a cluster the parts finish at different times). With a pad_id,
    the reference pass on them is queued behind the sampling. A launch the fleet repeats (a
    restarted generator sampled with stale weights) makes what was queued behind the last one
    useless: it is cancelled. Returns (rollout, reference pass ref or None, each part's PartChecks
    in part order: collect_scores awaits them)."""
    G, ref_pass, pending, by_part = cfg.algo.group_size, None, {}, []
    for event in roles.fleet.stream([r["prompt"] for r in records], sampling(cfg, roles.env), seed, records=records):
        if isinstance(event, Launch):
            roles.verifier.cancel([p.pending for p in pending.values() if p.pending is not None])
            if ref_pass is not None:
                ref_pass.cancel()
            if pad_id is not None and roles.reference is not None:
                ref_pass = roles.reference.rollout_pass(pad_id, event.refs, G)
            pending, by_part = {}, split(records, len(event.refs))
        elif isinstance(event, Arrived):
            pending[event.index] = submit_part(roles.verifier, by_part[event.index], event.part, G)
        elif isinstance(event, Sampled):
            return event.rollout, ref_pass, [pending[i] for i in sorted(pending)]
    raise AssertionError("the fleet's stream ended without a rollout")


def collect_rollout(step: int, cfg: Config, roles, sampler: PromptSampler, timer, pad_id: int) -> Collected:
    """Sample G completions for each of prompts_per_step prompts and score them. Without dynamic
    sampling the reference's pass is queued behind the sampling, so it runs while the driver
    scores, not after (on code tasks scoring takes seconds; with algo.overlong=mask it also runs
    on the truncated rows, masked later). With DAPO's dynamic sampling (algo.dynamic_sampling),
    groups whose rewards are all equal (zero advantage, no gradient) are dropped and new prompts
    sampled, up to dynamic_sampling_rounds extra rounds; the batch is then the first
    prompts_per_step informative groups, trimmed to a size every learner rank and mini-batch can
    share (or the last round whole, if none was informative)."""
    G, P, a = cfg.algo.group_size, cfg.rollout.prompts_per_step, cfg.algo
    kept, seen, waited, retries = [], 0, [0.0, 0.0], 0
    for rounds in range(1 + (a.dynamic_sampling_rounds if a.dynamic_sampling else 0)):
        records = sampler.next(P)
        with timer("generate"):  # dynamic sampling keeps a subset of the rounds: no queued pass
            rollout, ref_pass, scoring = sample_and_score(roles, cfg, records, step_seed(cfg, step, rounds),
                                                          pad_id=None if a.dynamic_sampling else pad_id)
        with timer("verify"):  # what is left of the scoring once the last part is sampled
            scores = collect_scores(roles.verifier, scoring)
        if not a.dynamic_sampling:
            return Collected(records, rollout, scores, ref_pass, retries=scores.retries)
        retries += scores.retries
        waited = [waited[0] + rollout.queued_s, waited[1] + rollout.sample_s]  # rounds run one after another
        useful = informative_groups(torch.tensor([s.reward for s in scores], dtype=torch.float64), G).tolist()
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
    return Collected(records, rollout, scores, None, stats, retries)


def start_rollout(step: int, cfg: Config, roles, sampler: PromptSampler) -> InFlight:
    """Draw the step's prompts and start sampling them with the fleet's current weights."""
    before = sampler.state_dict()
    records = sampler.next(cfg.rollout.prompts_per_step)
    launch = roles.fleet.launch([x["prompt"] for x in records], sampling(cfg, roles.env), step_seed(cfg, step), records)
    return InFlight(step, records, launch, before)


def collect_ahead(step: int, cfg: Config, roles, sampler: PromptSampler, timer,
                  ahead: InFlight | None) -> tuple[Collected, InFlight | None]:
    """rollout.asynchronous: this step's rollout was started during the previous step (or now: at
    the first step, after a resume or a rollback), and the next step's is started before this one
    is scored and trained on, so generation overlaps verification, reference and learner. The
    samples are then one update behind the learner; old_logprobs stay the sampler's, so the
    ratio exp(logp - old_logp) corrects for that lag (one-step off-policy, as in PPO's epochs).
    The reference is frozen, so the step queues the next rollout's reference pass behind its
    sampling (InFlight.queue_reference): it runs beside this step's learner, not after it.
    Returns this step's rollout and the next one, in flight (None after the last step)."""
    if ahead is None or ahead.step != step:
        ahead = start_rollout(step, cfg, roles, sampler)
    with timer("generate"):
        rollout = None
        for event in roles.fleet.stream(ahead.launch.prompts, ahead.launch.sampling, ahead.launch.seed,
                                        first=ahead.launch, records=ahead.records):
            if isinstance(event, Launch):  # sampled again (a restarted generator): the queued pass scores
                ahead.drop_reference()      # the samples thrown away
            elif isinstance(event, Sampled):
                rollout = event.rollout
    following = start_rollout(step + 1, cfg, roles, sampler) if step < cfg.train.steps else None
    with timer("verify"):
        scores = collect_scores(roles.verifier, [submit_part(roles.verifier, ahead.records, rollout, cfg.algo.group_size)])
    return Collected(ahead.records, rollout, scores, ahead.ref_logprobs, retries=scores.retries), following
