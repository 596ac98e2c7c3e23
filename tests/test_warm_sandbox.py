"""The warm sandbox (verifiers/warm_sandbox.py): one bubblewrap sandbox whose server forks per call.
Each call must get what a fresh sandbox gives it (see test_verifier_code.py for those): these
tests hold the calls apart from each other and from the server, and check the answers match."""
from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from memscan import SCAN

from grpo_ray.verifiers import sandbox, warm_sandbox
from grpo_ray.verifiers.warm_sandbox import run_python

pytestmark = pytest.mark.skipif(not sandbox.bwrap_works(), reason="the warm sandbox starts in bubblewrap")


def _server():
    run_python("pass")
    server = warm_sandbox._STATE["server"]
    assert warm_sandbox._STATE["usable"] and server is not None and not server.gone, warm_sandbox._STATE
    return server


@pytest.mark.parametrize("code", [
    "print(347 * 86)",
    "import sys\nprint('to err', file=sys.stderr)\nprint(1 / 0)",
    "import sys\nsys.exit(3)",
    "import sys\nsys.exit('bye')",
    "x = (",
    "import random\nprint(random.random() < 2)",
    "print(__name__, __import__('sys').argv)",
    "import os, signal\nprint(os.getpid())\nos.kill(os.getpid(), signal.SIGTERM)",
    "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))",
    "import threading, time\nthreading.Thread(target=lambda: (time.sleep(0.2), print('late'))).start()",
    "import atexit\natexit.register(print, 'at exit')\nprint('main')",
    "import sys\nsys.stderr.write('sandbox setup failed: forged')\nsys.exit(125)",  # not a set-up failure
])
def test_a_warm_call_answers_what_a_fresh_sandbox_answers(code):
    warm, fresh = run_python(code), sandbox.run_python(code)
    last = [r.stderr.strip().splitlines()[-1:] for r in (warm, fresh)]  # tracebacks: the prelude's frame
    assert (warm.returncode, warm.stdout, last[0], warm.killed_reason, warm.isolated) == \
        (fresh.returncode, fresh.stdout, last[1], fresh.killed_reason, fresh.isolated)


def test_calls_share_no_files_processes_or_memory():
    first = run_python("# SECRET-7391 in the source\n"
                       "import subprocess\n"
                       "open('/tmp/left', 'w').write('x'); open('/dev/shm/left', 'w').write('x')\n"
                       "subprocess.Popen(['sleep', '77'])\n"
                       "print('SECRET-8214 in the output')")
    assert first.returncode == 0 and "SECRET-8214" in first.stdout, first
    # the next call looks for what the first left: files, processes, and both secrets anywhere in
    # its own memory (a fork of the server, which must never have held them)
    second = run_python(
        SCAN + "import os\n"
        "print(sorted(os.listdir('/tmp')), sorted(os.listdir('/dev/shm')))\n"
        "print([p for p in os.listdir('/proc') if p.isdigit()])\n"
        "# CANARY-5150: in this call's own memory, so the search must find it\n"
        "print(memory_has([rb'SECRE[T]-7391', rb'SECRE[T]-8214', rb'CANAR[Y]-5150']))\n",
        memory_mb=1024, timeout_s=10.0)
    assert second.returncode == 0, second
    assert second.stdout == "[] []\n['1', '2']\n[False, False, True]\n", second.stdout  # its init and itself
    time.sleep(0.2)
    leftover = subprocess.run(["pgrep", "-f", "sleep 77"], capture_output=True, text=True).stdout
    assert not leftover, "the first call's background process outlived it"


def test_a_call_that_closes_its_outputs_still_ends_at_its_wall_clock_and_others_go_on():
    other = ThreadPoolExecutor(1).submit(run_python, "import time\ntime.sleep(1)\nprint('other')", timeout_s=5.0)
    start = time.monotonic()
    r = run_python("import os, time\nos.close(1)\nos.close(2)\ntime.sleep(1000)", timeout_s=1.0)
    assert r.timed_out and r.killed_reason == "timeout after 1.0s" and time.monotonic() - start < 3.0, r
    assert other.result(timeout=10).stdout == "other\n"


