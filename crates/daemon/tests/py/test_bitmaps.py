"""Dirty bitmaps over QMP, compared with qemu-storage-daemon reply by reply.

One script of commands runs on both daemons, each with its own copies of a qcow2 image (10 MiB)
and a raw image (3 MiB) exported writable over NBD: block-dirty-bitmap-add (default and given
granularity, disabled, persistent refused on raw and file nodes, the refusals for an empty or
too long name, bad granularities, a duplicate, a missing node), guest writes through NBD
(qemu-io: write, write -z, discard), -enable/-disable/-clear/-merge (names and {node, name}
sources, sizes that differ, a missing source), -remove, x-debug-block-dirty-bitmap-sha256 after
each step, and the `dirty-bitmaps` of query-named-block-nodes. Every reply (or error class and
message) must be equal. QEMU 10.0.2 crashes on a merge with an empty source list; blockd
answers it with success (nothing to merge), so that step is not compared.

Persistent bitmaps in qcow2: an image whose bitmaps qemu-img/qemu-io wrote is opened by both
daemons (same bitmaps, counts and hashes); each daemon then adds persistent bitmaps, removes
and clears some, takes NBD writes and quits; the images pass `qemu-img check`, `qemu-img info`
shows the same bitmaps for both, and qemu-storage-daemon loads both with the same hashes that
were recorded before the quit. A daemon killed with SIGKILL leaves the bitmaps in use on disk:
both daemons then load them as inconsistent and refuse to use them with the same errors.
Persistent bitmaps on a qcow2 v2 image are refused with QEMU's message.

NBD exports of bitmaps (`bitmaps` of block-export-add, `bitmap` of nbd-server-add): the
refusals (unknown names, bitmaps of nodes the export does not read from, {node, name} errors,
a recording bitmap on a read-only export), the bitmaps busy while exported and free again after
block-export-del, and `nbdinfo --map=qemu:dirty-bitmap:NAME` through each daemon's export equal.

A blockdev-reopen to read-only stores the persistent bitmaps (qemu-img info shows them stored,
not in use; qemu-img check passes) and makes them read-only (QEMU's refusals to change them).
"""

import asyncio
import json
import os
import shutil
import signal
import sys
import subprocess
import tempfile

from common import DAEMON, QSD, Daemon, ExecuteError, check, check_eq, finish, run

MiB = 1 << 20


def sh(*args):
    subprocess.run(args, check=True, capture_output=True)


def qemu_io(sock, export, *cmds):
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    args.append(f"nbd+unix:///{export}?socket={sock}")
    r = subprocess.run(args, capture_output=True, text=True)
    check(r.returncode == 0, f"qemu-io {cmds}: {r.stdout} {r.stderr}")


def bitmaps_of(nodes):
    return {n["node-name"]: n.get("dirty-bitmaps") for n in nodes}


