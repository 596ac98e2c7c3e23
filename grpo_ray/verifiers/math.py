"""Math answers: extract the model's final answer and compare it with the gold one.

Extraction order: the last \\boxed{...}, then the last `#### n` (GSM8K), then the last number.
Plain numbers are compared numerically (thousands separators and `$` ignored); anything else
(fractions, LaTeX, percentages, sets) goes to math-verify with its signal-based timeouts off,
because SIGALRM only works in a process's main thread (async actors and Serve replicas are not).
"""
from __future__ import annotations

import re

from ..records import Score

# a sign may stand before a currency sign ("-$5"); "3/4" is kept whole as a fraction
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\$?\.\d+")
_PLAIN = re.compile(r"^-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?$|^-?\.\d+$")


def last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j].strip()
    return None


def extract_answer(text: str) -> str | None:
    """The response's final answer as a string, or None when there is none."""
    boxed = last_boxed(text)
    if boxed:
        return boxed
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip()
        line = tail.splitlines()[0].strip().rstrip(".") if tail else ""
        if "\\" in line:  # LaTeX after ####: keep it whole (\frac{1}{2} is not "1")
            return line
        num = _NUMBER.search(line)
        if num:
            return num.group(0).replace("$", "")
        if line:
            return line
    nums = _NUMBER.findall(text)
    return nums[-1].replace("$", "") if nums else None


def gold_answer(answer: str) -> str:
    """GSM8K's `...#### 72` -> '72'; a plain or LaTeX answer is returned stripped."""
    answer = str(answer)
    return answer.rsplit("####", 1)[1].strip() if "####" in answer else answer.strip()


def to_number(text: str) -> float | None:
    s = text.strip().replace("$", "").replace(" ", "").rstrip(".")
    if not _PLAIN.match(s):
        return None
    return float(s.replace(",", ""))


def _math_verify_equal(gold: str, pred: str) -> bool:
    from math_verify import parse, verify

    def wrap(s: str) -> str:  # math-verify finds LaTeX only inside math delimiters
        return s if "$" in s else f"${s}$"

    g = parse(wrap(gold), parsing_timeout=None)
    p = parse(wrap(pred), parsing_timeout=None)
    return bool(g) and bool(p) and verify(g, p, timeout_seconds=None)


def score_math(record: dict, response: str, answer_key: str = "answer") -> Score:
    if answer_key not in record or record[answer_key] in (None, ""):
        return Score(0.0, f"record has no '{answer_key}' field")
    gold = gold_answer(record[answer_key])
    pred = extract_answer(response)
    if pred is None:
        return Score(0.0, "no answer found")
    g, p = to_number(gold), to_number(pred)
    if g is not None and p is not None:
        correct = abs(g - p) <= 1e-9 * max(1.0, abs(g))
    else:
        correct = _math_verify_equal(gold, pred)
    return Score(1.0, "correct") if correct else Score(0.0, f"wrong answer {pred} != {gold}")
