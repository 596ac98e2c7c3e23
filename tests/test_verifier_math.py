"""Tests for grpo_ray/verifiers/__init__.py (verify, Verifier) and grpo_ray/verifiers/math.py."""
from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import pytest

from grpo_ray.core.records import Score
from grpo_ray.verifiers import Verifier, verify
from grpo_ray.verifiers.math import extract_answer, gold_answer, last_boxed, score_math, to_number

GSM8K_TEST = Path(__file__).resolve().parents[2] / "shared/data/gsm8k/test.jsonl"


def rec(answer, **kw):
    return {"prompt": "q", "answer": answer, "task": "math", **kw}


# --------------------------------------------------------------------------- extraction


@pytest.mark.parametrize("text,expected", [
    (r"so \boxed{42}", "42"),
    (r"first \boxed{1} then \boxed{2}", "2"),  # the last box
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),  # nested braces
    (r"\boxed{ {a}{b{c}} } done", "{a}{b{c}}"),
    (r"\boxed{7} #### 8 and 9", "7"),  # boxed beats ####
    (r"\boxed{\frac{1}{2}} #### 3", r"\frac{1}{2}"),
    ("reasoning 5 + 6\n#### 11", "11"),
    ("#### 11\nthen 12 more text 13", "11"),  # #### beats the last number
    ("#### 3\n#### 4", "4"),  # the last ####
    ("####7", "7"),
    ("#### $1,234 dollars", "$1,234"[1:]),  # number after ####, $ not part of it
    ("#### unknown", "unknown"),  # no number: the rest of the line
    ("The answer is 5, then 6, finally 7.", "7"),  # the last number
    ("x = -3.5", "-3.5"),
    ("about .5 of it", ".5"),
    ("1,000,000 people", "1,000,000"),
    (r"\boxed{} 12", "12"),  # empty box falls through to the last number
    (r"\boxed{3", "3"),  # unbalanced box falls through
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("text", ["no number here", "", "####", r"\boxed{}"])
def test_extract_answer_none(text):
    assert extract_answer(text) is None


def test_last_boxed():
    assert last_boxed(r"\boxed{a} \boxed{b{c}}") == "b{c}"
    assert last_boxed("nothing") is None
    assert last_boxed(r"\boxed{open") is None


@pytest.mark.parametrize("answer,expected", [
    ("Janet sells 9 eggs.\nShe makes 9 * 2 = $18.\n#### 18", "18"),
    ("work\n#### 1,234", "1,234"),
    ("#### -5", "-5"),
    ("  42  ", "42"),
    (r"\frac{1}{2}", r"\frac{1}{2}"),
    (18, "18"),
])
def test_gold_answer(answer, expected):
    assert gold_answer(answer) == expected


@pytest.mark.parametrize("text,expected", [
    ("42", 42.0),
    ("1,234", 1234.0),
    ("1,234,567.5", 1234567.5),
    ("$1,234", 1234.0),
    ("$ 18", 18.0),
    ("-5", -5.0),
    ("-0.25", -0.25),
    (".5", 0.5),
    ("-.5", -0.5),
    ("7.", 7.0),  # a sentence-final period is not a decimal point
    (" 3 ", 3.0),
])
def test_to_number(text, expected):
    assert to_number(text) == expected


@pytest.mark.parametrize("text", ["abc", r"\frac{1}{2}", "1/2", "12,34", "1,2345", "50%", "", "1.2.3"])
def test_to_number_not_plain(text):
    assert to_number(text) is None


# --------------------------------------------------------------------------- scoring


@pytest.mark.parametrize("gold,response", [
    ("Explanation...\n#### 1,234", "#### 1234"),
    ("Explanation...\n#### 1,234", r"\boxed{1,234}"),
    ("#### 1234", "The total is $1,234."),
    ("18", "She makes $18 every day."),
    ("#### 18", "#### $18"),
    ("-7", "The result is -7."),
    ("-7", r"\boxed{-7}"),
    ("2.5", "It takes 2.5 hours"),
    ("2.50", "2.5"),
    ("3", "3.0"),
    ("0.5", ".5"),
    (r"\frac{1}{2}", "0.5"),  # math-verify path
    ("0.5", r"\boxed{\frac{1}{2}}"),
    ("1000000", "1,000,000"),
    ("0.5", r"\boxed{50\%}"),  # the equivalent forms
    (r"\{1,2\}", r"\boxed{\{2,1\}}"),
    (r"\frac{1}{2}", r"\boxed{\frac{2}{4}}"),
    (r"\$18.90", r"\boxed{\$18.90}"),  # MATH's currency answers: an escaped dollar is a unit
    ("18.90", r"\boxed{\$18.90}"),
    ("5", r"\boxed{\$5}"),
])
def test_correct_answers(gold, response):
    s = verify(rec(gold), response)
    assert isinstance(s, Score)
    assert s.reward == 1.0, s.reason
    assert s.reason == "correct"


@pytest.mark.parametrize("gold,response,pred,shown_gold", [
    ("#### 18", "The answer is 19.", "19", "18"),
    ("-7", "#### 7", "7", "-7"),
    ("2.5", "2.05", "2.05", "2.5"),
    ("#### 1,234", "#### 1235", "1235", "1,234"),
    (r"\frac{1}{2}", "0.4", "0.4", r"\frac{1}{2}"),
    ("0.5", r"\boxed{\frac{1}{3}}", r"\frac{1}{3}", "0.5"),
    ("1234567890", "#### 1234567891", "1234567891", "1234567890"),  # exact: no relative tolerance
    ("9007199254740993", "#### 9007199254740992", "9007199254740992", "9007199254740993"),  # past 2**53
])
def test_wrong_answers_reward_zero_with_both_numbers(gold, response, pred, shown_gold):
    s = verify(rec(gold), response)
    assert s.reward == 0.0
    assert pred in s.reason and shown_gold in s.reason
    assert "wrong answer" in s.reason


def test_no_number_in_response():
    s = verify(rec("5"), "I don't know")
    assert s.reward == 0.0 and s.reason == "no answer found"


def test_score_math_custom_answer_key():
    assert score_math({"target": "#### 4"}, "4", answer_key="target").reward == 1.0
    s = score_math({"answer": "4"}, "4", answer_key="target")
    assert s.reward == 0.0 and "'target'" in s.reason


def test_numeric_gold_answer():
    # JSONL datasets may store the answer as a JSON number
    assert verify(rec(18), "#### 18").reward == 1.0
    assert verify(rec(0), "0").reward == 1.0
    assert verify(rec(18), "#### 17").reward == 0.0


def _gsm8k_rows():
    if not GSM8K_TEST.is_file():
        pytest.skip(f"{GSM8K_TEST} not present")
    with open(GSM8K_TEST) as f:
        return [json.loads(line) for line in f if line.strip()]


FORMATS = ["{}", "#### {}", r"\boxed{{{}}}", "The answer is {}.", "Step 1: 3 + 4 = 7.\nSo the answer is {}"]


def test_gsm8k_gold_answers_round_trip():
    rows = _gsm8k_rows()
    assert len(rows) == 1319
    failures = []
    for row in rows:
        record = {"prompt": row["question"], "answer": row["answer"], "task": "math"}
        gold = gold_answer(row["answer"])
        n = to_number(gold)
        assert n is not None, gold
        plus_one = n + 1
        wrong = str(int(plus_one)) if plus_one == int(plus_one) else str(plus_one)
        for fmt in FORMATS:
            ok = verify(record, fmt.format(gold))
            if ok.reward != 1.0:
                failures.append((gold, fmt, "right", ok.reason))
            bad = verify(record, fmt.format(wrong))
            if bad.reward != 0.0:
                failures.append((gold, fmt, "wrong", bad.reason))
    assert not failures, failures[:10]


# --------------------------------------------------------------------------- verify: bad input never raises


@pytest.mark.parametrize("record,response,reason_part", [
    ({"prompt": "q", "task": "math"}, "42", "'answer'"),
    ({"prompt": "q", "answer": None}, "42", "'answer'"),
    ({"prompt": "q", "answer": ""}, "42", "'answer'"),
    (rec("42", task="chess"), "42", "unknown task 'chess'"),
    (rec("42", task=None), "42", "unknown task"),
    (rec("42", task=["math"]), "42", "verifier error"),  # unhashable task
    (rec("42"), None, "response is NoneType"),
    (rec("42"), 42, "response is int"),
    (rec("42"), b"42", "response is bytes"),
    (rec("42"), "", "empty response"),
    (rec("42"), "   \n", "empty response"),
    (None, "42", "record is NoneType"),
    (["42"], "42", "record is list"),
    ("42", "42", "record is str"),
    (rec("42", task="no_such_module_xyz:fn"), "42", "verifier error: ModuleNotFoundError"),
    (rec("42", task="json:no_such_function"), "42", "verifier error: AttributeError"),
])
def test_verify_bad_input_scores_zero(record, response, reason_part):
    s = verify(record, response)
    assert isinstance(s, Score)
    assert s.reward == 0.0
    assert reason_part in s.reason


def test_missing_task_defaults_to_math():
    assert verify({"answer": "3"}, "3").reward == 1.0


# --------------------------------------------------------------------------- user verifiers


USER_MODULE = '''
from grpo_ray.core.records import Score

def exact(record, response):
    return Score(1.0 if response.strip() == record["answer"] else 0.0, "exact match", {"len": len(response)})

def as_float(record, response):
    return 0.25

def as_bool(record, response):
    return response == "yes"

def broken(record, response):
    raise RuntimeError("boom")

def not_a_number(record, response):
    return "high"
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    name = f"user_rewards_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_user_verifier_returning_score(user_module):
    s = verify(rec("abc", task=f"{user_module}:exact"), " abc ")
    assert s == Score(1.0, "exact match", {"len": 5})
    assert verify(rec("abc", task=f"{user_module}:exact"), "abd").reward == 0.0


def test_user_verifier_returning_number(user_module):
    s = verify(rec("x", task=f"{user_module}:as_float"), "anything")
    assert s.reward == 0.25 and s.reason == "user verifier"
    assert verify(rec("x", task=f"{user_module}:as_bool"), "yes").reward == 1.0
    assert verify(rec("x", task=f"{user_module}:as_bool"), "no").reward == 0.0


def test_user_verifier_errors_are_caught(user_module):
    s = verify(rec("x", task=f"{user_module}:broken"), "y")
    assert s.reward == 0.0 and "RuntimeError" in s.reason and "boom" in s.reason
    s = verify(rec("x", task=f"{user_module}:not_a_number"), "y")
    assert s.reward == 0.0 and "verifier error: ValueError" in s.reason


def test_user_verifier_by_dotted_package_path(tmp_path, monkeypatch):
    pkg = f"userpkg_{uuid.uuid4().hex[:8]}"
    (tmp_path / pkg / "rewards").mkdir(parents=True)
    (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / pkg / "rewards" / "__init__.py").write_text("")
    (tmp_path / pkg / "rewards" / "score.py").write_text("def fn(record, response):\n    return 0.5\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert verify(rec("x", task=f"{pkg}.rewards.score:fn"), "y").reward == 0.5
    finally:
        for m in [m for m in sys.modules if m == pkg or m.startswith(pkg + ".")]:
            sys.modules.pop(m)


def test_verifier_batch(user_module):
    records = [rec("5"), rec("5"), rec("x", task=f"{user_module}:as_float"), {"answer": "1", "task": "nope"}]
    responses = ["#### 5", "#### 6", "z", "1"]
    scores = Verifier().score(records, responses)
    assert [s.reward for s in scores] == [1.0, 0.0, 0.25, 0.0]
    assert Verifier().score([], []) == []


# --------------------------------------------------------------------------- known bugs


def test_plain_fraction_answer():
    assert verify(rec("1/2"), "1/2").reward == 1.0


def test_latex_fraction_after_hashes():
    assert verify(rec(r"\frac{1}{2}"), r"#### \frac{1}{2}").reward == 1.0


def test_negative_dollar_amount():
    assert verify(rec("-5"), "The change is -$5.").reward == 1.0


@pytest.mark.parametrize("gold,response", [
    (r"\sqrt{2}", r"\boxed{\sqrt{2}}"),
    (r"\pi", r"\boxed{\pi}"),
    (r"\frac{\sqrt{3}}{2}", r"\boxed{\frac{\sqrt{3}}{2}}"),
    (r"\frac{1}{2}", r"\boxed{\dfrac{1}{2}}"),
    ("0.5", r"\boxed{\dfrac{1}{2}}"),
])
def test_bare_latex_answers(gold, response):
    assert verify(rec(gold), response).reward == 1.0


# --------------------------------------------------------------------------- time limit, strictness


def test_math_verify_time_limit_stops_a_hostile_answer_and_recovers():
    """9^{9^{9^{9}}} keeps sympy busy for ever; our limit kills math-verify's process and the
    next comparison runs in a fresh one."""
    import time

    score_math({"answer": r"\frac{1}{2}"}, r"\boxed{0.5}")  # the child is started (sympy import)
    t = time.monotonic()
    s = score_math({"answer": "1"}, r"\boxed{9^{9^{9^{9}}}}", timeout_s=1.0)
    assert s.reward == 0.0 and s.reason.startswith("timeout after 1s")
    assert time.monotonic() - t < 10
    assert score_math({"answer": r"\frac{1}{2}"}, r"\boxed{\dfrac{1}{2}}").reward == 1.0


HOSTILE = [rf"\boxed{{{b}^{{{b}^{{{b}^{{{b}}}}}}}}}" for b in range(3, 9)]  # 3^{3^{3^{3}}} ... 8^{8^{8^{8}}}


def test_a_repeated_hostile_answer_costs_its_timeout_once():
    """A group's 16 samples often give the same answer: the verdict, a timeout included, is
    remembered per (gold, answer), so the limit is paid once, not per sample."""
    import time

    from grpo_ray.verifiers import math as m

    m._VERDICTS.clear()
    score_math({"answer": r"\frac{1}{2}"}, r"\boxed{0.5}")  # the child is started (sympy import)
    t = time.monotonic()
    out = [score_math({"answer": "2"}, HOSTILE[-1], timeout_s=1.0) for _ in range(6)]
    assert time.monotonic() - t < 4  # six comparisons of 1 s each without the memory
    assert all(s.reward == 0.0 and s.reason.startswith("timeout after 1s") for s in out)
    assert m._VERDICTS[("2", HOSTILE[-1][7:-1])] == 1.0
    # a longer limit than the one that ran out tries again; true verdicts are remembered too
    assert score_math({"answer": r"\frac{1}{2}"}, r"\boxed{\frac{2}{4}}").reward == 1.0
    assert m._VERDICTS[(r"\frac{1}{2}", r"\frac{2}{4}")] is True


def test_a_request_deadline_bounds_many_slow_answers():
    """The verifier pool gives each request a time budget (request_budget): answers that meet it
    unchecked score 0 with the reason, instead of the request overrunning request_timeout_s,
    being sent again and failing the step the same way."""
    import time

    from grpo_ray.verifiers import Verifier
    from grpo_ray.verifiers import math as m

    m._VERDICTS.clear()
    verifier = Verifier(math={"timeout_s": 1.0})
    verifier.score([{"answer": "1/2"}], [r"\boxed{\frac{1}{2}}"])  # the child is started
    t = time.monotonic()
    out = verifier.score([{"answer": "3"}] * len(HOSTILE), HOSTILE, deadline=time.monotonic() + 2.0)
    took = time.monotonic() - t
    assert took < 2.0 + 1.0 + 3.0  # the budget, one comparison that began before it ran out, a restart
    skipped = [s for s in out if s.reason.startswith("not compared: the request's time budget")]
    assert 1 <= len(skipped) <= len(HOSTILE) - 1 and all(s.reward == 0.0 for s in out)
    assert "reward.pool.request_timeout_s" in skipped[0].reason
    assert verifier.score([{"answer": "1/2"}], [r"\boxed{0.5}"], deadline=time.monotonic() + 5)[0].reward == 1.0


def test_math_verify_runs_off_the_main_thread():
    """Serve replicas score in worker threads, where SIGALRM-based timeouts would raise."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        out = list(pool.map(lambda p: score_math({"answer": r"\frac{1}{2}"}, p),
                            [r"\boxed{0.5}", r"\boxed{\frac{2}{4}}", r"\boxed{0.6}", r"\boxed{50\%}"]))
    assert [s.reward for s in out] == [1.0, 1.0, 0.0, 1.0]


@pytest.mark.parametrize("extraction,response,reward", [
    ("any", "so the answer is 7", 1.0),
    ("marked", "so the answer is 7", 0.0),
    ("marked", "so #### 7", 1.0),
    ("marked", r"\boxed{7}", 1.0),
    ("boxed", "so #### 7", 0.0),
    ("boxed", r"it is \boxed{7} or maybe 8", 1.0),
])
def test_extraction_strictness(extraction, response, reward):
    s = verify({"answer": "7"}, response, math={"extraction": extraction})
    assert s.reward == reward
    if not reward:
        assert s.reason.startswith("no answer found in ")
