"""The warm sandbox's server: runs inside one bubblewrap sandbox and forks once per call.
Stdlib only, and imports nothing of grpo_ray: warm_sandbox.py starts it as
`python -I -S -c <this file's text>` as the sandbox's program.

Each call gets the isolation a one-shot sandbox gives it (verifiers/sandbox.py), made by the
kernel per call instead of by a fresh bubblewrap and interpreter:

    server (the sandbox's program, uid 65534, no capabilities)
      `- A, a fork: new user, mount, pid, net, ipc and uts namespaces; enforces the wall clock
         and the output cap, then reports
           `- B, pid 1 of A's pid namespace: its own /tmp, /dev/shm, /proc and /dev/pts, the
              user namespace limit set to 0, every capability dropped, no_new_privs, not
              dumpable; then the call's init. When B exits the kernel kills whatever the call
              left behind.
                `- C: a session and keyring of its own, rlimits; then runs the call's code.

What calls could share, and why they do not: memory (a fork is a copy, and the server never
holds a call's code, stdin or output: A takes them from the request pipe itself, and writes the
result straight to the response pipe), files (per-call tmpfs mounts over a read-only root),
processes (per-call pid namespaces; /proc shows only the call's own), the network and IPC
(per-call namespaces).

Protocol. Requests on fd 0: a header (id u64, then the lengths (u32) of the limits' JSON, the
code and its stdin), then those three, which A takes (the stdin without reading it: _spool);
the server waits for A's byte saying it has them before it reads the next header. Responses
on fd 1: chunks of at most PIPE_BUF bytes, so the writes of concurrent calls never interleave
within a chunk: (id u64, length u16, last u8) and a slice of the result's JSON.
"""
import atexit
import ctypes
import errno
import fcntl
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

HEADER = struct.Struct(">QIII")  # call id; lengths of the limits, the code, its stdin
CHUNK = struct.Struct(">QHB")
PIPE_BUF = 4096
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 2, 4, 8, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 1, 4, 24, 38
SYS_KEYCTL, KEYCTL_JOIN_SESSION_KEYRING = 250, 1  # x86-64
SETUP_FAILED = 125  # the exit code when a call's isolation could not be set up: the code never ran
SETUP_FD = 3  # B and C report a failed set-up here, a pipe the code never holds
SIDE_FD = 4  # the side channel's write end in C, when the call asks for one (its global SIDE_FD)
SIDE_CAP = 16_384

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


def read_exact(fd: int, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


def _drop_capabilities(last_cap: int) -> None:
    for cap in range(last_cap + 1):
        _ok(libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"drop capability {cap}")
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
    # bwrap's /dev/pts is one instance for the whole sandbox: calls could open each other's ptys
    _ok(mount(b"devpts", b"/dev/pts", b"devpts", MS_NOSUID | MS_NOEXEC, b"newinstance,ptmxmode=0666,mode=620"),
        "/dev/pts")
    _write_file("/proc/sys/user/max_user_namespaces", "0")  # what bwrap's --disable-userns does
    os.chdir("/tmp")


def _confine(limits: dict) -> None:
    """C (no capabilities: B dropped them), before the code: a session, keyring and limits of
    its own."""
    os.setsid()  # else kill(0, ...) would reach the server's process group, across namespaces
    _ok(libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0), "dumpable")  # as any program: B's 0 is B's own
    if libc.syscall(SYS_KEYCTL, KEYCTL_JOIN_SESSION_KEYRING, None) < 0:
        err = ctypes.get_errno()
        if err not in (errno.EPERM, errno.ENOSYS):  # those: keyctl is banned, for the code too
            raise OSError(err, f"a session keyring of its own: {os.strerror(err)}")
    cpu = math.ceil(limits["timeout_s"]) + 1  # the wall clock is the real limit; CPU a backstop
    for name, value in (("RLIMIT_AS", limits["memory_mb"] << 20), ("RLIMIT_CPU", cpu),
                        ("RLIMIT_FSIZE", 16 << 20), ("RLIMIT_NOFILE", 64), ("RLIMIT_CORE", 0),
                        ("RLIMIT_NPROC", limits["nproc"])):
        resource.setrlimit(getattr(resource, name), (value, value))
    signal.signal(signal.SIGINT, signal.default_int_handler)  # B ignores it; the code gets Python's


def _run_code(code: str, side: bool) -> int:
    """What `python -c` does with the code, in this already started interpreter; with a side
    channel, its fd is the global SIDE_FD (as in a fresh sandbox)."""
    main = types.ModuleType("__main__")
    main.SIDE_FD = SIDE_FD if side else -1  # as in a fresh sandbox
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
    try:  # what the interpreter does at exit: wait for the code's threads, run its atexit hooks
        if "threading" in sys.modules:
            sys.modules["threading"]._shutdown()
        atexit._run_exitfuncs()
    except BaseException:  # noqa: BLE001 - as at exit, a failing hook loses only itself
        pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001 - a closed or broken stream loses its output only
            pass
    return rc & 0xFF


