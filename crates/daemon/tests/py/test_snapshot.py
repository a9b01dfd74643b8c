"""External (and, where the format supports them, internal) snapshots, compared with
qemu-storage-daemon reply by reply: every validation error QEMU gives for blockdev-snapshot-sync
and blockdev-snapshot, with its class; what the created overlay's header says (qemu-img info);
the data: writes through an NBD export before the snapshot stay in the old image, writes after
it go to the overlay, the old image is read-only afterwards; mode=existing; an overlay of a
node nobody uses is closed again at once (QEMU drops its only reference)."""

import asyncio
import json
import os
import shutil
import subprocess
import tempfile

from common import DAEMON, QSD, Daemon, ExecuteError, check, check_eq, finish, run
import nbd_client

MiB = 1 << 20


def sh(*args):
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{args}: {r.stdout} {r.stderr}")
    return r.stdout


class S:
    def __init__(self, binary):
        self.binary = binary
        self.log = []
        self.dir = tempfile.mkdtemp(prefix="blockd-snap-")

    async def start(self):
        self.d = Daemon(self.binary)
        self.c = await self.d.client()
        return self

    def p(self, name):
        return os.path.join(self.dir, name)

    def norm(self, v):
        return json.loads(json.dumps(v).replace(self.dir, "DIR"))

    async def cmd(self, name, args=None):
        try:
            r = await asyncio.wait_for(self.c.execute(name, args or {}), 30)
            self.log.append((name, "ok"))
            return r
        except ExecuteError as e:
            self.log.append((name, e.error_class, self.norm(e.error.error.desc)))
            return None

    async def add(self, name, path, fmt="qcow2", **extra):
        o = {"driver": fmt, "node-name": name, "file": {"driver": "file", "filename": path}}
        o.update(extra)
        return await self.cmd("blockdev-add", o)

    async def nodes(self):
        ns = await self.c.execute("query-named-block-nodes", {"flat": True})
        self.log.append(("nodes", sorted((n["node-name"], n["drv"], n["ro"],
                                          self.norm(n.get("backing_file")))
                                         for n in ns if not n["node-name"].startswith("#"))))

    async def stop(self):
        await self.c.disconnect()
        self.d.stop()

    def cleanup(self):
        shutil.rmtree(self.dir, ignore_errors=True)


def info(path):
    v = json.loads(sh("qemu-img", "info", "-U", "--output=json", path))
    return {k: v.get(k) for k in ("format", "virtual-size", "backing-filename",
                                  "backing-filename-format", "cluster-size")}


