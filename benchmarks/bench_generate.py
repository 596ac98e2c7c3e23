"""Our generator (vLLM, as the Generator role runs it) vs Hugging Face `generate`, same sampling.

    .venv/bin/python benchmarks/bench_generate.py [--sizes tiny,small,medium] [--dtypes float32,bfloat16]

8 prompts x 16 samples at temperature 1.0 (no top-k), tiny 32 new tokens, small/medium 128, on
the three benchmark models. Each measurement runs in its own process: one warm-up call, then the
median of 3 timed calls. tokens/s counts the tokens actually generated (a completion may stop
at EOS). The last line is one JSON object with the vLLM/HF ratio per size and dtype.
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

from common import GROUP, KV_CACHE_MB, PROMPTS, REPO, SIZES, machine, model_dir, records  # noqa: E402


def prompts() -> list[str]:
    return [r["prompt"] for r in records()[:PROMPTS]]


def time_ours(model: str, dtype: str, new_tokens: int) -> list[tuple[int, float]]:
    from grpo_ray.roles.generator import Generator

    gen = Generator(model, dtype=dtype, max_model_len=512, kv_cache_mb=KV_CACHE_MB, cpu_threads="0-1")
    out = []
    for i in range(4):
        t = time.perf_counter()
        ro = gen.generate(prompts(), n=GROUP, temperature=1.0, max_new_tokens=new_tokens, seed=i)
        out.append((sum(len(r) for r in ro.response_ids), time.perf_counter() - t))
    return out


def time_hf(model: str, dtype: str, new_tokens: int) -> list[tuple[int, float]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(model, padding_side="left")
    tok.pad_token = tok.pad_token or tok.eos_token
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).eval()
    batch = tok([p for p in prompts() for _ in range(GROUP)], return_tensors="pt", padding=True)
    out = []
    for i in range(4):
        torch.manual_seed(i)
        t = time.perf_counter()
        with torch.no_grad():
            seqs = lm.generate(**batch, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                               max_new_tokens=new_tokens, pad_token_id=tok.pad_token_id)
        elapsed = time.perf_counter() - t
        new = seqs[:, batch["input_ids"].shape[1]:]
        # tokens up to and including the first EOS of each row
        done = (new == tok.eos_token_id).int().cumsum(dim=1)
        out.append((int(((done == 0) | ((done == 1) & (new == tok.eos_token_id))).sum()), elapsed))
    return out


def measure(system: str, size: str, dtype: str, root: str) -> float:
    """tokens/s of one system, in a fresh process."""
    out = os.path.join(root, f"{system}-{size}-{dtype}.json")
    with open(out + ".log", "w") as log:
        subprocess.run([sys.executable, __file__, "--worker", system, "--sizes", size, "--dtypes", dtype,
                        "--root", root, "--out", out], cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=True)
    runs = json.load(open(out))[1:]  # the first call warms up
    return statistics.median(n / s for n, s in runs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="tiny,small,medium")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--root", default=None)
    ap.add_argument("--worker", choices=["ours", "hf"])
    ap.add_argument("--out")
    args = ap.parse_args()
    root = args.root or tempfile.mkdtemp(prefix="bench-generate-")
    if args.worker:
        size = args.sizes
        fn = time_ours if args.worker == "ours" else time_hf
        result = fn(model_dir(size), args.dtypes, SIZES[size]["new_tokens"])
        json.dump(result, open(args.out, "w"))
        return
    print(f"{'size':<8}{'dtype':<10}{'vLLM tok/s':>12}{'HF tok/s':>12}{'ratio':>8}")
    headline = {}
    for size in args.sizes.split(","):
        for dtype in args.dtypes.split(","):
            ours, hf = measure("ours", size, dtype, root), measure("hf", size, dtype, root)
            headline[f"generate_ratio_vs_hf_{size}_{dtype}"] = round(ours / hf, 2)
            print(f"{size:<8}{dtype:<10}{ours:>12.0f}{hf:>12.0f}{ours / hf:>8.2f}", flush=True)
    print(json.dumps({**headline, "machine": machine()}))


if __name__ == "__main__":
    main()
