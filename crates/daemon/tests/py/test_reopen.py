"""blockdev-reopen of nodes in use: the same sequence of reopens (read-only toggles under a
writable NBD export, raw windows, replacing a file child, several nodes at once, options that
cannot change) runs on blockd-storage-daemon and on qemu-storage-daemon, and each step must
give the same result (success or the same error) and leave the same ro flags and sizes.
Then, blockd only: the data path after a reopen (monitor qemu-io), the image lock bytes a
read-only toggle takes and drops (checked with F_OFD_GETLK from here), and the children opened
with a node reopened with it."""

import asyncio
import fcntl
import os
import shutil
import struct
import subprocess

from common import QSD, Daemon, ExecuteError, check, check_eq, finish, run


def sequence(a, b, nbd_sock):
    """(command, arguments) steps; a and b are 1 MiB image files."""
    raw = lambda **kw: {"driver": "raw", "node-name": "fmt", **kw}  # noqa: E731
    f2 = lambda **kw: {"driver": "file", "node-name": "f2", "filename": b, **kw}  # noqa: E731
    reopen = lambda *opts: ("blockdev-reopen", {"options": list(opts)})  # noqa: E731
    return [
        ("blockdev-add", {"driver": "file", "node-name": "f1", "filename": a}),
        ("blockdev-add", raw(file="f1")),
        ("blockdev-add", f2(**{"read-only": True})),
        ("blockdev-add", {"driver": "null-co", "node-name": "n0"}),
        ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": nbd_sock}}}),
        ("block-export-add", {"type": "nbd", "id": "e0", "node-name": "fmt", "writable": True}),
        reopen(raw(file="f1", **{"read-only": True})),
        reopen({"driver": "file", "node-name": "f1", "filename": a, "read-only": True}),
        reopen(raw(file="nope")),
        reopen(raw(file="fmt")),
        reopen(raw(file="f1", size=4096)),
        reopen(raw(file="f1", offset=4096)),
        reopen(raw(file="f1", offset=1 << 21)),
        reopen(raw(file="f1")),
        reopen(raw(file="f2")),
        # both at once: f2 becomes writable and fmt uses it
        reopen(f2(**{"read-only": False}), raw(file="f2")),
        reopen(f2(**{"read-only": True})),
        reopen(f2(aio="native")),
        reopen(f2(filename=a)),
        reopen(f2(locking="off")),
        reopen(f2(cache={"no-flush": True})),
        reopen(f2(cache={"direct": True})),
        reopen(f2(discard="unmap")),
        reopen(f2(**{"force-share": True, "read-only": True})),
        reopen({"driver": "null-co", "node-name": "n0", "size": 4096}),
        reopen({"driver": "null-co", "node-name": "n0", "read-zeroes": True}),
        reopen({"driver": "null-co", "node-name": "nX"}),
        reopen({"driver": "null-co"}),
        reopen({"driver": "null-aio", "node-name": "n0"}),
        reopen({"driver": "null-co", "node-name": "n0"}, {"driver": "null-co", "node-name": "n0"}),
        # all or nothing: n0 would become read-only, fmt cannot (the export writes)
        reopen({"driver": "null-co", "node-name": "n0", "read-only": True},
               raw(file="f2", **{"read-only": True})),
        reopen({"driver": "null-co", "node-name": "n0", "read-only": True}),
        ("block-export-del", {"id": "e0"}),
        # without the writer fmt and its file can go read-only together, and back
        reopen(raw(file="f2", **{"read-only": True}), f2(**{"read-only": True})),
        reopen(f2(**{"read-only": False})),
        reopen(f2(), raw(file="f2")),
        # the old file child is free again: a node can take it
        reopen(raw(file="f1")),
        ("blockdev-del", {"node-name": "f2"}),
    ]


async def play(d, steps):
    c = await d.client()
    out = []
    for cmd, args in steps:
        try:
            await c.execute(cmd, args)
            r = "ok"
        except ExecuteError as e:
            r = (e.error_class, str(e))
        nodes = await c.execute("query-named-block-nodes", {"flat": True})
        state = sorted((n["node-name"], n["ro"], n["image"]["virtual-size"],
                        n["cache"]["direct"]) for n in nodes
                       if not n["node-name"].startswith("#"))
        out.append((cmd, r, state))
    await c.disconnect()
    return out


def images(d):
    a, b = d.path("a.img"), d.path("b.img")
    for p in (a, b):
        with open(p, "wb") as f:
            f.truncate(1 << 20)
    return a, b


