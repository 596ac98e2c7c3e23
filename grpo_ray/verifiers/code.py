"""Python code answers: run the record's tests against the response in the sandbox.

record: `tests` (Python that raises on failure: plain asserts, or HumanEval's `def check(candidate)`),
optional `entry_point` (the function under test; with a `check` in the tests, `check(entry_point)`
is called), optional `prompt` (HumanEval: the signature and docstring the response completes),
optional `timeout_s`. A fenced ```python block is extracted when present. Reward 1.0 when every test
passes, else 0.0 with the reason (with partial_credit: the fraction of asserts that pass).

Why two processes. Anything the untrusted program can reach, it can forge: in one process it can
walk frames to a nonce, patch the checker, call sys.exit(0) or os._exit(0), or return an object
whose __eq__ is always True. So inside the sandbox a trusted harness (T) and the solution's worker
(W) are separate processes:
- W execs the program (with __name__ "__solution__", as HumanEval's harness does) and then only
  answers calls: ("call", name, args, kwargs) -> ("ok", value) | ("err", type name, message),
  framed with marshal over two private pipes.
- T execs the trusted prompt (its helpers, e.g. HumanEval/32's poly) and the tests, with every
  function W defines replaced by a proxy to W. Values come back through marshal, which cannot
  build user classes, and T rejects anything but plain data (no code objects, no custom __eq__).
  So assertions, comparisons and builtins all run in T, which never executes solution code.
- T marks itself non-dumpable, so W (same uid) can neither ptrace it nor open /proc/T/mem or
  /proc/T/fd. Only T knows the per-check nonce (read from its stdin before W exists); it holds the
  side-channel fd, and writes {"nonce", "passed", "reason"} there after the tests. The parent
  passes a check only on that verdict with the right nonce and exit code 0; stdout is ignored.

Residual risk, honestly:
- Kernel or bubblewrap bugs; without bubblewrap (see sandbox.py) the run is not isolated at all.
- W can see the test inputs (the call arguments), and with the prompt absent, helpers the tests
  use are W's own (then W controls them). Keep HumanEval's prompt in the record.
- Only plain data crosses: a solution returning a custom class, or tests relying on a solution
  mutating its argument in place, or on module-level values (not callables) of the solution,
  cannot be checked and fail. Tests that rely on W's stdout are not supported.
- W can kill or stop T (same uid): that only ever fails the check. In a fresh sandbox it may
  also reach the verdict pipe through bwrap's init (/proc/1/fd) when the pipe is not root's:
  without the nonce that can only hide a verdict (a fail), never forge a pass. (The warm
  sandbox's init holds no copy of it, and is not dumpable.)
- A fork bomb's zombies are reaped by the host's init; without bubblewrap they count against
  uid 65534's NPROC until then, so checks right after one can fail (never pass) spuriously.
"""
from __future__ import annotations

import ast
import json
import re
import secrets

from ..core.score import Score
from . import sandbox, warm_sandbox as warm

NOT_ISOLATED = ("not run: bubblewrap is not usable on this node (see the 'sandbox:' warning in its log), so "
                "the check would run unisolated (network, world-readable files); install bubblewrap "
                "(apt-get install bubblewrap) with user namespaces allowed, or set "
                "reward.code.allow_unsandboxed=true to accept that")

_WORKER = r'''
import marshal, os, sys

def _main(rfd, wfd):
    def read(n):
        data = b""
        while len(data) < n:
            chunk = os.read(rfd, n - len(data))
            if not chunk:
                sys.exit(0)
            data += chunk
        return data
    def recv():
        return marshal.loads(read(int.from_bytes(read(8), "little")))
    def send(obj):
        data = marshal.dumps(obj)
        data = memoryview(len(data).to_bytes(8, "little") + data)
        while data:
            data = data[os.write(wfd, data):]
    ns = {"__name__": "__solution__", "__builtins__": __builtins__}
    try:
        exec(compile(recv(), "<solution>", "exec"), ns)
    except BaseException as e:
        send(("err", type(e).__name__, str(e)[:300]))
        return
    send(("ready", [k for k, v in ns.items() if type(k) is str and callable(v)]))
    while True:
        _, name, args, kwargs = recv()
        try:
            value = ns[name](*args, **kwargs)
        except BaseException as e:
            send(("err", type(e).__name__, str(e)[:300]))
            continue
        try:
            send(("ok", value))
        except ValueError:  # marshal refuses anything but plain data, e.g. a class with __eq__
            send(("err", "TypeError", f"solution returned a {type(value).__name__}; "
                                      "only plain data can be checked"))

_main(int(sys.argv[1]), int(sys.argv[2]))
'''

