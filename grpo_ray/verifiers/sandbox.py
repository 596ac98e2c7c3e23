"""Run untrusted Python in a throwaway sandbox: `run_python(source) -> SandboxResult`.

Layers, outermost first:
1. A separate process per run, in its own session (process group) so a wall-clock timeout can
   kill everything it started with one killpg.
2. bubblewrap, when it works here: fresh user/pid/net/ipc/uts/mount namespaces, no network, no
   capabilities, no nested user namespaces, a read-only view of /usr and the interpreter's prefix
   only (not the host's /, so /root, /work, /home and their data are simply absent), a private
   size-capped tmpfs /tmp, a private /proc. When the sandbox's init exits the kernel kills every
   process left in its pid namespace, so nothing outlives a run.
3. A non-root uid (65534, nobody) when we are root: RLIMIT_NPROC is ignored for root, and a fork
   bomb is only stopped by it. Under bubblewrap the count is per sandbox (per user namespace).
4. rlimits (AS, CPU, FSIZE, NOFILE, NPROC, CORE=0), set by a prelude inside the sandbox before the
   untrusted source runs. Not in preexec_fn: that is unsafe when the caller has threads (verifiers
   run in thread pools), and hard limits set by the prelude cannot be raised again.
5. A minimal environment (no inherited secrets) and stdout/stderr read incrementally with a cap:
   a run that writes more than `max_output_bytes` is killed ("output limit").

Without bubblewrap we fall back to layers 1, 3, 4 and 5 and log a loud one-time warning: that
mode is NOT isolated (the program can read what nobody may read, use the network, and a process
that leaves the session escapes the kill); results say `isolated=False`.
"""
from __future__ import annotations

import logging
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache

log = logging.getLogger(__name__)