STEPS = [
    ("block-dirty-bitmap-add", {"node": "q0", "name": "b0"}),
    ("block-dirty-bitmap-add", {"node": "r1", "name": "b1", "granularity": 512}),
    ("block-dirty-bitmap-add", {"node": "f1", "name": "b2"}),
    ("block-dirty-bitmap-add", {"node": "q0", "name": "d", "disabled": True}),
    ("block-dirty-bitmap-add", {"node": "q0", "name": "big", "granularity": 1 << 31}),
    ("block-dirty-bitmap-add", {"node": "q0", "name": "b0"}),
    ("block-dirty-bitmap-add", {"node": "nope", "name": "b0"}),
    ("block-dirty-bitmap-add", {"node": "nope", "name": ""}),
    ("block-dirty-bitmap-add", {"node": "q0", "name": ""}),
    ("block-dirty-bitmap-add", {"node": "q0", "name": "x" * 1024}),
    ("block-dirty-bitmap-add", {"node": "q0", "name": "x" * 1023, "granularity": 4096}),
    ("block-dirty-bitmap-add", {"node": "q0", "name": "g", "granularity": 1000}),
    ("block-dirty-bitmap-add", {"node": "q0", "name": "g", "granularity": 256}),
    ("block-dirty-bitmap-add", {"node": "q0", "name": "g", "granularity": 1 << 32}),
    ("block-dirty-bitmap-add", {"node": "q0", "name": "g", "granularity": -512}),
    ("block-dirty-bitmap-add", {"node": "r1", "name": "p", "persistent": True}),
    ("block-dirty-bitmap-add", {"node": "f1", "name": "p", "persistent": True}),
    ("query-named-block-nodes", {}),
    ("write", "q0", ["write -P 1 1000 70000", "write -z 2M 512", "discard 9M 64k"]),
    ("write", "r1", ["write -P 1 1000 70000", "write -z 1M 4096", "discard 2M 1536"]),
    ("query-named-block-nodes", {}),
    ("x-debug-block-dirty-bitmap-sha256", {"node": "q0", "name": "b0"}),
    ("x-debug-block-dirty-bitmap-sha256", {"node": "q0", "name": "d"}),
    ("x-debug-block-dirty-bitmap-sha256", {"node": "q0", "name": "big"}),
    ("x-debug-block-dirty-bitmap-sha256", {"node": "r1", "name": "b1"}),
    ("x-debug-block-dirty-bitmap-sha256", {"node": "f1", "name": "b2"}),
    ("x-debug-block-dirty-bitmap-sha256", {"node": "q0", "name": "zz"}),
    ("x-debug-block-dirty-bitmap-sha256", {"node": "zz", "name": "zz"}),
    ("block-dirty-bitmap-enable", {"node": "q0", "name": "d"}),
    ("block-dirty-bitmap-disable", {"node": "q0", "name": "b0"}),
    ("write", "q0", ["write -P 2 5M 4096"]),
    ("x-debug-block-dirty-bitmap-sha256", {"node": "q0", "name": "b0"}),
    ("x-debug-block-dirty-bitmap-sha256", {"node": "q0", "name": "d"}),
    ("block-dirty-bitmap-merge", {"node": "q0", "target": "d", "bitmaps": ["b0", "b0"]}),
    ("x-debug-block-dirty-bitmap-sha256", {"node": "q0", "name": "d"}),
    ("block-dirty-bitmap-merge", {"node": "q0", "target": "d", "bitmaps": ["d"]}),
    ("block-dirty-bitmap-merge", {"node": "q0", "target": "b0",
                                  "bitmaps": [{"node": "r1", "name": "b1"}]}),
    ("block-dirty-bitmap-merge", {"node": "f1", "target": "b2",
                                  "bitmaps": [{"node": "r1", "name": "b1"}]}),
    ("block-dirty-bitmap-merge", {"node": "q0", "target": "b0",
                                  "bitmaps": [{"node": "r9", "name": "b1"}]}),
    ("block-dirty-bitmap-merge", {"node": "q0", "target": "b0", "bitmaps": ["zz"]}),
    ("block-dirty-bitmap-merge", {"node": "q0", "target": "zz", "bitmaps": ["b0"]}),
    ("block-dirty-bitmap-merge", {"node": "q0", "target": "big",
                                  "bitmaps": ["b0", {"node": "q0", "name": "d"}]}),
    ("x-debug-block-dirty-bitmap-sha256", {"node": "q0", "name": "big"}),
    ("x-debug-block-dirty-bitmap-sha256", {"node": "f1", "name": "b2"}),
    ("block-dirty-bitmap-merge", {"node": "r1", "target": "b1",
                                  "bitmaps": [{"node": "f1", "name": "b2"}]}),
    ("x-debug-block-dirty-bitmap-sha256", {"node": "r1", "name": "b1"}),
    ("query-named-block-nodes", {}),
    ("block-dirty-bitmap-clear", {"node": "q0", "name": "d"}),
    ("block-dirty-bitmap-clear", {"node": "q0", "name": "zz"}),
    ("block-dirty-bitmap-enable", {"node": "q0", "name": "zz"}),
    ("block-dirty-bitmap-disable", {"node": "zz", "name": "zz"}),
    ("x-debug-block-dirty-bitmap-sha256", {"node": "q0", "name": "d"}),
    ("block-dirty-bitmap-remove", {"node": "q0", "name": "b0"}),
    ("block-dirty-bitmap-remove", {"node": "q0", "name": "b0"}),
    ("block-dirty-bitmap-remove", {"node": "q0", "name": "x" * 1023}),
    ("query-named-block-nodes", {}),
    ("write", "q0", ["write -P 3 0 10M"]),
    ("query-named-block-nodes", {}),
    ("x-debug-block-dirty-bitmap-sha256", {"node": "q0", "name": "d"}),
]


