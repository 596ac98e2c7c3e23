"""grpo-ray vs TRL's GRPOTrainer, the same workload at three model sizes.

    .venv/bin/pip install -e '.[bench]'          # TRL (optional extra)
    .venv/bin/python benchmarks/bench_vs_trl.py [--sizes tiny,small,medium] [--rounds N]

Same model folder, prompts (the default job's arithmetic task), group size 16, 8 prompts per
step, completion length (tiny 32 tokens, small/medium 128), learning rate (constant 1e-4, AdamW
betas 0.9/0.99, grad clip 1), beta 0.001, epsilon 10, per-sequence loss ("grpo"), temperature 1,
the same step count, fp32 (--dtype bfloat16: TRL's bf16=True with the model loaded in bf16, and
grpo-ray's model.dtype=bfloat16, which keeps fp32 master weights). TRL runs on the CPU with its
default HF `generate`; grpo-ray with its default actors (vLLM generators, reference, DeepSpeed
learner ranks, verifier pool). --compiled compiles grpo-ray's vLLM engines
(rollout.enforce_eager=false): sampling ~12% faster at the tiny size and ~4% at small
(in-process, alternating), for 0-6 s more start-up per engine with a warm compile cache and
28-37 s without, which the wall time shows and the step time does not. Each system runs in
its own process, one after the other. Prints a table per size (step time; "train s", the
training call alone; "process s", the whole process from interpreter start to exit, which is
what a user waits for: imports, set-up, Ray's start and shut-down included), both reward
curves, a PNG of step time vs model size, and as its last line one JSON object with the
headline ratios (step time, and wall_ratio_vs_trl_<size>: the whole-process ratio), and the
rounds and engine mode they came from.

--rounds N runs the systems N times in turn (TRL, grpo-ray, TRL, grpo-ray, ...) and reports the
median of the N ratios, each taken between runs minutes apart. On a shared 2-core box the same
TRL run took 0.28 s a step in one run and 0.45 s in another (benchmarks/RESULTS.md, fifth
session): a ratio of two single runs said more about the box than about either system.
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

from common import GROUP, LR, PROMPTS, REPO, SIZES, machine, model_dir, num_params, records, run_ours, steady  # noqa: E402


def run_trl(model: str, new_tokens: int, steps: int, out_dir: str, dtype: str = "float32") -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from grpo_ray.verifiers.math import score_math

    torch.set_num_threads(2)

    def correct(prompts, completions, answer, **_):
        return [score_math({"answer": a}, c).reward for c, a in zip(completions, answer)]

    class Clock(TrainerCallback):
        def __init__(self):
            self.step_s, self.rewards, self.kl, self.t = [], [], [], 0.0

        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.step_s.append(time.perf_counter() - self.t)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "reward" in logs:
                self.rewards.append(logs["reward"])
                self.kl.append(logs.get("kl", float("nan")))

    data = Dataset.from_list([{"prompt": r["prompt"], "answer": str(r["answer"])} for r in records()])
    args = GRPOConfig(output_dir=out_dir, per_device_train_batch_size=PROMPTS * GROUP, num_generations=GROUP,
                      max_completion_length=new_tokens, learning_rate=LR, lr_scheduler_type="constant",
                      warmup_steps=0, adam_beta2=0.99, weight_decay=0.0, max_grad_norm=1.0, max_steps=steps,
                      beta=0.001, epsilon=10.0, loss_type="grpo", temperature=1.0, logging_steps=1,
                      report_to="none", save_strategy="no", use_cpu=True, bf16=dtype == "bfloat16", seed=0,
                      disable_tqdm=True)
    tok = AutoTokenizer.from_pretrained(model)
    tok.pad_token = tok.pad_token or tok.eos_token
    clock = Clock()
    # bfloat16: the model itself in bf16 as well as autocast, TRL's fastest CPU setting (generation too)
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)),
                          reward_funcs=correct, args=args, train_dataset=data, processing_class=tok,
                          callbacks=[clock])
    t0 = time.perf_counter()
    trainer.train()
    return {"wall_s": time.perf_counter() - t0, "step_s": clock.step_s, "rewards": clock.rewards, "kl": clock.kl}


def worker(system: str, size: str, root: str, out: str, dtype: str, compiled: bool) -> None:
    spec, model = SIZES[size], model_dir(size)
    out_dir = tempfile.mkdtemp(prefix=f"{system}-", dir=root)
    if system == "trl":
        result = run_trl(model, spec["new_tokens"], spec["steps"], out_dir, dtype)
    else:  # ours_async: one-step off-policy rollouts (generation of step n+1 overlaps learning on n)
        result = run_ours(model, spec["new_tokens"], spec["steps"], out_dir, f"model.dtype={dtype}",
                          f"rollout.asynchronous={system == 'ours_async'}", f"rollout.enforce_eager={not compiled}",
                          *spec.get("overrides", []))
    with open(out, "w") as f:
        json.dump(result, f)


def measure(system: str, size: str, root: str, dtype: str, reuse: bool = False, round_: int = 0,
            compiled: bool = False) -> dict:
    """One system at one size in a fresh process (no shared threads, caches or memory); with
    reuse, a result already in root (from an earlier run of this script) is read instead."""
    tag = ((size if dtype == "float32" else f"{size}-{dtype}") + ("-compiled" if compiled and system != "trl" else "")
           + (f"-r{round_}" if round_ else ""))
    out = os.path.join(root, f"{system}-{tag}.json")
    if reuse and os.path.isfile(out):
        return json.load(open(out))
    log = os.path.join(root, f"{system}-{tag}.log")
    with open(log, "w") as f:
        cmd = [sys.executable, __file__, "--worker", system, "--size", size, "--root", root, "--out", out,
               "--dtype", dtype] + (["--compiled"] if compiled else [])
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
        process_s = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"{system} at size {size} failed; see {log}")
    result = json.load(open(out))
    # the whole process, interpreter start to exit: imports, set-up, Ray start and shut-down included
    result["process_s"] = process_s
    # counted here, not in the timed process: transformers' import (~2.5 s) was charged to grpo-ray,
    # whose driver does not import it, and not to TRL, whose process had it already
    result["params"] = num_params(model_dir(size))
    with open(out, "w") as f:
        json.dump(result, f)
    return result


def report(size: str, rounds: list[dict[str, dict]]) -> tuple[float, float | None, float | None]:
    """Prints one size's table; returns the step-time ratios against TRL (sync, and async or
    None), each the median over rounds of the ratio within a round, and the whole-process wall
    time ratio (grpo-ray sync / TRL; None for results measured before it was recorded)."""
    trl, ours, ours_async = (rounds[0].get(s) for s in ("trl", "ours", "ours_async"))
    print(f"\n{size}: {ours['params'] / 1e6:.1f}M parameters, {SIZES[size]['new_tokens']} new tokens, "
          f"{PROMPTS} prompts x {GROUP} samples, {SIZES[size]['steps']} steps")
    print(f"{'':<16}{'step s':>9}{'train s':>9}{'process s':>11}   reward per step")
    rows = (("TRL", trl), ("grpo-ray", ours), ("grpo-ray async", ours_async))
    for name, r in (row for row in rows if row[1] is not None):
        curve = " ".join(f"{x:.2f}" for x in r["rewards"])
        process = f"{r['process_s']:>11.1f}" if "process_s" in r else f"{'-':>11}"
        print(f"{name:<16}{steady(r['step_s']):>9.2f}{r['wall_s']:>9.1f}{process}   {curve}")
    walls = [r["ours"]["process_s"] / r["trl"]["process_s"] for r in rounds
             if "process_s" in r["ours"] and "process_s" in r["trl"]]
    wall_ratio = statistics.median(walls) if walls else None
    if wall_ratio is not None:
        print(f"whole-process wall time ratio (grpo-ray / TRL, interpreter start to exit): {wall_ratio:.2f}"
              + (f" (rounds: {' '.join(f'{x:.2f}' for x in walls)})" if len(walls) > 1 else ""))
    ratios = {}
    for system, name in (("ours", "grpo-ray"), ("ours_async", "grpo-ray async")):
        if system not in rounds[0]:
            continue
        per_round = [steady(r[system]["step_s"]) / steady(r["trl"]["step_s"]) for r in rounds]
        ratios[system] = statistics.median(per_round)
        phases = " ".join(f"{k} {steady(v):.2f}" for k, v in rounds[0][system]["phases"].items() if k != "step")
        print(f"step time ratio ({name} / TRL): {ratios[system]:.2f}; phases (s): {phases}")
        if len(rounds) > 1:
            steps = ", ".join(f"{steady(r['trl']['step_s']):.3f} / {steady(r[system]['step_s']):.3f}" for r in rounds)
            print(f"  per round (TRL / {name} s): {steps}; ratios {' '.join(f'{x:.2f}' for x in per_round)}, "
                  f"median {ratios[system]:.2f}")
    return ratios["ours"], ratios.get("ours_async"), wall_ratio


def plot(results: dict, path: str, dtype: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(results)
    params = [results[s][0]["ours"]["params"] / 1e6 for s in sizes]
    fig, ax = plt.subplots(figsize=(6, 4))
    for system, label in (("trl", "TRL GRPOTrainer"), ("ours", "grpo-ray"), ("ours_async", "grpo-ray async")):
        if system not in results[sizes[0]][0]:
            continue
        ax.plot(params, [statistics.median(steady(r[system]["step_s"]) for r in results[s]) for s in sizes],
                "o-", label=label)
    ax.set(xscale="log", yscale="log", xlabel="parameters (M)", ylabel="step time (s, median)",
           title=f"GRPO step time, 8 prompts x 16 samples, {dtype}, 2 CPU cores")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=100)
    os.replace(path + ".tmp.png", path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="tiny,small,medium")
    ap.add_argument("--root", default=None, help="models and logs (default: a new temp dir)")
    ap.add_argument("--plot", default=None,
                    help="PNG path (default: benchmarks/step_time_vs_size.png when all three sizes run, "
                         "else in --root, so a partial run does not replace the recorded plot)")
    ap.add_argument("--reuse", action="store_true", help="read results already in --root instead of measuring")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="both systems: TRL bf16=True with the model in bf16; grpo-ray model.dtype")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the systems this many times in turn; each ratio is the median over rounds")
    ap.add_argument("--with-async", action="store_true",
                    help="also run grpo-ray with rollout.asynchronous=true (one-step off-policy)")
    ap.add_argument("--compiled", action="store_true",
                    help="grpo-ray's vLLM engines compiled (rollout.enforce_eager=false; default: eager, as configured)")
    ap.add_argument("--worker", choices=["trl", "ours", "ours_async"])
    ap.add_argument("--size")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.size, args.root, args.out, args.dtype, args.compiled)
    if args.rounds < 1:
        ap.error(f"--rounds={args.rounds}: run each system at least once (--rounds 1)")
    root = args.root or tempfile.mkdtemp(prefix="bench-vs-trl-")
    os.makedirs(root, exist_ok=True)
    results, ratios, async_ratios, wall_ratios = {}, {}, {}, {}
    systems = ("trl", "ours", "ours_async") if args.with_async else ("trl", "ours")
    for size in args.sizes.split(","):
        results[size] = [{system: measure(system, size, root, args.dtype, args.reuse, k, args.compiled)
                          for system in systems}
                         for k in range(args.rounds)]
        ratios[size], async_ratios[size], wall_ratios[size] = report(size, results[size])
    suffix = "" if args.dtype == "float32" else f"_{args.dtype}"
    where = os.path.join(REPO, "benchmarks") if set(args.sizes.split(",")) == set(SIZES) else root
    path = (args.plot or os.path.join(where, "step_time_vs_size.png")).replace(".png", f"{suffix}.png")
    plot(results, path, args.dtype)
    print(f"\nplot: {path}; logs: {root}")
    largest = list(ratios)[-1]
    print(json.dumps({f"step_time_ratio_vs_trl{suffix}": round(ratios[largest], 3),
                      **{f"step_time_ratio_vs_trl_{s}{suffix}": round(r, 3) for s, r in ratios.items()},
                      **{f"step_time_ratio_vs_trl_{s}{suffix}_async": round(r, 3)
                         for s, r in async_ratios.items() if r is not None},
                      **{f"wall_ratio_vs_trl_{s}{suffix}": round(r, 3) for s, r in wall_ratios.items() if r is not None},
                      "rounds": args.rounds, "engines": "compiled" if args.compiled else "eager",
                      "machine": machine()}))


if __name__ == "__main__":
    main()
