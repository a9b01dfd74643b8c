"""NBD exports wired through blockd-nbd: --nbd-server and --export on the command line,
block-export-add with an iothread, qemu-io as the NBD client, BLOCK_EXPORT_DELETED on a
second monitor, nbd-server-stop; query-block-exports like qemu-storage-daemon's."""

import json
import os
import shutil
import subprocess

from common import QSD, Daemon, ExecuteError, check, check_eq, finish, run

QEMU_IO = shutil.which("qemu-io")


def qemu_io(sock, export, *cmds, ro=False):
    args = [QEMU_IO, "-f", "raw"] + (["-r"] if ro else []) + [
        f"nbd+unix:///{export}?socket={sock}"]
    for c in cmds:
        args += ["-c", c]
    p = subprocess.run(args, capture_output=True, timeout=60)
    return p.returncode, p.stdout.decode() + p.stderr.decode()


async def main():
    probe = Daemon(wait=False)
    probe.stop()
    os.makedirs(probe.dir, exist_ok=True)
    img = os.path.join(probe.dir, "img")
    with open(img, "wb") as f:
        f.truncate(16 << 20)
    nbd_sock = os.path.join(probe.dir, "nbd.sock")
    d = Daemon(args=["--blockdev", json.dumps({"driver": "file", "node-name": "f",
                                               "filename": img}),
                     "--blockdev", "raw,node-name=r,file=f",
                     "--object", "iothread,id=io0",
                     "--nbd-server", f"addr.type=unix,addr.path={nbd_sock}",
                     "--export", "nbd,id=e0,node-name=r,writable=on"])
    try:
        a = await d.client("a")
        b = await d.client("b")
        code, out = qemu_io(nbd_sock, "r", "write -P 0x33 0 1M", "read -P 0x33 0 1M")
        check(code == 0 and "read 1048576/1048576" in out, f"qemu-io over NBD: {out}")
        exports = await a.execute("query-block-exports")
        check_eq(exports, [{"type": "nbd", "id": "e0", "node-name": "r",
                            "shutting-down": False}], "query-block-exports")
        # a second, read-only export of the same node, served from an iothread
        await a.execute("block-export-add", {"type": "nbd", "id": "e1", "node-name": "r",
                                             "name": "ro", "iothread": "io0"})
        code, out = qemu_io(nbd_sock, "ro", "read -P 0x33 0 1M", ro=True)
        check(code == 0 and "read 1048576/1048576" in out, f"export from an iothread: {out}")
        code, out = qemu_io(nbd_sock, "ro", "write 0 512")
        check(code != 0 and "Permission denied" in out, f"read-only export refuses writes: {out}")
        try:
            await a.execute("block-export-add", {"type": "nbd", "id": "e2", "node-name": "zz"})
            check(False, "export of a missing node")
        except ExecuteError as e:
            check_eq(e.error_class, "GenericError", "missing node error class")
        await a.execute("block-export-del", {"id": "e1"})
        ev = await b.events.get()
        check_eq((ev["event"], ev["data"]), ("BLOCK_EXPORT_DELETED", {"id": "e1"}),
                 "export deletion announced to another monitor")
        await a.execute("block-export-del", {"id": "e0"})
        ev = await b.events.get()
        check_eq(ev["data"], {"id": "e0"}, "second deletion")
        check_eq(await a.execute("query-block-exports"), [], "no exports left")
        await a.execute("nbd-server-stop")
        await a.execute("blockdev-del", {"node-name": "r"})
        await a.disconnect()
        await b.disconnect()
        with open(img, "rb") as f:
            check_eq(f.read(1 << 20), b"\x33" * (1 << 20), "data written over NBD")
    finally:
        check_eq(d.stop(), 0, "clean exit")
    if QSD:
        # the same export query shape as qemu-storage-daemon
        q = Daemon(QSD, args=["--blockdev", "null-co,node-name=n",
                              "--nbd-server", f"addr.type=unix,addr.path={nbd_sock}",
                              "--export", "nbd,id=e0,node-name=n"])
        try:
            c = await q.client()
            check_eq(await c.execute("query-block-exports"),
                     [{"type": "nbd", "id": "e0", "node-name": "n", "shutting-down": False}],
                     "qemu-storage-daemon's query-block-exports")
            await c.disconnect()
        finally:
            q.stop()
    for exe in [None] + ([QSD] if QSD else []):
        await resize_under_export(exe, nbd_sock)
    shutil.rmtree(probe.dir, ignore_errors=True)


async def resize_under_export(exe, nbd_sock):
    """An NBD export (read-only or writable) keeps its node's size: block_resize is a
    permission conflict until the export is gone, with QEMU's text."""
    who = "qemu-storage-daemon" if exe else "blockd"
    img = nbd_sock + ".resize.img"
    with open(img, "wb") as f:
        f.truncate(1 << 20)
    args = ["--blockdev", f"file,node-name=n,filename={img}",
            "--nbd-server", f"addr.type=unix,addr.path={nbd_sock}"]
    d = Daemon(exe, args=args) if exe else Daemon(args=args)
    try:
        c = await d.client()
        for writable in (False, True):
            await c.execute("block-export-add", {"type": "nbd", "id": "e", "node-name": "n",
                                                 "writable": writable})
            try:
                await c.execute("block_resize", {"node-name": "n", "size": 2 << 20})
                check(False, f"{who}: block_resize under an export (writable={writable})")
            except ExecuteError as e:
                check_eq((e.error_class, str(e)),
                         ("GenericError",
                          "Permission conflict on node 'n': permissions 'resize' are both "
                          "required by an unnamed block device (uses node 'n' as 'root' child) "
                          "and unshared by an unnamed block device (uses node 'n' as 'root' "
                          "child)."), f"{who}: resize refused (writable={writable})")
            await c.execute("block-export-del", {"id": "e"})
            await c.events.get()
        await c.execute("block_resize", {"node-name": "n", "size": 2 << 20})
        nodes = await c.execute("query-named-block-nodes")
        check_eq(nodes[0]["image"]["virtual-size"], 2 << 20, f"{who}: resized after the export")
        await c.disconnect()
    finally:
        d.stop()
        os.unlink(img)


if QEMU_IO:
    run(main())
else:
    print("qemu-io missing: NBD export test skipped")
finish()