async def compare_with_qsd():
    blk = Daemon()
    try:
        a, b = images(blk)
        got = await play(blk, sequence(a, b, blk.path("nbd.sock")))
    finally:
        blk.stop()
    for (cmd, r, _), (want_cmd, want) in zip(got, EXPECTED):
        check_eq((cmd, r), (want_cmd, want), "blockd step")
    if not QSD:
        print("QSD unset: blockdev-reopen not compared with qemu-storage-daemon")
        return
    q = Daemon(binary=QSD)
    try:
        qa, qb = images(q)
        want = await play(q, sequence(qa, qb, q.path("nbd.sock")))
    finally:
        q.stop()
    for i, (g, w) in enumerate(zip(got, want)):
        gr = g[1] if g[1] == "ok" else (g[1][0], g[1][1].replace(blk.dir, "D"))
        wr = w[1] if w[1] == "ok" else (w[1][0], w[1][1].replace(q.dir, "D"))
        check_eq((i, g[0], gr), (i, w[0], wr), "result as qemu-storage-daemon's")
        check_eq((i, g[2]), (i, w[2]), "ro flags and sizes as qemu-storage-daemon's")


RO_WRITER = ("GenericError", "Read-only block node 'fmt' cannot support read-write users")
EXPECTED = [
    ("blockdev-add", "ok"), ("blockdev-add", "ok"), ("blockdev-add", "ok"),
    ("blockdev-add", "ok"), ("nbd-server-start", "ok"), ("block-export-add", "ok"),
    ("blockdev-reopen", RO_WRITER),
    ("blockdev-reopen", ("GenericError",
                         "Read-only block node 'f1' cannot support read-write users")),
    ("blockdev-reopen", ("GenericError", "Cannot find device='' nor node-name='nope'")),
    ("blockdev-reopen", ("GenericError", "Making 'fmt' a file child of 'fmt' would create a cycle")),
    ("blockdev-reopen", "ok"), ("blockdev-reopen", "ok"),
    ("blockdev-reopen", ("GenericError", "Offset (2097152) cannot be greater than size of the "
                         "containing file (1048576)")),
    ("blockdev-reopen", "ok"),
    ("blockdev-reopen", ("GenericError", "Block node is read-only")),
    ("blockdev-reopen", "ok"),
    ("blockdev-reopen", ("GenericError",
                         "Read-only block node 'f2' cannot support read-write users")),
    ("blockdev-reopen", ("GenericError", "Cannot change the option 'aio'")),
    ("blockdev-reopen", ("GenericError", "Cannot change the option 'filename'")),
    ("blockdev-reopen", ("GenericError", "Cannot change the option 'locking'")),
    ("blockdev-reopen", "ok"), ("blockdev-reopen", "ok"), ("blockdev-reopen", "ok"),
    ("blockdev-reopen", ("GenericError", "Cannot change the option 'force-share'")),
    ("blockdev-reopen", ("GenericError", "Cannot change the option 'size'")),
    ("blockdev-reopen", ("GenericError", "Cannot change the option 'read-zeroes'")),
    ("blockdev-reopen", ("GenericError", "Failed to find node with node-name='nX'")),
    ("blockdev-reopen", ("GenericError", "node-name not specified")),
    ("blockdev-reopen", ("GenericError", "Cannot change the option 'driver'")),
    ("blockdev-reopen", "ok"),
    ("blockdev-reopen", RO_WRITER),
    ("blockdev-reopen", "ok"),
    ("block-export-del", "ok"),
    ("blockdev-reopen", "ok"), ("blockdev-reopen", "ok"), ("blockdev-reopen", "ok"),
    ("blockdev-reopen", "ok"),
    ("blockdev-del", "ok"),
]


def lock_held(path, byte):
    """Does any open file description hold a lock on `byte` of `path`?"""
    fd = os.open(path, os.O_RDONLY)
    try:
        fl = struct.pack("hhxxxxqqixxxx", fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0)
        r = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, fl)
        return struct.unpack("hhxxxxqqixxxx", r)[0] != fcntl.F_UNLCK
    finally:
        os.close(fd)


async def hmp(c, cmd):
    return await c.execute("human-monitor-command", {"command-line": cmd})


