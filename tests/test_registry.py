"""The table of built-in tasks (grpo_ray/verifiers/registry.py): names, resolving built-ins and user
'module:function' specs, the row checks the datasets use, the options by section, and that one
registration is all a new built-in needs (verify, the row checks, the pool's replica)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from grpo_ray.config import load_config
from grpo_ray.data.datasets import DataError, load_jsonl, task_problem
from grpo_ray.verifiers import Verifier, registry, verify
from grpo_ray.verifiers.registry import Task


def test_builtin_names_and_sections():
    assert registry.builtin_names() == ("math", "code")
    assert registry.sections() == ("math", "code")
    assert registry.DEFAULT_TASK in registry.builtin_names()


def test_importing_the_table_loads_no_verifier():
    # the config asks for builtin_names(): that must not start the sandbox or math-verify
    code = ("import sys, grpo_ray.verifiers.registry as r; r.builtin_names(); "
            "print([m for m in ('grpo_ray.verifiers.math', 'grpo_ray.verifiers.code', 'sympy', 'ray') "
            "if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_resolve_builtins_and_user_functions():
    from grpo_ray.verifiers.code import score_code
    from grpo_ray.verifiers.math import score_math

    assert registry.resolve("math") is score_math and registry.resolve("code") is score_code
    assert registry.resolve("json:dumps") is json.dumps
    assert registry.resolve("reward_fns:digit_fraction")({}, "a1") == 0.5


@pytest.mark.parametrize("spec, error, needle", [
    ("chess", ValueError, "unknown task 'chess'; known: math, code or 'module:function'"),
    ("no_such_module_xyz:fn", ModuleNotFoundError, "cannot import 'no_such_module_xyz' for 'no_such_module_xyz:fn'"),
    ("json:no_such_fn", AttributeError, "module 'json' has no attribute 'no_such_fn' (from 'json:no_such_fn')"),
    ("json:__doc__", TypeError, "'json:__doc__' is a str, not a function"),
])
def test_resolve_errors_name_the_spec(spec, error, needle):
    with pytest.raises(error) as e:
        registry.resolve(spec)
    assert needle in str(e.value)


def test_row_checks_come_from_the_table():
    assert registry.row_problem({"task": "math"}) is None
    assert registry.row_problem({}) is None  # the default task
    assert registry.row_problem({"task": "code", "tests": "assert True"}) is None
    assert "a code row needs a 'tests' field" in registry.row_problem({"task": "code"})
    assert registry.row_problem({"task": ["math"]}).startswith("task ['math']: expected math, code, or")
    assert (registry.row_problem({"task": "json:__doc__"})
            == "task 'json:__doc__': TypeError: 'json:__doc__' is a str, not a function")
    assert task_problem({"task": "reward_fns:digit_fraction"}) is None
    assert registry.needs_answer("math") and not registry.needs_answer("code")
    assert registry.needs_answer("reward_fns:digit_fraction") and registry.needs_answer(["code"])


def test_options_by_section_from_the_reward_config():
    reward = load_config(None, ["reward.code.memory_mb=256", "reward.math.extraction=marked"]).reward
    opts = registry.options(reward)
    assert set(opts) == {"math", "code"}
    assert opts["code"]["memory_mb"] == 256 and opts["math"]["extraction"] == "marked"
    opts["math"]["extraction"] = "any"  # a copy: the config is not changed through it
    assert reward.math.extraction == "marked"


def test_verify_takes_options_by_section_or_as_keywords():
    rec = {"answer": "7"}
    assert verify(rec, "so 7", {"math": {"extraction": "marked"}}).reward == 0.0
    assert verify(rec, "so 7", math={"extraction": "marked"}).reward == 0.0
    assert verify(rec, "so 7", {"math": {"extraction": "any"}}, math={"extraction": "marked"}).reward == 0.0
    assert verify(rec, "so 7").reward == 1.0
    with pytest.raises(TypeError, match="unknown verifier option section.*'maths'"):
        verify(rec, "so 7", maths={"extraction": "marked"})
    with pytest.raises(TypeError, match="'pool'"):
        Verifier(options={"pool": {}})


@pytest.fixture
def echo_task(tmp_path, monkeypatch):
    """A new built-in in one file plus one registration: `echo` scores 1 when the response repeats
    the row's 'word', its options under reward.echo (here given directly)."""
    (tmp_path / "echo_verifier.py").write_text(
        "from grpo_ray.core.records import Score\n"
        "def score_echo(record, response, *, exact=False):\n"
        "    ok = response == record['word'] if exact else record['word'] in response\n"
        "    return Score(1.0 if ok else 0.0, 'echo')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(registry.BUILTIN, "echo", Task("echo_verifier:score_echo", section="echo", needs_answer=False,
                                                       fields=(("word", "the word to repeat"),)))
    return tmp_path


def test_a_new_builtin_needs_one_registration(echo_task):
    assert "echo" in registry.builtin_names() and "echo" in registry.sections()
    rec = {"task": "echo", "word": "hi"}
    assert verify(rec, "oh hi there").reward == 1.0
    assert verify(rec, "oh hi there", echo={"exact": True}).reward == 0.0
    assert Verifier(echo={"exact": True}).score([rec], ["hi"])[0].reward == 1.0
    # the datasets' checks: no answer needed, the 'word' field is
    path = echo_task / "d.jsonl"
    path.write_text(json.dumps({"prompt": "say hi", "word": "hi", "task": "echo"}) + "\n")
    assert load_jsonl(str(path))[0]["task"] == "echo"
    path.write_text(json.dumps({"prompt": "say hi", "task": "echo"}) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl:1: a echo row needs a 'word' field \(the word to repeat\)"):
        load_jsonl(str(path))
    assert "expected math, code, echo, or module:function" in registry.row_problem({"task": "ech"})


def test_the_replica_asks_the_table_whether_its_task_needs_a_sandbox(echo_task, monkeypatch):
    from grpo_ray.roles.verifier_pool import VerifierReplica
    from grpo_ray.verifiers import sandbox

    monkeypatch.setattr(sandbox, "bwrap_works", lambda: False)
    monkeypatch.setitem(registry.BUILTIN, "echo", Task("echo_verifier:score_echo", section="echo", needs_sandbox=True))
    with pytest.raises(RuntimeError, match="bubblewrap is not usable"):
        VerifierReplica({"correct": 1.0}, {}, 1, task="echo")
    VerifierReplica({"correct": 1.0}, {"echo": {"allow_unsandboxed": True}}, 1, task="echo").executor.shutdown()
    VerifierReplica({"correct": 1.0}, {}, 1, task="math").executor.shutdown()  # no sandbox needed
    rep = VerifierReplica({"correct": 1.0}, {}, 1, task="reward_fns:digit_fraction")  # nor for a user function
    assert rep.verifier.score([{"task": "echo", "word": "x"}], ["x"])[0].reward == 1.0
    rep.executor.shutdown()
