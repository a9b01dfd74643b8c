"""BLOCK_IMAGE_CORRUPTED from a qcow2 node: an image (made by qemu-img) whose first L2 entry
is rewritten to point at the active L1 table is exported writable over NBD; qemu-io writes to
guest offset 0 through the export. The overlap check refuses the write, the node marks the
image corrupt and every monitor gets BLOCK_IMAGE_CORRUPTED exactly once with QEMU's members
and message (`fatal: true`, the host range of the refused write); later writes fail without a
second event; the image on disk has the corrupt bit (qemu-img info says `corrupt: true`). With
QSD set, the same steps against qemu-storage-daemon give the same event data."""

import asyncio
import json
import os
import shutil
import struct
import subprocess

from common import QSD, Daemon, check, check_eq, finish, run

QEMU_IO = shutil.which("qemu-io")
QEMU_IMG = shutil.which("qemu-img")


def make_image(path):
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", path, "1M"], check=True)
    subprocess.run([QEMU_IO, "-c", "write -P 1 0 64k", path], check=True, capture_output=True)
    with open(path, "r+b") as f:
        f.seek(40)
        l1 = struct.unpack(">Q", f.read(8))[0]
        f.seek(l1)
        l2 = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
        # Guest cluster 0 now "lives" on the L1 table (COPIED: written in place).
        f.seek(l2)
        f.write(struct.pack(">Q", (1 << 63) | l1))
    return l1


def qemu_io(sock, *cmds):
    args = [QEMU_IO, "-f", "raw", f"nbd+unix:///q?socket={sock}"]
    for c in cmds:
        args += ["-c", c]
    p = subprocess.run(args, capture_output=True, timeout=60)
    return p.returncode, p.stdout.decode() + p.stderr.decode()


async def drain_events(c, wait=0.3):
    got = []
    while True:
        try:
            ev = await asyncio.wait_for(c.events.get(), wait)
        except asyncio.TimeoutError:
            return got
        got.append(ev)


async def scenario(binary):
    d = Daemon(binary=binary, monitors=2)
    try:
        img = d.path("img.qcow2")
        l1 = make_image(img)
        a = await d.client("a")
        b = await d.client("b", sock=d.socks[1])
        nbd = d.path("nbd.sock")
        await a.execute("blockdev-add", {"driver": "qcow2", "node-name": "q",
                                         "file": {"driver": "file", "filename": img}})
        await a.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": nbd}}})
        await a.execute("block-export-add", {"type": "nbd", "id": "e", "node-name": "q",
                                             "writable": True})
        rc, out = qemu_io(nbd, "write -P 2 0 4k")
        check(rc != 0 or "error" in out.lower(), f"{binary}: the write into metadata fails: {out}")
        evs = {}
        for name, c in (("a", a), ("b", b)):
            evs[name] = [e for e in await drain_events(c)
                         if e["event"] == "BLOCK_IMAGE_CORRUPTED"]
            check_eq(len(evs[name]), 1, f"{binary}: BLOCK_IMAGE_CORRUPTED on monitor {name}")
        data = evs["a"][0]["data"] if evs["a"] else None
        if data is not None:
            check_eq(data.get("fatal"), True, f"{binary}: fatal")
            check_eq(data.get("node-name"), "q", f"{binary}: node-name")
            check_eq(data.get("offset"), l1, f"{binary}: offset (the refused host write)")
        # Further writes are refused, without another event.
        rc, out = qemu_io(nbd, "write -P 3 128k 4k")
        check(rc != 0 or "error" in out.lower(), f"{binary}: a later write fails: {out}")
        more = [e for e in await drain_events(a) if e["event"] == "BLOCK_IMAGE_CORRUPTED"]
        check_eq(more, [], f"{binary}: no second event")
        await a.execute("block-export-del", {"id": "e"})
        await drain_events(a)
        await a.execute("blockdev-del", {"node-name": "q"})
        info = subprocess.run([QEMU_IMG, "info", "--output=json", "-U", img],
                              capture_output=True, text=True)
        spec = json.loads(info.stdout)["format-specific"]["data"]
        check_eq(spec.get("corrupt"), True, f"{binary}: corrupt bit on disk")
        await a.disconnect()
        await b.disconnect()
        return data
    finally:
        d.stop()


async def main():
    ours = await scenario(None)
    want = {"device": "", "node-name": "q",
            "msg": "Preventing invalid write on metadata (overlaps with active L1 table)",
            "offset": 0x30000, "size": 4096, "fatal": True}
    check_eq(ours, want, "blockd's BLOCK_IMAGE_CORRUPTED data")
    if QSD:
        theirs = await scenario(QSD)
        check_eq(ours, theirs, "BLOCK_IMAGE_CORRUPTED data vs qemu-storage-daemon")


run(main())
finish()