# Runs as T. Never execs solution code; see the module docstring.
_HARNESS = r'''
import ast, builtins, ctypes, json, marshal, os, sys

_PLAIN = {type(None), bool, int, float, complex, str, bytes, tuple, list, dict, set, frozenset}


class Died(Exception):
    pass


def plain(value):
    stack = [value]
    while stack:
        v = stack.pop()
        t = type(v)
        if t not in _PLAIN:
            raise TypeError(f"solution returned a {t.__name__}; only plain data can be checked")
        if t is dict:
            stack.extend(v.keys())
            stack.extend(v.values())
        elif t in (tuple, list, set, frozenset):
            stack.extend(v)
    return value


class Worker:
    def __init__(self, source):
        a_r, a_w = os.pipe()  # T -> W
        b_r, b_w = os.pipe()  # W -> T
        os.set_inheritable(a_r, True)
        os.set_inheritable(b_w, True)
        null = os.open(os.devnull, os.O_RDONLY)  # W must not inherit our stdin (the job)
        self.pid = os.posix_spawn(sys.executable, [sys.executable, "-I", "-S", "-c", source,
                                  str(a_r), str(b_w)], dict(os.environ),
                                  file_actions=[(os.POSIX_SPAWN_DUP2, null, 0)])
        for fd in (a_r, b_w, null):
            os.close(fd)
        self.w, self.r = a_w, b_r

    def send(self, obj):
        data = marshal.dumps(obj)
        data = memoryview(len(data).to_bytes(8, "little") + data)
        while data:
            data = data[os.write(self.w, data):]

    def read(self, n):
        data = b""
        while len(data) < n:
            chunk = os.read(self.r, n - len(data))
            if not chunk:
                raise Died(self.exit_status())
            data += chunk
        return data

    def recv(self):
        n = int.from_bytes(self.read(8), "little")
        if n > 64 << 20:  # W writes the frames: garbage must not make us allocate at will
            raise Died("sent a malformed reply")
        try:
            return marshal.loads(self.read(n))
        except (EOFError, ValueError, TypeError):
            raise Died("sent a malformed reply") from None

    def exit_status(self):
        _, status = os.waitpid(self.pid, 0)
        if os.WIFSIGNALED(status):
            return f"killed by signal {os.WTERMSIG(status)}"
        return f"exit code {os.WEXITSTATUS(status)}"

    def proxy(self, name):
        def call(*args, **kwargs):
            self.send(("call", name, args, kwargs))
            msg = self.recv()
            if type(msg) is tuple and len(msg) == 2 and msg[0] == "ok":
                return plain(msg[1])
            raise solution_error(msg)
        return call


def solution_error(msg):
    kind, text = (msg[1], msg[2]) if type(msg) is tuple and len(msg) == 3 else ("?", "bad reply")
    kind, text = str(kind), str(text)
    cls = getattr(builtins, kind, None)  # a builtin type lets tests expecting e.g. ValueError work
    # StopIteration would end the tests' any(map(f, ...)) as if the input ran out (PEP 479's reason)
    if not (isinstance(cls, type) and issubclass(cls, Exception)) or issubclass(cls, (StopIteration,
                                                                                     StopAsyncIteration)):
        cls = RuntimeError
    err = cls(f"{kind}: {text}")
    err.from_solution = True
    return err


def failure(e):
    if isinstance(e, MemoryError) or str(e).startswith("MemoryError"):
        return "memory limit"
    if isinstance(e, Died):
        return f"tests did not finish: the solution process ended ({e})"
    if getattr(e, "from_solution", False):
        return f"runtime error: {e}"
    if isinstance(e, AssertionError):
        return f"wrong answer: AssertionError {e}".rstrip()
    return f"wrong answer: {type(e).__name__}: {e}"


class Soft(ast.NodeTransformer):
    """Partial credit: `assert cond, msg` -> `__grpo_assert__(lambda: cond)`, which counts the
    assertion and goes on instead of stopping at the first failure."""
    count = 0

    def visit_Assert(self, node):
        self.generic_visit(node)
        self.count += 1
        fn = ast.Lambda(ast.arguments([], [], None, [], [], None, []), node.test)
        call = ast.Call(ast.Name("__grpo_assert__", ast.Load()), [fn], [])
        return ast.copy_location(ast.Expr(call), node)


class Tally:
    def __init__(self):
        self.run = self.passed = 0

    def __call__(self, cond):
        self.run += 1
        try:
            ok = bool(cond())
        except Exception:  # an error inside one assertion fails that one, not the rest
            ok = False
        self.passed += ok


def compile_tests(job):
    if not job.get("partial"):
        return compile(job["tests"], "<tests>", "exec"), 0
    soft = Soft()
    tree = ast.fix_missing_locations(soft.visit(ast.parse(job["tests"], "<tests>")))
    return compile(tree, "<tests>", "exec"), soft.count


def run(job):
    try:
        compile(job["program"], "<solution>", "exec")
    except (SyntaxError, ValueError) as e:
        return False, f"syntax error: {getattr(e, 'msg', e)} (line {getattr(e, 'lineno', '?')})"
    try:
        tests = compile_tests(job)
    except (SyntaxError, ValueError) as e:
        return False, f"tests did not run: the tests do not compile ({e})"
    worker = Worker(job["worker"])
    worker.send(job["program"])
    try:
        msg = worker.recv()
    except Died as e:
        return False, f"tests did not run: the program ended before the tests ({e})"
    if msg[0] != "ready":
        err = solution_error(msg)
        if str(err).startswith("SystemExit"):
            return False, f"tests did not run: the program exited before the tests ({err})"
        return False, failure(err)
    return run_tests(worker, tests, job, msg[1])


def run_tests(worker, tests, job, names):
    entry, (tests, asserts), tally = job.get("entry_point"), tests, Tally()
    ns = {"__name__": "__tests__", "__grpo_assert__": tally}
    if job.get("prompt"):  # trusted: helpers the tests call (HumanEval/32's poly) come from here
        exec(compile(job["prompt"], "<prompt>", "exec"), ns)
    for name in names:  # W's names may not shadow builtins (a fake abs() would fool the tests)
        if name == entry or (type(name) is str and name.isidentifier() and name not in ns
                             and not name.startswith("__") and not hasattr(builtins, name)):
            ns[name] = worker.proxy(name)
    if entry and entry not in names:
        return False, f"wrong answer: the solution does not define {entry}()"
    theirs = ns.get("check")  # a check() of the solution's own is no test harness
    try:
        exec(tests, ns)
        check = ns.get("check")
        if entry and callable(check) and check is not theirs:
            check(worker.proxy(entry))
        elif check is not None and check is not theirs and not entry:
            return False, "tests did not run: the tests define check() but the record has no entry_point"
    except BaseException as e:
        return False, failure(e), partial(tally, asserts, crashed=True)
    if tally.passed < tally.run:
        failed = f"{tally.run - tally.passed} of {tally.run} assertions failed"
        return False, f"wrong answer: {failed}", partial(tally, asserts)
    return True, "all tests passed"


def partial(tally, asserts, crashed=False):
    """Fraction of assertions that held. An assertion in a loop counts each time it runs; one
    never reached (the tests stopped early) counts as failed, and so does the error that stopped
    them: `asserts` counts a loop's assertion once, so a solution that passed its first call and
    raised on the second would otherwise score 1."""
    total = max(tally.run + crashed, asserts)
    return tally.passed / total if total else 0.0


def main():
    job = json.loads(sys.stdin.buffer.read())
    side = SIDE_FD
    os.set_inheritable(side, False)

    def verdict(passed, reason, fraction=None):
        fraction = float(passed) if fraction is None else fraction
        line = json.dumps({"nonce": job["nonce"], "passed": passed, "reason": reason[:500], "fraction": fraction})
        # one write under PIPE_BUF is atomic; the leading newline ends any partial line that W
        # wrote through the sandbox init's copy of this fd (/proc/1/fd: blocked when the pipe is
        # root's, possible when the trainer runs as the sandbox's own uid)
        os.write(side, b"\n" + line.encode()[:3500] + b"\n")
        os._exit(0)  # the sandbox's pid namespace takes W and its children down with us

    try:
        # PR_SET_DUMPABLE=0: W runs as our uid; this stops it ptracing us or reading /proc/T/*
        if ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE) failed")
        verdict(*run(job))
    except BaseException as e:
        verdict(False, f"harness error: {type(e).__name__}: {e}")


main()
'''

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(response: str, entry_point: str | None = None) -> str:
    """The fenced python block (the one defining entry_point, else the longest); else the text."""
    blocks = [body for lang, body in _FENCE.findall(response)
              if lang.lower() in ("", "python", "py", "python3")]
    if not blocks:
        return response
    if entry_point:
        defining = [b for b in blocks if _defines(b, entry_point)]
        if defining:
            return defining[0]
    return max(blocks, key=len)


