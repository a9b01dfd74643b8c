"""I/O from iothreads through the monitor.

Seed scenario (in QEMU this crashed with a thread unlocking a lock it did not own): a node
whose I/O runs in an iothread gets `qemu-io NODE "write 0 64M"` through human-monitor-command
while other requests from that iothread, sent by another monitor, are in flight. Everything
succeeds and the data is there.

Then x-blockdev-set-iothread moves the node 200 times between two iothreads and the main
context while a second monitor keeps writing through qemu-io (each command runs in the
node's context of the moment): no error, and every write reads back."""

import asyncio
import os

from common import Daemon, check, check_eq, finish, run

MiB = 1 << 20


async def hmp(c, node, cmd):
    return await c.execute("human-monitor-command", {"command-line": f'qemu-io {node} "{cmd}"'})


async def main():
    d = Daemon(wait=False, args=[])
    d.stop()
    img_dir = d.dir
    os.makedirs(img_dir, exist_ok=True)
    img = os.path.join(img_dir, "disk.raw")
    with open(img, "wb") as f:
        f.truncate(128 * MiB)
    d = Daemon(args=["--blockdev", f"file,node-name=f,filename={img}",
                     "--blockdev", "raw,node-name=r,file=f",
                     "--object", "iothread,id=io0", "--object", "iothread,id=io1"])
    try:
        a = await d.client("a")
        b = await d.client("b")
        c = await d.client("c")
        await a.execute("x-blockdev-set-iothread", {"node-name": "r", "iothread": "io0"})

        # seed scenario
        async def others():
            outs = []
            for i in range(16):
                outs.append(await hmp(b, "r", f"write -P 0x22 {80 * MiB + i * MiB} {MiB}"))
            return outs

        async def readers():
            return [await hmp(c, "r", f"read {100 * MiB + i * MiB} {MiB}") for i in range(16)]

        big, small, reads = await asyncio.gather(hmp(a, "r", "write -P 0x11 0 64M"),
                                                 others(), readers())
        check("wrote 67108864/67108864 bytes at offset 0" in big, f"64M write: {big!r}")
        check(all("wrote 1048576/1048576" in o for o in small), f"concurrent writes: {small}")
        check(all("read 1048576/1048576" in o for o in reads), f"concurrent reads: {reads}")
        v = await hmp(a, "r", "read -P 0x11 0 64M")
        check("read 67108864/67108864" in v and "failed" not in v, f"64M data: {v!r}")
        v = await hmp(a, "r", f"read -P 0x22 {80 * MiB} {16 * MiB}")
        check("read 16777216/16777216" in v and "failed" not in v, f"other data: {v!r}")

        # 200 moves while writes run
        moving = True
        errors = []

        async def mover():
            nonlocal moving
            targets = ["io1", None, "io0"]
            try:
                for i in range(200):
                    await a.execute("x-blockdev-set-iothread",
                                    {"node-name": "r", "iothread": targets[i % 3],
                                     "force": True})
            except Exception as e:  # noqa: BLE001 (reported as a check)
                errors.append(repr(e))
            moving = False

        async def writer():
            n = 0
            while moving or n < 20:
                off = (n % 512) * 64 * 1024
                out = await hmp(b, "r", f"write -P {n % 251} {64 * MiB + off} 64k")
                if "wrote 65536/65536" not in out:
                    errors.append(out)
                n += 1
            return n

        _, writes = await asyncio.gather(mover(), writer())
        check_eq(errors, [], "no error while moving")
        check(writes >= 20, f"{writes} writes ran during the moves")
        last = {}
        for n in range(writes):
            last[(n % 512)] = n % 251
        bad = []
        for slot, pat in last.items():
            out = await hmp(c, "r", f"read -P {pat} {64 * MiB + slot * 64 * 1024} 64k")
            if "read 65536/65536" not in out or "failed" in out:
                bad.append((slot, out))
        check_eq(bad, [], "every write is there")
        print(f"{writes} writes during 200 moves")

        await a.execute("x-blockdev-set-iothread", {"node-name": "r", "iothread": None})
        await a.execute("object-del", {"id": "io0"})
        await a.execute("quit")
        for x in (a, b, c):
            await x.disconnect()
        check_eq(d.proc.wait(20), 0, "exit status")
        with open(img, "rb") as f:
            check(f.read(64 * MiB) == b"\x11" * (64 * MiB), "64M on disk")
    finally:
        d.stop()


run(main())
finish()