async def scenario_validation(binary):
    s = await S(binary).start()
    p = s.p
    sh("qemu-img", "create", "-q", "-f", "qcow2", p("a.qcow2"), "1M")
    sh("qemu-img", "create", "-q", "-f", "qcow2", p("b.qcow2"), "1M")
    sh("qemu-img", "create", "-q", "-f", "raw", p("r.raw"), "1M")
    sh("qemu-img", "create", "-q", "-f", "qcow2", p("ov.qcow2"), "1M")
    sh("qemu-img", "create", "-q", "-f", "qcow2", p("c.qcow2"), "1M")
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", p("c.qcow2"), "-F", "qcow2",
       p("ovb.qcow2"), "1M")
    sh("qemu-img", "create", "-q", "-f", "qcow2", p("ov2.qcow2"), "1M")
    await s.add("a", p("a.qcow2"))
    await s.add("b", p("b.qcow2"))
    await s.add("r", p("r.raw"), "raw")
    await s.add("ov", p("ov.qcow2"))
    await s.add("ovb", p("ovb.qcow2"))
    await s.add("ov2", p("ov2.qcow2"))
    await s.cmd("nbd-server-start", {"addr": {"type": "unix",
                                              "data": {"path": p("nbd.sock")}}})
    await s.cmd("block-export-add", {"type": "nbd", "id": "ea", "node-name": "a",
                                     "writable": True})
    await s.cmd("block-export-add", {"type": "nbd", "id": "eov", "node-name": "ov"})
    sync = "blockdev-snapshot-sync"
    for args in (
            {"device": "nope", "snapshot-file": p("s1.qcow2")},
            {"device": "a", "snapshot-file": p("s1.qcow2")},
            {"node-name": "nope", "snapshot-file": p("s1.qcow2")},
            {"node-name": "a", "snapshot-file": p("s1.qcow2")},
            {"node-name": "a", "snapshot-file": p("s1.qcow2"), "snapshot-node-name": "ov"},
            {"node-name": "a", "snapshot-file": p("s1.qcow2"), "snapshot-node-name": "s1",
             "format": "raw"},
            {"node-name": "a", "snapshot-file": p("nonexist.qcow2"),
             "snapshot-node-name": "s1", "mode": "existing"},
            {"node-name": "a", "snapshot-file": "/nonexistdir/x.qcow2",
             "snapshot-node-name": "s1"},
            {"node-name": "a", "snapshot-file": p("s1.qcow2"), "snapshot-node-name": "1bad"},
            {"node-name": "a", "snapshot-file": p("s1.qcow2"), "mode": "bogus"},
            {"node-name": "a"},
    ):
        await s.cmd(sync, args)
    for args in (
            {"node": "nope", "overlay": "ov2"},
            {"node": "a", "overlay": "nope"},
            {"node": "a", "overlay": "a"},
            {"node": "b", "overlay": "ov"},     # exported: in use
            {"node": "b", "overlay": "ovb"},    # has a backing image
            {"node": "b", "overlay": "r"},      # raw: no backing support
            {"node": "b"},
    ):
        await s.cmd("blockdev-snapshot", args)
    await s.nodes()
    # a good one, then the old node is busy as a backing file
    await s.cmd(sync, {"node-name": "a", "snapshot-file": p("s1.qcow2"),
                       "snapshot-node-name": "s1"})
    await s.cmd(sync, {"node-name": "a", "snapshot-file": p("s2.qcow2"),
                       "snapshot-node-name": "s2"})
    await s.cmd("blockdev-snapshot", {"node": "a", "overlay": "ov2"})
    # blockdev-snapshot of the top onto a blockdev-add'ed overlay (which keeps no backing)
    await s.cmd("blockdev-snapshot", {"node": "s1", "overlay": "ov2"})
    await s.nodes()
    ex = await s.cmd("query-block-exports")
    s.log.append(("exports", sorted((e["id"], e["node-name"]) for e in ex)))
    s.log.append(("s1 header", s.norm(info(p("s1.qcow2")))))
    # a node without users: the overlay goes again at once (QEMU), the node stays read-only
    await s.cmd(sync, {"node-name": "b", "snapshot-file": p("sb.qcow2"),
                       "snapshot-node-name": "sb"})
    await s.nodes()
    s.log.append(("sb header", s.norm(info(p("sb.qcow2")))))
    await s.stop()
    s.cleanup()
    return s.log


async def scenario_data(binary):
    s = await S(binary).start()
    p = s.p
    sh("qemu-img", "create", "-q", "-f", "qcow2", p("a.qcow2"), str(4 * MiB))
    sh("qemu-img", "create", "-q", "-f", "qcow2", p("ex.qcow2"), str(4 * MiB))
    await s.add("a", p("a.qcow2"))
    sock = p("nbd.sock")
    await s.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
    await s.cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": "a",
                                     "writable": True})
    cl = await nbd_client.Client().connect(sock, "a")
    await cl.write(0, b"\x11" * (2 * MiB))
    await s.cmd("blockdev-snapshot-sync", {"node-name": "a", "snapshot-file": p("s.qcow2"),
                                           "snapshot-node-name": "s"})
    await cl.write(MiB, b"\x22" * (2 * MiB))
    # mode=existing: an image made beforehand, its header left as it is
    await s.cmd("blockdev-snapshot-sync", {"node-name": "s", "snapshot-file": p("ex.qcow2"),
                                           "snapshot-node-name": "ex", "mode": "existing"})
    await cl.write(3 * MiB, b"\x33" * MiB)
    check_eq(await cl.read(0, MiB), b"\x11" * MiB, f"{binary}: read through the chain")
    await cl.flush()
    await cl.close()
    await s.nodes()
    await s.cmd("block-export-del", {"id": "e"})
    await asyncio.sleep(0.2)
    await s.stop()

    def pattern(path, pat, off, n, fmt_opts=()):
        r = subprocess.run(["qemu-io", *fmt_opts, "-c", f"read -P {pat} {off} {n}", path],
                           capture_output=True, text=True)
        return r.returncode == 0 and "failed" not in r.stdout

    check(pattern(p("a.qcow2"), "0x11", 0, 2 * MiB), f"{binary}: old image keeps its data")
    check(pattern(p("a.qcow2"), "0", 2 * MiB, 2 * MiB), f"{binary}: old image unchanged")
    check(pattern(p("s.qcow2"), "0x22", MiB, 2 * MiB), f"{binary}: the overlay has the new data")
    s.log.append(("s header", s.norm(info(p("s.qcow2")))))
    s.log.append(("ex header", s.norm(info(p("ex.qcow2")))))
    check_eq(subprocess.run(["qemu-img", "check", "-q", p("s.qcow2")]).returncode, 0,
             f"{binary}: qemu-img check of the overlay")
    s.cleanup()
    return s.log


