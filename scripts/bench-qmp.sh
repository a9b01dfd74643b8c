#!/usr/bin/env bash
# QMP monitor throughput: blockd-storage-daemon against qemu-storage-daemon in the same run.
# Sequential round trips (query-version, one at a time), a pipelined stream of 20,000 commands
# on one monitor, and query-qmp-schema. Uses the release binary (cargo build --release).
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
blockd="$target/release/blockd-storage-daemon"
[ -x "$blockd" ] || cargo build --release -p blockd-storage-daemon
qsd="$(command -v qemu-storage-daemon || true)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

cat > "$tmp/bench.py" <<'PY'
import socket, subprocess, sys, threading, time, os

def run(binary, tag, tmp):
    sock = os.path.join(tmp, tag + ".sock")
    pid = os.path.join(tmp, tag + ".pid")
    p = subprocess.Popen([binary, "--chardev", f"socket,id=c,path={sock},server=on,wait=off",
                          "--monitor", "chardev=c", "--pidfile", pid])
    while not os.path.exists(pid):
        time.sleep(0.01)
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock)
    f = s.makefile("rb")
    f.readline()
    s.sendall(b'{"execute":"qmp_capabilities"}\n')
    f.readline()
    n = 5000
    t = time.perf_counter()
    for i in range(n):
        s.sendall(b'{"execute":"query-version","id":%d}\n' % i)
        f.readline()
    rtt = (time.perf_counter() - t) / n * 1e6
    m = 20000
    data = b"".join(b'{"execute":"query-version","id":%d}\n' % i for i in range(m))
    t = time.perf_counter()
    th = threading.Thread(target=s.sendall, args=(data,))
    th.start()
    for _ in range(m):
        f.readline()
    th.join()
    pipelined = m / (time.perf_counter() - t)
    t = time.perf_counter()
    for i in range(20):
        s.sendall(b'{"execute":"query-qmp-schema"}\n')
        f.readline()
    schema_ms = (time.perf_counter() - t) / 20 * 1e3
    s.sendall(b'{"execute":"quit"}\n')
    f.readline()
    p.wait()
    print(f"{tag:8} round trip {rtt:7.1f} us   pipelined {pipelined:9.0f} cmd/s   "
          f"query-qmp-schema {schema_ms:6.2f} ms")

run(sys.argv[1], "blockd", sys.argv[3])
if sys.argv[2]:
    run(sys.argv[2], "qsd", sys.argv[3])
PY
python3 "$tmp/bench.py" "$blockd" "$qsd" "$tmp"
