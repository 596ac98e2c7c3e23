"""Tune the multiply task's warm start (multi-turn tool use): build the base with the given knobs
into a temporary folder (never the cache), then sample it on held-out prompts with the Python tool
simulated exactly as the environment runs it, and report

  pass@1       sampled (temperature 1.0) accuracy of the warm-started base
  tool         fraction of samples that call the tool (turn 1 stops at "```output")
  acc|tool     accuracy among the samples that call the tool (what GRPO can raise pass@1 towards)
  acc|forced   accuracy when every turn 1 is made to start with the tool call's first token
               (the tool path on every prompt: a larger sample of what acc|tool estimates)
  acc|guess    accuracy among the samples that answer at once
  code_ok      among tool calls: the code is exactly print(a*b)
  copy_ok      among tool calls: the answer is exactly the tool's output
  warm_s       seconds to build and warm-start the base on ONE core (torch threads 1)

The protocol (grpo_ray.data.tasks): prompt 'Q: a*b=?\\nA:'; turn 1 until "```output", EOS or 40
tokens; if it holds a ```python block, its code runs (exec, stdout captured) and the observation
'\\n<stdout>\\n```\\n' is appended as token ids tokenised on their own; turn 2 until EOS or 20 tokens.
Scored by the number after ####.

    python benchmarks/tune_tool_warmstart.py            # the recommended knobs (configs/tool_default.yaml)
    python benchmarks/tune_tool_warmstart.py --steps 1600 --guess-weight 1.0 --seed 1

The last line is JSON.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import tempfile
import time
from types import SimpleNamespace

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, REPO)

import torch  # noqa: E402

torch.set_num_threads(1)
os.cpu_count = lambda: 1  # builtin_model sets torch's threads to os.cpu_count(): one core, as the brief says

from grpo_ray.data.tasks import TOOL_STOP, multiply_records, tool_call_turn, tool_observation  # noqa: E402
from grpo_ray.models import warmstart  # noqa: E402
from grpo_ray.models.warmstart import builtin_model  # noqa: E402

ANSWER = re.compile(r"####\s*(-?\d+)")
CODE = re.compile(r"```python\n(.*?)\n```", re.S)


def build(args, train, root: str) -> tuple[str, float]:
    cfg = SimpleNamespace(
        model=SimpleNamespace(path="builtin:tiny", dtype="float32", share_prompts=True, hidden_size=args.hidden,
                              num_layers=args.layers, num_heads=args.heads),
        warmstart=SimpleNamespace(steps=args.steps, batch_size=args.batch, lr=args.lr, show_work=args.show_work,
                                  label_noise=args.label_noise),
        data=SimpleNamespace(task="multiply", max_operand=args.max_operand, eval_fraction=args.eval_fraction),
        run=SimpleNamespace(seed=args.seed))
    start = time.time()
    path = builtin_model(cfg, train, root, log=lambda m: print(m, file=sys.stderr, flush=True))
    return path, time.time() - start


def run_tool(code: str) -> str:
    """Trusted here: the prompts are ours and the model only copies digits into print(a*b)."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(code, {})
    except Exception as e:  # noqa: BLE001 - an observation like any other
        return f"{type(e).__name__}: {e}"
    return out.getvalue()


