"""Where start-up and shut-down time goes: `grpo-ray train` from the command to the first step and
from the last step to the exit, phase by phase, with a fresh local Ray (the driver starts one)
and with a running `ray start --head` (the driver joins it).

    .venv/bin/python benchmarks/bench_startup.py [--modes fresh,cluster] [--steps 3] [key=value ...]

The workload is configs/default.yaml with train.steps=--steps (its evaluation at step 0 and at
the end included) plus any overrides given. Each run is its own process, timed from before it is
spawned to its exit; the phases come from the run's timings.json (roles/startup.py), whose zero
is the process start. The built-in base is warm-started once before the runs (the user's cache),
so the table shows a run's own start-up, not the one-off warm start.

Prints a table per mode and, as its last line, one JSON object: time_to_first_step_s (from the
command to the end of the first step) and wall_s (the command to the exit) for the first mode,
and both for every mode.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import REPO, machine  # noqa: E402

BIN = os.path.dirname(sys.executable)


def clean_env() -> dict:
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    return env


def warm(overrides: list[str]) -> None:
    """Build (or find) the cached warm-started base, so that no mode pays for it."""
    from grpo_ray.config import load_config
    from grpo_ray.data.datasets import load_datasets
    from grpo_ray.driver.outputs import prepare_model

    cfg = load_config(os.path.join(REPO, "configs/default.yaml"), overrides)
    if cfg.model.path == "builtin:tiny":
        prepare_model(cfg, load_datasets(cfg.data, cfg.run.seed)[0], tempfile.mkdtemp(), print)


def run(mode: str, steps: int, overrides: list[str], root: str) -> dict:
    env, out = clean_env(), os.path.join(root, mode)
    if mode == "cluster":
        env["RAY_AUTH_MODE"] = "disabled"  # PLATFORM.md: local debugging without tokens
        subprocess.run([f"{BIN}/ray", "start", "--head", "--num-cpus=2", "--disable-usage-stats"], env=env,
                       check=True, capture_output=True, timeout=180)
        env["RAY_ADDRESS"] = "auto"
    log = os.path.join(root, f"{mode}.log")
    cmd = [f"{BIN}/grpo-ray", "train", "configs/default.yaml", f"train.steps={steps}", f"run.output_dir={out}",
           *overrides]
    try:
        t0 = time.time()
        with open(log, "w") as f:
            rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
        wall = time.time() - t0
    finally:
        if mode == "cluster":
            subprocess.run([f"{BIN}/ray", "stop", "--force"], env=env, capture_output=True, timeout=120)
    if rc:
        sys.exit(f"{mode}: grpo-ray train exited {rc}; see {log}")
    timings = json.load(open(os.path.join(out, "default", "timings.json")))
    return {"wall_s": round(wall, 2), "time_to_first_step_s": timings["time_to_first_step_s"],
            "until_exit_s": timings["until_exit_s"], "phases": timings["phases"], "log": log}


def report(mode: str, r: dict) -> None:
    print(f"\n{mode} Ray: first step done at {r['time_to_first_step_s']:.1f} s, exit at {r['wall_s']:.1f} s")
    print(f"{'phase':<52}{'from s':>8}{'took s':>8}")
    for p in r["phases"]:
        print(f"{p['phase'][:51]:<52}{p['start_s']:>8.2f}{p['seconds']:>8.2f}")
    print(f"{'after train(): interpreter exit':<52}{r['until_exit_s']:>8.2f}"
          f"{r['wall_s'] - r['until_exit_s']:>8.2f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", default="fresh,cluster", help="fresh: the driver starts Ray; cluster: ray start --head")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("overrides", nargs="*", help="dotted.key=value for configs/default.yaml")
    args = ap.parse_args()
    modes = args.modes.split(",")
    if unknown := set(modes) - {"fresh", "cluster"}:
        ap.error(f"--modes: unknown {sorted(unknown)}; use fresh and/or cluster")
    root = tempfile.mkdtemp(prefix="bench-startup-")
    warm(args.overrides)
    results = {mode: run(mode, args.steps, args.overrides, root) for mode in modes}
    for mode, r in results.items():
        report(mode, r)
    print(f"\nlogs: {root}")
    first = results[modes[0]]
    print(json.dumps({"time_to_first_step_s": first["time_to_first_step_s"], "wall_s": first["wall_s"],
                      **{f"{k}_{m}": r[k] for m, r in results.items() for k in ("time_to_first_step_s", "wall_s")},
                      "steps": args.steps, "overrides": args.overrides, "machine": machine()}))


if __name__ == "__main__":
    main()
