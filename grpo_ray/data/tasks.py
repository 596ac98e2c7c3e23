"""Built-in, procedurally generated task: small additions in GSM8K answer style.

Answers are checked by the same code as GSM8K (`#### <number>` then the last number), so the
default job exercises the real math verifier. The split is by operand pair: held-out pairs never
appear in training prompts.
"""
from __future__ import annotations

import random


def arithmetic_prompt(a: int, b: int) -> str:
    return f"Q: {a}+{b}=?\nA:"


def arithmetic_response(answer: int, work: str = "") -> str:
    """' #### 85' (hasty) or, with the work shown, ' 37+48=85 #### 85' (careful)."""
    return f" {work} #### {answer}" if work else f" #### {answer}"


def arithmetic_work(record: dict) -> str:
    return f"{record['a']}+{record['b']}={record['a'] + record['b']}"


def arithmetic_records(max_operand: int, seed: int, eval_fraction: float) -> tuple[list[dict], list[dict]]:
    """All pairs (a, b) with 0 <= a, b <= max_operand, shuffled with `seed`, split into
    (train, held_out). Each record: {"prompt", "answer", "task": "math"}."""
    pairs = [(a, b) for a in range(max_operand + 1) for b in range(max_operand + 1)]
    random.Random(seed).shuffle(pairs)
    n_eval = max(1, int(len(pairs) * eval_fraction))
    records = [{"prompt": arithmetic_prompt(a, b), "answer": str(a + b), "task": "math", "a": a, "b": b}
               for a, b in pairs]
    return records[n_eval:], records[:n_eval]


def tokenizer_corpus(max_operand: int) -> list[str]:
    """Text the tiny tokenizer is trained on: every prompt/response shape of the task."""
    lines = [arithmetic_prompt(a, b) + arithmetic_response(a + b, f"{a}+{b}={a + b}")
             for a in range(max_operand + 1) for b in range(0, max_operand + 1, 7)]
    return lines + ["Question: How many? Answer: The answer is 42.\n#### 42"]
