"""The `code_feedback` environment, for code rows: the model submits a solution, the row's
visible tests run on it in the sandbox, and their failure comes back so that it may revise, up
to env.max_turns; the reward is the row's full tests on the last submission (as in multi-turn
code RL with execution feedback, e.g. Gehring et al. 2024, "RLEF", arXiv:2410.02089).

Visible tests: the row's `visible_tests` field, else its first `visible` assert lines of
`tests` (plain-assert rows; a HumanEval check() has none to split, and gets no feedback turn).
"""
from __future__ import annotations

from . import EnvStep
from .tools import check_code


def visible_tests(record: dict, count: int) -> str:
    if isinstance(record.get("visible_tests"), str):
        return record["visible_tests"]
    tests = record.get("tests") if isinstance(record.get("tests"), str) else ""
    asserts = [line for line in tests.splitlines() if line.startswith("assert ")]
    return "\n".join(asserts[:count])


class CodeFeedback:
    stop = ()  # a turn is a whole submission, ended by EOS

    def __init__(self, max_turns: int = 4, visible: int = 1, max_feedback_chars: int = 300):
        self.max_turns, self.visible, self.max_chars = max_turns, visible, max_feedback_chars
        self.record: dict = {}
        self.turn = 0

    def reset(self, record: dict) -> str:
        self.record, self.turn = record, 0
        return ""

    def step(self, completion: str) -> EnvStep:
        self.turn += 1
        tests = visible_tests(self.record, self.visible)
        if tests and self.turn < self.max_turns:
            passed, reason = check_code({**self.record, "tests": tests}, completion)
            if passed < 1.0:
                return EnvStep(f"\nThe tests failed: {reason[:self.max_chars]}\nRevise the solution.\n",
                               tool_calls=1)
        reward, _ = check_code(self.record, completion)
        return EnvStep(reward=reward, done=True, tool_calls=1)