async def play(binary, images):
    d = Daemon(binary, args=[
        "--blockdev", f"file,node-name=f0,filename={images['q']}",
        "--blockdev", "qcow2,node-name=q0,file=f0",
        "--blockdev", f"file,node-name=f1,filename={images['r']}",
        "--blockdev", "raw,node-name=r1,file=f1",
    ])
    log = []
    try:
        c = await d.client()
        sock = d.path("nbd.sock")
        await c.execute("nbd-server-start",
                        {"addr": {"type": "unix", "data": {"path": sock}}})
        for e in ("q0", "r1"):
            await c.execute("block-export-add", {"type": "nbd", "id": e, "node-name": e,
                                                 "writable": True})
        for step in STEPS:
            if step[0] == "write":
                qemu_io(sock, step[1], *step[2])
                continue
            name, args = step
            try:
                r = await c.execute(name, args)
                if name == "query-named-block-nodes":
                    r = bitmaps_of(r)
                log.append((name, args, r))
            except ExecuteError as e:
                log.append((name, args, e.error_class, e.error.error.desc))
        # blockd only: QEMU 10.0.2 crashes here.
        if binary == DAEMON:
            r = await c.execute("block-dirty-bitmap-merge",
                                {"node": "q0", "target": "d", "bitmaps": []})
            check_eq(r, {}, "merge of no source")
        await c.disconnect()
    finally:
        d.stop()
    return log


async def quit(c, d):
    await c.execute("quit")
    try:
        await c.disconnect()
    except Exception:  # the daemon closed the connection first
        pass
    d.proc.wait(20)


def open_args(img):
    return ["--blockdev", f"file,node-name=f0,filename={img}",
            "--blockdev", "qcow2,node-name=q0,file=f0"]


async def state(c):
    """The bitmaps of q0 with their hashes."""
    out = {}
    for n in await c.execute("query-named-block-nodes"):
        for b in n.get("dirty-bitmaps") or []:
            h = await c.execute("x-debug-block-dirty-bitmap-sha256",
                                {"node": n["node-name"], "name": b["name"]})
            out[(n["node-name"], b["name"])] = (b, h["sha256"])
    return out


async def attempt(c, name, args):
    try:
        return await c.execute(name, args)
    except ExecuteError as e:
        return (e.error_class, e.error.error.desc)


PERSIST_STEPS = [
    ("block-dirty-bitmap-add", {"node": "q0", "name": "p0", "persistent": True,
                                "granularity": 4096}),
    ("block-dirty-bitmap-add", {"node": "q0", "name": "p1", "persistent": True,
                                "disabled": True}),
    ("block-dirty-bitmap-add", {"node": "q0", "name": "b1", "persistent": True}),
    ("block-dirty-bitmap-add", {"node": "q0", "name": "mem"}),
    ("block-dirty-bitmap-remove", {"node": "q0", "name": "b2"}),
    ("block-dirty-bitmap-clear", {"node": "q0", "name": "b1"}),
    ("write", "q0", ["write -P 7 8M 200k", "write -z 1M 64k"]),
    ("block-dirty-bitmap-disable", {"node": "q0", "name": "b0"}),
    ("write", "q0", ["write -P 8 3M 4k"]),
    ("block-dirty-bitmap-merge", {"node": "q0", "target": "p1", "bitmaps": ["p0"]}),
    # (the image was resized to 20 MiB before the export: bitmaps follow it)
    ("write", "q0", ["write -P 9 15M 64k", "write -P 9 9M 4k"]),
]

INCONSISTENT_STEPS = [
    ("block-dirty-bitmap-clear", {"node": "q0", "name": "b0"}),
    ("block-dirty-bitmap-enable", {"node": "q0", "name": "b0"}),
    ("block-dirty-bitmap-merge", {"node": "q0", "target": "b1", "bitmaps": ["b0"]}),
    ("block-dirty-bitmap-merge", {"node": "q0", "target": "b0", "bitmaps": ["b1"]}),
    ("block-dirty-bitmap-remove", {"node": "q0", "name": "b0"}),
]


