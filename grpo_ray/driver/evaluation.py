"""Held-out evaluation: sample `samples` completions per prompt, verify them, and report the
unbiased pass@k (Chen et al. 2021) for each k. The same code runs inside training and from
`grpo-ray eval`."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import ConfigError
from ..core.metrics import mean_pass_at_k
from ..roles.fleet import GeneratorFleet, Sampling
from ..roles.multiturn import EnvRollout
from .rollout import collect_scores, submit_part

EVAL_SEED = 1_000_003  # fixed: successive evaluations differ by the model, not the dice


@dataclass
class EvalSet:
    """One evaluation set of a run: the main held-out one (name "": eval/pass@k) or one of
    eval.sets (eval/<name>/pass@k)."""
    name: str
    records: list[dict]
    samples: int
    ks: list[int]
    temperature: float
    retention: bool = False

    def key(self, metric: str) -> str:
        """"pass@1" -> eval/pass@1 or eval/<name>/pass@1."""
        return f"eval/{self.name}/{metric}" if self.name else f"eval/{metric}"

    @property
    def pass_key(self) -> str:
        """Its pass@ at the smallest k: what the step line shows and retention watches."""
        return self.key(f"pass@{min(self.ks)}")


def eval_sets(cfg, held_out: list[dict], train_records: list[dict], fit) -> list[EvalSet]:
    """The main held-out set, then eval.sets, each read from its file (DataError naming the file
    and line) or made by its built-in task, without the prompts the run trains on, through `fit`
    (the rows the model can take)."""
    from ..data.datasets import drop_training_prompts, load_jsonl
    from ..data.tasks import subtract_records

    e, d = cfg.eval, cfg.data
    sets = [EvalSet("", held_out[:e.num_prompts], e.samples, list(e.ks), e.temperature)]
    for s in e.sets:
        if s.task == "subtract":  # the warm start's held-out side; short built-in prompts: not fitted
            records = subtract_records(d.max_operand, cfg.run.seed, d.eval_fraction)[1]
        else:
            records = load_jsonl(s.path, d.prompt_key, d.answer_key, d.prompt_template, d.verifier)
            records = fit(records, f"eval set {s.name!r}")
        records, _ = drop_training_prompts(records, train_records, d.train_path or "the task")
        records = records[:s.num_prompts or e.num_prompts]
        sets.append(EvalSet(s.name, records, s.samples or e.samples, list(s.ks or e.ks), s.temperature or e.temperature,
                            s.retention))
    return sets


def evaluate_sets(fleet: GeneratorFleet, verifier, sets: list[EvalSet], max_new_tokens: int,
                  env: EnvRollout | None = None) -> dict:
    """Every set's pass@k and mean reward, under its own keys (env: multi-turn, as in training)."""
    out = {}
    for s in sets:
        m, _ = evaluate(fleet, verifier, s.records, samples=s.samples, ks=s.ks, temperature=s.temperature,
                        max_new_tokens=max_new_tokens, env=env)
        out.update({s.key(k[len("eval/"):]): v for k, v in m.items()})
    return out


class RetentionStop(ConfigError):
    """eval.retention_action=stop: a retention set fell below its baseline; the run stops in one
    line, naming the set and the checkpoint saved at that step."""


class Retention:
    """eval.sets marked retention: each one's pass@ (its smallest k) at the first evaluation is
    its baseline; a later one more than eval.retention_drop below it is a capability the run is
    losing (the GRPO guide's best practice 4: check capability retention). `held_at`: the step of
    the newest evaluation at which every set held (what eval.retention_action=rollback goes back
    to, at the latest)."""

    def __init__(self, sets: list[EvalSet], drop: float):
        self.keys = {s.name or "held-out": s.pass_key for s in sets if s.retention}
        self.drop, self.start, self.held_at = drop, {}, None

    def check(self, m: dict, step: int) -> list[str]:
        """Warnings for the sets below their baseline by more than the drop."""
        out = []
        for name, key in self.keys.items():
            if key not in m:
                continue
            start = self.start.setdefault(name, m[key])
            if m[key] < start - self.drop:
                out.append(f"retention: eval set {name!r} fell from {start:.3f} to {m[key]:.3f} ({key}; more than "
                           f"eval.retention_drop={self.drop:g}): the run is losing that capability; raise algo.beta, "
                           "lower learner.lr, or mix prompts of that kind into the training data")
        if not out and any(key in m for key in self.keys.values()):
            self.held_at = step
        return out

    def verdict(self, m: dict) -> str | None:
        """One line for the end of the run: each retention set's start and end, held or lost."""
        parts = [f"{name} {'held' if m[key] >= self.start[name] - self.drop else 'LOST'} "
                 f"({self.start[name]:.3f} -> {m[key]:.3f})" for name, key in self.keys.items()
                 if name in self.start and key in m]
        return "retention: " + "; ".join(parts) if parts else None

    def state_dict(self) -> dict:
        return {"start": dict(self.start), "held_at": self.held_at}

    def load_state_dict(self, state: dict | None) -> None:
        state = state or {}
        if not isinstance(state.get("start"), dict):  # a checkpoint from before held_at: the baselines alone
            state = {"start": state}
        self.start, self.held_at = dict(state["start"]), state.get("held_at")


