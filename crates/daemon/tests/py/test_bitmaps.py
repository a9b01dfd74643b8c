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
"""

import os
import shutil
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
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    finish()


run(main())
