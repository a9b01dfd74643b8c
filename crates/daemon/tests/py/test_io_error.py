"""BLOCK_IO_ERROR from a real failure: a raw image on a 1 MiB tmpfs (mounted here, so root is
needed; skipped loudly otherwise) exported writable over NBD; qemu-io writes 2 MiB through the
export and the device fills up. The monitors get BLOCK_IO_ERROR with QEMU's members
(operation write, action report, nospace, strerror's reason), at most one per second per node
(QEMU's rate limit), and the daemon keeps serving. Also x-blockdev-set-iothread of an exported
node: QEMU's refusals."""

import asyncio
import os
import shutil
import subprocess
import time

from common import Daemon, ExecuteError, check, check_eq, finish, run

QEMU_IO = shutil.which("qemu-io")


def qemu_io(sock, export, *cmds):
    args = [QEMU_IO, "-f", "raw", f"nbd+unix:///{export}?socket={sock}"]
    for c in cmds:
        args += ["-c", c]
    p = subprocess.run(args, capture_output=True, timeout=60)
    return p.returncode, p.stdout.decode() + p.stderr.decode()


async def err(c, cmd, args):
    try:
        await c.execute(cmd, args)
        return None
    except ExecuteError as e:
        return (e.error_class, str(e))


async def set_iothread_refusals():
    d = Daemon(args=["--object", "iothread,id=io0"])
    try:
        c = await d.client()
        nbd = d.path("nbd.sock")
        await c.execute("blockdev-add", {"driver": "null-co", "node-name": "n0"})
        await c.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": nbd}}})
        await c.execute("block-export-add", {"type": "nbd", "id": "e0", "node-name": "n0"})
        check_eq(await err(c, "x-blockdev-set-iothread", {"node-name": "n0", "iothread": "io0"}),
                 ("GenericError", "Node n0 is associated with a BlockBackend and could be in "
                  "use (use force=true to override this check)"), "set-iothread without force")
        check_eq(await err(c, "x-blockdev-set-iothread",
                           {"node-name": "n0", "iothread": "io0", "force": True}),
                 ("GenericError", "Cannot change iothread of active block backend"),
                 "set-iothread of an exported node")
        await c.execute("block-export-del", {"id": "e0"})
        await c.events.get()  # BLOCK_EXPORT_DELETED
        check_eq(await err(c, "x-blockdev-set-iothread", {"node-name": "n0", "iothread": "io0"}),
                 None, "moves once the export is gone")
        await c.disconnect()
    finally:
        d.stop()


async def io_error():
    d = Daemon()
    mnt = d.path("small")
    os.makedirs(mnt)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", mnt],
                       capture_output=True)
    if r.returncode != 0:
        d.stop()
        # Not a missing outside tool but a missing privilege (CI may run unprivileged), so
        # this skips loudly even under BLOCKD_REQUIRE_INTEROP.
        print("SKIPPED BLOCK_IO_ERROR test: cannot mount a tmpfs here:", r.stderr.decode())
        return
    try:
        img = os.path.join(mnt, "img")
        with open(img, "wb") as f:
            f.truncate(4 << 20)
        nbd = d.path("nbd.sock")
        a = await d.client("a")
        b = await d.client("b")
        await a.execute("blockdev-add", {"driver": "raw", "node-name": "full",
                                         "file": {"driver": "file", "filename": img}})
        await a.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": nbd}}})
        await a.execute("block-export-add", {"type": "nbd", "id": "e0", "node-name": "full",
                                             "writable": True})
        t0 = time.time()
        code, out = qemu_io(nbd, "full", "write -P 0x11 0 2M", "write -P 0x11 2M 2M",
                            "read -P 0 3M 4096")
        check(code != 0 or "No space left on device" in out, f"the write fails: {out}")
        check("No space left on device" in out, f"the client sees ENOSPC: {out}")
        check("read 4096/4096" in out, f"reads still work: {out}")
        ev = await asyncio.wait_for(b.events.get(), 10)
        t_first = time.monotonic()
        check_eq(ev["event"], "BLOCK_IO_ERROR", "event name")
        check_eq(ev["data"], {"qom-path": "", "device": "", "node-name": "full",
                              "operation": "write", "action": "report", "nospace": True,
                              "reason": "No space left on device"}, "BLOCK_IO_ERROR data")
        ev_a = await asyncio.wait_for(a.events.get(), 10)
        check_eq(ev_a["event"], "BLOCK_IO_ERROR", "the other monitor gets it too")
        # two failed writes within the second: the second event comes at the end of the period
        # (it keeps the time it happened at as its timestamp, as in QEMU)
        ev2 = await asyncio.wait_for(b.events.get(), 10)
        gap = time.monotonic() - t_first
        check_eq(ev2["event"], "BLOCK_IO_ERROR", "second event")
        check(gap >= 0.8, f"rate limited: second event {gap:.3f}s after the first")
        check(b.events.empty(), "no further events")
        check(time.time() - t0 < 30, "events arrive promptly")
        # the daemon keeps serving
        check_eq((await a.execute("query-block-exports"))[0]["id"], "e0", "still serving")
        await a.execute("block-export-del", {"id": "e0", "mode": "hard"})
        await a.disconnect()
        await b.disconnect()
    finally:
        d.stop()
        subprocess.run(["umount", "-l", mnt], capture_output=True)


async def main():
    await set_iothread_refusals()
    await io_error()


if QEMU_IO:
    run(main())
else:
    print("qemu-io missing: BLOCK_IO_ERROR test skipped")
finish()