def _fail_setup(fd: int, e: BaseException) -> None:
    try:
        os.write(fd, f"{type(e).__name__}: {e}".encode()[:2000])
    finally:
        os._exit(SETUP_FAILED)


def _child(limits: dict, code: str, fds: dict[int, int], last_cap: int) -> None:
    """B: sets up the call's mounts, drops every capability, then stands as the call's init (pid
    1, as bubblewrap's own init does for a fresh sandbox) while its child C runs the code.
    fds: C's fd number -> B's fd for it (stdin, stdout, stderr, the set-up pipe, the side
    channel when asked for). Never returns."""
    report = fds[SETUP_FD]
    try:
        _ok(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "die with A")  # A enforces the wall clock
        _ok(libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0), "not dumpable")  # the code cannot ptrace its init
        _own_mounts(limits)
        _drop_capabilities(last_cap)
        high = {to: fcntl.fcntl(fd, fcntl.F_DUPFD, 64) for to, fd in fds.items()}  # no target clobbers a source
        for to, fd in high.items():
            os.dup2(fd, to)
        report = SETUP_FD
        os.closerange(max(fds) + 1, 2**31 - 1)  # the server's request and response pipes included
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the code cannot interrupt its init
        code_pid = os.fork()
    except BaseException as e:  # noqa: BLE001
        _fail_setup(report, e)
    if code_pid == 0:
        try:
            _confine(limits)
        except BaseException as e:  # noqa: BLE001
            _fail_setup(SETUP_FD, e)
        os.close(SETUP_FD)
        os._exit(_run_code(code, SIDE_FD in fds))
    null = os.open("/dev/null", os.O_RDONLY)
    for fd in fds:  # the pipes close when C and what it started are gone, not with us; and the
        os.dup2(null, fd)  # code cannot reach the side channel or stdin through /proc/1/fd
    while True:  # reap what the code orphans too, until the code itself is done
        pid, status = os.wait()
        if pid == code_pid:
            rc = os.waitstatus_to_exitcode(status)
            os._exit(rc if rc >= 0 else 128 - rc)  # killed by a signal: 128 + its number, as bwrap says


class _Pipes:
    """A's ends of a call's output pipes (stdout, stderr, the side channel), each read up to its
    cap (stdout or stderr at the cap is an overflow)."""

    def __init__(self, reads: dict[str, int], cap: int):
        self.fds = {fd: name for name, fd in reads.items()}
        self.bufs = {name: bytearray() for name in reads}
        self.caps = {name: SIDE_CAP if name == "side" else cap for name in reads}
        self.overflow = False

    def reading(self) -> list[int]:
        return list(self.fds)

    def read(self, ready: list[int]) -> None:
        for fd in ready:
            chunk, name = os.read(fd, 65536), self.fds[fd]
            if not chunk:
                del self.fds[fd]
                continue
            buf, cap = self.bufs[name], self.caps[name]
            buf += chunk[: max(0, cap - len(buf))]
            self.overflow = self.overflow or (len(buf) >= cap and name != "side")


def _collect(pid: int, pipes: _Pipes, deadline: float) -> dict:
    """A: read B's outputs until B has exited and every output is closed (B's namespace is
    gone), the wall clock runs out, or the output passes its cap; then kill and reap B. Closed
    outputs alone do not end a call: the code may close them and go on."""
    pidfd = os.pidfd_open(pid)
    exited, timed_out = False, False
    while (pipes.fds or not exited) and not pipes.overflow:
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        ready, _, _ = select.select(pipes.reading() + ([] if exited else [pidfd]), [], [], left)
        exited = exited or pidfd in ready
        pipes.read([fd for fd in ready if fd != pidfd])
    if timed_out or pipes.overflow:
        os.kill(pid, signal.SIGKILL)  # pid 1 of the call's namespace: everything in it dies
        end = time.monotonic() + 0.2  # what is already in the pipes still counts, as in a fresh sandbox
        while pipes.fds and not pipes.overflow and (left := end - time.monotonic()) > 0:
            pipes.read(select.select(pipes.reading(), [], [], left)[0])
    os.close(pidfd)
    status = os.waitpid(pid, 0)[1]
    out = {name: bytes(buf) for name, buf in pipes.bufs.items()}
    return {"rc": os.waitstatus_to_exitcode(status), "timed_out": timed_out, "overflow": pipes.overflow,
            "stdout": out["stdout"].decode(errors="replace"), "stderr": out["stderr"].decode(errors="replace"),
            "side": out.get("side", b"").decode("latin-1")}  # bytes, through JSON


def _respond(resp: int, call_id: int, result: dict) -> None:
    payload = json.dumps(result).encode()
    step = PIPE_BUF - CHUNK.size
    for i in range(0, max(len(payload), 1), step):
        last = i + step >= len(payload)
        os.write(resp, CHUNK.pack(call_id, len(payload[i:i + step]), last) + payload[i:i + step])


def _splice_exact(src: int, dst: int, n: int) -> None:
    """Move n bytes from the pipe src to dst in the kernel, never through our memory."""
    while n:
        moved = os.splice(src, dst, n)
        if not moved:
            raise EOFError
        n -= moved