def _defines(code: str, name: str) -> bool:
    return re.search(rf"^\s*(?:async\s+)?def\s+{re.escape(name)}\s*\(", code, re.MULTILINE) is not None


def _source_prompt(record: dict) -> str:
    """The row's own prompt when it is code the response completes (HumanEval's signature and
    docstring), not data.prompt_template's text; "" when it is prose (MBPP's "Write a function
    that..."), which in front of the program would make every answer a syntax error."""
    prompt = (record["raw_prompt"] if "raw_prompt" in record else record.get("prompt")) or ""
    for stub in (prompt, prompt.rstrip() + "\n    pass\n"):  # a def whose body the response writes
        try:
            ast.parse(stub)
            return prompt
        except (SyntaxError, ValueError):
            continue
    return ""


def build_program(record: dict, response: str) -> str:
    """HumanEval: a bare body completes the prompt. A full `def entry_point` also gets the prompt
    in front (it is only the stub, redefined right after), so the prompt's imports (typing.List)
    and helpers stay available, which models often leave out of a restated function."""
    entry = record.get("entry_point")
    code = extract_code(response, entry)
    prompt = _source_prompt(record)
    if not prompt:
        return code
    if entry and _defines(code, entry):
        return prompt.rstrip("\n") + "\n\n\n" + code
    return prompt + code


