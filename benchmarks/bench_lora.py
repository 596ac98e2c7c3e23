"""LoRA's two weight syncs, end to end: configs/default_lora.yaml with model.lora.sync=merged (the
generators get the base with the adapter folded in) and with sync=adapter (only the adapter's
tensors travel; vLLM serves them as a LoRA), one after the other, plus the full fine-tuning
default job for reference.

    .venv/bin/python benchmarks/bench_lora.py [--steps 20] [--skip-full] [key=value ...]

Per run: held-out pass@1 at each evaluation, the median step, generation and sync times, bytes
sent to each generator per sync (sync/bytes), generation tokens/s (sampled tokens / the
sampling's own time), wall time. Each run is its own `grpo-ray train` process; the built-in base
is warm-started once before (the user's cache). Last line: one JSON object.

    .venv/bin/python benchmarks/bench_lora.py --sizes small,medium [--rank 8] [--size-steps N] [key=value ...]

The bigger models of benchmarks/common.py (SIZES: the step benchmark's workload, 8 prompts x 16
samples, 128 new tokens), full fine-tuning against LoRA (rank --rank on every linear layer) with
merged and with adapter sync, in this process: per run the steady step and sync times, the bytes
per sync, the learner's peak memory (peak RSS on CPU, the most of its ranks), its optimizer
state, the reference actor's peak memory (full fine-tuning runs it as an actor here,
resources.reference_host=actor; LoRA places none) and the trained parameters. Last
line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import REPO, machine  # noqa: E402

BIN = os.path.dirname(sys.executable)


def run(name: str, config: str, overrides: list[str], root: str) -> dict:
    out = os.path.join(root, name)
    cmd = [f"{BIN}/grpo-ray", "train", config, f"run.output_dir={out}", "run.name=run", *overrides]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    t0 = time.time()
    with open(os.path.join(root, f"{name}.log"), "w") as f:
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    wall = time.time() - t0
    if rc:
        sys.exit(f"{name}: exit {rc}; see {root}/{name}.log")
    rows = [json.loads(line) for line in open(os.path.join(out, "run", "metrics.jsonl"))]
    steps = [r for r in rows if "time/step" in r][1:] or [r for r in rows if "time/step" in r]
    # tokens: the step's sampled tokens; generate_sampling: the slowest generator's own sampling time
    rate = [r["tokens"] / r["time/generate_sampling"] for r in steps if r.get("time/generate_sampling")]

    def med(key):
        vals = [r[key] for r in steps if key in r]
        return statistics.median(vals) if vals else float("nan")

    return {"pass@1": {r["step"]: round(r["eval/pass@1"], 3) for r in rows if "eval/pass@1" in r},
            "step_s": med("time/step"), "generate_s": med("time/generate"), "sync_s": med("time/sync"),
            "sync_bytes": med("sync/bytes"), "tokens_per_s": statistics.median(rate) if rate else float("nan"),
            "final_kl": next((r["kl"] for r in reversed(rows) if "kl" in r), float("nan")), "wall_s": wall}


def _peak_rss_mb(actor) -> float:
    import ray

    return ray.get(actor.__ray_call__.remote(
        lambda self: __import__("resource").getrusage(__import__("resource").RUSAGE_SELF).ru_maxrss / 1024))


def _optimizer_state_mb(actor) -> float:
    """The bytes of the optimizer's state tensors (AdamW's moments; DeepSpeed's ZeRO optimizer
    wraps a torch optimizer, whose state holds its flat partitions)."""
    import ray

    def measure(self):
        import torch

        opt, seen = self.backend.optimizer, 0
        while opt is not None and not getattr(opt, "state", None):
            opt = getattr(opt, "optimizer", None)
        for state in (opt.state.values() if opt is not None else ()):
            seen += sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t) and t.dim())
        return seen / 1e6

    return ray.get(actor.__ray_call__.remote(measure))


def size_run(size: str, variant: list[str], overrides: list[str], steps: int = 0) -> dict:
    """One in-process run at a SIZES model; the actors' memory is read just before they stop."""
    import grpo_ray.driver.train as train_mod
    from common import SIZES, model_dir, run_ours, steady

    memory, stop = {}, train_mod.stop_roles

    def measure_then_stop(roles):
        learners = roles.learners.actors
        memory.update(learner_peak_mb=max(_peak_rss_mb(a) for a in learners),
                      optimizer_state_mb=sum(_optimizer_state_mb(a) for a in learners),
                      reference_peak_mb=_peak_rss_mb(roles.reference.actors[0]) if roles.reference and roles.reference.actors else 0.0,
                      trained=roles.learners.parameter_counts()[0])
        stop(roles)

    train_mod.stop_roles = measure_then_stop
    try:
        spec = SIZES[size]
        got = run_ours(model_dir(size), spec["new_tokens"], steps or spec["steps"],
                       tempfile.mkdtemp(prefix="bench-lora-"), *spec.get("overrides", []), *variant, *overrides)
    finally:
        train_mod.stop_roles = stop
    sync_bytes = statistics.median(got["sync_bytes"]) if got.get("sync_bytes") else float("nan")
    return {"step_s": steady(got["step_s"]), "sync_s": steady(got["phases"]["sync"]), "sync_bytes": sync_bytes,
            **memory}


