"""User reward functions ('module:function') under a per-call time limit (reward.user.timeout_s).

Verifiers run in Ray Serve replicas (in executor threads, where signal.alarm cannot reach) and
synchronously in tests. A thread cannot be killed: a hung function left in a worker thread would
hold it for good, and the next hung call another one. So each call runs in a small persistent
worker process (a plain `python -c` child: no fork of a threaded Ray worker, no multiprocessing
re-import of __main__) that imports the function once and answers calls over two pipes
(length-prefixed pickles). A call past its time limit kills the worker's process group (SIGKILL)
and the next call starts a fresh one: a hung function never outlives its limit, and a function
that kills its own process (os._exit, a segfault) costs a worker, not the replica.

Each calling thread borrows an idle worker (one is started when none is idle), so a replica's
`threads` concurrent requests use as many workers. The cost on top of the function, measured
with a trivial function on a shared 2-core machine: 20-40 us a call (25-48k calls/s per calling
thread), up to ~180 us (5.5k calls/s) at a load of 7; a worker starts and imports the module in
25-85 ms, once (and again after a timeout kills it).
The time limit covers the call; a fresh worker first imports the function's module under a limit
of its own (IMPORT_S, within the request's budget), so a module that loads a tokenizer when
imported does not make every first call time out.

What a call can end in: the function's value, or UserFunctionError saying what went wrong in
words that name the function: "raised ValueError: bad input, at rewards.py:12 in fn",
"timeout after 10 s", "its worker process died (exit code 1)".
"""
from __future__ import annotations

import atexit
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import threading
import time

DEFAULT_TIMEOUT_S = 10.0  # reward.user.timeout_s's default
IMPORT_S = 120.0  # a fresh worker's import of the function's module (a module may load a tokenizer)

# The worker: reads (sys.path or None, spec, (record, response) or None to import the function
# only), writes ("ok", value) or
# ("error", "Type: message", "file:line in function"). Its stdout becomes stderr, so a print() in
# the user's function goes to the log instead of the reply pipe.
_WORKER = r"""
import importlib, os, pickle, struct, sys, traceback
rd, wr = os.fdopen(os.dup(0), "rb", buffering=0), os.fdopen(os.dup(1), "wb", buffering=0)
os.dup2(2, 1)
null = os.open(os.devnull, os.O_RDONLY); os.dup2(null, 0)
fns = {}
def read(n):
    b = b""
    while len(b) < n:
        part = rd.read(n - len(b))
        if not part:
            sys.exit(0)
        b += part
    return b
while True:
    path, spec, args = pickle.loads(read(struct.unpack("<Q", read(8))[0]))
    if path is not None:
        sys.path[:] = path
        importlib.invalidate_caches()
    try:
        fn = fns.get(spec)
        if fn is None:
            module, _, attr = spec.partition(":")
            fn = fns[spec] = getattr(importlib.import_module(module), attr)
        out = ("ok", None if args is None else fn(*args))
        data = pickle.dumps(out, pickle.HIGHEST_PROTOCOL)
    except BaseException as e:  # SystemExit and KeyboardInterrupt in the function included
        tb = [f for f in traceback.extract_tb(e.__traceback__)
              if not f.filename.startswith("<") and "importlib" not in f.filename]
        where = f"{os.path.basename(tb[-1].filename)}:{tb[-1].lineno} in {tb[-1].name}" if tb else ""
        text = traceback.format_exception_only(type(e), e)[-1].strip()
        data = pickle.dumps(("error", text[:500], where), pickle.HIGHEST_PROTOCOL)
    m = memoryview(struct.pack("<Q", len(data)) + data)
    while m:
        m = m[wr.write(m):]
"""


class UserFunctionError(Exception):
    """A user function raised, ran past its time limit, or lost its worker. str(): what happened
    (without the function's name); `reason`: the same for a Score's reason."""

    def __init__(self, what: str, reason: str | None = None):
        super().__init__(what)
        self.reason = reason or what


