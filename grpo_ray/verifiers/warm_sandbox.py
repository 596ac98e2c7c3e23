"""Python in a warm sandbox: `run_python(source) -> SandboxResult`, as sandbox.run_python, for
short programs that come often (environments' tool calls, code checks).

A fresh sandbox per call (sandbox.py) pays a bubblewrap launch and an interpreter start each
time. Here one bubblewrap sandbox (the same mounts, no network, uid 65534, new session) runs a
server that forks per call, and the kernel gives each fork namespaces of its own (user, mount,
pid, net, ipc, uts), fresh /tmp, /dev/shm, /proc and /dev/pts, no capabilities, no user
namespaces of its own, and the call's rlimits: warm_server.py says how, and why no call can see
another's files, processes or memory. Costs per call: benchmarks/RESULTS.md ("the warm sandbox").

What it needs beyond the fresh sandbox: bubblewrap without --disable-userns for the server
(each call's user namespace then sets that limit to 0 for the code), and the kernel letting an
unprivileged process nest user namespaces. Where the first call's self-test fails, calls go to
the fresh sandbox, with a one-time warning naming the reason.
"""
from __future__ import annotations

import itertools
import json
import logging
import queue
import subprocess
import threading
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

from . import sandbox
from .sandbox import SandboxResult
from .warm_server import CHUNK, HEADER, SETUP_FAILED, read_exact

log = logging.getLogger(__name__)
SERVER_SOURCE = Path(__file__).with_name("warm_server.py").read_text()
MAX_STDIN_BYTES = 1 << 30
_HOST_SLACK_S = 10.0  # past the call's own wall clock, the server itself counts as hung


class ServerGone(RuntimeError):
    """The server exited or stopped answering: its calls fail, and the next call starts another."""


class WarmSandbox:
    """One server process and the calls in flight to it; thread-safe."""

    def __init__(self):
        python, drop = sandbox._interpreter()
        prefix, ids = sandbox._as_nobody(drop)
        cmd = [*prefix, *sandbox._bwrap_prefix(python, 1, disable_userns=False),
               python, "-I", "-S", "-c", SERVER_SOURCE]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=sandbox._ENV, **ids)
        self.lock = threading.Lock()  # one request at a time on the pipe
        self.pending_lock = threading.Lock()
        self.ids = itertools.count(1)
        self.pending: dict[int, Future] = {}
        self.gone: str | None = None
        threading.Thread(target=self._read, daemon=True, name="warm-sandbox").start()

    def submit(self, source: str, limits: dict, stdin: bytes = b"") -> Future:
        body_limits, body_code = json.dumps(limits).encode(), source.encode()
        if len(stdin) > MAX_STDIN_BYTES:
            raise ValueError(f"stdin is over {MAX_STDIN_BYTES} bytes")
        done: Future = Future()
        with self.lock:  # the pipe's writer; `pending` has its own lock, so answers never wait on a write
            if self.gone:
                raise ServerGone(self.gone)
            call_id = next(self.ids)
            request = HEADER.pack(call_id, len(body_limits), len(body_code), len(stdin)) + body_limits + body_code + stdin
            with self.pending_lock:
                if self.gone:  # closed by the reader meanwhile: nobody would answer
                    raise ServerGone(self.gone)
                self.pending[call_id] = done
            try:
                self.proc.stdin.write(request)
                self.proc.stdin.flush()
            except BaseException as e:  # half a request would put the stream out of step
                with self.pending_lock:
                    self.pending.pop(call_id)
                self.gone = f"the warm sandbox's server does not take requests: {type(e).__name__}: {e}"
                self.proc.kill()
                if isinstance(e, OSError):
                    raise ServerGone(self.gone) from e
                raise
        return done

    def run(self, source: str, limits: dict, stdin: bytes = b"") -> SandboxResult:
        done = self.submit(source, limits, stdin)
        try:
            out = done.result(timeout=limits["timeout_s"] + _HOST_SLACK_S)
        except FutureTimeout:
            self.close(f"the warm sandbox's server did not answer within {limits['timeout_s'] + _HOST_SLACK_S:g} s")
            raise ServerGone(self.gone) from None
        if "error" in out:  # this call only: the server goes on
            return SandboxResult(returncode=None, stdout="", stderr="", timed_out=False,
                                 killed_reason=f"sandbox failed: {out['error']}", wall_s=0.0, isolated=True)
        timed_out, stderr = out["timed_out"], out["stderr"]
        reason = sandbox._reason(out["rc"], stderr, timed_out, out["overflow"], limits["timeout_s"])
        if out["rc"] == SETUP_FAILED and out["setup_error"]:  # its own pipe: the code cannot fake it
            reason = f"sandbox setup failed: {out['setup_error']}"
        return SandboxResult(returncode=None if timed_out else out["rc"], stdout=out["stdout"], stderr=stderr,
                             timed_out=timed_out, killed_reason=reason, wall_s=out["wall_s"], isolated=True,
                             side=out["side"].encode("latin-1"))

    def _read(self) -> None:
        """Reassemble each call's chunks (they interleave between calls) and answer its future."""
        fd, parts = self.proc.stdout.fileno(), {}
        try:
            while True:
                call_id, n, last = CHUNK.unpack(read_exact(fd, CHUNK.size))
                parts.setdefault(call_id, bytearray()).extend(read_exact(fd, n))
                if last:
                    with self.pending_lock:
                        done = self.pending.pop(call_id, None)
                    if done is not None:
                        done.set_result(json.loads(parts.pop(call_id)))
        except (EOFError, OSError, ValueError) as e:
            self.close(f"the warm sandbox's server exited ({type(e).__name__})")
        finally:
            self.proc.stdout.close()  # here only: closed elsewhere, its fd could be reused and read here

    def close(self, why: str = "closed") -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # bubblewrap: its sandbox, the server and every call in it go too
        with self.pending_lock:
            if not self.gone:
                self.gone = why
            pending, self.pending = self.pending, {}
        with self.lock:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        for done in pending.values():
            if not done.done():
                done.set_exception(ServerGone(self.gone))
        self.proc.wait()


