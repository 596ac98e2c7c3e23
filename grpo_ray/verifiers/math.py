"""Math answers: extract the model's final answer and compare it with the gold one.

Extraction order: the last \\boxed{...}, then the last `#### n` (GSM8K), then the last number;
`extraction` makes it stricter ("boxed": only \\boxed{}, "marked": \\boxed{} or ####, "any": all
three). A strict setting stops a policy from being paid for a number that merely appears last.

Plain numbers are compared numerically (thousands separators and `$` ignored); anything else
(fractions, LaTeX, percentages, sets) goes to math-verify. Its own timeouts use SIGALRM, which
only works in a process's main thread (Serve replicas and thread pools are not), and a hostile
answer such as \\boxed{9^{9^{9^{9}}}} keeps sympy busy for ever. A Python thread cannot be
killed, so math-verify runs in a child process that is killed and replaced when a comparison
takes longer than `timeout_s` (see _MathVerifyProcess).
"""
from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import threading
import time
from fractions import Fraction

from ..core.score import Score

EXTRACTION = ("boxed", "marked", "any")

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


def extract_answer(text: str, extraction: str = "any") -> str | None:
    """The response's final answer as a string, or None when there is none."""
    boxed = last_boxed(text)
    if boxed or extraction == "boxed":
        return boxed or None
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
    if extraction == "marked":
        return None
    nums = _NUMBER.findall(text)
    return nums[-1].replace("$", "") if nums else None


def gold_answer(answer: str) -> str:
    """GSM8K's `...#### 72` -> '72'; a plain or LaTeX answer is returned stripped."""
    answer = str(answer)
    return answer.rsplit("####", 1)[1].strip() if "####" in answer else answer.strip()


def _plain(text: str) -> str | None:
    """A plain decimal number's digits ("\\$1,234.50" -> "1234.50"), or None. `\\$` is LaTeX's
    escaped dollar sign (MATH's currency answers): a unit, not a math delimiter."""
    s = text.strip().replace("\\$", "").replace("$", "").replace(" ", "").rstrip(".")
    return s.replace(",", "") if _PLAIN.match(s) else None


def to_number(text: str) -> float | None:
    s = _plain(text)
    return None if s is None else float(s)


def same_number(a: str, b: str) -> bool | None:
    """Exact decimal comparison of two plain numbers (None if either is not one): a float with a
    relative tolerance took 1234567891 for 1234567890, and loses digits past 2**53."""
    x, y = _plain(a), _plain(b)
    return None if x is None or y is None else Fraction(x) == Fraction(y)


def _math_verify_equal(gold: str, pred: str) -> bool:
    """math-verify's comparison, without its signal timeouts (the caller enforces one)."""
    from math_verify import parse, verify

    def wrap(s: str) -> str:  # math-verify finds LaTeX only inside math delimiters
        s = s.replace("\\$", "")  # an escaped dollar (currency) is no delimiter; parse() found nothing
        return s if "$" in s else f"${s}$"

    g = parse(wrap(gold), parsing_timeout=None)
    p = parse(wrap(pred), parsing_timeout=None)
    return bool(g) and bool(p) and verify(g, p, timeout_seconds=None)