async def persistence(tmp):
    """Section 2: bitmaps stored in and loaded from qcow2."""
    base = os.path.join(tmp, "base.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", base, "10M")
    sh("qemu-img", "bitmap", "--add", base, "b0")
    sh("qemu-img", "bitmap", "--add", "-g", "512", base, "b1")
    sh("qemu-img", "bitmap", "--add", "--disable", base, "b2")
    sh("qemu-io", "-c", "write -P 1 100k 300k", "-c", "write -z 5M 4k", base)
    loaded, recorded, images = {}, {}, {}
    for who, binary in (("blockd", DAEMON), ("qsd", QSD)):
        if binary is None:
            continue
        img = os.path.join(tmp, f"p-{who}.qcow2")
        shutil.copy(base, img)
        images[who] = img
        d = Daemon(binary, args=open_args(img))
        try:
            c = await d.client()
            loaded[who] = await state(c)
            # Bitmaps follow a resize (the grown area clean) and are stored at the new size.
            resized = await attempt(c, "block_resize", {"node-name": "q0", "size": 20 << 20})
            sock = d.path("nbd.sock")
            await c.execute("nbd-server-start",
                            {"addr": {"type": "unix", "data": {"path": sock}}})
            await c.execute("block-export-add", {"type": "nbd", "id": "e", "node-name": "q0",
                                                 "writable": True})
            log = [resized]
            for step in PERSIST_STEPS:
                if step[0] == "write":
                    qemu_io(sock, step[1], *step[2])
                else:
                    log.append(await attempt(c, *step))
            recorded[who] = (log, await state(c))
            await quit(c, d)
        finally:
            d.stop()
    mine = loaded["blockd"]
    check_eq(sorted(k[1] for k in mine), ["b0", "b1", "b2"], "bitmaps loaded by blockd")
    check(mine[("q0", "b0")][0]["count"] > 0, "b0 holds qemu-io's writes")
    check(all(b["persistent"] for b, _ in mine.values()), "loaded bitmaps are persistent")
    for who, img in images.items():
        r = subprocess.run(["qemu-img", "check", img], capture_output=True, text=True)
        check(r.returncode == 0, f"qemu-img check of {who}'s image: {r.stdout} {r.stderr}")
    infos = {}
    for who, img in images.items():
        r = subprocess.run(["qemu-img", "info", "--output=json", img],
                           capture_output=True, text=True, check=True)
        infos[who] = json.loads(r.stdout)["format-specific"]["data"].get("bitmaps")
    check_eq([b["name"] for b in infos["blockd"]], ["b0", "b1", "p1", "p0"],
             "bitmaps blockd stored (qemu-img info; new ones newest first, as QEMU)")
    # Each image, reopened by qemu-storage-daemon (or blockd without it), holds what its
    # writer had at the quit.
    reloaded = {}
    for who, img in images.items():
        d = Daemon(QSD or DAEMON, args=open_args(img))
        try:
            c = await d.client()
            reloaded[who] = await state(c)
            await quit(c, d)
        finally:
            d.stop()
        want = {k: v for k, v in recorded[who][1].items() if v[0]["persistent"]}
        check_eq({k: v[1] for k, v in reloaded[who].items()},
                 {k: v[1] for k, v in want.items()}, f"hashes of {who}'s stored bitmaps")
    if "qsd" in loaded:
        check_eq(loaded["blockd"], loaded["qsd"], "bitmaps loaded from qemu-img's image")
        check_eq(recorded["blockd"], recorded["qsd"], "persistent steps and their state")
        check_eq(infos["blockd"], infos["qsd"], "qemu-img info bitmaps")
        check_eq(reloaded["blockd"], reloaded["qsd"], "stored bitmaps reloaded")

    # A killed writer leaves its bitmaps in use: inconsistent when loaded again.
    crashed = {}
    for who, binary in (("blockd", DAEMON), ("qsd", QSD)):
        if binary is None:
            continue
        img = os.path.join(tmp, f"c-{who}.qcow2")
        shutil.copy(base, img)
        d = Daemon(binary, args=open_args(img))
        try:
            c = await d.client()
            await state(c)
        finally:
            d.stop(sig=signal.SIGKILL)
        r = subprocess.run(["qemu-img", "info", "--output=json", "-U", img],
                           capture_output=True, text=True, check=True)
        flags = [b["flags"] for b in
                 json.loads(r.stdout)["format-specific"]["data"]["bitmaps"]]
        check(all("in-use" in f for f in flags), f"{who} killed: bitmaps in use ({flags})")
        d = Daemon(DAEMON, args=open_args(img))
        try:
            c = await d.client()
            st = await state(c)
            log = [await attempt(c, *step) for step in INCONSISTENT_STEPS]
            crashed[who] = (st, log)
            await quit(c, d)
        finally:
            d.stop()
        check(all(b.get("inconsistent") for b, _ in st.values()),
              f"bitmaps of the image {who} left are inconsistent in blockd")
        if QSD:
            img2 = os.path.join(tmp, f"c2-{who}.qcow2")
            shutil.copy(base, img2)
            d = Daemon(QSD, args=open_args(img2))
            try:
                c = await d.client()
                await state(c)
            finally:
                d.stop(sig=signal.SIGKILL)
            d = Daemon(QSD, args=open_args(img2))
            try:
                c = await d.client()
                st2 = await state(c)
                log2 = [await attempt(c, *step) for step in INCONSISTENT_STEPS]
                await quit(c, d)
            finally:
                d.stop()
            check_eq((st, log), (st2, log2), f"inconsistent bitmaps ({who}'s crash) vs QEMU")

    # qcow2 v2 cannot store bitmaps.
    v2 = {}
    for who, binary in (("blockd", DAEMON), ("qsd", QSD)):
        if binary is None:
            continue
        img = os.path.join(tmp, f"v2-{who}.qcow2")
        sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", img, "1M")
        d = Daemon(binary, args=open_args(img))
        try:
            c = await d.client()
            v2[who] = await attempt(c, "block-dirty-bitmap-add",
                                    {"node": "q0", "name": "p", "persistent": True})
            await c.disconnect()
        finally:
            d.stop()
    check(isinstance(v2["blockd"], tuple), "v2 image refuses persistent bitmaps")
    if "qsd" in v2:
        check_eq(v2["blockd"], v2["qsd"], "v2 refusal")