def sizes_table(sizes: list[str], rank: int, overrides: list[str], steps: int = 0) -> None:
    lora = [f"model.lora.rank={rank}", f"model.lora.alpha={2 * rank}", "learner.lr=5e-4"]
    # full fine-tuning keeps its reference in an actor of its own, whose memory the table shows
    # apart (on CPUs it would otherwise be a copy inside each learner rank: resources.reference_host)
    variants = {"full": ["resources.reference_host=actor"], "lora merged": [*lora, "model.lora.sync=merged"],
                "lora adapter": [*lora, "model.lora.sync=adapter"]}
    results = {size: {name: size_run(size, v, overrides, steps) for name, v in variants.items()} for size in sizes}
    print(f"\n{'size':<8}{'run':<14}{'step s':>8}{'sync s':>8}{'sync MB':>9}{'% full':>8}{'learner MB':>11}"
          f"{'optim MB':>10}{'ref MB':>8}{'trained M':>10}")
    for size, runs in results.items():
        full = runs["full"]["sync_bytes"]
        for name, r in runs.items():
            print(f"{size:<8}{name:<14}{r['step_s']:>8.3f}{r['sync_s']:>8.3f}{r['sync_bytes'] / 1e6:>9.2f}"
                  f"{100 * r['sync_bytes'] / full:>7.1f}%{r['learner_peak_mb']:>11.0f}{r['optimizer_state_mb']:>10.1f}"
                  f"{r['reference_peak_mb']:>8.0f}{r['trained'] / 1e6:>10.3f}")
    print(json.dumps({"sizes": results, "rank": rank, "machine": machine()}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--skip-full", action="store_true", help="only the two LoRA syncs")
    ap.add_argument("--sizes", default="", help="e.g. small,medium: full vs LoRA at the bigger SIZES models")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank with --sizes (alpha: 2 x rank)")
    ap.add_argument("--size-steps", type=int, default=0, help="steps per run with --sizes (default: SIZES' own)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.sizes:
        return sizes_table(args.sizes.split(","), args.rank, args.overrides, args.size_steps)
    root = tempfile.mkdtemp(prefix="bench-lora-")
    extra = [f"train.steps={args.steps}", *args.overrides]
    runs = {"lora merged": ("configs/default_lora.yaml", ["model.lora.sync=merged", *extra]),
            "lora adapter": ("configs/default_lora.yaml", ["model.lora.sync=adapter", *extra])}
    if not args.skip_full:
        runs["full fine-tuning"] = ("configs/default.yaml", extra)
    results = {name: run(name.replace(" ", "_"), cfg, ov, root) for name, (cfg, ov) in runs.items()}
    print(f"\n{'':<18}{'step s':>8}{'gen s':>8}{'sync s':>8}{'sync MB':>9}{'tok/s':>8}{'wall s':>8}   pass@1 by step")
    for name, r in results.items():
        curve = " ".join(f"{s}:{p:.3f}" for s, p in r["pass@1"].items())
        print(f"{name:<18}{r['step_s']:>8.3f}{r['generate_s']:>8.3f}{r['sync_s']:>8.4f}{r['sync_bytes'] / 1e6:>9.3f}"
              f"{r['tokens_per_s']:>8.0f}{r['wall_s']:>8.1f}   {curve}")
    print(f"\nlogs: {root}")
    print(json.dumps({"runs": results, "steps": args.steps, "machine": machine()}))


if __name__ == "__main__":
    main()