_STATE: dict = {"server": None, "usable": None, "why": None}
_LOCK = threading.Lock()
_LAUNCHES: queue.Queue = queue.Queue()
_LOCK_LAUNCHER = threading.Lock()
_LAUNCHER: dict = {"thread": None}


def _launcher() -> None:
    while True:
        done = _LAUNCHES.get()
        try:
            done.set_result(WarmSandbox())
        except BaseException as e:  # noqa: BLE001 - the caller gets it
            done.set_exception(e)


def _start() -> WarmSandbox:
    """A server started from a thread that lives as long as this process: bubblewrap's
    --die-with-parent follows the thread that started it, and a pool's short-lived thread
    would take the server down with it."""
    with _LOCK_LAUNCHER:
        if _LAUNCHER["thread"] is None:
            _LAUNCHER["thread"] = threading.Thread(target=_launcher, daemon=True, name="warm-sandbox-launcher")
            _LAUNCHER["thread"].start()
    done: Future = Future()
    _LAUNCHES.put(done)
    return done.result()


def _server() -> WarmSandbox | None:
    """This process's server, started (and self-tested) on first use and again after it exits;
    None where the warm sandbox cannot work here."""
    with _LOCK:
        if _STATE["usable"] is False:
            return None
        server = _STATE["server"]
        if server is not None and not server.gone:
            return server
        server = None
        try:
            server = _start()
            # stdin too: a kernel or seccomp profile without splice into a memory file fails here,
            # not in every call
            probe = server.run("import sys\nprint(6 * int(sys.stdin.read()))", _limits(5.0, 64, 1024, 8, 1), b"7")
            if probe.stdout != "42\n" or probe.returncode != 0:
                raise ServerGone(f"its self-test printed {probe.stdout!r}, rc {probe.returncode}: "
                                 f"{(probe.killed_reason or probe.stderr)[-300:]}")
        except (ServerGone, OSError) as e:
            if server is not None:
                server.close()
            if _STATE["usable"] is None:  # never worked here: stay with the fresh sandbox
                _STATE.update(usable=False, why=str(e))
                log.warning("sandbox: the warm sandbox does not work here (%s); every call starts a "
                            "fresh sandbox instead (isolated the same, slower)", e)
                return None
            raise
        _STATE.update(server=server, usable=True)
        return server


def shutdown() -> None:
    """Stop this process's server, if any (the next call starts another). It stops by itself
    when this process exits."""
    with _LOCK:
        server, _STATE["server"] = _STATE["server"], None
    if server is not None:
        server.close("shut down")


def _limits(timeout_s: float, memory_mb: int, max_output_bytes: int, nproc: int, tmp_mb: int,
            side_channel: bool = False) -> dict:
    return dict(timeout_s=timeout_s, memory_mb=memory_mb, max_output_bytes=max_output_bytes,
                nproc=nproc, tmp_mb=tmp_mb, side_channel=side_channel)


def run_python(source: str, *, timeout_s: float = 2.0, memory_mb: int = 512,
               max_output_bytes: int = 65536, stdin: bytes = b"", side_channel: bool = False,
               nproc: int = 64, tmp_mb: int = 64) -> SandboxResult:
    """Run `source` as a Python program in a fork of the warm sandbox (a fresh sandbox where the
    warm one cannot work, or has no bubblewrap to start in). The arguments and the result are
    sandbox.run_python's."""
    if len(source.encode()) > sandbox.MAX_SOURCE_BYTES:
        raise ValueError(f"source is over {sandbox.MAX_SOURCE_BYTES} bytes")
    try:
        server = _server() if sandbox.bwrap_works() else None
        if server is not None:
            return server.run(source, _limits(timeout_s, memory_mb, max_output_bytes, nproc, tmp_mb, side_channel),
                              stdin)
    except (ServerGone, OSError) as e:  # this call goes to a fresh sandbox; the next one, a fresh server
        log.warning("sandbox: %s; the call runs in a fresh sandbox", e)
    return sandbox.run_python(source, timeout_s=timeout_s, memory_mb=memory_mb, max_output_bytes=max_output_bytes,
                              stdin=stdin, side_channel=side_channel, nproc=nproc, tmp_mb=tmp_mb)
