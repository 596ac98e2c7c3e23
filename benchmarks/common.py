"""What the benchmarks share: the three model sizes, the arithmetic prompts, and one grpo-ray run
with the benchmark workload (8 prompts x 16 samples per step, as in issue 6's TRL figures)."""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, REPO)

from grpo_ray.models.tiny_model import TinyShape  # noqa: E402

# Qwen2-shaped, random-initialised, on the arithmetic tokenizer (~290 tokens). tiny is the default
# job's warm-started model, so that its reward moves within a few steps.
SIZES = {
    "tiny": {"shape": None, "new_tokens": 32, "steps": 20},
    "small": {"shape": TinyShape(hidden_size=512, num_layers=6, num_heads=8, num_kv_heads=4, intermediate_size=2048),
              "new_tokens": 128, "steps": 4},
    "medium": {"shape": TinyShape(hidden_size=768, num_layers=14, num_heads=12, num_kv_heads=6,
                                  intermediate_size=3072), "new_tokens": 128, "steps": 3,
               # default.yaml's two generators and two learner ranks ran out of this box's 24 GB
               # at 124M parameters (Ray's OOM killer, 2026-11-26): one of each
               "overrides": ["rollout.num_generators=1", "learner.num_ranks=1"]},
}
PROMPTS, GROUP, LR = 8, 16, 1e-4
KV_CACHE_MB = 2048  # room for a whole step's 128 sequences at the medium size (~43 KB per token in fp32)
CACHE = os.environ.get("GRPO_BENCH_CACHE", "/tmp/grpo-bench-models")  # models, built once for every benchmark


def records():
    """The default job's arithmetic training prompts (same split and seed)."""
    from grpo_ray.config import load_config
    from grpo_ray.data.datasets import load_datasets

    return load_datasets(load_config("configs/default.yaml").data, 0)[0]


def model_dir(size: str, root: str = CACHE) -> str:
    """The size's model folder, built once under root (tiny: the default job's warm start)."""
    from grpo_ray.config import load_config
    from grpo_ray.data.tasks import tokenizer_corpus
    from grpo_ray.models.tiny_model import build_tiny_model
    from grpo_ray.models.warmstart import builtin_model

    if SIZES[size]["shape"] is None:
        return builtin_model(load_config("configs/default.yaml"), records(), root, log=lambda *_: None)
    path = os.path.join(root, f"bench-{size}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        build_tiny_model(path + ".tmp", tokenizer_corpus(49), SIZES[size]["shape"], seed=0)
        os.replace(path + ".tmp", path)
    return path


def machine() -> str:
    """The CPU the numbers came from, e.g. "AMD EPYC, 2 CPUs, avx512": the same code gave a tiny
    ratio of 0.85 against TRL on an AMD EPYC box and 1.16-1.28 on a Xeon (benchmarks/RESULTS.md),
    so a figure without its machine cannot be compared with another."""
    name, flags = "unknown CPU", set()
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:  # not Linux
        import platform

        name = platform.processor() or name
    extras = [label for flag, label in (("avx512f", "avx512"), ("amx_bf16", "amx_bf16")) if flag in flags]
    return ", ".join([name, f"{os.cpu_count()} CPUs", *extras])


def num_params(path: str) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    with __import__("torch").device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    return sum(p.numel() for p in model.parameters())


def run_ours(model: str, new_tokens: int, steps: int, out_dir: str, *overrides: str) -> dict:
    """A grpo-ray run of the benchmark workload; per-step wall times, rewards and phase times."""
    from grpo_ray.config import load_config
    from grpo_ray.driver.train import train

    cfg = load_config("configs/default.yaml", [
        f"model.path={model}", f"rollout.prompts_per_step={PROMPTS}", f"algo.group_size={GROUP}",
        f"rollout.max_new_tokens={new_tokens}", f"rollout.kv_cache_mb={KV_CACHE_MB}", f"train.steps={steps}",
        f"learner.lr={LR}", "learner.warmup_steps=0",
        "train.eval_every=0", "train.checkpoint_every=0", "eval.num_prompts=8", "eval.samples=1", "eval.ks=[1]",
        "run.plots=false", "run.tensorboard=false", f"run.output_dir={out_dir}",
        "eval.sets=[]",  # default.yaml's retention set: the same workload as before it, and as TRL's
        *overrides])
    t0 = time.perf_counter()
    run_dir = train(cfg)
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if '"reward/mean"' in line]
    return {"wall_s": time.perf_counter() - t0, "step_s": [r["time/step"] for r in rows],
            "rewards": [r["reward/mean"] for r in rows], "kl": [r.get("kl") for r in rows],
            "phases": {k[5:]: [r[k] for r in rows] for k in rows[0] if k.startswith("time/")},
            "tokens": [r["response_length/mean"] * PROMPTS * GROUP for r in rows],
            "sync_bytes": [r["sync/bytes"] for r in rows if "sync/bytes" in r]}


def steady(values: list[float]) -> float:
    """Median over the steps after the first (the first warms caches and compiles)."""
    return statistics.median(values[1:] if len(values) > 1 else values)