def correctness(score) -> float:
    """pass@k counts correct answers, not the weighted sum with format or other components."""
    return score.components.get("correct", score.reward)


def evaluate(fleet: GeneratorFleet, verifier, records: list[dict], *, samples: int, ks: list[int],
             temperature: float, max_new_tokens: int, top_p: float = 1.0,
             progress_every: int = 0, env: EnvRollout | None = None) -> tuple[dict, list[dict]]:
    """Returns ({"eval/pass@k": ...}, per-problem rows with num_samples and num_correct).
    `verifier`: the VerifierPool (submit now, collect later).
    progress_every > 0: work in chunks of that many prompts behind a progress bar (the samples
    are the same: prompt j always samples with seeds EVAL_SEED + j*samples + k); each chunk is
    scored while the next one samples. Every chunk comes from the fleet's current weights (a
    generator Ray restarted mid-evaluation gets them pushed, and the chunk is sampled again).
    env: sample multi-turn trajectories (env.name), scored as in training (rollout.submit_part)."""
    chunk = progress_every or max(len(records), 1)
    texts, pending, trajectories = [], [], []
    starts = range(0, len(records), chunk)
    if progress_every:
        from tqdm import tqdm

        starts = tqdm(starts, desc="eval", unit=f"x{chunk} prompts")
    sampling = Sampling(n=samples, temperature=temperature, max_new_tokens=max_new_tokens, top_p=top_p, env=env)
    for start in starts:
        part = records[start:start + chunk]
        rollout = fleet.sample([r["prompt"] for r in part], sampling, seed=EVAL_SEED + start * samples, records=part)
        texts += rollout.texts
        trajectories += rollout.trajectories
        pending.append(submit_part(verifier, part, rollout, samples))
    scores = collect_scores(verifier, pending)
    rows = []
    for i, rec in enumerate(records):
        group = scores[i * samples:(i + 1) * samples]
        rows.append({"prompt": rec["prompt"], "answer": rec.get("answer"), "num_samples": samples,
                     "num_correct": sum(correctness(s) >= 0.99 for s in group),
                     "example": texts[i * samples]})
    n, c = [r["num_samples"] for r in rows], [r["num_correct"] for r in rows]
    metrics = {f"eval/pass@{k}": mean_pass_at_k(n, c, k) for k in ks}
    metrics["eval/mean_reward"] = sum(s.reward for s in scores) / max(len(scores), 1)
    if trajectories:  # how the tool use of the evaluated policy changes
        metrics["eval/tool_calls/mean"] = sum(t.tool_calls for t in trajectories) / len(trajectories)
    return metrics, rows


def write_results(out_dir: str, rows: list[dict], metrics: dict) -> tuple[str, str]:
    """results.csv (one row per problem, via pandas) and pass_at_k.json, each written to a temp
    file and renamed, so an interrupted run never leaves a half-written result."""
    import csv
    import json
    import os

    import pandas as pd

    os.makedirs(out_dir, exist_ok=True)
    csv_path, json_path = os.path.join(out_dir, "results.csv"), os.path.join(out_dir, "pass_at_k.json")
    # every text field quoted: a sampled "\r" left bare reads back as a line break
    pd.DataFrame(rows).to_csv(csv_path + ".tmp", index=False, quoting=csv.QUOTE_NONNUMERIC)
    os.replace(csv_path + ".tmp", csv_path)
    with open(json_path + ".tmp", "w") as f:
        json.dump(metrics, f, indent=1)
    os.replace(json_path + ".tmp", json_path)
    return csv_path, json_path


