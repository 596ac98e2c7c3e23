"""The driver: one GRPO loop over Ray actors, readable top to bottom.

    generate -> verify -> reference logprobs -> advantages -> learner update -> weight sync -> log

Run as `grpo-ray train configs/default.yaml [dotted.key=value ...]` or `python -m grpo_ray.train ...`.
"""
from __future__ import annotations

import math
import os
import shutil
import sys
import time
from contextlib import contextmanager

import ray
import torch

from .actors import Roles, init_ray, start_reference, start_roles, stop_roles
from .algorithm import group_advantages, informative_groups, loss_normalizer, overlong_penalty
from .checkpoint import find_resume, list_checkpoints, load_state, save_checkpoint
from .config import Config, overlong_buffer
from .data import PromptSampler, load_datasets
from .evaluation import evaluate
from .metrics import Monitor, advantage_variance, combine_parts, reward_stats
from .modeling import load_tokenizer
from .outputs import create_run_dir, prepare_model, summary_line, write_samples
from .records import Rollout, TrainBatch
from .rollout import InFlight, launch, split
from .tracking import Tracker


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
            ahead.ref_logprobs = roles.reference.rollout_logprobs.remote(pad_id, *ahead.refs)
    with timer("learner"):  # the generators' weight load is queued behind the update, not awaited
        pending, weights = update_policy(roles, cfg, batch)
        pushed = push_weights(roles, weights, version=step)
        stats = combine_parts(ray.get(pending))
    if ahead is not None:  # the generators take new weights once the next rollout is sampled
        with timer("generate"):
            ahead.wait()
    with timer("sync"):  # not awaited: the load runs while the driver logs this step (see finish_sync)
        finish_sync(roles, pushed, version=step, wait=False)
    metrics = {"step": step, **rollout_metrics(rollout, rewards, advantages, G), **component_means(scores),
               **shaping, **sampling, **stats, "verify/retries": roles.verifier.retries, **timer.metrics(),
               "time/generate_queued": rollout.queued_s,  # sync mode: the load's share of generate
               "time/generate_sampling": rollout.sample_s}  # the generators' busy time (async: hidden)
    return metrics, spot_samples(records, rollout, scores, advantages, G, cfg.train.spot_check_samples), ahead