NOBODY = 65534
MAX_SOURCE_BYTES = 100_000  # the source travels as one argv element (Linux caps those at 128 KiB)
_SIDE_CAP = 16_384
_ENV = {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8", "PYTHONHASHSEED": "0"}
BWRAP = shutil.which("bwrap")  # found on the PATH the verifier starts with

# Runs first inside the sandbox. argv: limits, side-channel fd, source. Hard limits equal soft
# ones, so the untrusted code cannot raise them back.
_PRELUDE = r"""
import resource, sys
_lim, _side, _src = sys.argv[1:4]
del sys.argv[1:]
for _item in _lim.split(","):
    _name, _v = _item.split("=")
    resource.setrlimit(getattr(resource, _name), (int(_v), int(_v)))
_g = {"__name__": "__main__", "__builtins__": __builtins__, "SIDE_FD": int(_side)}
del _lim, _side, _item, _name, _v, resource
exec(compile(_src, "<sandbox>", "exec"), _g)
"""


@dataclass
class SandboxResult:
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    killed_reason: str | None
    wall_s: float
    isolated: bool
    side: bytes = b""  # what the program wrote to SIDE_FD, when run with side_channel=True


def _reachable_by_nobody(path: str) -> bool:
    """Every directory on the way must be world-searchable and the file world-executable."""
    path = os.path.realpath(path)
    parts = path.split("/")
    for i in range(2, len(parts)):
        if not os.stat("/".join(parts[:i])).st_mode & 0o001:
            return False
    return bool(os.stat(path).st_mode & 0o001)


@lru_cache(maxsize=1)
def _interpreter() -> tuple[str, bool]:
    """(python to run, whether to drop to nobody). Ours first; when nobody cannot reach it
    (e.g. pyenv under a 0700 /root) the system python of the same minor version, then any."""
    drop = os.geteuid() == 0
    v = sys.version_info
    for cand in (sys.executable, f"/usr/bin/python{v.major}.{v.minor}", "/usr/bin/python3"):
        if cand and os.path.exists(cand) and (not drop or _reachable_by_nobody(cand)):
            return os.path.realpath(cand), drop
    log.warning("sandbox: no python reachable by uid %d; running checks as uid %d (NPROC ignored)",
                NOBODY, os.geteuid())
    return os.path.realpath(sys.executable), False


def _mounts(python: str, tmp_mb: int) -> list[str]:
    args = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):  # merged-/usr systems: keep the symlinks, not the whole root
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    prefix = os.path.dirname(os.path.dirname(python))  # .../bin/python3.x -> ...
    if not prefix.startswith("/usr/") and prefix != "/usr":
        args += ["--ro-bind", prefix, prefix]
    # Writable: only the sized tmpfs /tmp and /dev/shm. bwrap's root and its /dev are tmpfs
    # mounts of their own with no size limit (RLIMIT_FSIZE caps one file, not how many, and
    # RLIMIT_AS does not count tmpfs pages): left writable, a check could fill the host's RAM.
    args += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache",
             "--size", str(tmp_mb << 20), "--tmpfs", "/tmp",
             "--dev", "/dev", "--size", str(max(tmp_mb // 4, 1) << 20), "--tmpfs", "/dev/shm", "--remount-ro", "/dev",
             "--proc", "/proc", "--remount-ro", "/", "--chdir", "/tmp"]
    return args


def _bwrap_prefix(python: str, tmp_mb: int, disable_userns: bool | None = None) -> list[str]:
    if disable_userns is None:
        disable_userns = _probe()[1]
    return [BWRAP, "--unshare-all", "--unshare-user", *(["--disable-userns"] if disable_userns else []),
            "--die-with-parent", "--new-session", *_mounts(python, tmp_mb), "--"]


def _as_nobody(drop: bool) -> tuple[list[str], dict]:
    """(command prefix, Popen kwargs) that run the command as uid/gid 65534 with no groups.

    setpriv (util-linux) changes the ids after exec, so Popen can vfork: a plain fork() in a
    process that runs gRPC (any Ray worker, or a driver after ray.init) runs gRPC's fork
    handler, which starts a poller whose fds the child then closes, and the child aborts before
    exec (measured: 1 launch in ~250, and a correct solution scored 0). Popen(user=...) forces
    fork(), so it is only the fallback when setpriv is missing."""
    if not drop:
        return [], {}
    setpriv = shutil.which("setpriv")
    if setpriv:
        return [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--"], {}
    return [], {"user": NOBODY, "group": NOBODY, "extra_groups": []}


def bwrap_works() -> bool:
    """Probe once: bubblewrap installed, and user namespaces allowed for the uid we run as."""
    return _probe()[0]


@lru_cache(maxsize=1)
def _probe() -> tuple[bool, bool]:
    """(bubblewrap works, with --disable-userns). That flag (bubblewrap >= 0.8) stops the
    program making user namespaces of its own; Ubuntu 22.04, which Ray's images and the AWS
    Deep Learning AMI are built on, ships 0.6, where the sandbox still isolates without it."""
    if not BWRAP:
        return False, False
    python, drop = _interpreter()
    prefix, ids = _as_nobody(drop)
    errors = []
    for disable_userns in (True, False):
        try:
            r = subprocess.run([*prefix, *_bwrap_prefix(python, 1, disable_userns), python, "-I", "-S", "-c", "pass"],
                               env=_ENV, capture_output=True, timeout=10, check=False, **ids)
        except (OSError, subprocess.SubprocessError):
            return False, False
        if r.returncode == 0:
            if not disable_userns:
                log.warning("sandbox: bwrap has no --disable-userns (bubblewrap < 0.8: %s); checks are "
                            "isolated, but may create nested user namespaces", errors[0])
            return True, disable_userns
        errors.append(r.stderr.decode(errors="replace")[-300:].strip())
    log.warning("sandbox: bwrap probe failed: %s", errors[-1])
    return False, False


@lru_cache(maxsize=1)
def _warn_not_isolated() -> None:
    log.warning("sandbox: bubblewrap is NOT available; untrusted code runs with rlimits and "
                "uid %d only. This is NOT isolated: it can read world-readable files, use the "
                "network and escape the timeout kill by leaving its session.", NOBODY)


def _limits(timeout_s: float, memory_mb: int, nproc: int | None) -> str:
    cpu = math.ceil(timeout_s) + 1  # the wall clock is the real limit; CPU time is a backstop
    limits = [f"RLIMIT_AS={memory_mb << 20}", f"RLIMIT_CPU={cpu}", f"RLIMIT_FSIZE={16 << 20}",
              "RLIMIT_NOFILE=64", "RLIMIT_CORE=0"]
    return ",".join(limits + ([f"RLIMIT_NPROC={nproc}"] if nproc else []))


class _Pump:
    """Moves bytes between us and the child without ever blocking or buffering without bound."""

    def __init__(self, proc: subprocess.Popen, stdin: bytes, side_r: int | None, cap: int):
        self.sel = selectors.DefaultSelector()
        self.bufs: dict[str, bytearray] = {}
        self.caps = {"stdout": cap, "stderr": cap, "side": _SIDE_CAP}
        self.open_outputs = 0
        self.exited = False
        self.overflow = False
        for name, fd in (("stdout", proc.stdout.fileno()), ("stderr", proc.stderr.fileno()),
                         ("side", side_r)):
            if fd is not None:
                self._register(fd, selectors.EVENT_READ, name)
                self.bufs[name] = bytearray()
                self.open_outputs += 1
        self.stdin, self.pending = proc.stdin, memoryview(stdin)
        if stdin:
            self._register(proc.stdin.fileno(), selectors.EVENT_WRITE, "stdin")
        else:
            proc.stdin.close()
        try:  # a pidfd turns "the child exited" into one more readable fd for the selector
            self.pidfd = os.pidfd_open(proc.pid)
            self.sel.register(self.pidfd, selectors.EVENT_READ, "exit")
        except (AttributeError, OSError):
            self.pidfd = None
        self.proc = proc

    def _register(self, fd: int, events: int, name: str) -> None:
        os.set_blocking(fd, False)
        self.sel.register(fd, events, name)

    def run(self, until: float) -> None:
        while not (self.exited and self.open_outputs == 0) and not self.overflow:
            left = until - time.monotonic()
            if left <= 0:
                return
            for key, _ in self.sel.select(min(left, 0.05 if self.pidfd is None else left)):
                self._handle(key)
            if self.pidfd is None and not self.exited:
                self.exited = os.waitid(os.P_PID, self.proc.pid,
                                        os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None

    def _handle(self, key) -> None:
        name = key.data
        if name == "exit":
            self.exited = True
            self.sel.unregister(key.fd)
        elif name == "stdin":
            try:
                n = os.write(key.fd, self.pending[:65536])
                self.pending = self.pending[n:]
            except BrokenPipeError:
                self.pending = self.pending[:0]
            if not self.pending:
                self.sel.unregister(key.fd)
                self.stdin.close()
        else:
            chunk = os.read(key.fd, 65536)
            if not chunk:
                self.sel.unregister(key.fd)
                self.open_outputs -= 1
                return
            buf, cap = self.bufs[name], self.caps[name]
            buf += chunk[: max(0, cap - len(buf))]
            if len(chunk) and len(buf) >= cap and name != "side":
                self.overflow = True

    def close(self) -> None:
        self.sel.close()
        if self.pidfd is not None:
            os.close(self.pidfd)


def _private_dir(drop: bool) -> str:
    path = tempfile.mkdtemp(prefix="sandbox-")
    if drop:
        os.chown(path, NOBODY, NOBODY)
    return path


def _kill_group(proc: subprocess.Popen) -> None:
    """Called before the leader is reaped, so its pgid cannot have been reused by someone else."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _reason(rc: int | None, stderr: str, timed_out: bool, overflow: bool, timeout_s: float):
    if timed_out:
        return f"timeout after {timeout_s}s"
    if overflow:
        return "output limit"
    if rc in (-signal.SIGXCPU, 128 + signal.SIGXCPU):
        return "cpu limit"
    lines = stderr.strip().splitlines()
    if lines and lines[-1].startswith("MemoryError"):
        return "memory limit"
    return None


def run_python(source: str, *, timeout_s: float = 2.0, memory_mb: int = 512,
               max_output_bytes: int = 65536, stdin: bytes = b"", side_channel: bool = False,
               nproc: int = 64, tmp_mb: int = 64) -> SandboxResult:
    """Run `source` as a Python program in the sandbox and return what happened.

    side_channel=True opens a pipe only this run can write to: the program finds its fd in the
    global SIDE_FD, and what it writes (up to 16 KiB) comes back as `result.side`.
    """
    if len(source.encode()) > MAX_SOURCE_BYTES:
        raise ValueError(f"source is over {MAX_SOURCE_BYTES} bytes")
    python, drop = _interpreter()
    isolated = bwrap_works()
    if not isolated:
        _warn_not_isolated()
    if not isolated and not drop:
        nproc = None  # it would count all of our own uid's processes, not just this run's
    side_r, side_w = os.pipe() if side_channel else (None, -1)
    cmd = [python, "-I", "-S", "-c", _PRELUDE, _limits(timeout_s, memory_mb, nproc),
           str(side_w), source]
    if isolated:
        cmd = _bwrap_prefix(python, tmp_mb) + cmd
    prefix, ids = _as_nobody(drop)
    cmd = prefix + cmd
    workdir = None if isolated else _private_dir(drop)  # bwrap gives it a tmpfs /tmp instead
    env = _ENV if isolated else {**_ENV, "TMPDIR": workdir}
    start = time.monotonic()
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env, start_new_session=True,
                                cwd=workdir, pass_fds=(side_w,) if side_channel else (), **ids)
    except BaseException:
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        raise
    finally:
        if side_channel:
            os.close(side_w)  # the child holds the only write end now
    pump = _Pump(proc, stdin, side_r, max_output_bytes)
    try:
        pump.run(start + timeout_s)
        timed_out = not pump.exited and not pump.overflow
        _kill_group(proc)  # stragglers (fallback mode) and anything still running
        pump.run(time.monotonic() + 0.2)  # collect what is already in the pipes
        rc = proc.wait(timeout=5)
    finally:
        pump.close()
        for f in (proc.stdin, proc.stdout, proc.stderr):
            f.close()
        if side_r is not None:
            os.close(side_r)
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    out = bytes(pump.bufs["stdout"]).decode(errors="replace")
    err = bytes(pump.bufs["stderr"]).decode(errors="replace")
    return SandboxResult(
        returncode=None if timed_out else rc, stdout=out, stderr=err, timed_out=timed_out,
        killed_reason=_reason(rc, err, timed_out, pump.overflow, timeout_s),
        wall_s=time.monotonic() - start, isolated=isolated,
        side=bytes(pump.bufs.get("side", b"")))