EXPORT_STEPS = [
    ("block-dirty-bitmap-add", {"node": "q0", "name": "b0"}),
    ("block-dirty-bitmap-add", {"node": "q0", "name": "d", "disabled": True}),
    ("block-dirty-bitmap-add", {"node": "f0", "name": "fb", "disabled": True}),
    ("block-export-add", {"type": "nbd", "id": "w", "node-name": "q0", "name": "w",
                          "writable": True}),
    ("write", "w", ["write -P 1 100k 300k", "write -z 5M 4k", "write 9M 1000"]),
    ("block-dirty-bitmap-merge", {"node": "q0", "target": "d", "bitmaps": ["b0"]}),
    ("block-export-add", {"type": "nbd", "id": "e1", "node-name": "q0", "bitmaps": ["nope"]}),
    ("block-export-add", {"type": "nbd", "id": "e1", "node-name": "q0", "bitmaps": ["b0"]}),
    ("block-export-add", {"type": "nbd", "id": "e1", "node-name": "q0", "bitmaps": ["fb"]}),
    ("block-export-add", {"type": "nbd", "id": "e1", "node-name": "q0",
                          "bitmaps": [{"node": "f9", "name": "fb"}]}),
    ("block-export-add", {"type": "nbd", "id": "e1", "node-name": "q0",
                          "bitmaps": [{"node": "q0", "name": "zz"}]}),
    ("nbd-server-add", {"device": "q0", "name": "x7", "bitmap": "b0"}),
    ("nbd-server-add", {"device": "q0", "name": "x8", "bitmap": "zz"}),
    ("block-export-add", {"type": "nbd", "id": "e2", "node-name": "q0", "name": "e2",
                          "bitmaps": ["d", {"node": "f0", "name": "fb"}]}),
    ("block-export-add", {"type": "nbd", "id": "e3", "node-name": "q0", "name": "e3",
                          "writable": True, "bitmaps": ["b0"]}),
    ("query-named-block-nodes", {}),
    ("block-dirty-bitmap-remove", {"node": "q0", "name": "d"}),
    ("block-dirty-bitmap-clear", {"node": "q0", "name": "b0"}),
    ("block-dirty-bitmap-enable", {"node": "f0", "name": "fb"}),
    ("map", "e2", "qemu:dirty-bitmap:d"),
    ("map", "e2", "qemu:dirty-bitmap:fb"),
    ("map", "e3", "qemu:dirty-bitmap:b0"),
    ("list", "e2"),
    ("block-export-del", {"id": "e2"}),
    ("block-export-del", {"id": "e3"}),
    ("query-named-block-nodes", {}),
    ("block-dirty-bitmap-remove", {"node": "q0", "name": "d"}),
]


