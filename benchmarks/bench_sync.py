"""Weight sync (learner -> generators) time vs model size, for both sync methods, and its share
of a step.

    .venv/bin/python benchmarks/bench_sync.py [--sizes tiny,small,medium] [--methods object_store,collective]
                                              [--generators N] [--tensor-parallel K] [--in-loop]
                                              [--steps-from BENCH_VS_TRL_LOG_DIR]

Starts a real DeepSpeed learner and vLLM generator(s) as Ray actors on each benchmark model and
times one push through the fleet, as the driver does it every step, per sync.method:
object_store (the learner packs its weights into byte buckets, Ray stores them once, every
generator loads them into its running engine) and collective (the learner packs and keeps them,
broadcasts them over gloo to every generator worker, which loads them); median of 5 after one
warm-up. --in-loop adds the object store sync's cost inside a step (time/sync +
time/generate_queued: the load is queued, not awaited, and the next rollout waits for what is
left of it); the share of a step uses grpo-ray's step time at that size, from a bench_vs_trl
run's log directory when given (ours-SIZE.json), else from a 3-step run here. Last line: one
JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import SIZES, machine, model_dir, num_params, run_ours, steady  # noqa: E402


def time_sync(model: str, overrides: list[str], method: str) -> float:
    import ray

    from grpo_ray.config import load_config
    from grpo_ray.roles.actors import collective_sync, init_ray, start_generators, start_learners
    from grpo_ray.roles.fleet import GeneratorFleet
    from grpo_ray.roles.learner_group import LearnerGroup
    from grpo_ray.roles.placement import reserve

    init_ray(None)
    cfg = load_config("configs/default.yaml", [f"model.path={model}", *overrides, f"sync.method={method}"])
    placement = reserve(cfg)
    try:
        gens, learners = start_generators(cfg, model, placement), start_learners(cfg, model, placement)
        ray.get([g.ready.remote() for g in gens] + [lr.__ray_ready__.remote() for lr in learners])
        # below ZeRO-3, rank 0 alone packs the weights (LearnerGroup)
        group = LearnerGroup(learners, gather_on_all_ranks=False, dtype=cfg.model.dtype,
                             collective=method == "collective")
        fleet = GeneratorFleet(gens, group, collective=collective_sync(cfg))
        if method == "collective" and not fleet.form_group():
            raise RuntimeError("the weight-sync group did not form")
        times = []
        for version in range(6):
            t = time.perf_counter()
            if method == "collective":
                fleet.push(group.keep_weights(), version, broadcast=True)
            else:
                fleet.push(group.weight_buckets(), version)
            fleet.settle()
            times.append(time.perf_counter() - t)
    finally:
        placement.remove()
    return statistics.median(times[1:])


def step_time(size: str, steps_from: str | None, layout: list[str]) -> tuple[float, float]:
    """(grpo-ray's median step time, the sync's cost inside it) at this size. The loop queues the
    weight load without awaiting it (time/sync ~0); what the next rollout still waits for of it
    is time/generate_queued, so the cost is the sum of the two."""
    saved = os.path.join(steps_from or "", f"ours-{size}.json")
    if steps_from and os.path.isfile(saved):
        run = json.load(open(saved))
    else:
        run = run_ours(model_dir(size), SIZES[size]["new_tokens"], 3, tempfile.mkdtemp(prefix="bench-sync-"),
                       *layout)
    phases = run["phases"]
    queued = phases.get("generate_queued", [0.0] * len(phases["sync"]))  # absent in older saved runs
    return steady(run["step_s"]), steady([s + q for s, q in zip(phases["sync"], queued)])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="tiny,small,medium")
    ap.add_argument("--methods", default="object_store,collective")
    ap.add_argument("--generators", type=int, default=None, help="default: the size's layout (default.yaml's, "
                    "or SIZES[size]['overrides'])")
    ap.add_argument("--tensor-parallel", type=int, default=1, help="rollout.tensor_parallel of each generator")
    ap.add_argument("--in-loop", action="store_true", help="also the object store sync's share of a step")
    ap.add_argument("--steps-from", default=None)
    args = ap.parse_args()
    methods = args.methods.split(",")
    print(f"{'size':<8}{'params':>9}{'fp32 MB':>9}" + "".join(f"{m + ' s':>16}" for m in methods)
          + (f"{'in-loop s':>11}{'step s':>9}{'share':>8}" if args.in_loop else ""))
    headline = {}
    for size in args.sizes.split(","):
        model = model_dir(size)
        params = num_params(model)
        layout = [*SIZES[size].get("overrides", []), f"rollout.tensor_parallel={args.tensor_parallel}"]
        if args.generators:
            layout = [*layout, f"rollout.num_generators={args.generators}"]
        row = f"{size:<8}{params / 1e6:>8.1f}M{params * 4 / 2**20:>9.0f}"
        for method in methods:
            sync = time_sync(model, layout, method)
            headline[f"sync_s_{size}_{method}"] = round(sync, 4)
            row += f"{sync:>16.4f}"
        if args.in_loop:
            step, in_loop = step_time(size, args.steps_from, layout)
            headline[f"sync_share_{size}"] = round(in_loop / step, 4)
            row += f"{in_loop:>11.3f}{step:>9.2f}{in_loop / step:>8.1%}"
        print(row, flush=True)
    print(json.dumps({**headline, "tensor_parallel": args.tensor_parallel, "machine": machine()}))


if __name__ == "__main__":
    main()