class _Worker:
    """One worker process and the sys.path it was last sent."""

    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.path: list[str] | None = None
        self.loaded: set[str] = set()  # the specs this worker has imported
        self.owner = os.getpid()

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _WORKER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, bufsize=0, start_new_session=True)
        self.path, self.loaded = None, set()

    def kill(self) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the function's own children too
            except (ProcessLookupError, PermissionError):
                pass
            self.proc.wait()
            for f in (self.proc.stdin, self.proc.stdout):
                f.close()
            self.proc = None

    def call(self, spec: str, record, response, limit: float, import_limit: float):
        """The reply to one call: ("ok", value), ("error", text, where), ("timeout", seconds, what)
        or ("died", exit code). In a fresh worker the function's module is imported first, under
        import_limit."""
        if self.proc is None or self.proc.poll() is not None:
            self.kill()
            self.start()
        if spec not in self.loaded:
            out = self._ask(spec, None, import_limit)
            if out[0] != "ok":
                return (*out[:3], "import") if out[0] == "error" else out
            self.loaded.add(spec)
        return self._ask(spec, (record, response), limit)

    def _ask(self, spec: str, args: tuple | None, limit: float):
        path = list(sys.path)
        msg = pickle.dumps((None if path == self.path else path, spec, args), pickle.HIGHEST_PROTOCOL)
        ends = time.monotonic() + limit
        try:
            data, fd = memoryview(struct.pack("<Q", len(msg)) + msg), self.proc.stdin.fileno()
            while data:
                data = data[os.write(fd, data):]
        except OSError:  # BrokenPipeError: the worker died
            return self._died()
        self.path = path
        what = "importing its module" if args is None else ""
        head = self._read(8, ends)
        if head is None:
            return self._timeout(limit, what)
        body = self._read(struct.unpack("<Q", head)[0], ends + 5.0) if head else b""  # being written
        if body is None:
            return self._timeout(limit, what)
        if not body:
            return self._died()
        try:
            return pickle.loads(body)
        except Exception as e:  # a value whose class the replica cannot import, say
            return ("error", f"returned a value that cannot be unpickled here: {type(e).__name__}: {e}"[:500], "")

    def _read(self, n: int, ends: float) -> bytes | None:
        """n bytes from the worker, or None at `ends`; b"" if the worker died."""
        fd, buf = self.proc.stdout.fileno(), b""
        while len(buf) < n:
            left = ends - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            part = os.read(fd, n - len(buf))
            if not part:  # the worker died
                return b""
            buf += part
        return buf

    def _timeout(self, limit: float, what: str):
        self.kill()
        return ("timeout", limit, what)

    def _died(self):
        try:
            code = self.proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            code = None
        self.kill()
        return ("died", code)


_idle: list[_Worker] = []
_lock = threading.Lock()


def _borrow() -> _Worker:
    with _lock:
        while _idle:
            w = _idle.pop()
            if w.owner == os.getpid():  # not a copy from before a fork
                return w
    return _Worker()


def _give_back(w: _Worker) -> None:
    with _lock:
        _idle.append(w)


@atexit.register
def _stop_all() -> None:
    with _lock:
        workers, _idle[:] = list(_idle), []
    for w in workers:
        if w.owner == os.getpid():
            w.kill()


def call(spec: str, record, response, timeout_s: float = DEFAULT_TIMEOUT_S, deadline: float | None = None):
    """spec(record, response) in a worker process, within timeout_s and, when given, by
    `deadline` (time.monotonic(): the pool's request budget). Returns the function's value;
    raises UserFunctionError (a raise in the function, a timeout, a dead worker)."""
    left = float("inf") if deadline is None else deadline - time.monotonic()
    if left <= 0.01:
        raise UserFunctionError("not run: the request's time budget was spent (reward.pool.request_timeout_s)")
    limit, by_budget = min(timeout_s, left), left < timeout_s
    w = _borrow()
    try:
        out = w.call(spec, record, response, limit, min(max(timeout_s, IMPORT_S), left))
    finally:
        _give_back(w)
    kind = out[0]
    if kind == "ok":
        return out[1]
    if kind == "error":
        where = f", at {out[2]}" if out[2] else ""
        verb = "could not be imported:" if out[3:] == ("import",) else "raised"
        raise UserFunctionError(f"{verb} {out[1]}{where}", f"verifier error: {out[1]}")
    if kind == "timeout":
        budget = " (the request's time budget, reward.pool.request_timeout_s)" if by_budget else ""
        what = f" {out[2]}" if out[2] else ""
        raise UserFunctionError(f"timeout after {_secs(out[1])} s{what}{budget}")
    code = out[1]
    how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
    raise UserFunctionError(f"its worker process died ({how})")


def _secs(t: float) -> str:
    return f"{t:g}" if t >= 1 and float(t).is_integer() else f"{t:.2g}" if t < 10 else f"{t:.0f}"