# ---------------------------------------------------------------- the phases
def collect_rollout(step: int, cfg: Config, roles: Roles, sampler: PromptSampler, timer: PhaseTimer, pad_id: int):
    """Sample G completions for each of prompts_per_step prompts and score them. Without dynamic
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
            rollout, ref_ahead = generate(roles, cfg, [r["prompt"] for r in records], seed=step_seed(cfg, step, rounds),
                                          pad_id=None if a.dynamic_sampling else pad_id)
        with timer("verify"):
            scores = roles.verifier.score([r for r in records for _ in range(G)], rollout.texts)
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


def reference_logprobs(roles: Roles, batch: TrainBatch, ahead: ray.ObjectRef | None) -> torch.Tensor:
    """ref_logprobs [B, T]: the pass queued behind the rollout's sampling, or run now.
    The queued pass saw the response mask before overlong masking, hence the product."""
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
    ahead.ref_logprobs = None  # it scored the samples thrown away
    return generate(roles, cfg, [r["prompt"] for r in ahead.records], seed=step_seed(cfg, ahead.step))[0]


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


def generate(roles: Roles, cfg: Config, prompts: list[str], seed: int,
             pad_id: int | None = None) -> tuple[Rollout, ray.ObjectRef | None]:
    """G completions per prompt from the generators, and with a pad_id the reference pass on
    them, queued behind the sampling (Reference.rollout_logprobs). A generator that Ray
    restarted after a crash comes back with the weights it started with: its rollout carries
    another weight version, so the current weights are pushed to every generator and the prompts
    sampled again (same seeds), and no sample from stale weights reaches the learner."""
    r = cfg.rollout
    for _ in range(3):
        refs = launch(roles.generators, prompts, n=cfg.algo.group_size, temperature=r.temperature,
                      max_new_tokens=r.max_new_tokens, top_p=r.top_p, seed=seed)
        ref_pass = None if pad_id is None else roles.reference.rollout_logprobs.remote(pad_id, *refs)
        parts = ray.get(refs)
        if all(p.weight_version == roles.weight_version for p in parts):
            return Rollout.concat(parts), ref_pass
        if ref_pass is not None:  # it scores samples about to be thrown away
            ray.cancel(ref_pass)
        print(f"generator weights at versions {sorted({p.weight_version for p in parts})}, expected "
              f"{roles.weight_version} (a restarted generator?): pushing the current weights and resampling",
              file=sys.stderr)
        sync_weights(roles, cfg, roles.weight_version)
    raise RuntimeError("generators keep returning stale weight versions after 3 weight pushes")


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


def rollout_metrics(rollout: Rollout, rewards: torch.Tensor, advantages: torch.Tensor, group_size: int) -> dict:
    lengths = torch.tensor([len(r) for r in rollout.response_ids], dtype=torch.float32)
    return {**reward_stats(rewards, group_size),
            "advantage/variance": advantage_variance(advantages),
            "response_length/mean": float(lengths.mean()), "response_length/max": float(lengths.max()),
            "response_length/min": float(lengths.min()),
            "truncated/frac": sum(rollout.truncated) / max(len(rollout), 1),
            "weight_version": rollout.weight_version}


def component_means(scores: list) -> dict:
    """reward/<name>/mean for each reward component (multi-faceted rewards, logged separately)."""
    names = scores[0].components if scores else {}
    return {f"reward/{n}/mean": sum(s.components.get(n, 0.0) for s in scores) / len(scores) for n in names}


# ---------------------------------------------------------------- the run
def save_policy(roles: Roles, cfg: Config, run_dir: str, tokenizer, name: str) -> str:
    """Policy in Hugging Face format (loadable by transformers and vLLM), written atomically."""
    final, tmp = os.path.join(run_dir, name), os.path.join(run_dir, f".{name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    ray.get([lr.save_pretrained.remote(tmp) for lr in gathering_ranks(roles, cfg)])
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def train(cfg: Config, address: str | None = None) -> str:
    """Run GRPO as configured (resuming from the run's last checkpoint when there is one and
    run.resume allows); returns the run directory."""
    from tqdm import tqdm

    log = tqdm.write
    # Bad data and bad checkpoints fail here, before anything is written or started.
    train_records, eval_records = load_datasets(cfg.data, cfg.run.seed)
    run_dir = create_run_dir(cfg)
    log(f"run directory: {run_dir}")
    model_path = prepare_model(cfg, train_records, run_dir, log)
    resume = find_resume(run_dir, cfg.run.resume, model_path)
    reference = (resume[1].get("reference") if resume else None) or model_path
    init_ray(address)
    t0 = time.perf_counter()
    roles = start_roles(cfg, model_path, resume_from=resume[0] if resume else None, reference=reference)
    log(f"actors ready in {time.perf_counter() - t0:.1f}s: {cfg.rollout.num_generators} generator(s), "
        f"verifier pool ({cfg.reward.pool.min_replicas}-{cfg.reward.pool.max_replicas} replicas), reference, "
        f"{cfg.learner.num_ranks} learner rank(s)")
    run = None
    try:
        run = Run(cfg, roles, run_dir, model_path, PromptSampler(train_records, cfg.run.seed),
                  eval_records[:cfg.eval.num_prompts], log)
        run.loop(run.restore(*resume) if resume else 1, tqdm)
    finally:
        if run is not None:
            run.metrics.close()
        stop_roles(roles)
    log(f"run directory: {run_dir}")
    return run_dir


class Run:
    """What one training run carries between steps: the actors, the prompt sampler, the KL
    monitor and the metrics file; and what it does besides steps: evaluate and checkpoint."""

    def __init__(self, cfg: Config, roles: Roles, run_dir: str, model_path: str, sampler: PromptSampler,
                 eval_records: list[dict], log):
        self.cfg, self.roles, self.run_dir, self.sampler, self.eval_records, self.log = (
            cfg, roles, run_dir, sampler, eval_records, log)
        self.tokenizer = load_tokenizer(model_path)
        self.monitor = Monitor(cfg.algo.kl_stop, cfg.algo.kl_window)
        self.metrics = Tracker(run_dir, tensorboard=cfg.run.tensorboard,  # metrics.jsonl appends on resume
                               wandb_project=cfg.run.wandb_project or None, run_name=cfg.run.name,
                               config=cfg.to_dict(), resumed=bool(list_checkpoints(run_dir)))
        self.lr_scale, self.rollbacks = 1.0, 0  # KL rollbacks so far and the lr factor they left
        self.ahead: InFlight | None = None  # rollout.asynchronous: the next step's rollout, sampling

    def restore(self, path: str, state: dict) -> int:
        """Sampler and monitor as they were at the checkpoint; returns the first step to run."""
        self.sampler.load_state_dict(state["sampler"])
        self.monitor.load_state_dict(state["monitor"])
        self.lr_scale, self.rollbacks = state.get("lr_scale", 1.0), state.get("rollbacks", 0)
        self.log(f"resumed from {path}: step {state['step']} of {self.cfg.train.steps} done")
        self.metrics.write({"step": state["step"], "event": "resume", "message": path})
        return state["step"] + 1

    def loop(self, start: int, tqdm) -> None:
        cfg, steps, step, last = self.cfg, self.cfg.train.steps, start, start - 1
        if start == 1:
            self.evaluate(0)
        bar = tqdm(desc="grpo", unit="step", file=sys.stderr, initial=start - 1, total=steps)
        mark = None  # when the last step returned: its bookkeeping below counts in the next step's time
        while step <= steps:
            try:
                m, samples, self.ahead = train_step(step, cfg, self.roles, self.sampler,
                                                    self.tokenizer.pad_token_id, self.ahead, started=mark)
            except ray.exceptions.RayActorError as e:  # a learner (no restarts) or a role out of restarts
                raise RuntimeError(self.died(step, e)) from None
            mark = time.perf_counter()
            self.metrics.write(m)
            last = step
            if cfg.train.spot_check_every and step % cfg.train.spot_check_every == 0:
                write_samples(self.run_dir, step, samples)
            if ref_reset_due(cfg, step):
                self.reset_reference(step)
                mark = None
            if step % cfg.run.log_every == 0:
                self.log(summary_line(m, steps))
            if self.watch(step, m):
                back = self.rollback(step) if cfg.algo.kl_action == "rollback" else None
                if back is None:
                    break
                step, mark = back + 1, None
                bar.n = back
                continue
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step != steps:
                self.evaluate(step)
                mark = None  # evaluations and checkpoints are not step time
            if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
                self.checkpoint(step)
                mark = None
            step += 1
            bar.update(1)
        bar.close()
        if last >= start:  # something was trained in this session
            self.evaluate(last)
            if not (cfg.train.checkpoint_every and last % cfg.train.checkpoint_every == 0):
                self.checkpoint(last)
            self.log(f"final policy: {save_policy(self.roles, cfg, self.run_dir, self.tokenizer, 'final_model')}")
            if cfg.run.plots:
                from .plots import plot_run

                charts = plot_run(self.run_dir, cfg.algo.kl_stop)
                self.log(f"plots: {len(charts)} charts in {os.path.join(self.run_dir, 'plots')}")

    def reset_reference(self, step: int) -> None:
        """algo.ref_reset_every (DeepSeek-R1: every 400 steps): the reference becomes the current
        policy. It is saved to reference_policy/ and the reference actor is started from there,
        so a crash restart of that actor, and a resume, load the reset policy too."""
        path = save_policy(self.roles, self.cfg, self.run_dir, self.tokenizer, "reference_policy")
        # the old actor goes first: the new one takes its place in the placement group
        ray.kill(self.roles.reference)
        self.roles.reference = start_reference(self.cfg, path, self.roles.placement)
        ray.get(self.roles.reference.__ray_ready__.remote())
        self.metrics.write({"step": step, "event": "ref_reset", "message": f"reference := policy of step {step}"})

    def died(self, step: int, e: Exception) -> str:
        found = list_checkpoints(self.run_dir)
        where = (f"the last checkpoint is step {found[-1][0]} ({found[-1][1]}): run the same command with --resume"
                 if found else "there is no checkpoint yet (train.checkpoint_every): the run has to start over")
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        return f"an actor died at step {step} and could not be restarted ({first}); {where}"

    def rollback(self, step: int) -> int | None:
        """algo.kl_action=rollback: back to the newest checkpoint (saved while the KL rule held)
        with the learning rate times kl_rollback_lr_factor; returns its step, or None to stop."""
        a, found = self.cfg.algo, list_checkpoints(self.run_dir)
        if self.rollbacks >= a.kl_max_rollbacks or not found:
            why = "no checkpoint to roll back to" if not found else f"algo.kl_max_rollbacks={a.kl_max_rollbacks} used"
            self.log(f"KL guard: stopping instead of rolling back ({why})")
            return None
        path = found[-1][1]
        state = load_state(path)
        self.rollbacks += 1
        scale = a.kl_rollback_lr_factor ** self.rollbacks
        ray.get([lr.load_state.remote(os.path.join(path, "learner")) for lr in self.roles.learners])
        lrs = ray.get([lr.scale_lr.remote(scale / state.get("lr_scale", 1.0)) for lr in self.roles.learners])
        self.lr_scale = scale
        self.ahead = None  # sampled by the rolled-back policy
        sync_weights(self.roles, self.cfg, version=state["step"])
        self.sampler.load_state_dict(state["sampler"])
        self.monitor.load_state_dict(state["monitor"])
        msg = (f"KL guard: rolled back from step {step} to the checkpoint of step {state['step']} ({path}); "
               f"learning rate now {lrs[0]:.3g} (x{scale:g}), rollback {self.rollbacks} of {a.kl_max_rollbacks}")
        self.log(msg)
        self.metrics.write({"step": step, "event": "kl_rollback", "message": msg, "to_step": state["step"]})
        return state["step"]

    def watch(self, step: int, m: dict) -> bool:
        """The guide's thresholds: warnings when they start; True when the KL rule fires (then
        the run stops, or rolls back with algo.kl_action=rollback)."""
        warnings, stop = self.monitor.check(m)
        for w in warnings:
            self.log(f"warning: {w}")
            self.metrics.write({"step": step, "event": "warning", "message": w})
        if stop:
            action = "rolling back" if self.cfg.algo.kl_action == "rollback" else "stopping"
            self.log(f"KL guard at step {step}: {stop}; {action}")
            self.metrics.write({"step": step, "event": "kl_stop", "message": stop})
        return stop is not None

    def evaluate(self, step: int) -> None:
        c = self.cfg
        finish_sync(self.roles, [], self.roles.weight_version)  # evaluate the weights of `step`, loaded
        m, _ = evaluate(self.roles.generators, self.roles.verifier, self.eval_records, samples=c.eval.samples,
                        ks=c.eval.ks, temperature=c.eval.temperature, max_new_tokens=c.rollout.max_new_tokens)
        self.metrics.write({"step": step, **m})
        self.log(f"eval step {step}: " + " ".join(f"{k[5:]} {v:.3f}" for k, v in m.items()))
        for w in self.monitor.check_eval(m[f"eval/pass@{min(c.eval.ks)}"]):
            self.log(f"warning: {w}")
            self.metrics.write({"step": step, "event": "warning", "message": w})

    def checkpoint(self, step: int) -> None:
        ref = os.path.join(self.run_dir, "reference_policy")
        # a rollout sampling ahead is not saved: a resume draws its prompts again
        sampler = self.ahead.sampler_state if self.ahead else self.sampler.state_dict()
        state = {"sampler": sampler, "monitor": self.monitor.state_dict(),
                 "lr_scale": self.lr_scale, "rollbacks": self.rollbacks,
                 "reference": ref if os.path.isdir(ref) else None}
        path = save_checkpoint(self.roles, gathering_ranks(self.roles, self.cfg), self.tokenizer, self.run_dir,
                               step, state, self.cfg.train.keep_checkpoints)
        self.metrics.write({"step": step, "event": "checkpoint", "message": path})


def main(argv: list[str] | None = None) -> None:
    from .cli import main as cli_main

    cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