async def blockd_only():
    d = Daemon()
    try:
        base = d.path("base.img")
        with open(base, "wb") as f:
            f.truncate(1 << 20)
        c = await d.client()
        # a backing-like pair opened read-only, made writable for a commit, and back
        await c.execute("blockdev-add", {"driver": "file", "node-name": "b", "filename": base,
                                         "read-only": True})
        await c.execute("blockdev-add", {"driver": "raw", "node-name": "rb", "file": "b",
                                         "read-only": True})
        check(not lock_held(base, 101), "no write lock while read-only")
        out = await hmp(c, 'qemu-io rb "write 0 512"')
        check("read-only" in out, f"read-only node refuses writes: {out!r}")
        rw = [{"driver": "file", "node-name": "b", "filename": base},
              {"driver": "raw", "node-name": "rb", "file": "b"}]
        await c.execute("blockdev-reopen", {"options": rw})
        check(lock_held(base, 101), "the write lock is taken when the node becomes writable")
        out = await hmp(c, 'qemu-io rb "write -P 0x6b 4096 4096"')
        check("wrote 4096/4096" in out, f"write after the reopen: {out!r}")
        ro = [dict(o, **{"read-only": True}) for o in rw]
        await c.execute("blockdev-reopen", {"options": ro})
        check(not lock_held(base, 101), "the write lock is dropped again")
        check(lock_held(base, 100), "the read lock stays")
        out = await hmp(c, 'qemu-io rb "write 0 512"')
        check("read-only" in out, f"read-only again: {out!r}")
        with open(base, "rb") as f:
            f.seek(4096)
            check_eq(f.read(4096), b"\x6b" * 4096, "the data reached the file")
        out = await hmp(c, 'qemu-io rb "read -P 0x6b 4096 4096"')
        check("read 4096/4096" in out, f"read back through the reopened fd: {out!r}")

        # a child opened with its parent is reopened with it (it inherits read-only)
        other = d.path("other.img")
        with open(other, "wb") as f:
            f.truncate(1 << 20)
        await c.execute("blockdev-add", {"driver": "raw", "node-name": "in",
                                         "file": {"driver": "file", "filename": other},
                                         "read-only": True})
        nodes = await c.execute("query-named-block-nodes", {"flat": True})
        child = [n["node-name"] for n in nodes if n["node-name"].startswith("#")][0]
        await c.execute("blockdev-reopen", {"options": [{"driver": "raw", "node-name": "in",
                                                         "file": child}]})
        nodes = {n["node-name"]: n for n in
                 await c.execute("query-named-block-nodes", {"flat": True})}
        check_eq((nodes["in"]["ro"], nodes[child]["ro"]), (False, False),
                 "implicit child reopened read-write with its parent")
        # nested options reopen it too
        await c.execute("blockdev-reopen", {"options": [
            {"driver": "raw", "node-name": "in", "read-only": True,
             "file": {"driver": "file", "filename": other}}]})
        nodes = {n["node-name"]: n for n in
                 await c.execute("query-named-block-nodes", {"flat": True})}
        check_eq((nodes["in"]["ro"], nodes[child]["ro"]), (True, True),
                 "nested options: both read-only")
        # replacing it by another node closes it
        await c.execute("blockdev-reopen", {"options": [
            {"driver": "raw", "node-name": "in", "file": "b", "read-only": True}]})
        names = [n["node-name"] for n in
                 await c.execute("query-named-block-nodes", {"flat": True})]
        check(child not in names, f"the replaced implicit child is closed: {names}")
        await c.disconnect()
    finally:
        d.stop()


async def under_load():
    """Reopens while an NBD client writes through an iothread: every write succeeds and
    lands (each reopen of the file toggles O_DIRECT, so its descriptor changes each time)."""
    qemu_io = shutil.which("qemu-io")
    if not qemu_io:
        print("qemu-io missing: reopen under load skipped")
        return
    d = Daemon(args=["--object", "iothread,id=io0"])
    try:
        img = d.path("load.img")
        with open(img, "wb") as f:
            f.truncate(32 << 20)
        nbd = d.path("nbd.sock")
        c = await d.client()
        await c.execute("blockdev-add", {"driver": "file", "node-name": "f", "filename": img})
        await c.execute("blockdev-add", {"driver": "raw", "node-name": "r", "file": "f"})
        await c.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": nbd}}})
        await c.execute("block-export-add", {"type": "nbd", "id": "e", "node-name": "r",
                                             "writable": True, "iothread": "io0"})
        cmds = []
        for i in range(512):
            cmds += ["-c", f"write -P {i % 250 + 1} {i * 65536} 65536"]
        writer = await asyncio.create_subprocess_exec(
            qemu_io, "-f", "raw", f"nbd+unix:///r?socket={nbd}", *cmds,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        n = 0
        while writer.returncode is None and n < 100:
            direct = n % 2 == 0
            await c.execute("blockdev-reopen", {"options": [
                {"driver": "file", "node-name": "f", "filename": img,
                 "cache": {"direct": direct, "no-flush": not direct}},
                {"driver": "raw", "node-name": "r", "file": "f"}]})
            n += 1
            try:
                await asyncio.wait_for(writer.wait(), 0.005)
            except asyncio.TimeoutError:
                pass
        out = (await writer.communicate())[0].decode()
        check(writer.returncode == 0 and "failed" not in out,
              f"writes during {n} reopens: {out[-300:]}")
        check(n >= 5, f"reopens happened while the client wrote ({n})")
        print(f"{n} reopens during 512 NBD writes")
        with open(img, "rb") as f:
            data = f.read()
        bad = [i for i in range(512)
               if data[i * 65536:(i + 1) * 65536] != bytes([i % 250 + 1]) * 65536]
        check_eq(bad, [], "every write on disk after the reopens")
        await c.disconnect()
    finally:
        d.stop()


async def main():
    await compare_with_qsd()
    await blockd_only()
    await under_load()


run(main())
finish()
