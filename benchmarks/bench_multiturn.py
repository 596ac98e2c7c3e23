"""Multi-turn, tool-using rollouts: what a tool call costs, how many the sandbox pool runs a
second, and what the tools cost a step of the tool task.

    .venv/bin/python benchmarks/bench_multiturn.py [--replicas 1,2,4] [--calls 256] [--prompts 16]
        [--sandboxes warm,fresh] [--rounds 5] [--model DIR]

1. Per-call cost (median, p99) of the python tool's call ("print(347*86)"): in this process
   (the sandbox alone), and from an env host through the verifier pool (the path a rollout's
   call takes: host actor -> Serve -> replica thread -> sandbox); for each kind of sandbox
   (env.options.warm: a fork of a warm sandbox, or a fresh one per call).
2. Calls/s of the pool at 1, 2 and 4 replicas: `--calls` calls sent at once through one env host.
3. The tool task (configs/tool_default.yaml's warm-started model, data.task=multiply): one
   generate call of --prompts x group_size trajectories with the python tool on the pool,
   against one single-turn call that samples the same number of model tokens per completion
   (min_tokens = max_tokens = the multi-turn mean); and the generator's wait on tool calls with
   nothing left to sample (Rollout.env_s) as a share of the multi-turn call (the first kind of
   sandbox in --sandboxes); medians over --rounds calls of each.
Prints tables and, last, one JSON line with every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
# The tool task's generator runs here on one core ("0"), and a generator actor on one core gets
# one OpenMP thread (actors._placed). Left at the machine's count, OpenMP's second thread spins
# between the engine's steps on the core the tools need: before torch loads, or it is too late.
os.environ.setdefault("OMP_NUM_THREADS", "1")

CALL = "```python\nprint(347*86)\n```\n```output"
LIMITS = dict(timeout_s=5.0, memory_mb=256, max_output_bytes=8192, allow_unsandboxed=False)
KINDS = {"warm": True, "fresh": False}


def pct(times: list[float], q: float) -> float:
    times = sorted(times)
    return 1000 * times[min(len(times) - 1, int(q * len(times)))]


def local_cost(n: int, kind: str) -> dict:
    from grpo_ray.envs.tools import execute

    limits = {**LIMITS, "warm": KINDS[kind]}
    execute("pass", limits)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        assert execute("print(347*86)", limits).output == "29842\n"
        times.append(time.perf_counter() - t)
    return {"median_ms": round(1000 * statistics.median(times), 1), "p99_ms": round(pct(times, 0.99), 1)}


def start_pool(replicas: int, ongoing: int = 8):
    from grpo_ray.config import load_config
    from grpo_ray.roles.actors import actor_env
    from grpo_ray.roles.verifier_pool import VerifierPool

    cfg = load_config(None, [f"run.output_dir={tempfile.mkdtemp()}", f"reward.pool.min_replicas={replicas}",
                             f"reward.pool.max_replicas={replicas}", f"reward.pool.max_ongoing_requests={ongoing}"])
    return VerifierPool(cfg.reward, actor_env(), name=f"bench{replicas}")


def host_for(pool, concurrency: int = 64):
    import ray

    from grpo_ray.roles.env_host import EnvHost

    return ray.remote(EnvHost).options(num_cpus=0.1, max_concurrency=concurrency).remote(pool.app, 4)


def pool_figures(replicas: int, serial: int, burst: int, ongoing: int, kind: str) -> dict:
    import ray

    from grpo_ray.envs import EnvSpec

    pool = start_pool(replicas, ongoing)
    try:
        host = host_for(pool)
        keys = [f"k{i}" for i in range(burst)]
        ray.get(host.reset.remote([(k, EnvSpec("python", {"warm": KINDS[kind]}), {}) for k in keys]))
        for k in keys[:8]:  # warm-up: each replica's thread pool and the handle
            ray.get(host.step.remote(k, CALL))
        times = []
        for i in range(serial):
            t = time.perf_counter()
            reply = ray.get(host.step.remote(keys[i % burst], CALL))
            times.append(time.perf_counter() - t)
        assert reply.step.observation == "\n29842\n```\n", reply
        t = time.perf_counter()
        replies = ray.get([host.step.remote(k, CALL) for k in keys])
        took = time.perf_counter() - t
        assert all(r.step.tool_errors == 0 for r in replies)
        return {"median_ms": round(1000 * statistics.median(times), 1), "p99_ms": round(pct(times, 0.99), 1),
                "calls_per_s": round(burst / took, 1)}
    finally:
        pool.shutdown()


def tool_task(prompts: int, model: str | None, kind: str, rounds: int = 5) -> dict:
    """The tool task's generate call, multi-turn against single-turn of the same length. model:
    the policy to sample (default: the warm-started base; a trained tool_default run's
    final_model calls the tool on nearly every prompt)."""
    import ray
    from vllm import SamplingParams

    from grpo_ray.config import load_config
    from grpo_ray.data.datasets import load_datasets
    from grpo_ray.driver.outputs import cache_dir
    from grpo_ray.models.warmstart import builtin_model
    from grpo_ray.roles.actors import env_rollout
    from grpo_ray.roles.generator import Generator

    cfg = load_config("configs/tool_default.yaml", [f"env.options.warm={str(KINDS[kind]).lower()}"])
    train, _ = load_datasets(cfg.data, cfg.run.seed)
    model = model or builtin_model(cfg, train, cache_dir(), log=lambda *_: None)
    records, G = train[:prompts], cfg.algo.group_size
    pool = start_pool(1)
    try:
        env = env_rollout(cfg, (host_for(pool),))
        gen = Generator(model, cpu_threads="0", max_model_len=cfg.rollout.max_model_len,
                        kv_cache_mb=cfg.rollout.kv_cache_mb)
        kw = dict(n=G, temperature=1.0, max_new_tokens=cfg.rollout.max_new_tokens, records=records, env=env)
        gen.generate([r["prompt"] for r in records], seed=0, **kw)  # warm-up
        multi, waits, runs = [], [], []
        for seed in range(1, rounds + 1):
            t = time.perf_counter()
            ro = gen.generate([r["prompt"] for r in records], seed=seed, **kw)
            multi.append(time.perf_counter() - t)
            waits.append(ro.env_s)
            runs.append(ro)
        trajs = [t for ro in runs for t in ro.trajectories]
        model_tokens = sum(len(r) for ro in runs for r in ro.response_ids) - sum(t.observation_tokens for t in trajs)
        per = max(1, round(model_tokens / len(trajs)))
        single = []
        for seed in range(1, rounds + 1):
            params = SamplingParams(n=G, temperature=1.0, max_tokens=per, min_tokens=per, logprobs=0, seed=seed,
                                    detokenize=False)
            t = time.perf_counter()
            gen.llm.generate([r["prompt"] for r in records], params, use_tqdm=False)
            single.append(time.perf_counter() - t)
        m, s, w = (statistics.median(x) for x in (multi, single, waits))
        return {"trajectories": len(runs[0]), "rounds": rounds, "model_tokens_per_trajectory": per,
                "tool_calls_per_trajectory": round(sum(t.tool_calls for t in trajs) / len(trajs), 2),
                "turns_per_trajectory": round(sum(t.turns for t in trajs) / len(trajs), 2),
                "multi_turn_s": round(m, 3), "single_turn_s": round(s, 3), "ratio": round(m / s, 2),
                "tool_wait_s": round(w, 3),
                "tool_share": round(statistics.median(a / b for a, b in zip(waits, multi)), 3)}
    finally:
        pool.shutdown()
        ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--replicas", default="1,2,4")
    ap.add_argument("--calls", type=int, default=256)
    ap.add_argument("--serial", type=int, default=100)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--ongoing", type=int, default=8, help="reward.pool.max_ongoing_requests")
    ap.add_argument("--sandboxes", default="warm,fresh", help="kinds of sandbox to measure: warm, fresh")
    ap.add_argument("--skip-task", action="store_true")
    ap.add_argument("--model", default=None, help="the tool task's policy (default: the warm-started base)")
    ap.add_argument("--rounds", type=int, default=5, help="the tool task's calls of each kind (medians)")
    args = ap.parse_args()
    import ray

    from benchmarks.common import machine

    kinds = args.sandboxes.split(",")
    out = {"machine": machine(), "local": {k: local_cost(args.serial, k) for k in kinds}}
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")
    out["pool"] = {k: {n: pool_figures(n, args.serial, args.calls, args.ongoing, k)
                       for n in map(int, args.replicas.split(","))} for k in kinds}
    print(f"\npython tool call ({out['machine']})")
    print(f"{'path':<46}{'median ms':>10}{'p99 ms':>9}{'calls/s':>9}")
    for k in kinds:
        print(f"{f'{k} sandbox, in process':<46}{out['local'][k]['median_ms']:>10}{out['local'][k]['p99_ms']:>9}")
        for n, f in out["pool"][k].items():
            print(f"{f'{k} sandbox, env host -> pool, {n} replica(s)':<46}{f['median_ms']:>10}{f['p99_ms']:>9}"
                  f"{f['calls_per_s']:>9}")
    if args.skip_task:
        print(json.dumps(out))
        return
    out["tool_task"] = t = tool_task(args.prompts, args.model, kinds[0], args.rounds)
    print(f"\ntool task ({kinds[0]} sandbox): {t['trajectories']} trajectories, {t['turns_per_trajectory']} turns and "
          f"{t['tool_calls_per_trajectory']} tool calls each, {t['model_tokens_per_trajectory']} model tokens; "
          f"medians of {t['rounds']} calls")
    print(f"{'multi-turn generate s':<34}{t['multi_turn_s']:>10}")
    print(f"{'single turn, same tokens s':<34}{t['single_turn_s']:>10}")
    print(f"{'tool wait on the critical path s':<34}{t['tool_wait_s']:>10}  ({100 * t['tool_share']:.0f}% of the call)")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
