"""Where a step's time goes, in sync and async mode, on the default job.

    .venv/bin/python benchmarks/bench_step.py [dotted.overrides ...]

Runs configs/default.yaml (warm-started tiny model, 32 prompts x 16 samples, 20 steps) twice:
rollout.asynchronous=false, then true. Prints per-phase wall time (median over steps 2..N;
overhead = step minus the timed phases on the driver's critical path), tokens/s, peak memory per
actor and the held-out pass@1 each run reached. In async mode generation runs beside verify,
reference and learner, so `generate` is only the wait for it and `generate_sampling` the
generators' busy time. The weight load is queued behind the update, not awaited, so its cost in
the step is `sync + generate_queued` (the next rollout's wait for it). The last line is one JSON
object.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import REPO, machine, steady  # noqa: E402

import grpo_ray.driver.train as train_mod  # noqa: E402
from grpo_ray.config import load_config  # noqa: E402

PHASES = ["generate", "verify", "reference", "learner", "sync", "overhead", "step",
          "generate_queued", "generate_sampling"]  # not phases of their own: parts of, or beside, `generate`


def peak_rss_mb(actor) -> float:
    import ray

    return ray.get(actor.__ray_call__.remote(lambda self: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def run(asynchronous: bool, overrides: list[str]) -> dict:
    """One training run; the actors' peak memory is read just before they are stopped."""
    memory = {}
    stop = train_mod.stop_roles

    def measure_then_stop(roles):
        memory.update({f"generator {i}": peak_rss_mb(g) for i, g in enumerate(roles.fleet.actors)})
        memory.update({f"learner {i}": peak_rss_mb(lr) for i, lr in enumerate(roles.learners.actors)})
        if roles.reference is not None and roles.reference.actors:  # none with algo.beta=0 algo.kl_stop=null or in the learners
            memory["reference"] = peak_rss_mb(roles.reference.actors[0])
        stop(roles)

    train_mod.stop_roles = measure_then_stop
    cfg = load_config(os.path.join(REPO, "configs/default.yaml"), [
        f"run.output_dir={tempfile.mkdtemp(prefix='bench-step-')}", f"rollout.asynchronous={asynchronous}",
        "run.plots=false", *overrides])
    t0 = time.perf_counter()
    try:
        run_dir = train_mod.train(cfg)
    finally:
        train_mod.stop_roles = stop
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    steps = [r for r in rows if "reward/mean" in r]
    evals = [r for r in rows if "eval/pass@1" in r]
    memory["driver"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tokens = [r["response_length/mean"] * cfg.rollout.prompts_per_step * cfg.algo.group_size for r in steps]
    return {"wall_s": time.perf_counter() - t0, "phases": {p: steady([r[f"time/{p}"] for r in steps]) for p in PHASES},
            "tokens_per_s": steady([t / r["time/step"] for t, r in zip(tokens, steps)]),
            "pass1": [e["eval/pass@1"] for e in evals], "reward": [r["reward/mean"] for r in steps],
            "kl_end": steps[-1].get("kl"), "memory_mb": memory}


def main() -> None:
    results = {mode: run(mode == "async", sys.argv[1:]) for mode in ("sync", "async")}
    print(f"\n{'phase (s, median)':<20}{'sync':>10}{'async':>10}")
    for p in PHASES:
        print(f"{p:<20}{results['sync']['phases'][p]:>10.3f}{results['async']['phases'][p]:>10.3f}")
    for key, label in (("tokens_per_s", "tokens/s (step)"), ("wall_s", "wall s (run)"), ("kl_end", "KL, last step")):
        print(f"{label:<20}{results['sync'][key]:>10.3f}{results['async'][key]:>10.3f}")
    ends = [f"{results[m]['pass1'][0]:.3f}->{results[m]['pass1'][-1]:.3f}" for m in ("sync", "async")]
    print(f"{'pass@1 start->end':<20}{ends[0]:>13}{ends[1]:>13}")
    print("\npeak memory (MiB, RSS)")
    for actor in results["sync"]["memory_mb"]:
        print(f"{actor:<20}{results['sync']['memory_mb'][actor]:>10.0f}{results['async']['memory_mb'][actor]:>10.0f}")
    sync, asyn = results["sync"]["phases"], results["async"]["phases"]
    # What overlap could reach: the longer of the two branches, from the async run itself, where
    # the roles share the cores as they do there: the generators' busy time against what the step
    # waited for the reference and the learner. (Sync-run phase times had each role on every
    # core, and since the reference pass is queued behind the sampling they hold only its wait.)
    bound = max(asyn["generate_sampling"], asyn["learner"] + asyn["reference"])
    print("\nreward per step, sync :", " ".join(f"{x:.2f}" for x in results["sync"]["reward"]))
    print("reward per step, async:", " ".join(f"{x:.2f}" for x in results["async"]["reward"]))
    print(json.dumps({"sync_step_s": round(sync["step"], 3), "async_step_s": round(asyn["step"], 3),
                      "async_step_vs_overlap_bound_same_run": round(asyn["step"] / bound, 3),
                      # the load is queued, not awaited: what the next rollout waited for is its cost
                      "sync_share": round((sync["sync"] + sync["generate_queued"]) / sync["step"], 4),
                      "overhead_share": round(sync["overhead"] / sync["step"], 4),
                      "pass1_end_sync": round(results["sync"]["pass1"][-1], 3),
                      "pass1_end_async": round(results["async"]["pass1"][-1], 3), "machine": machine()}))


if __name__ == "__main__":
    main()