def config_eval_sets(cfg, model_dir: str, log=print) -> list[EvalSet]:
    """`grpo-ray eval --config` without DATA: the sets a training run of `cfg` evaluates (its
    held-out prompts, then eval.sets), the same prompts with the training prompts removed, fitted
    to `model_dir`'s tokenizer."""
    from ..data.datasets import drop_training_prompts, load_datasets
    from ..models.modeling import load_tokenizer
    from .outputs import fit_records

    train, held_out = load_datasets(cfg.data, cfg.run.seed)
    held_out, dropped = drop_training_prompts(held_out, train, cfg.data.train_path or "the task")
    if dropped:
        log(f"warning: {dropped}")
    tokenizer = load_tokenizer(model_dir)
    fit = lambda rows, name: fit_records(cfg, tokenizer, rows, name, log)  # noqa: E731
    return eval_sets(cfg, fit(held_out, "held-out"), train, fit)


def eval_model(cfg, model_dir: str, records: list[dict], out_dir: str, log=print) -> tuple[dict, list[dict]]:
    """`grpo-ray eval MODEL DATA`: `records` with cfg.eval's samples, ks and temperature (one set,
    written into out_dir); returns the pass@k metrics and the per-problem rows."""
    e = cfg.eval
    return eval_model_sets(cfg, model_dir, [EvalSet("", records, e.samples, list(e.ks), e.temperature)], [out_dir],
                           log)[0]


def eval_model_sets(cfg, model_dir: str, sets: list[EvalSet], out_dirs: list[str],
                    log=print) -> list[tuple[dict, list[dict]]]:
    """Start generators and the verifier pool on the cluster once, evaluate each set (its own
    samples, ks and temperature) and write its results into its out_dir; returns each set's
    (pass@k metrics, per-problem rows)."""
    import os
    from dataclasses import replace

    import ray

    from ..models.modeling import check_model_dir, load_tokenizer
    from .outputs import fit_records

    check_model_dir(model_dir, max_model_len=cfg.rollout.max_model_len, tensor_parallel=cfg.rollout.tensor_parallel)
    # a prompt the model cannot take fails in vLLM: said here, before any actor, naming its file:line
    tokenizer = load_tokenizer(model_dir)
    sets = [replace(s, records=fit_records(cfg, tokenizer, s.records, f"eval set {s.name!r}" if s.name else "evaluation",
                                           log)) for s in sets]
    for out_dir in out_dirs:
        try:  # before hours of sampling, not after
            os.makedirs(out_dir, exist_ok=True)
            with open(os.path.join(out_dir, ".write-test"), "w"):
                pass
            os.remove(os.path.join(out_dir, ".write-test"))
        except OSError as e:
            raise OSError(f"--out {out_dir!r} is not writable ({e.strerror})") from None

    from ..roles.actors import actor_env, init_ray, start_env_hosts, start_generators
    from ..roles.local_verifier import start_verifier

    init_ray(None)
    fleet = GeneratorFleet(start_generators(cfg, model_dir))
    pool = start_verifier(cfg.reward, actor_env(), task=cfg.data.verifier, name=cfg.run.name)
    env = start_env_hosts(cfg, pool.app)
    try:
        fleet.ready()
        results = [evaluate(fleet, pool, s.records, samples=s.samples, ks=s.ks, temperature=s.temperature,
                            max_new_tokens=cfg.rollout.max_new_tokens, progress_every=64, env=env) for s in sets]
    finally:
        pool.shutdown()
        for actor in fleet.actors + list(env.hosts if env else ()):
            ray.kill(actor)
    for s, (metrics, rows), out_dir in zip(sets, results, out_dirs):
        csv_path, json_path = write_results(out_dir, rows, {"model": model_dir, "problems": len(rows), **metrics})
        log((f"{s.name}: " if s.name else "") + " ".join(f"{k[5:]} {v:.3f}" for k, v in metrics.items())
            + f" on {len(rows)} problems")
        log(f"wrote {csv_path} and {json_path}")
    return results
