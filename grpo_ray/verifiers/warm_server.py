"""The warm sandbox's server: runs inside one bubblewrap sandbox and forks once per call.
Stdlib only, and imports nothing of grpo_ray: warm_sandbox.py starts it as
`python -I -S -c <this file's text>` as the sandbox's program.

Each call gets the isolation a one-shot sandbox gives it (verifiers/sandbox.py), made by the
kernel per call instead of by a fresh bubblewrap and interpreter:

    server (the sandbox's program, uid 65534, no capabilities)
      `- A, a fork: new user, mount, pid, net, ipc and uts namespaces; enforces the wall clock
         and the output cap, then reports
           `- B, pid 1 of A's pid namespace: its own /tmp, /dev/shm and /proc, the user
              namespace limit set to 0; then the call's init. When B exits the kernel kills
              whatever the call left behind.
                `- C: a session and keyring of its own, rlimits, every capability dropped,
                   no_new_privs; then runs the call's code.

What calls could share, and why they do not: memory (a fork is a copy, and the server never
holds a call's code or output: A reads the code from the request pipe itself, and writes the
result straight to the response pipe), files (per-call tmpfs mounts over a read-only root),
processes (per-call pid namespaces; /proc shows only the call's own), the network and IPC
(per-call namespaces).

Protocol. Requests on fd 0: a header (id u64, limits length u32, code length u32), then the
limits' JSON and the code, which A reads; the server waits for A's byte saying it has them
before it reads the next header. Responses on fd 1: chunks of at most PIPE_BUF bytes, so the
writes of concurrent calls never interleave within a chunk: (id u64, length u16, last u8) and
a slice of the result's JSON.
"""
import ctypes
import json
import math
import os
import resource
import select
import signal
import struct
import sys
import time
import traceback
import types

HEADER = struct.Struct(">QII")
CHUNK = struct.Struct(">QHB")
PIPE_BUF = 4096
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 2, 4, 8, 16384, 1 << 18
PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 24, 38
SYS_KEYCTL, KEYCTL_JOIN_SESSION_KEYRING = 250, 1  # x86-64
SETUP_FAILED = 125  # B's exit code when its isolation could not be set up: the code never ran

libc = ctypes.CDLL(None, use_errno=True)


