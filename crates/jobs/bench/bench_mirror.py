"""Mirror benchmark: seconds from blockdev-mirror (sync=full) to BLOCK_JOB_READY for a data-filled
raw image, idle and with an NBD client writing to the source meanwhile, for
blockd-storage-daemon and qemu-storage-daemon in the same run on the same files.

    python3 crates/jobs/bench/bench_mirror.py BLOCKD_DAEMON [SIZE_MIB] [ROUNDS]

Needs qemu-img, qemu-io, qemu-storage-daemon and Python's qemu.qmp.
"""

import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "../../daemon/tests/py"))
os.environ.setdefault("BLOCKD_DAEMON", sys.argv[1] if len(sys.argv) > 1 else "blockd-storage-daemon")
from common import Daemon  # noqa: E402

SIZE = int(sys.argv[2]) if len(sys.argv) > 2 else 1024
ROUNDS = int(sys.argv[3]) if len(sys.argv) > 3 else 3
# e.g. BENCH_BUF_SIZE=67108864 to compare buf-size settings (both daemons get it)
EXTRA = {"buf-size": int(os.environ["BENCH_BUF_SIZE"])} if "BENCH_BUF_SIZE" in os.environ else {}


def sh(*a):
    subprocess.run(a, check=True, stdout=subprocess.DEVNULL)


async def one(binary, src, tgt, writer):
    d = Daemon(binary)
    c = await d.client()
    try:
        for name, f in (("src", src), ("tgt", tgt)):
            await c.execute("blockdev-add", {"driver": "file", "node-name": name,
                                             "filename": f})
        sock = os.path.join(d.dir, "nbd.sock")
        w = None
        if writer:
            await c.execute("nbd-server-start", {"addr": {"type": "unix",
                                                          "data": {"path": sock}}})
            await c.execute("block-export-add", {"type": "nbd", "id": "e",
                                                 "node-name": "src", "writable": True})
        t0 = time.monotonic()
        await c.execute("blockdev-mirror", {"job-id": "m", "device": "src", "target": "tgt",
                                            "sync": "full", **EXTRA})
        if writer:
            cmds = []
            for i in range(64):
                cmds += ["-c", f"write -P {i % 250 + 1} {(i * 16) % SIZE}M 1M"]
            w = await asyncio.create_subprocess_exec(
                "qemu-io", "-f", "raw", *cmds, f"nbd+unix:///src?socket={sock}",
                stdout=subprocess.DEVNULL)
        while True:
            ev = await asyncio.wait_for(c.events.get(), 600)
            if ev["event"] == "BLOCK_JOB_READY":
                break
        t = time.monotonic() - t0
        if w:
            await w.wait()
        await c.execute("job-cancel", {"id": "m"})
        while True:
            ev = await asyncio.wait_for(c.events.get(), 60)
            if ev["event"] == "JOB_STATUS_CHANGE" and ev["data"]["status"] == "null":
                break
        return t
    finally:
        await c.disconnect()
        d.stop()


async def main():
    blockd = os.environ["BLOCKD_DAEMON"]
    qsd = shutil.which("qemu-storage-daemon")
    d = tempfile.mkdtemp(prefix="bench-mirror-", dir="/var/tmp")
    src, tgt = os.path.join(d, "src.raw"), os.path.join(d, "tgt.raw")
    sh("qemu-img", "create", "-q", "-f", "raw", src, f"{SIZE}M")
    sh("qemu-io", "-f", "raw", "-c", f"write -P 0x5a 0 {SIZE}M", src)
    try:
        for writer in (False, True):
            # rounds interleaved (blockd, qemu, blockd, ...) so that load from elsewhere on
            # the machine hits both alike; best and median of each
            ts = {"blockd": [], "qemu": []}
            for _ in range(ROUNDS):
                for name, b in (("blockd", blockd), ("qemu", qsd)):
                    sh("qemu-img", "create", "-q", "-f", "raw", tgt, f"{SIZE}M")
                    ts[name].append(await one(b, src, tgt, writer))
            best = {k: min(v) for k, v in ts.items()}
            med = {k: statistics.median(v) for k, v in ts.items()}
            label = "with an NBD writer" if writer else "idle"
            print(f"mirror {SIZE} MiB to READY, {label}: best blockd {best['blockd']:.2f}s, "
                  f"qemu-storage-daemon {best['qemu']:.2f}s, ratio "
                  f"{best['qemu'] / best['blockd']:.2f}x; median blockd {med['blockd']:.2f}s, "
                  f"qemu-storage-daemon {med['qemu']:.2f}s, ratio "
                  f"{med['qemu'] / med['blockd']:.2f}x")
    finally:
        shutil.rmtree(d, ignore_errors=True)


asyncio.run(main())
