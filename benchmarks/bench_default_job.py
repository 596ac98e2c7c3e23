"""Time the default job end to end and summarise what it learned.

    .venv/bin/python benchmarks/bench_default_job.py [dotted.overrides ...]

Prints a table (phases, per-step timings, held-out pass@k before/after) and, as its last line,
one JSON object with the headline figures. The run goes to a fresh directory under /tmp, so the
warm start is part of the measured time (as for a new user), and it runs in this process, so
Ray's start-up counts too.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from grpo_ray.config import load_config  # noqa: E402
from grpo_ray.driver.train import train  # noqa: E402

PHASES = ["generate", "verify", "reference", "learner", "sync", "overhead", "step"]


def main() -> None:
    out = tempfile.mkdtemp(prefix="grpo-bench-")
    cfg = load_config("configs/default.yaml", [f"run.output_dir={out}", *sys.argv[1:]])
    start = time.perf_counter()
    run_dir = train(cfg)
    total = time.perf_counter() - start
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    steps = [r for r in rows if "reward/mean" in r]
    evals = [r for r in rows if "eval/pass@1" in r]
    print(f"\ndefault job: {len(steps)} steps, {cfg.rollout.prompts_per_step} prompts x {cfg.algo.group_size} "
          f"samples per step, wall time {total:.0f}s (warm start and actor start-up included)")
    print(f"{'phase':<12}{'median s':>10}{'mean s':>10}")
    for p in PHASES:
        vals = [r[f"time/{p}"] for r in steps[1:]] or [r[f"time/{p}"] for r in steps]  # step 1 warms caches
        print(f"{p:<12}{statistics.median(vals):>10.3f}{statistics.mean(vals):>10.3f}")
    print(f"{'step':>6}{'pass@1':>10}{'pass@10':>10}")
    for e in evals:
        print(f"{e['step']:>6}{e['eval/pass@1']:>10.3f}{e['eval/pass@10']:>10.3f}")
    print(json.dumps({"wall_s": round(total, 1), "pass1_start": round(evals[0]["eval/pass@1"], 3),
                      "pass1_end": round(evals[-1]["eval/pass@1"], 3),
                      "pass1_gain": round(evals[-1]["eval/pass@1"] - evals[0]["eval/pass@1"], 3),
                      "step_s_median": round(statistics.median(r["time/step"] for r in steps), 3),
                      "final_kl": round(steps[-1]["kl"], 4)}))


if __name__ == "__main__":
    main()