def _ok(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _write_file(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _read_exact(fd: int, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


def _drop_capabilities() -> None:
    cap = 0
    while libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) == 0:
        cap += 1
    _ok(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()                  # effective, permitted, inheritable: all 0
    _ok(libc.capset(header, data), "capset")


def _own_mounts(limits: dict) -> None:
    """B, pid 1 of the call's namespaces: mounts of its own, and no user namespaces below."""
    mount = libc.mount
    _ok(mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make mounts private")
    tmp = limits["tmp_mb"]
    _ok(mount(b"tmpfs", b"/tmp", b"tmpfs", MS_NOSUID | MS_NODEV, f"size={tmp}m,mode=1777".encode()), "/tmp")
    _ok(mount(b"tmpfs", b"/dev/shm", b"tmpfs", MS_NOSUID | MS_NODEV,
              f"size={max(tmp // 4, 1)}m,mode=1777".encode()), "/dev/shm")
    _ok(mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None), "/proc")
    _write_file("/proc/sys/user/max_user_namespaces", "0")  # what bwrap's --disable-userns does
    os.chdir("/tmp")


def _confine(limits: dict) -> None:
    """C, before the code: nothing it could use to leave the call's namespaces or limits."""
    os.setsid()  # else kill(0, ...) would reach the server's process group, across namespaces
    libc.syscall(SYS_KEYCTL, KEYCTL_JOIN_SESSION_KEYRING, None)  # not the server's (refused where seccomp bans keyctl)
    cpu = math.ceil(limits["timeout_s"]) + 1  # the wall clock is the real limit; CPU a backstop
    for name, value in (("RLIMIT_AS", limits["memory_mb"] << 20), ("RLIMIT_CPU", cpu),
                        ("RLIMIT_FSIZE", 16 << 20), ("RLIMIT_NOFILE", 64), ("RLIMIT_CORE", 0),
                        ("RLIMIT_NPROC", limits["nproc"])):
        resource.setrlimit(getattr(resource, name), (value, value))
    _drop_capabilities()
    signal.signal(signal.SIGINT, signal.default_int_handler)  # B ignores it; the code gets Python's


def _run_code(code: str) -> int:
    """What `python -c` does with the code, in this already started interpreter."""
    main = types.ModuleType("__main__")
    sys.modules["__main__"] = main
    sys.argv[:] = ["-c"]
    try:
        exec(compile(code, "<string>", "exec"), main.__dict__)
        rc = 0
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    except BaseException as e:  # noqa: BLE001 - the code's own error, reported as python would
        traceback.print_exception(type(e), e, e.__traceback__.tb_next)  # not this function's frame
        rc = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001 - a closed or broken stream loses its output only
            pass
    return rc & 0xFF


def _child(limits: dict, code: str, out_w: int, err_w: int) -> None:
    """B: sets up the call's mounts, then stands as its init (pid 1, as bubblewrap's own init
    does for a fresh sandbox) while its child C runs the code. Never returns."""
    try:
        _own_mounts(limits)
        null = os.open("/dev/null", os.O_RDONLY)
        for fd, to in ((null, 0), (out_w, 1), (err_w, 2)):
            os.dup2(fd, to)
        os.closerange(3, 1 << 16)  # the server's request and response pipes included
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the code cannot interrupt its init
        code_pid = os.fork()
    except BaseException as e:  # noqa: BLE001
        for fd in (err_w, 2):  # err_w is closed once it is on fd 2
            try:
                os.write(fd, f"sandbox setup failed: {e}\n".encode())
                break
            except OSError:
                pass
        os._exit(SETUP_FAILED)
    if code_pid == 0:
        try:
            _confine(limits)
        except BaseException as e:  # noqa: BLE001
            os.write(2, f"sandbox setup failed: {e}\n".encode())
            os._exit(SETUP_FAILED)
        os._exit(_run_code(code))
    os.dup2(0, 1)  # the pipes close when C and what it started are gone, not with us
    os.dup2(0, 2)
    while True:  # reap what the code orphans too, until the code itself is done
        pid, status = os.wait()
        if pid == code_pid:
            rc = os.waitstatus_to_exitcode(status)
            os._exit(rc if rc >= 0 else 128 - rc)  # killed by a signal: 128 + its number, as bwrap says


def _collect(pid: int, out_r: int, err_r: int, limits: dict, deadline: float) -> dict:
    """A: read B's output until both pipes close (B's namespace is gone), the wall clock runs
    out, or the output passes its cap; then kill and reap B."""
    cap = limits["max_output_bytes"]
    bufs = {out_r: bytearray(), err_r: bytearray()}
    open_fds, timed_out, overflow = [out_r, err_r], False, False
    while open_fds:
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        ready, _, _ = select.select(open_fds, [], [], left)
        for fd in ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                open_fds.remove(fd)
                continue
            buf = bufs[fd]
            buf += chunk[: max(0, cap - len(buf))]
            overflow = overflow or len(buf) >= cap
        if overflow:
            break
    if open_fds:
        os.kill(pid, signal.SIGKILL)  # pid 1 of the call's namespace: everything in it dies
    status = os.waitpid(pid, 0)[1]
    return {"rc": os.waitstatus_to_exitcode(status), "timed_out": timed_out, "overflow": overflow,
            "stdout": bufs[out_r].decode(errors="replace"), "stderr": bufs[err_r].decode(errors="replace")}


def _respond(resp: int, call_id: int, result: dict) -> None:
    payload = json.dumps(result).encode()
    step = PIPE_BUF - CHUNK.size
    for i in range(0, max(len(payload), 1), step):
        last = i + step >= len(payload)
        os.write(resp, CHUNK.pack(call_id, len(payload[i:i + step]), last) + payload[i:i + step])


def _call(req: int, resp: int, consumed: int, call_id: int, sizes: tuple[int, int]) -> None:
    """A: never returns."""
    status = 0
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the server's SIG_IGN would reap B for us
        limits = json.loads(_read_exact(req, sizes[0]))
        code = _read_exact(req, sizes[1]).decode(errors="replace")
        os.write(consumed, b"1")
        os.close(consumed)
        os.close(req)
        start = time.monotonic()
        uid, gid = os.geteuid(), os.getegid()
        _ok(libc.unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC
                         | CLONE_NEWUTS), "unshare")
        _write_file("/proc/self/setgroups", "deny")
        _write_file("/proc/self/uid_map", f"{uid} {uid} 1")
        _write_file("/proc/self/gid_map", f"{gid} {gid} 1")
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(out_r)
            os.close(err_r)
            _child(limits, code, out_w, err_w)
        os.close(out_w)
        os.close(err_w)
        result = _collect(pid, out_r, err_r, limits, start + limits["timeout_s"])
        result["wall_s"] = time.monotonic() - start
    except BaseException as e:  # noqa: BLE001 - reported to the host as this call's failure
        result, status = {"error": f"{type(e).__name__}: {e}"}, 1
    try:
        _respond(resp, call_id, result)
    finally:
        os._exit(status)


def main() -> None:
    req, resp = os.dup(0), os.dup(1)
    null = os.open("/dev/null", os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)  # nothing of ours may reach the response pipe but whole chunks
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # finished calls are reaped by the kernel
    while True:
        try:
            call_id, n_limits, n_code = HEADER.unpack(_read_exact(req, HEADER.size))
        except EOFError:
            return  # the host closed the pipe: it is gone or done with us
        got, consumed = os.pipe()
        if os.fork() == 0:
            os.close(got)
            _call(req, resp, consumed, call_id, (n_limits, n_code))
        os.close(consumed)
        took = os.read(got, 1)  # b"" when A died before reading the request's body
        os.close(got)
        if not took:
            return  # the stream is out of step: exit, and the host starts a fresh server


if __name__ == "__main__":
    main()
