"""LoRA's two weight syncs, end to end: configs/default_lora.yaml with model.lora.sync=merged (the
generators get the base with the adapter folded in) and with sync=adapter (only the adapter's
tensors travel; vLLM serves them as a LoRA), one after the other, plus the full fine-tuning
default job for reference.

    .venv/bin/python benchmarks/bench_lora.py [--steps 20] [--skip-full] [key=value ...]

Per run: held-out pass@1 at each evaluation, the median step, generation and sync times, bytes
sent to each generator per sync (sync/bytes), generation tokens/s (sampled tokens / the
sampling's own time), wall time. Each run is its own `grpo-ray train` process; the built-in base
is warm-started once before (the user's cache). Last line: one JSON object.
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--skip-full", action="store_true", help="only the two LoRA syncs")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
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
