"""Shared helpers of the blockd-storage-daemon interop tests.

A test script starts the daemon under test (env BLOCKD_DAEMON) and, where it compares
behaviour, qemu-storage-daemon too (env QSD, skipped when unset), each with a QMP socket and a
pid file in a private directory, and drives them with qemu.qmp's QMPClient or a raw socket.
"""

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from qemu.qmp import QMPClient, ExecuteError  # noqa: F401 (re-exported)

DAEMON = os.environ["BLOCKD_DAEMON"]
QSD = os.environ.get("QSD") or None

FAILURES = []


def check(cond, what):
    if not cond:
        FAILURES.append(what)
        print("FAIL:", what, file=sys.stderr)


def check_eq(got, want, what):
    if got != want:
        check(False, f"{what}: got {repr(got)[:300]}, want {repr(want)[:300]}")


def finish():
    if FAILURES:
        print(f"{len(FAILURES)} check(s) failed", file=sys.stderr)
        sys.exit(1)
    print("ok")


class Daemon:
    """A storage daemon with one QMP monitor socket (path `sock`)."""

    def __init__(self, binary=None, args=(), monitors=1, pretty=False, wait=True):
        self.binary = binary or DAEMON
        self.dir = tempfile.mkdtemp(prefix="blockd-qmp-")
        self.pidfile = os.path.join(self.dir, "pid")
        self.socks = [os.path.join(self.dir, f"qmp{i}.sock") for i in range(monitors)]
        self.sock = self.socks[0]
        cmd = [self.binary]
        for i, s in enumerate(self.socks):
            cmd += ["--chardev", f"socket,id=mon{i},path={s},server=on,wait=off",
                    "--monitor", f"chardev=mon{i}" + (",pretty=on" if pretty else "")]
        cmd += list(args)
        cmd += ["--pidfile", self.pidfile]
        # Output goes to a file: a pipe nobody reads fills up after 64 KiB and then blocks the
        # daemon in write(2), which looks exactly like a hang of the daemon.
        self.log = os.path.join(self.dir, "daemon.log")
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        if wait:
            self.wait_ready()

    def path(self, name):
        return os.path.join(self.dir, name)

    def output(self):
        """What the daemon printed so far (stdout and stderr)."""
        try:
            with open(self.log, "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def wait_ready(self, timeout=10):
        end = time.time() + timeout
        while not os.path.exists(self.pidfile):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.binary} exited: {self.output()}")
            if time.time() > end:
                raise RuntimeError(f"{self.binary} did not start")
            time.sleep(0.02)

    def stop(self, sig=signal.SIGTERM, timeout=20):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            check(False, f"{self.binary} did not exit on signal {sig}")
        out = self.output()
        if out and os.environ.get("BLOCKD_TEST_VERBOSE"):
            print(f"--- {self.binary} printed:\n{out}", file=sys.stderr)
        shutil.rmtree(self.dir, ignore_errors=True)
        return self.proc.returncode

    async def client(self, name="test", sock=None):
        c = QMPClient(name)
        await c.connect(sock or self.sock)
        return c


class Raw:
    """A line-oriented raw QMP client (the way libvirt talks)."""

    def __init__(self, path, timeout=10):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.connect(path)
        self.s.settimeout(timeout)
        self.buf = b""

    def send(self, data):
        self.s.sendall(data)

    def recv_msg(self):
        """One CRLF-terminated message, parsed."""
        while b"\r\n" not in self.buf:
            d = self.s.recv(1 << 20)
            if not d:
                raise EOFError("connection closed")
            self.buf += d
        line, self.buf = self.buf.split(b"\r\n", 1)
        check(line.isascii(), f"server output is ASCII: {line[:80]!r}")
        return json.loads(line)

    def cmd(self, execute, arguments=None, id=None):
        m = {"execute": execute}
        if arguments is not None:
            m["arguments"] = arguments
        if id is not None:
            m["id"] = id
        self.send(json.dumps(m).encode() + b"\r\n")
        return self.recv_msg()

    def negotiate(self):
        greeting = self.recv_msg()
        r = self.cmd("qmp_capabilities")
        check_eq(r, {"return": {}}, "qmp_capabilities")
        return greeting

    def close(self):
        self.s.close()


def run(coro):
    """Run a test script's main coroutine under an overall limit (BLOCKD_TEST_TIMEOUT seconds,
    default 120; long runs such as JOBS_FIRE_ROUNDS=200 need more). Hitting it is reported as
    such, so it is not mistaken for a hang of the daemon."""
    limit = float(os.environ.get("BLOCKD_TEST_TIMEOUT", "120"))
    try:
        asyncio.run(asyncio.wait_for(coro, limit))
    except asyncio.TimeoutError:
        print(f"the test script's overall limit of {limit:.0f} s was reached "
              "(BLOCKD_TEST_TIMEOUT raises it)", file=sys.stderr)
        raise
