"""Built-in, procedurally generated tasks: small additions in GSM8K answer style, and
(multiply) products to be computed with a Python tool over two model turns.

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
    """'37+48=85', or for a subtraction record '48-37=11'."""
    if record.get("op") == "-":
        return f"{record['a']}-{record['b']}={record['a'] - record['b']}"
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


def subtract_records(max_operand: int, seed: int, eval_fraction: float) -> tuple[list[dict], list[dict]]:
    """All pairs (a, b) with 0 <= b <= a <= max_operand as 'Q: a-b=?\nA:' (answer a-b, never
    negative), shuffled with `seed`, split into (train, held_out): a second skill of the built-in
    base (warmstart.subtract) that GRPO on additions does not train, for a retention set
    (eval.sets: {task: subtract, retention: true})."""
    pairs = [(a, b) for a in range(max_operand + 1) for b in range(a + 1)]
    random.Random(seed + 1).shuffle(pairs)  # another order than the additions' (seed)
    n_eval = max(1, int(len(pairs) * eval_fraction))
    records = [{"prompt": f"Q: {a}-{b}=?\nA:", "answer": str(a - b), "task": "math", "a": a, "b": b, "op": "-"}
               for a, b in pairs]
    return records[n_eval:], records[:n_eval]


def tokenizer_corpus(max_operand: int, task: str = "arithmetic") -> list[str]:
    """Text the tiny tokenizer is trained on: every prompt/response shape of the task."""
    if task == "multiply":
        return multiply_corpus(max_operand)
    lines = [arithmetic_prompt(a, b) + arithmetic_response(a + b, f"{a}+{b}={a + b}")
             for a in range(max_operand + 1) for b in range(0, max_operand + 1, 7)]
    return lines + ["Question: How many? Answer: The answer is 42.\n#### 42"]


# --- multiply: multi-turn tool use -------------------------------------------------------------
# A task the tiny model cannot do in its head (3-digit x 2-digit products) but can do with a Python
# tool. The text protocol (the environment's code relies on it):
#   prompt                 'Q: 523*93=?\nA:'
#   model turn 1 (loss)    ' ```python\nprint(523*93)\n```\n```output'   (generation stops at "```output")
#   observation (no loss)  '\n48639\n```\n'                                (written by the environment)
#   model turn 2 (loss)    ' #### 48639' + EOS
# or, guessing, one model turn ' #### 61907' + EOS. The answer is the number after ####.

MULTIPLY_A_RANGE = (100, 999)  # a is always 3 digits; b is in [MULTIPLY_MIN_B, max_operand] (multiply_pairs)
MULTIPLY_MIN_B = 10
TOOL_STOP = "```output"


def multiply_prompt(a: int, b: int) -> str:
    return f"Q: {a}*{b}=?\nA:"


def tool_call_turn(a: int, b: int) -> str:
    """Model turn 1 of a tool-using trajectory; ends with the stop string TOOL_STOP."""
    return f" ```python\nprint({a}*{b})\n```\n{TOOL_STOP}"


def tool_observation(output: str) -> str:
    """What the environment appends after turn 1: the tool's printed text (e.g. '48639\\n'), fenced."""
    return f"\n{output.strip()}\n```\n"


def tool_answer_turn(answer) -> str:
    """Model turn 2 (EOS not included)."""
    return f" #### {answer}"


def guess_turn(guess) -> str:
    """The whole response of a trajectory that does not call the tool (EOS not included)."""
    return f" #### {guess}"


def multiply_guess(a: int, b: int, rng: random.Random) -> int:
    """A plausible wrong-ish answer: a random number with as many digits as a*b."""
    d = len(str(a * b))
    return rng.randint(10 ** (d - 1), 10 ** d - 1)


def multiply_pairs(max_operand: int) -> list[tuple[int, int]]:
    """Every (a, b) of the task in order: a in [100, 999], b in [10, max_operand], and a*b with as
    many digits as the largest product (5 for max_operand <= 99: 100*10=1000 is left out). A fixed
    length puts every digit of the tool's output at a fixed distance from where the answer copies
    it; with 4- and 5-digit products mixed, most copying errors were in the 4-digit ones."""
    if max_operand < MULTIPLY_MIN_B:
        raise ValueError(f"multiply: max_operand={max_operand} must be >= {MULTIPLY_MIN_B} (b is in "
                         f"[{MULTIPLY_MIN_B}, max_operand])")
    lo_a, hi_a = MULTIPLY_A_RANGE
    smallest = 10 ** (len(str(hi_a * max_operand)) - 1)
    return [(a, b) for a in range(lo_a, hi_a + 1) for b in range(MULTIPLY_MIN_B, max_operand + 1) if a * b >= smallest]


def multiply_records(max_operand: int, seed: int, eval_fraction: float,
                     size: int = 20000) -> tuple[list[dict], list[dict]]:
    """`size` distinct pairs of multiply_pairs(max_operand) drawn with `seed`, split into
    (train, held_out): held-out pairs never appear in training. Each record:
    {"prompt", "answer", "task": "math", "a", "b"}."""
    pairs = multiply_pairs(max_operand)
    pairs = random.Random(seed).sample(pairs, min(size, len(pairs)))
    n_eval = max(1, int(len(pairs) * eval_fraction))
    records = [{"prompt": multiply_prompt(a, b), "answer": str(a * b), "task": "math", "a": a, "b": b}
               for a, b in pairs]
    return records[n_eval:], records[:n_eval]


def multiply_corpus(max_operand: int, n: int = 3000) -> list[str]:
    """Tokenizer text for the multiply task: every segment shape, whole trajectories of both kinds
    and each segment alone (so BPE learns the fences, 'python', 'print', 'output')."""
    rng = random.Random(0)
    pairs = multiply_pairs(max_operand)
    lines = []
    for _ in range(n):
        a, b = rng.choice(pairs)
        call, obs, ans = tool_call_turn(a, b), tool_observation(str(a * b)), tool_answer_turn(a * b)
        lines.append(multiply_prompt(a, b) + call + obs + ans)
        lines.append(multiply_prompt(a, b) + guess_turn(multiply_guess(a, b, rng)))
        lines += [call, obs, ans]
    return lines + ["Question: How many? Answer: The answer is 42.\n#### 42"]
