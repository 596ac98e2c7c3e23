"""What a run leaves on disk besides checkpoints: the run directory and its config.yaml, the
spot-check samples, and the one-line step summary. Writes are atomic (temp file + rename)."""
from __future__ import annotations

import json
import os
import time

import yaml

from ..models.cache import cache_dir
from ..roles.actors import in_ray_job
from ..config import Config


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
        path, text = os.path.join(run_dir, "config.yaml"), yaml.safe_dump(cfg.to_dict(), sort_keys=False)
        if os.path.isfile(path) and open(path).read() != text:  # resumed with other settings: keep the old
            stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(os.path.getmtime(path)))
            os.replace(path, os.path.join(run_dir, f"config.until-{stamp}.yaml"))
        write_atomic(path, text)
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
    from ..models.warmstart import builtin_model

    return builtin_model(cfg, train_records, cache_dir(), log)


def fit_to_model(cfg: Config, model_path: str, train: list[dict], held_out: list[dict],
                 log) -> tuple[list[dict], list[dict]]:
    """The JSONL rows whose prompt fits the model (fit_records). The built-in task's prompts are
    short: not checked."""
    if cfg.data.task in ("arithmetic", "multiply"):
        return train, held_out
    from ..models.modeling import load_tokenizer

    tokenizer = load_tokenizer(model_path)
    if not cfg.data.drop_long_prompts:  # the error names the file's first long row, on either side of the split
        fit_records(cfg, tokenizer, train + held_out, "", log)
        return train, held_out
    return fit_records(cfg, tokenizer, train, "training", log), fit_records(cfg, tokenizer, held_out, "held-out", log)


def fit_records(cfg: Config, tokenizer, records: list[dict], name: str, log) -> list[dict]:
    """The records whose prompt fits rollout.max_model_len - rollout.max_new_tokens tokens. A
    row that does not is an error naming its file:line (vLLM would fail at the step that first
    draws it), or with data.drop_long_prompts dropped with a count."""
    from ..data.datasets import DataError, fit_prompts

    limit = cfg.rollout.max_model_len - cfg.rollout.max_new_tokens
    kept, dropped = fit_prompts(records, tokenizer, limit, drop=cfg.data.drop_long_prompts)
    if dropped:
        log(f"warning: dropped {dropped} of {len(records)} {name} prompt(s) longer than {limit} tokens "
            "(rollout.max_model_len - rollout.max_new_tokens; data.drop_long_prompts=true)")
    if not kept:
        raise DataError(f"no {name} prompt fits in {limit} tokens (rollout.max_model_len - rollout.max_new_tokens): "
                        "raise rollout.max_model_len")
    return kept


def stopped_where(run_dir: str, steps: int) -> str:
    """Where a stopped run is: 'after step N of S; the last checkpoint is ...: run the same
    command with --resume' (N: the last training step in metrics.jsonl)."""
    from .checkpoint import list_checkpoints

    done = 0
    try:
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:  # a line cut short by the stop
                    continue
                if isinstance(row, dict) and "time/step" in row:
                    done = max(done, int(row.get("step", 0)))
    except OSError:
        pass
    found = list_checkpoints(run_dir)
    where = (f"the last checkpoint is step {found[-1][0]} ({found[-1][1]}): run the same command with --resume"
             if found else "no checkpoint yet (train.checkpoint_every): a rerun starts over")
    return f"after step {done} of {steps}; {where}"


def write_samples(run_dir: str, step: int, samples: list[dict]) -> None:
    """samples/step_N.jsonl and a Markdown table of the same rows, for manual inspection."""
    folder = os.path.join(run_dir, "samples")
    os.makedirs(folder, exist_ok=True)
    base = os.path.join(folder, f"step_{step:06d}")
    write_atomic(base + ".jsonl", "".join(json.dumps(s) + "\n" for s in samples))

    def cell(v) -> str:
        text = f"{v:.3f}" if isinstance(v, float) else str(v)
        return text.replace("|", "\\|").replace("\n", "<br>")

    def response(s: dict) -> str:  # a multi-turn trajectory: each turn and observation, marked
        if "turns" not in s:
            return cell(s["response"])
        return "<br>".join(f"**[{t['role']}]** {cell(t['text'])}" for t in s["turns"])

    cols = ["prompt", "response", "reward", "advantage", "reason"]
    lines = [f"# Samples at step {step}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(response(s) if c == "response" else cell(s[c]) for c in cols) + " |"
              for s in samples]
    write_atomic(base + ".md", "\n".join(lines) + "\n")


def summary_line(m: dict, steps: int) -> str:
    t = " ".join(f"{k[5:]} {m[k]:.2f}" for k in ("time/generate", "time/verify", "time/reference",
                                                  "time/learner", "time/sync"))
    kl = f"kl {m['kl']:.4f} | " if "kl" in m else ""  # no reference ran: no KL
    return (f"step {m['step']}/{steps} | reward {m['reward/mean']:.3f} (std {m['reward/std']:.2f}) | {kl}"
            f"clip {m['clip/low']:.3f}/{m['clip/high']:.3f} | ent {m['entropy']:.2f} | "
            f"len {m['response_length/mean']:.1f} | {m['time/step']:.2f}s ({t})")