async def scenario_internal(binary):
    """blockdev-snapshot-internal-sync and -delete-internal-sync: QEMU's refusals, a
    transaction that aborts deletes the snapshot, SnapshotInfo of deleted ones, the image
    afterwards as qemu-img sees it."""
    s = await S(binary).start()
    p = s.p
    sh("qemu-img", "create", "-q", "-f", "qcow2", p("a.qcow2"), "1M")
    sh("qemu-img", "create", "-q", "-f", "raw", p("r.raw"), "1M")
    sh("qemu-img", "create", "-q", "-f", "qcow2", p("ro.qcow2"), "1M")
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 64k", p("a.qcow2"))
    await s.add("a", p("a.qcow2"))
    await s.add("r", p("r.raw"), "raw")
    await s.add("ro", p("ro.qcow2"), **{"read-only": True})
    isync, dsync = "blockdev-snapshot-internal-sync", "blockdev-snapshot-delete-internal-sync"
    for args in ({"device": "nope", "name": "x"}, {"device": "r", "name": "x"},
                 {"device": "ro", "name": "x"}, {"device": "a", "name": ""},
                 {"device": "a", "name": "sn1"}, {"device": "a", "name": "sn1"}):
        await s.cmd(isync, args)
    await s.cmd("transaction", {"actions": [
        {"type": isync, "data": {"device": "a", "name": "sn2"}},
        {"type": "abort", "data": {}}]})
    await s.cmd("transaction", {"actions": [
        {"type": isync, "data": {"device": "a", "name": "sn3"}}]})
    for args in ({"device": "a"}, {"device": "a", "name": "zz"},
                 {"device": "a", "id": "7", "name": "sn1"}, {"device": "a", "id": "7"},
                 {"device": "a", "name": "sn2"}, {"device": "r", "name": "x"},
                 {"device": "a", "id": "1"}):
        r = await s.cmd(dsync, args)
        if r is not None:
            s.log.append(("deleted", {k: v for k, v in r.items()
                                      if k not in ("date-sec", "date-nsec", "vm-clock-sec",
                                                   "vm-clock-nsec")}))
    await s.stop()
    lst = sh("qemu-img", "snapshot", "-l", p("a.qcow2"))
    s.log.append(("left", [ln.split()[1] for ln in lst.splitlines()[2:]]))
    check_eq(subprocess.run(["qemu-img", "check", "-q", p("a.qcow2")]).returncode, 0,
             f"{binary}: qemu-img check after internal snapshots")
    s.cleanup()
    return s.log


def compare(name, ours, theirs):
    if theirs is None:
        return
    n = max(len(ours), len(theirs))
    for i in range(n):
        a = ours[i] if i < len(ours) else None
        b = theirs[i] if i < len(theirs) else None
        if a != b:
            check(False, f"{name}: step {i}: blockd {a!r} vs qemu {b!r}")


async def main():
    only = os.environ.get("TXN_ONLY")
    for sc in (scenario_validation, scenario_data, scenario_internal):
        if only and only not in sc.__name__:
            continue
        ours = await sc(DAEMON)
        theirs = await sc(QSD) if QSD else None
        if os.environ.get("TXN_VERBOSE"):
            print(sc.__name__, "\n ours  ", ours, "\n theirs", theirs)
        compare(sc.__name__, ours, theirs)
    finish()


if __name__ == "__main__":
    # both daemons run every scenario: more than the default overall limit
    os.environ.setdefault("BLOCKD_TEST_TIMEOUT", "600")
    run(main())
