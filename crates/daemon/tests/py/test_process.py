"""The process side: command-line errors with QEMU's wording and exit status, -h/-V, options
in dotted and JSON spelling, the pid file (written when ready, removed on exit), --daemonize
(the parent's exit status tells start-up's outcome), SIGINT/SIGTERM/SIGHUP shut down cleanly
with the images flushed."""

import json
import os
import signal
import socket
import subprocess
import tempfile
import time

from common import DAEMON, QSD, Daemon, Raw, check, check_eq, finish

tmp = tempfile.mkdtemp(prefix="blockd-proc-")


def run(args, binary=DAEMON):
    p = subprocess.run([binary] + args, capture_output=True, timeout=30)
    return p.returncode, p.stdout.decode(), p.stderr.decode()


# command-line errors: QEMU's text (program name aside) and status
for args in (["--foo"], ["-x"], ["extra"], ["--blockdev"], ["--blockdev", "driver=nope"],
             ["--object", "iothread,id=io0,bogus=1"], ["--object", "foo,id=x"],
             ["--blockdev", '{"driver":"null-co","node-name":"a"}',
              "--blockdev", "driver=null-co,node-name=a"],
             ["--chardev", f"socket,id=c,path={tmp}/x.sock,server=on,wait=off",
              "--monitor", "chardev=d"]):
    code, _, err = run(args)
    check_eq(code, 1, f"exit status for {args}")
    if QSD:
        _, _, qerr = run(args, QSD)
        # getopt's messages start with argv[0]
        check_eq(err.replace(DAEMON, "PROG"), qerr.replace(QSD, "PROG"),
                 f"error message for {args}")
    else:
        check(err.startswith("qemu-storage-daemon: "), f"error text for {args}: {err!r}")

code, out, _ = run(["-h"])
check(code == 0 and "--blockdev" in out and "--pidfile" in out, "-h")
code, out, _ = run(["-V"])
check(code == 0 and "version" in out, "-V")
code, _, err = run(["--blockdev", "driver=null-co,node-name=a", "--export",
                    "vhost-user-blk,id=e,node-name=a"])
check(code == 1 and "not supported yet" in err, f"other export types refused: {err!r}")
code, _, err = run(["--pidfile", "/nonexistent/dir/pid"])
check_eq((code, err.strip()),
         (1, "qemu-storage-daemon: cannot create PID file: Could not create "
             "'/nonexistent/dir/pid': No such file or directory"), "pid file error")

# both spellings; signals end the daemon cleanly and remove the pid file
img = os.path.join(tmp, "img")
with open(img, "wb") as f:
    f.truncate(1 << 20)
for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    d = Daemon(args=["--blockdev", json.dumps({"driver": "file", "node-name": "f",
                                               "filename": img}),
                     "--blockdev", "raw,node-name=r,file=f",
                     "--object", '{"qom-type":"iothread","id":"io0","poll-max-ns":0}'])
    with open(d.pidfile) as f:
        check_eq(int(f.read().strip()), d.proc.pid, "pid file content")
    r = Raw(d.sock)
    r.negotiate()
    nodes = sorted(n["node-name"] for n in r.cmd("query-named-block-nodes")["return"])
    check_eq(nodes, ["f", "r"], "nodes from JSON and dotted --blockdev")
    check_eq(r.cmd("query-iothreads")["return"][0]["poll-max-ns"], 0, "--object in JSON")
    out = r.cmd("human-monitor-command",
                {"command-line": f'qemu-io r "write -P {sig} 0 64k"'})["return"]
    check("wrote 65536/65536" in out, f"write before {sig}: {out!r}")
    pidfile = d.pidfile
    d.proc.send_signal(sig)
    check_eq(d.proc.wait(20), 0, f"exit status on signal {sig}")
    check(not os.path.exists(pidfile), f"pid file removed on signal {sig}")
    check(not os.path.exists(d.sock), f"socket removed on signal {sig}")
    with open(img, "rb") as f:
        check_eq(f.read(65536), bytes([sig]) * 65536, f"data on disk after signal {sig}")
    r.close()
    d.stop()