class _MathVerifyProcess:
    """math-verify in a long-lived child process (running _serve below), one JSON
    line per comparison. On a timeout the child is killed and the next call starts a new one;
    start-up (importing sympy, ~1 s) is not counted against the time limit."""

    def __init__(self):
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()  # one comparison at a time per process; callers may be threads

    def equal(self, gold: str, pred: str, timeout_s: float) -> bool:
        with self._lock:
            proc = self._proc if self._proc and self._proc.poll() is None else self._start()
            try:
                proc.stdin.write(json.dumps([gold, pred]).encode() + b"\n")
                proc.stdin.flush()
            except BrokenPipeError:  # it died since (PDEATHSIG fires when its starting thread ends)
                proc = self._start()
                proc.stdin.write(json.dumps([gold, pred]).encode() + b"\n")
                proc.stdin.flush()
            reply = self._readline(proc, timeout_s)
            if not reply:
                self.close()
                if reply is None:
                    raise TimeoutError(f"timeout after {timeout_s:g}s")
                raise RuntimeError("the math-verify process died")
            out = json.loads(reply)
            if "error" in out:
                raise RuntimeError(out["error"])
            return bool(out["equal"])

    def warm_up(self) -> None:
        """Start the child now (importing sympy takes ~1.4 s) rather than in the first step
        that meets a non-numeric answer."""
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._start()

    def _start(self) -> subprocess.Popen:
        self.close()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        self._proc = subprocess.Popen([sys.executable, "-c", _CHILD], env=env,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        if self._readline(self._proc, 60.0) != b"ready\n":
            self.close()
            raise RuntimeError("the math-verify process did not start")
        return self._proc

    @staticmethod
    def _readline(proc: subprocess.Popen, timeout_s: float) -> bytes | None:
        ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
        return proc.stdout.readline() if ready else None

    def close(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            for f in (self._proc.stdin, self._proc.stdout):
                f.close()
            self._proc = None


_CHILD = "from grpo_ray.verifiers.math import _serve; _serve()"
_MATH_VERIFY = _MathVerifyProcess()


def warm_up() -> None:
    """Start math-verify's process ahead of the first LaTeX answer (verifier replicas do)."""
    _MATH_VERIFY.warm_up()


# (gold, pred) -> math-verify's verdict, or the seconds a comparison ran out of. A policy repeats
# itself (16 samples of a prompt, step after step): a hostile answer costs its timeout once per
# replica, not once per sample. Bounded: cleared when full.
_VERDICTS: dict[tuple[str, str], bool | float] = {}
_VERDICTS_MAX = 50_000


def _compare(gold: str, pred: str, timeout_s: float) -> bool:
    """math-verify's verdict, remembered; TimeoutError when it takes longer than timeout_s (or
    took longer than that before)."""
    known = _VERDICTS.get((gold, pred))
    if isinstance(known, bool):
        return known
    if known is not None and known >= timeout_s:
        raise TimeoutError(f"timeout after {timeout_s:g}s (as before)")
    if len(_VERDICTS) >= _VERDICTS_MAX:
        _VERDICTS.clear()
    try:
        _VERDICTS[(gold, pred)] = verdict = _MATH_VERIFY.equal(gold, pred, timeout_s)
    except TimeoutError:
        _VERDICTS[(gold, pred)] = timeout_s
        raise
    return verdict


def score_math(record: dict, response: str, answer_key: str = "answer", *, extraction: str = "any",
               timeout_s: float = 5.0, deadline: float | None = None) -> Score:
    """1.0 when the response's final answer equals record[answer_key]; timeout_s bounds math-verify,
    and so does `deadline` (time.monotonic()): the verifier pool's request budget, which a batch of
    slow answers would otherwise overrun until the request is resent and fails the same way."""
    if answer_key not in record or record[answer_key] in (None, ""):
        return Score(0.0, f"record has no '{answer_key}' field")
    if extraction not in EXTRACTION:
        return Score(0.0, f"unknown extraction {extraction!r}; use one of {', '.join(EXTRACTION)}")
    gold = gold_answer(record[answer_key])
    pred = extract_answer(response, extraction)
    if pred is None:
        where = {"boxed": " in \\boxed{}", "marked": " in \\boxed{} or after ####"}.get(extraction, "")
        return Score(0.0, f"no answer found{where}")
    correct = same_number(gold, pred)
    if correct is None and " ".join(gold.split()) == " ".join(pred.split()):
        correct = True  # the same text: no parser needed (or able to refuse it)
    if correct is None:
        limit = timeout_s if deadline is None else min(timeout_s, deadline - time.monotonic())
        if limit <= 0:
            return Score(0.0, f"not compared: the request's time budget went on slower answers before it "
                              f"({pred[:80]} with {gold[:80]}); raise reward.pool.request_timeout_s")
        try:
            correct = _compare(gold, pred, limit)
        except TimeoutError as e:
            return Score(0.0, f"{e} comparing {pred[:80]} with {gold[:80]}")
    return Score(1.0, "correct") if correct else Score(0.0, f"wrong answer {pred} != {gold}")


def _serve() -> None:
    """The child's loop: one [gold, pred] JSON line in, one {"equal"} or {"error"} line out."""
    import ctypes
    import logging
    import resource
    import signal

    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the verifier
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))  # a huge integer fails, not the host
    import math_verify  # noqa: F401  (import before "ready": start-up is not part of a timeout)

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout is disabled": we have one

    out = sys.stdout.buffer
    out.write(b"ready\n")
    out.flush()
    for line in sys.stdin.buffer:
        gold, pred = json.loads(line)
        try:
            reply = {"equal": _math_verify_equal(gold, pred)}
        except Exception as e:  # MemoryError included: a wrong answer, not a dead process
            reply = {"error": f"math-verify: {type(e).__name__}: {str(e)[:200]}"}
        out.write(json.dumps(reply).encode() + b"\n")
        out.flush()