def test_calls_do_not_share_terminals():
    holder = ThreadPoolExecutor(1).submit(run_python, "import os, time\nm, s = os.openpty()\n"
                                          "print(os.ttyname(s))\ntime.sleep(1.5)", timeout_s=5.0)
    time.sleep(0.5)
    r = run_python("import os\nprint(sorted(os.listdir('/dev/pts')))")
    assert r.stdout == "['ptmx']\n", r  # not the other call's pty
    assert holder.result(timeout=10).stdout == "/dev/pts/0\n"


def test_a_call_has_no_capabilities_namespaces_or_network():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    r = run_python(
        "import ctypes, os, socket\n"
        "status = dict(l.split(':', 1) for l in open('/proc/self/status'))\n"
        "print(status['CapEff'].strip(), status['CapPrm'].strip(), status['CapBnd'].strip(), status['NoNewPrivs'].strip())\n"
        "init = dict(l.split(':', 1) for l in open('/proc/1/status'))\n"
        "print(init['CapEff'].strip(), init['CapPrm'].strip())\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "print(libc.unshare(0x10000000), libc.unshare(0x00020000), libc.mount(b'none', b'/tmp', b'tmpfs', 0, None))\n"
        "print(os.getuid(), os.getpid(), os.getppid())\n"
        f"try:\n    socket.create_connection(('127.0.0.1', {port}), timeout=0.5); print('connected')\n"
        "except OSError as e:\n    print('no network', e.errno)\n")
    listener.close()
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and len(lines) == 5, r
    assert lines[0] == "0000000000000000 0000000000000000 0000000000000000 1"
    assert lines[1] == "0000000000000000 0000000000000000"  # its init holds none either
    assert lines[2] == "-1 -1 -1"  # no user namespace, no mount namespace, no mount
    uid, pid, ppid = lines[3].split()
    assert (pid, ppid) == ("2", "1") and (os.geteuid() != 0 or uid == str(sandbox.NOBODY))
    assert lines[4].startswith("no network")


@pytest.mark.parametrize("code, reason", [
    ("import os\nwhile True:\n    os.fork()", None),  # contained by NPROC: any error, in time
    ("while True:\n    pass", "timeout after 2.0s"),
    ("x = bytearray(10**10)", "memory limit"),
    ("while True:\n    print('x' * 10000)", "output limit"),
])
def test_hostile_calls_end_within_their_limit_and_the_server_goes_on(code, reason):
    server = _server()
    start = time.monotonic()
    r = run_python(code, timeout_s=2.0, memory_mb=256, max_output_bytes=4096)
    assert time.monotonic() - start < 6.0
    assert r.returncode != 0 and (reason is None or r.killed_reason == reason), r
    assert run_python("print(6 * 7)").stdout == "42\n" and warm_sandbox._STATE["server"] is server


def test_a_call_cannot_signal_the_server_or_other_calls():
    server = _server()
    other = ThreadPoolExecutor(1).submit(run_python, "import time\ntime.sleep(1.5)\nprint('other')", timeout_s=5.0)
    time.sleep(0.3)
    r = run_python("import os, signal\n"
                   "for pid in (os.getppid(), -1, 1):\n"
                   "    try:\n        os.kill(pid, signal.SIGKILL)\n"
                   "    except OSError as e:\n        print(pid, e.errno)\n"
                   "print('alive')")
    assert r.stdout.endswith("alive\n"), r  # its init ignores it; nothing else is in sight
    # its own process group is itself alone: as in a fresh sandbox, it dies, and nothing else
    r = run_python("import os\nos.kill(0, 9)\nprint('alive')")
    assert r.returncode == 128 + 9 and r.stdout == "", r
    assert other.result(timeout=10).stdout == "other\n"
    assert run_python("print(6 * 7)").stdout == "42\n" and warm_sandbox._STATE["server"] is server


def test_concurrent_calls_each_get_their_own_answer_whole():
    def call(i: int):
        return i, run_python(f"import sys\nsys.stdout.write(str({i}) * {1000 + 997 * i})", max_output_bytes=1 << 17)

    with ThreadPoolExecutor(8) as pool:
        for i, r in pool.map(call, range(40)):
            assert r.returncode == 0 and r.stdout == str(i) * (1000 + 997 * i), (i, len(r.stdout))


