"""The driver: one GRPO loop over Ray actors, readable top to bottom.

    generate -> verify -> reference logprobs -> advantages -> learner update -> weight sync -> log

Run as `grpo-ray train configs/default.yaml [dotted.key=value ...]` or `python -m grpo_ray.train ...`.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from contextlib import contextmanager

import ray
import torch
import yaml

from .actors import Roles, in_ray_job, init_ray, start_roles, stop_roles
from .algorithm import group_advantages, loss_normalizer
from .config import Config
from .data import PromptSampler, load_datasets
from .evaluation import evaluate
from .metrics import MetricsLog, Monitor, advantage_variance, combine_parts, reward_stats
from .modeling import load_tokenizer
from .records import Rollout, TrainBatch
from .rollout import sample, split


class PhaseTimer:
    def __init__(self):
        self.times: dict[str, float] = {}
        self._start = time.perf_counter()

    @contextmanager
    def __call__(self, name: str):
        t = time.perf_counter()
        yield
        self.times[f"time/{name}"] = time.perf_counter() - t

    def metrics(self) -> dict[str, float]:
        step = time.perf_counter() - self._start
        return {**self.times, "time/step": step, "time/overhead": step - sum(self.times.values())}


# ---------------------------------------------------------------- the step
def train_step(step: int, cfg: Config, roles: Roles, records: list[dict], pad_id: int) -> dict:
    G, timer = cfg.algo.group_size, PhaseTimer()
    with timer("generate"):
        rollout = generate(roles, cfg, [r["prompt"] for r in records], seed=step_seed(cfg, step))
    with timer("verify"):
        scores = roles.verifier.score([r for r in records for _ in range(G)], rollout.texts)
    rewards = torch.tensor([s.reward for s in scores], dtype=torch.float32)
    advantages = group_advantages(rewards, G, estimator=cfg.algo.estimator)
    batch = TrainBatch.from_rollout(rollout, advantages, pad_id)
    with timer("reference"):
        batch.ref_logprobs = ray.get(roles.reference.logprobs.remote(batch))
    with timer("learner"):
        stats = update_policy(roles, cfg, batch)
    with timer("sync"):
        sync_weights(roles, cfg, version=step)
    return {"step": step, **rollout_metrics(rollout, rewards, advantages, G), **component_means(scores),
            **stats, "verify/retries": roles.verifier.retries, **timer.metrics()}


# ---------------------------------------------------------------- the phases
def step_seed(cfg: Config, step: int) -> int:
    """Completion k of prompt j at a step samples with seed step_seed + j*G + k: distinct for every
    completion of the run, and the same on a rerun with the same run.seed."""
    return cfg.run.seed * 1_000_000_007 + step * cfg.rollout.prompts_per_step * cfg.algo.group_size


def generate(roles: Roles, cfg: Config, prompts: list[str], seed: int) -> Rollout:
    r = cfg.rollout
    return sample(roles.generators, prompts, n=cfg.algo.group_size, temperature=r.temperature,
                  max_new_tokens=r.max_new_tokens, top_p=r.top_p, seed=seed)


def update_policy(roles: Roles, cfg: Config, batch: TrainBatch) -> dict:
    """One optimizer step; with M learner ranks each takes a contiguous 1/M of the batch. All
    divide by the normaliser of the WHOLE batch so the gradient is independent of the split."""
    normalizer = loss_normalizer(batch.response_mask, cfg.algo.aggregation, cfg.rollout.max_new_tokens)
    rows = split(list(range(batch.size)), len(roles.learners))
    shards = [batch.select(slice(r[0], r[-1] + 1)) for r in rows]
    results = ray.get([lr.update.remote(s, normalizer) for lr, s in zip(roles.learners, shards)])
    return combine_parts(results)


def sync_weights(roles: Roles, cfg: Config, version: int) -> None:
    """Learner weights -> every generator: one ObjectRef of buckets, stored once in the object
    store and read by each generator (no per-parameter calls)."""
    buckets = [lr.weight_buckets.remote(cfg.model.dtype) for lr in gathering_ranks(roles, cfg)][0]
    ray.get([g.update_weights.remote(buckets, version) for g in roles.generators])


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
def resolve_run_dir(cfg: Config) -> str:
    """Absolute run directory. Under `ray job submit` the cwd is Ray's temporary copy of the
    working dir, which is deleted later: relative paths then go under ~/grpo-ray instead."""
    base = os.path.expanduser("~/grpo-ray") if in_ray_job() else os.getcwd()
    out = cfg.run.output_dir if os.path.isabs(cfg.run.output_dir) else os.path.join(base, cfg.run.output_dir)
    return os.path.join(os.path.abspath(out), cfg.run.name)


def create_run_dir(cfg: Config) -> str:
    run_dir = resolve_run_dir(cfg)
    try:
        os.makedirs(run_dir, exist_ok=True)
        write_atomic(os.path.join(run_dir, "config.yaml"), yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    except OSError as e:
        raise OSError(f"run directory {run_dir!r} is not writable ({e.strerror}); set run.output_dir") from None
    return run_dir


def write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def prepare_model(cfg: Config, train_records: list[dict], run_dir: str, log) -> str:
    if cfg.model.path != "builtin:tiny":
        return cfg.model.path
    from .warmstart import builtin_model

    return builtin_model(cfg, train_records, os.path.join(os.path.dirname(run_dir), ".cache"), log)


def save_policy(roles: Roles, cfg: Config, run_dir: str, model_path: str, name: str) -> str:
    """Policy in Hugging Face format (loadable by transformers and vLLM), written atomically."""
    final, tmp = os.path.join(run_dir, name), os.path.join(run_dir, f".{name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    ray.get([lr.save_pretrained.remote(tmp) for lr in gathering_ranks(roles, cfg)])
    load_tokenizer(model_path).save_pretrained(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def summary_line(m: dict, steps: int) -> str:
    t = " ".join(f"{k[5:]} {m[k]:.2f}" for k in ("time/generate", "time/verify", "time/reference",
                                                  "time/learner", "time/sync"))
    return (f"step {m['step']}/{steps} | reward {m['reward/mean']:.3f} (std {m['reward/std']:.2f}) | "
            f"kl {m['kl']:.4f} | clip {m['clip/low']:.3f}/{m['clip/high']:.3f} | ent {m['entropy']:.2f} | "
            f"len {m['response_length/mean']:.1f} | {m['time/step']:.2f}s ({t})")


def train(cfg: Config, address: str | None = None) -> str:
    """Run GRPO as configured; returns the run directory."""
    from tqdm import tqdm

    log = tqdm.write
    # Bad data fails here, before anything is written.
    train_records, eval_records = load_datasets(cfg.data, cfg.run.seed)
    eval_records = eval_records[:cfg.eval.num_prompts]
    run_dir = create_run_dir(cfg)
    log(f"run directory: {run_dir}")
    model_path = prepare_model(cfg, train_records, run_dir, log)
    pad_id = load_tokenizer(model_path).pad_token_id
    init_ray(address)
    t0 = time.perf_counter()
    roles = start_roles(cfg, model_path)
    log(f"actors ready in {time.perf_counter() - t0:.1f}s: {cfg.rollout.num_generators} generator(s), "
        f"verifier pool ({cfg.reward.pool.min_replicas}-{cfg.reward.pool.max_replicas} replicas), reference, "
        f"{cfg.learner.num_ranks} learner rank(s)")
    metrics_log = MetricsLog(os.path.join(run_dir, "metrics.jsonl"))
    sampler = PromptSampler(train_records, cfg.run.seed)

    def run_eval(step: int) -> None:
        m, _ = evaluate(roles.generators, roles.verifier, eval_records, samples=cfg.eval.samples, ks=cfg.eval.ks,
                        temperature=cfg.eval.temperature, max_new_tokens=cfg.rollout.max_new_tokens)
        metrics_log.write({"step": step, **m})
        log(f"eval step {step}: " + " ".join(f"{k[5:]} {v:.3f}" for k, v in m.items()))

    try:
        run_eval(0)
        monitor = Monitor(cfg.algo.kl_stop, cfg.algo.kl_window)
        bar = tqdm(range(1, cfg.train.steps + 1), desc="grpo", unit="step", file=sys.stderr)
        for step in bar:
            m = train_step(step, cfg, roles, sampler.next(cfg.rollout.prompts_per_step), pad_id)
            metrics_log.write(m)
            if step % cfg.run.log_every == 0:
                log(summary_line(m, cfg.train.steps))
            warnings, stop = monitor.check(m)
            for w in warnings:
                log(f"warning: {w}")
                metrics_log.write({"step": step, "event": "warning", "message": w})
            if stop:
                log(f"stopping at step {step}: {stop}")
                metrics_log.write({"step": step, "event": "kl_stop", "message": stop})
                break
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step != cfg.train.steps:
                run_eval(step)
        if cfg.train.steps:
            run_eval(step)
        log(f"final policy: {save_policy(roles, cfg, run_dir, model_path, 'final_model')}")
    finally:
        metrics_log.close()
        stop_roles(roles)
    log(f"run directory: {run_dir}")
    return run_dir


def main(argv: list[str] | None = None) -> None:
    from .cli import main as cli_main

    cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