def _spool(req: int, n: int) -> int:
    """The call's stdin, moved from the request pipe into a memory file by the kernel (splice):
    never in our memory, so in none of the processes forked from us either (a code check's
    worker must not find its nonce there). The code reads it as its fd 0, sealed: it cannot
    write to it, as it cannot to a pipe's read end."""
    fd = os.memfd_create("stdin", os.MFD_ALLOW_SEALING)
    _splice_exact(req, fd, n)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _call(req: int, resp: int, consumed: int, call_id: int, sizes: tuple[int, int, int], last_cap: int) -> None:
    """A: never returns."""
    status = 0
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the server's SIG_IGN would reap B for us
        start = time.monotonic()
        uid, gid = os.geteuid(), os.getegid()
        _ok(libc.unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC
                         | CLONE_NEWUTS), "unshare")
        # writing one's own id maps needs a dumpable process; before the request is read, so
        # that nothing of it is in our memory while another process could read it
        _ok(libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0), "dumpable")
        _write_file("/proc/self/setgroups", "deny")
        _write_file("/proc/self/uid_map", f"{uid} {uid} 1")
        _write_file("/proc/self/gid_map", f"{gid} {gid} 1")
        _ok(libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0), "not dumpable")
        limits = json.loads(read_exact(req, sizes[0]))
        code = read_exact(req, sizes[1]).decode(errors="replace")
        stdin = _spool(req, sizes[2])
        os.write(consumed, b"1")
        os.close(consumed)
        os.close(req)
        names = ["stdout", "stderr", "setup"] + (["side"] if limits.get("side_channel") else [])
        pairs = {name: os.pipe() for name in names}  # (read end, write end)
        theirs = {"stdout": 1, "stderr": 2, "setup": SETUP_FD, "side": SIDE_FD}
        pid = os.fork()
        if pid == 0:
            for r, _ in pairs.values():
                os.close(r)
            _child(limits, code, {0: stdin, **{theirs[n]: w for n, (_, w) in pairs.items()}}, last_cap)
        os.close(stdin)
        for _, w in pairs.values():
            os.close(w)
        setup_r = pairs["setup"][0]
        reads = {n: r for n, (r, _) in pairs.items() if n != "setup"}
        result = _collect(pid, _Pipes(reads, limits["max_output_bytes"]), start + limits["timeout_s"])
        result["wall_s"] = time.monotonic() - start
        os.set_blocking(setup_r, False)  # B is gone: what its set-up said is all there
        try:
            result["setup_error"] = os.read(setup_r, 4096).decode(errors="replace")
        except BlockingIOError:
            result["setup_error"] = ""
    except BaseException as e:  # noqa: BLE001 - reported to the host as this call's failure
        result, status = {"error": f"{type(e).__name__}: {e}"}, 1
    try:
        _respond(resp, call_id, result)
    finally:
        os._exit(status)


def _refuse(resp: int, req: int, call_id: int, n: int, e: OSError) -> None:
    """A call the server could not start (fork or pipe failed: EAGAIN, EMFILE): answered with
    the reason, its body passed to /dev/null without entering our memory."""
    null = os.open("/dev/null", os.O_WRONLY)
    try:
        _splice_exact(req, null, n)
    finally:
        os.close(null)
    _respond(resp, call_id, {"error": f"the call could not start: {type(e).__name__}: {e}"})


def main() -> None:
    # not dumpable: another process of our uid on the host could otherwise open our response pipe
    # through /proc/<pid>/fd and write answers; A and B inherit it
    _ok(libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0), "not dumpable")
    req, resp = os.dup(0), os.dup(1)
    null = os.open("/dev/null", os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)  # nothing of ours may reach the response pipe but whole chunks
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # finished calls are reaped by the kernel
    libc.syscall(SYS_KEYCTL, KEYCTL_JOIN_SESSION_KEYRING, None)  # not the host's, should a call's own fail
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last_cap = int(f.read())
    # a process's first compile() sets up the parser (~1 ms): once here, not once per call
    compile("import sys\nprint(f'{sys.argv!r}', [x for x in range(3)], file=sys.stderr)\n", "<warm-up>", "exec")
    while True:
        try:
            call_id, *sizes = HEADER.unpack(read_exact(req, HEADER.size))
        except EOFError:
            return  # the host closed the pipe: it is gone or done with us
        try:
            got, consumed = os.pipe()
            try:
                a = os.fork()
            except OSError:
                os.close(got)
                os.close(consumed)
                raise
        except OSError as e:
            _refuse(resp, req, call_id, sum(sizes), e)
            continue
        if a == 0:
            os.close(got)
            _call(req, resp, consumed, call_id, tuple(sizes), last_cap)
        os.close(consumed)
        took = os.read(got, 1)  # b"" when A died before reading the request's body
        os.close(got)
        if not took:
            return  # the stream is out of step: exit, and the host starts a fresh server


if __name__ == "__main__":
    main()