async def exports(tmp):
    """Section 3: bitmaps exported over NBD."""
    logs = {}
    for who, binary in (("blockd", DAEMON), ("qsd", QSD)):
        if binary is None:
            continue
        img = os.path.join(tmp, f"x-{who}.qcow2")
        sh("qemu-img", "create", "-q", "-f", "qcow2", img, "10M")
        d = Daemon(binary, args=open_args(img))
        log = []
        try:
            c = await d.client()
            sock = d.path("nbd.sock")
            await c.execute("nbd-server-start",
                            {"addr": {"type": "unix", "data": {"path": sock}}})
            for step in EXPORT_STEPS:
                if step[0] == "write":
                    qemu_io(sock, step[1], *step[2])
                elif step[0] in ("map", "list"):
                    # (without --list: nbdinfo then shows this export alone, contexts too)
                    arg = [f"--map={step[2]}"] if step[0] == "map" else []
                    r = subprocess.run(["nbdinfo", *arg, f"nbd+unix:///{step[1]}?socket={sock}"],
                                       capture_output=True, text=True)
                    out = [ln for ln in r.stdout.splitlines()
                           if "export=" not in ln and "uri:" not in ln]
                    log.append((step, r.returncode, out))
                else:
                    r = await attempt(c, *step)
                    if step[0] == "query-named-block-nodes":
                        r = bitmaps_of(r)
                    log.append((step[0], r))
            await quit(c, d)
        finally:
            d.stop()
        logs[who] = log
    mine = logs["blockd"]
    busy = [b["busy"] for b in mine[[i for i, x in enumerate(mine)
                                     if x[0] == "query-named-block-nodes"][0]][1]["q0"]]
    check(any(busy), "exported bitmaps are busy")
    if "qsd" in logs:
        for m, t in zip(mine, logs["qsd"]):
            check_eq(m, t, f"export step {str(m[0])[:60]}")
        check_eq(len(mine), len(logs["qsd"]), "export steps")