def sample(model, tokenizer, contexts: list[list[int]], max_new: int, stop: str | None) -> list[list[int]]:
    """Temperature-1.0 samples (no top-k/top-p), each cut after EOS or after the token that
    completes `stop` (what a generator with that stop string returns; later tokens cannot affect
    earlier ones, so cutting afterwards is the same as stopping)."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    L = max(map(len, contexts))
    ids = torch.full((len(contexts), L), pad)
    mask = torch.zeros((len(contexts), L), dtype=torch.long)
    for i, c in enumerate(contexts):  # left padding
        ids[i, L - len(c):] = torch.tensor(c)
        mask[i, L - len(c):] = 1
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             max_new_tokens=max_new, pad_token_id=pad, eos_token_id=eos)
    results = []
    for row in out[:, L:].tolist():
        cut = []
        for t in row:
            cut.append(t)
            if t == eos or (stop and stop in tokenizer.decode(cut)):
                break
        results.append(cut)
    return results


def _count(counts: dict, r: dict, kind: str, text: str, code: str | None, obs: str | None) -> bool:
    """Add one sample to the tallies; returns whether its answer is right."""
    m = ANSWER.search(text)
    right = bool(m) and m.group(1) == r["answer"]
    counts["n"] += 1
    counts["right"] += right
    counts[kind] += 1
    if kind == "tool":
        counts["tool_right"] += right
        counts["code_ok"] += code == f"print({r['a']}*{r['b']})"
        counts["copy_ok"] += bool(m) and m.group(1) == obs.strip().split("\n")[0].strip()
    elif kind == "guess":
        counts["guess_right"] += right
    return right


def evaluate(path: str, held_out: list[dict], samples: int, batch: int = 200, force_tool: bool = False) -> dict:
    """Sample and score; force_tool: every turn 1 starts with the first token of the tool call
    (as if the policy had learnt to call it), the rest sampled."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    eos = tokenizer.eos_token_id
    rows = [r for r in held_out for _ in range(samples)]
    counts = {"n": 0, "right": 0, "tool": 0, "tool_right": 0, "code_ok": 0, "copy_ok": 0, "guess": 0,
              "guess_right": 0, "other": 0}
    examples, failures = [], []
    for s in range(0, len(rows), batch):
        chunk = rows[s:s + batch]
        prompts = [tokenizer(r["prompt"])["input_ids"] for r in chunk]
        if force_tool:
            first = tokenizer(tool_call_turn(1, 1))["input_ids"][:1]
            turn1 = [first + t for t in sample(model, tokenizer, [p + first for p in prompts], 39, TOOL_STOP)]
        else:
            turn1 = sample(model, tokenizer, prompts, 40, TOOL_STOP)
        second, finals = [], {}
        for i, (r, t1) in enumerate(zip(chunk, turn1)):
            text = tokenizer.decode([t for t in t1 if t != eos])
            code = CODE.search(text)
            if TOOL_STOP in text and code:
                obs = tokenizer(tool_observation(run_tool(code.group(1))))["input_ids"]
                second.append((i, prompts[i] + t1 + obs, code.group(1), tokenizer.decode(obs)))
            else:
                finals[i] = ("guess" if "```" not in text else "other", text, None, None)
        if second:
            turn2 = sample(model, tokenizer, [c for _, c, _, _ in second], 20, None)
            for (i, _, code, obs), t2 in zip(second, turn2):
                finals[i] = ("tool", tokenizer.decode([t for t in t2 if t != eos]), code, obs)
        for i, r in enumerate(chunk):
            kind, text, code, obs = finals[i]
            right = _count(counts, r, kind, text, code, obs)
            if len(examples) < 4 and (kind != "guess" or len(examples) < 2) or (kind == "tool" and not right
                                                                                  and len(failures) < 6):
                (examples if len(examples) < 4 else failures).append((r["prompt"], kind, code, obs, text, right))
    for e in examples:
        print("  example:", repr(e), file=sys.stderr)
    for e in failures:
        print("  wrong with the tool:", repr(e), file=sys.stderr)
    c = counts

    def ratio(a, b):
        return round(a / b, 3) if b else None

    return {"samples": c["n"], "pass@1": ratio(c["right"], c["n"]), "tool": ratio(c["tool"], c["n"]),
            "acc|tool": ratio(c["tool_right"], c["tool"]), "acc|guess": ratio(c["guess_right"], c["guess"]),
            "code_ok": ratio(c["code_ok"], c["tool"]), "copy_ok": ratio(c["copy_ok"], c["tool"]),
            "malformed": ratio(c["other"], c["n"])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--show-work", type=float, default=0.3, help="tool-using fraction in the last 20%% of steps")
    p.add_argument("--label-noise", type=float, default=1.0, help="fraction of guesses that are random")
    p.add_argument("--tool-phase", type=float, default=None,
                   help="share of steps that all call the tool (default: warmstart.MULTIPLY_TOOL_PHASE)")
    p.add_argument("--guess-weight", type=float, default=None,
                   help="loss weight of a guess's digits (default: warmstart.GUESS_DIGIT_WEIGHT)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--max-operand", type=int, default=99, help="largest b (a is 3 digits, b in [10, max])")
    p.add_argument("--eval-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompts", type=int, default=200, help="held-out prompts")
    p.add_argument("--samples", type=int, default=4, help="samples per prompt")
    p.add_argument("--keep", default="", help="copy the built model here")
    args = p.parse_args()

    if args.tool_phase is not None:
        warmstart.MULTIPLY_TOOL_PHASE = args.tool_phase
    args.tool_phase = warmstart.MULTIPLY_TOOL_PHASE
    if args.guess_weight is not None:
        warmstart.GUESS_DIGIT_WEIGHT = args.guess_weight
    args.guess_weight = warmstart.GUESS_DIGIT_WEIGHT
    torch.manual_seed(args.seed)
    train, held_out = multiply_records(args.max_operand, args.seed, args.eval_fraction)
    with tempfile.TemporaryDirectory(prefix="tune-tool-") as root:
        path, seconds = build(args, train, root)
        torch.manual_seed(args.seed + 1)
        result = evaluate(path, held_out[:args.prompts], args.samples)
        forced = evaluate(path, held_out[:args.prompts], args.samples, force_tool=True)
        result["acc|forced"] = forced["pass@1"]
        if args.keep:
            import shutil

            shutil.copytree(path, args.keep, dirs_exist_ok=True)
    result = {"knobs": {k: v for k, v in vars(args).items() if k not in ("prompts", "samples", "keep")},
              "prompts": min(args.prompts, len(held_out)), "warm_s": round(seconds, 1), **result}
    cols = ["pass@1", "tool", "acc|tool", "acc|forced", "acc|guess", "code_ok", "copy_ok", "malformed", "warm_s"]
    print(" | ".join(f"{c:>9}" for c in cols))
    print(" | ".join(f"{str(result[c]):>9}" for c in cols))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