def test_a_dead_servers_calls_rerun_in_a_fresh_sandbox_and_the_next_call_starts_another(caplog):
    server = _server()
    slow = ThreadPoolExecutor(1).submit(run_python, "import os, time\ntime.sleep(1)\nprint(os.getpid())", timeout_s=5.0)
    time.sleep(0.5)
    server.proc.kill()
    r = slow.result(timeout=20)
    assert r.returncode == 0 and r.stdout == "2\n", r
    assert "the warm sandbox's server exited" in caplog.text and "runs in a fresh sandbox" in caplog.text
    assert run_python("print(1)").stdout == "1\n"
    assert warm_sandbox._STATE["server"] is not server and not warm_sandbox._STATE["server"].gone


def test_where_the_kernel_refuses_nested_namespaces_calls_go_to_a_fresh_sandbox(monkeypatch, caplog):
    """Stand-in for such a kernel: the server's bubblewrap forbids user namespaces in it."""
    real = sandbox._bwrap_prefix
    monkeypatch.setattr(sandbox, "_bwrap_prefix", lambda python, tmp_mb, disable_userns=None: real(python, tmp_mb, True))
    monkeypatch.setattr(warm_sandbox, "_STATE", {"server": None, "usable": None, "why": None})
    fresh_calls, fresh = [], sandbox.run_python
    monkeypatch.setattr(sandbox, "run_python", lambda source, **kw: fresh_calls.append(source) or fresh(source, **kw))
    r = run_python("print(6 * 7)")
    assert r.stdout == "42\n" and r.returncode == 0 and r.isolated and fresh_calls == ["print(6 * 7)"]
    assert warm_sandbox._STATE["usable"] is False and "unshare" in warm_sandbox._STATE["why"]
    assert "the warm sandbox does not work here" in caplog.text


def test_source_too_long_is_refused():
    with pytest.raises(ValueError, match="over"):
        run_python("#" * (sandbox.MAX_SOURCE_BYTES + 1))


def test_a_call_holds_only_its_own_fds_and_cannot_look_into_its_init():
    code = ("import os\n"
            "print(sorted(int(fd) for fd in os.listdir('/proc/self/fd')))\n"
            "for path in ('/proc/1/fd', '/proc/1/mem'):\n"
            "    try:\n        os.listdir(path) if path.endswith('fd') else open(path, 'rb')\n        print('opened', path)\n"
            "    except PermissionError:\n        print('denied', path)\n")
    plain, side = run_python(code), run_python(code, side_channel=True)
    # 0-2, and the fd of the listdir itself (3); with a side channel, also SIDE_FD (4)
    assert plain.stdout == "[0, 1, 2, 3]\ndenied /proc/1/fd\ndenied /proc/1/mem\n", plain
    assert side.stdout.splitlines()[0] == "[0, 1, 2, 3, 4]", side


def test_stdin_and_the_side_channel_carry_bytes_whole():
    data = bytes(range(256)) * 600  # 150 KiB: more than a pipe holds
    r = run_python("import hashlib, os, sys\nbody = sys.stdin.buffer.read()\n"
                   "os.write(SIDE_FD, bytes(range(256)))\nprint(len(body), hashlib.sha256(body).hexdigest())",
                   stdin=data, side_channel=True)
    assert r.returncode == 0 and r.side == bytes(range(256)), r
    assert r.stdout == f"{len(data)} {hashlib.sha256(data).hexdigest()}\n"
    big = run_python("import os\nfor _ in range(10):\n    os.write(SIDE_FD, b'v' * 4096)\nprint('done')",
                     side_channel=True)
    assert big.returncode == 0 and big.side == b"v" * 16384 and big.killed_reason is None, big  # capped, not an overflow


def test_stdin_the_code_never_reads_does_not_hold_up_the_wall_clock():
    start = time.monotonic()
    r = run_python("import time\ntime.sleep(100)", stdin=b"x" * (1 << 20), timeout_s=1.0)
    assert r.timed_out and time.monotonic() - start < 3.0, r


def test_a_calls_stdin_is_read_only():
    r = run_python("import os, sys\nprint(sys.stdin.read())\n"
                   "try:\n    os.write(0, b'x')\nexcept OSError as e:\n    print('refused', e.errno)\n",
                   stdin=b"the job")
    assert r.returncode == 0 and r.stdout.startswith("the job\nrefused "), r