async def reopen_ro(tmp, base):
    """Section 4: a reopen to read-only stores the bitmaps; they become read-only. A reopen
    back to read-write makes them take writes and changes again (and in use on disk)."""
    logs = {}
    for who, binary in (("blockd", DAEMON), ("qsd", QSD)):
        if binary is None:
            continue
        img = os.path.join(tmp, f"ro-{who}.qcow2")
        shutil.copy(base, img)
        d = Daemon(binary, args=open_args(img))
        log = []
        try:
            c = await d.client()
            sock = d.path("nbd.sock")
            log.append(await attempt(c, "block-dirty-bitmap-add",
                                     {"node": "q0", "name": "r", "persistent": True,
                                      "granularity": 16384}))
            await c.execute("nbd-server-start",
                            {"addr": {"type": "unix", "data": {"path": sock}}})
            await c.execute("block-export-add", {"type": "nbd", "id": "e", "node-name": "q0",
                                                 "writable": True})
            qemu_io(sock, "q0", "write -P 5 2M 100k", "write -P 6 7M 1k")
            # (the client's disconnect may not have been seen yet: retry, then wait for it to go)
            for _ in range(100):
                if await attempt(c, "block-export-del", {"id": "e"}) == {}:
                    break
                await asyncio.sleep(0.05)
            for _ in range(100):
                if not await c.execute("query-block-exports"):
                    break
                await asyncio.sleep(0.05)
            log.append(await attempt(c, "blockdev-reopen", {"options": [
                {"driver": "qcow2", "node-name": "q0", "file": "f0", "read-only": True}]}))
            log.append(await state(c))
            for name, args in [
                ("block-dirty-bitmap-clear", {"node": "q0", "name": "r"}),
                ("block-dirty-bitmap-disable", {"node": "q0", "name": "b0"}),
                ("block-dirty-bitmap-add", {"node": "q0", "name": "n", "persistent": True}),
            ]:
                log.append(await attempt(c, name, args))
            # and writable again: the bitmaps take writes and changes again
            log.append(await attempt(c, "blockdev-reopen", {"options": [
                {"driver": "qcow2", "node-name": "q0", "file": "f0", "read-only": False}]}))
            log.append(await state(c))
            await c.execute("block-export-add", {"type": "nbd", "id": "e2", "node-name": "q0",
                                                 "writable": True})
            qemu_io(sock, "q0", "write -P 7 5M 64k")
            for _ in range(100):
                if await attempt(c, "block-export-del", {"id": "e2"}) == {}:
                    break
                await asyncio.sleep(0.05)
            for name, args in [
                ("block-dirty-bitmap-disable", {"node": "q0", "name": "b0"}),
                ("block-dirty-bitmap-add", {"node": "q0", "name": "n", "persistent": True}),
            ]:
                log.append(await attempt(c, name, args))
            log.append(await state(c))
            await quit(c, d)
        finally:
            d.stop()
        r = subprocess.run(["qemu-img", "info", "--output=json", img],
                           capture_output=True, text=True, check=True)
        bms = json.loads(r.stdout)["format-specific"]["data"]["bitmaps"]
        log.append(bms)
        check(all("in-use" not in b["flags"] for b in bms), f"{who}: stored, not in use")
        r = subprocess.run(["qemu-img", "check", img], capture_output=True, text=True)
        check(r.returncode == 0, f"{who}: qemu-img check after the read-only reopen")
        logs[who] = log
    if "qsd" in logs:
        for m, t in zip(logs["blockd"], logs["qsd"]):
            check_eq(m, t, "read-only reopen step")


def short(a):
    return {k: (v[:20] + "..." if isinstance(v, str) and len(v) > 40 else v)
            for k, v in a.items()}


async def main():
    logs = {}
    tmp = tempfile.mkdtemp(prefix="blockd-bitmaps-")
    try:
        for who, binary in (("blockd", DAEMON), ("qsd", QSD)):
            if binary is None:
                continue
            images = {"q": os.path.join(tmp, f"{who}.qcow2"), "r": os.path.join(tmp, f"{who}.raw")}
            sh("qemu-img", "create", "-q", "-f", "qcow2", images["q"], "10M")
            sh("qemu-img", "create", "-q", "-f", "raw", images["r"], "3M")
            logs[who] = await play(binary, images)
        mine = logs["blockd"]
        # Checks that hold without the oracle: the marks of the writes.
        first_query = [x for x in mine if x[0] == "query-named-block-nodes"][1][2]
        b0 = first_query["q0"]
        check_eq([b["name"] for b in b0], ["x" * 1023, "big", "d", "b0"], "bitmap order")
        counts = {b["name"]: b["count"] for b in b0}
        check_eq(counts["b0"], 3 * 65536, "b0 count after the writes (the discard is ignored)")
        check_eq(counts["d"], 0, "disabled bitmap unchanged")
        if "qsd" in logs:
            theirs = logs["qsd"]
            check_eq(len(mine), len(theirs), "number of replies")
            for m, t in zip(mine, theirs):
                check_eq(m, t, f"{m[0]} {short(m[1])}")
        if os.environ.get("BITMAPS_ONLY") in (None, "", "persist"):
            await persistence(tmp)
        if os.environ.get("BITMAPS_ONLY") in (None, "", "reopen"):
            base = os.path.join(tmp, "reopen-base.qcow2")
            sh("qemu-img", "create", "-q", "-f", "qcow2", base, "10M")
            sh("qemu-img", "bitmap", "--add", base, "b0")
            await reopen_ro(tmp, base)
        if os.environ.get("BITMAPS_ONLY") in (None, "", "export") and shutil.which("nbdinfo"):
            await exports(tmp)
        elif not shutil.which("nbdinfo"):
            print("NOTE: nbdinfo missing, bitmap exports not checked", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    finish()


run(main())