def _verdict(side: bytes, nonce: str) -> dict | None:
    for line in side.decode(errors="replace").splitlines():
        try:
            v = json.loads(line)
        except ValueError:
            continue
        if isinstance(v, dict) and v.get("nonce") == nonce:
            return v
    return None


def score_code(record: dict, response: str, *, timeout_s: float = 2.0, memory_mb: int = 512,
               partial_credit: bool = False, allow_unsandboxed: bool = False, warm_sandbox: bool = True) -> Score:
    """1.0 when every test passes. partial_credit: the fraction of assertions that hold instead
    (plain asserts and HumanEval's check(); a timeout or crash still scores 0). The record's own
    `timeout_s` overrides the argument. Without a working bubblewrap nothing runs (0, with the
    reason) unless allow_unsandboxed: isolation fails closed. warm_sandbox: run the check in a
    fork of a warm sandbox (warm_sandbox.py), else in a fresh one."""
    if not allow_unsandboxed and not sandbox.bwrap_works():
        return Score(0.0, NOT_ISOLATED)
    tests = record.get("tests")
    if not isinstance(tests, str) or not tests.strip():
        return Score(0.0, "record has no 'tests' field")
    entry = record.get("entry_point")
    if entry is not None and not (isinstance(entry, str) and entry.isidentifier()):
        return Score(0.0, f"bad entry_point {entry!r}")
    try:
        timeout = float(record.get("timeout_s", timeout_s))
    except (TypeError, ValueError):
        return Score(0.0, f"bad timeout_s {record.get('timeout_s')!r}")
    nonce = secrets.token_hex(16)
    job = {"nonce": nonce, "program": build_program(record, response), "tests": tests,
           "entry_point": entry, "prompt": _source_prompt(record), "worker": _WORKER,
           "partial": bool(partial_credit)}
    run = warm.run_python if warm_sandbox else sandbox.run_python
    res = run(_HARNESS, stdin=json.dumps(job).encode(), side_channel=True, timeout_s=timeout, memory_mb=memory_mb)
    if res.killed_reason and res.killed_reason != "memory limit":
        return Score(0.0, res.killed_reason)
    v = _verdict(res.side, nonce)
    if v is None:
        tail = res.stderr.strip().splitlines()[-1:] or [f"exit code {res.returncode}"]
        return Score(0.0, f"tests did not run: no verdict from the harness ({tail[0][:200]})")
    passed = v.get("passed") is True and res.returncode == 0
    reward = 1.0 if passed else 0.0
    if partial_credit and not passed and res.returncode == 0:
        fraction = v.get("fraction")
        reward = min(max(float(fraction), 0.0), 1.0) if isinstance(fraction, (int, float)) else 0.0
    return Score(reward, str(v.get("reason", "")))