# --chardev fd=N (an inherited listening socket), a TCP chardev, and -T to a file
lsock = socket.socket(socket.AF_UNIX)
lsock.bind(os.path.join(tmp, "inherited.sock"))
lsock.listen()
tcp = socket.socket()
tcp.bind(("127.0.0.1", 0))
port = tcp.getsockname()[1]
tcp.close()
trace = os.path.join(tmp, "trace.log")
pid2 = os.path.join(tmp, "fd.pid")
p = subprocess.Popen([DAEMON, "--chardev", f"socket,id=c0,fd={lsock.fileno()}",
                      "--monitor", "c0",
                      "--chardev", f"socket,id=c1,host=127.0.0.1,port={port},server=on,wait=off",
                      "--monitor", '{"chardev":"c1","pretty":false}',
                      "-T", f"enable=blockd_qmp*,file={trace}", "--pidfile", pid2],
                     pass_fds=[lsock.fileno()], stderr=subprocess.PIPE)
for _ in range(200):
    if os.path.exists(pid2):
        break
    time.sleep(0.05)
r = Raw(os.path.join(tmp, "inherited.sock"))
r.negotiate()
check_eq(r.cmd("query-version", id="fd")["id"], "fd", "monitor on an inherited socket")
t = socket.create_connection(("127.0.0.1", port))
t.settimeout(10)
greeting = t.recv(65536)
check(greeting.startswith(b'{"QMP"'), f"TCP monitor greeting: {greeting[:40]!r}")
t.close()
check_eq(r.cmd("quit"), {"return": {}}, "quit")
check_eq(p.wait(20), 0, "exit status")
with open(trace) as f:
    log = f.read()
check("execute" in log and "query_version" not in log and "query-version" in log,
      f"-T traced the monitor's commands: {log[:200]!r}")
r.close()
lsock.close()

# wait=on (the default): start-up waits for the first client, which is then served
wsock = os.path.join(tmp, "wait.sock")
wpid = os.path.join(tmp, "wait.pid")
p = subprocess.Popen([DAEMON, "--chardev", f"socket,id=c,path={wsock},server=on",
                      "--monitor", "chardev=c", "--pidfile", wpid], stderr=subprocess.PIPE)
for _ in range(200):
    if os.path.exists(wsock):
        break
    time.sleep(0.05)
time.sleep(0.2)
check(not os.path.exists(wpid), "not ready before the first client connects")
r = Raw(wsock)
check("QMP" in r.recv_msg(), "the waited-for client gets the greeting")
check_eq(r.cmd("qmp_capabilities"), {"return": {}}, "and is served")
for _ in range(200):
    if os.path.exists(wpid):
        break
    time.sleep(0.05)
check(os.path.exists(wpid), "ready after the first client")
r.cmd("quit")
check_eq(p.wait(20), 0, "exit status")
check(b"waiting for connection" in p.stderr.read(), "the waiting message")
r.close()

# --daemonize: the parent exits 0 once ready (pid file there), 1 when start-up fails
pid = os.path.join(tmp, "d.pid")
sock = os.path.join(tmp, "d.sock")
p = subprocess.run([DAEMON, "--daemonize", "--pidfile", pid,
                    "--chardev", f"socket,id=c,path={sock},server=on,wait=off",
                    "--monitor", "chardev=c"], capture_output=True, timeout=30)
check_eq(p.returncode, 0, "daemonized parent's status")
check(os.path.exists(pid) and os.path.exists(sock), "ready when the parent exits")
with open(pid) as f:
    child = int(f.read())
r = Raw(sock)
r.negotiate()
check_eq(r.cmd("quit"), {"return": {}}, "quit the daemonized child")
r.close()
for _ in range(200):
    if not os.path.exists(pid):
        break
    time.sleep(0.05)
check(not os.path.exists(pid), "daemon removed its pid file on quit")
p = subprocess.run([DAEMON, "--daemonize", "--blockdev", "driver=nope"],
                   capture_output=True, timeout=30)
check_eq(p.returncode, 1, "daemonized start-up failure")
check("does not accept value 'nope'" in p.stderr.decode(), "the child's error is shown")
finish()
