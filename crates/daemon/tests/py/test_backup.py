"""Backup and fleecing, compared with qemu-storage-daemon where both can run the scenario.

- errors: blockdev-backup/drive-backup argument checks in QEMU's order and words.
- point in time: a full backup (blockdev-backup, and drive-backup with compress) held back by
  `speed` while an NBD client overwrites the whole source: the target equals the source as it
  was when the job started (qemu-img compare), the source has the new data, the filter is gone.
- sync=top by drive-backup: the target gets the source's backing file and only the top's data.
- fleecing: a copy-before-write node above the source, a snapshot-access node on it, both
  exported; a guest overwrites the source through the filter's export while a reader reads the
  view: the view is the old data, the guest reads its new data, the image has the new data.
- transactions: a backup then `abort` (the job goes created -> aborting -> concluded -> null
  and the graph is as before); a grouped transaction of two backups where one is cancelled:
  both end cancelled.
"""

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import tempfile

from common import DAEMON, QSD, Daemon, ExecuteError, check, check_eq, finish, run
import nbd_client

MiB = 1 << 20
SIZE = 4 * MiB


def sh(*args):
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{args}: {r.stdout} {r.stderr}")
    return r.stdout


class S:
    def __init__(self, binary):
        self.binary = binary
        self.log = []
        # images outside the daemon's directory, which goes when it stops
        self.dir = tempfile.mkdtemp(prefix="blockd-backup-")

    async def start(self, args=()):
        self.d = Daemon(self.binary, args=list(args))
        self.c = await self.d.client()
        return self

    def p(self, name):
        return os.path.join(self.dir, name)

    async def cmd(self, name, args=None):
        try:
            r = await asyncio.wait_for(self.c.execute(name, args or {}), 30)
            self.log.append((name, "ok"))
            return r
        except ExecuteError as e:
            self.log.append((name, e.error_class, e.error.error.desc.replace(self.dir, "DIR")))
            return None

    async def add(self, name, path, fmt="qcow2", **extra):
        o = {"driver": fmt, "node-name": name, "file": {"driver": "file", "filename": path}}
        o.update(extra)
        return await self.cmd("blockdev-add", o)

    async def wait_job(self, job, status="null", timeout=30, record=True):
        """Job status changes of `job` up to `status` (paused/running pairs from drains left
        out: QEMU pauses jobs in drained sections, blockd does not)."""
        seen = []
        while True:
            ev = await asyncio.wait_for(self.c.events.get(), timeout)
            data = ev.get("data", {})
            if ev["event"] == "JOB_STATUS_CHANGE" and data["id"] == job:
                if data["status"] not in ("paused",) and not (
                        data["status"] == "running" and seen and seen[-1] == "running"):
                    seen.append(data["status"])
                if data["status"] == status:
                    break
            elif ev["event"] in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED") \
                    and data.get("device") == job:
                seen.append(ev["event"] + (f" error={data['error']}" if "error" in data else ""))
            elif ev["event"] == "BLOCK_JOB_ERROR" and data.get("device") == job:
                # (how many depends on the requests in flight: each kind once)
                e = f"ERROR {data['operation']} {data['action']}"
                if e not in seen:
                    seen.append(e)
        if record:
            self.log.append((job, seen))
        return seen

    async def stop(self):
        await self.c.disconnect()
        self.d.stop()

    def cleanup(self):
        shutil.rmtree(self.dir, ignore_errors=True)


def fill(path, fmt, pattern, size=SIZE):
    sh("qemu-io", "-f", fmt, "-c", f"write -P {pattern} 0 {size}", path)


async def nbd_overwrite(sock, name, pattern, size=SIZE, chunk=256 * 1024):
    cl = await nbd_client.Client().connect(sock, name)
    for off in range(0, size, chunk):
        await cl.write(off, bytes([pattern]) * chunk)
    await cl.flush()
    await cl.close()


async def scenario_errors(binary):
    s = await S(binary).start()
    for n, size, fmt in (("a", "1M", "qcow2"), ("t", "1M", "qcow2"), ("t2", "2M", "qcow2"),
                         ("rt", "1M", "raw")):
        sh("qemu-img", "create", "-q", "-f", fmt, s.p(n + ".img"), size)
        await s.add(n, s.p(n + ".img"), fmt)
    bb = "blockdev-backup"
    for args in (
            {"device": "nope", "target": "t", "sync": "full"},
            {"device": "a", "target": "nope", "sync": "full"},
            {"device": "a", "target": "a", "sync": "full"},
            {"device": "a", "target": "t2", "sync": "full"},
            {"device": "a", "target": "t", "sync": "full", "job-id": "1bad"},
            {"device": "a", "target": "t", "sync": "incremental"},
            {"device": "a", "target": "t", "sync": "bitmap"},
            {"device": "a", "target": "t", "sync": "full", "bitmap": "nob"},
            {"device": "a", "target": "t", "sync": "full", "bitmap-mode": "always"},
            {"device": "a", "target": "t", "sync": "full", "speed": -1},
            {"device": "a", "target": "rt", "sync": "full", "compress": True},
            {"device": "a", "target": "t", "sync": "full", "filter-node-name": "a"},
            {"device": "a", "target": "t", "sync": "full", "x-perf": {"max-workers": 0}},
            {"device": "a", "target": "t", "sync": "full", "x-perf": {"max-chunk": -1}},
            {"device": "a", "target": "t", "sync": "full", "x-perf": {"max-chunk": 1000}},
            {"device": "a", "target": "t", "sync": "full", "job-id": "j", "speed": -1},
            {"device": "a", "target": "t", "sync": "full", "bogus": 1},
    ):
        await s.cmd(bb, args)
    for args in (
            {"device": "a", "target": s.p("nonexist.qcow2"), "sync": "full", "job-id": "d3",
             "mode": "existing"},
            {"device": "a", "target": "/nonexistdir/x", "sync": "full", "job-id": "d4"},
            {"device": "nope", "target": s.p("x.qcow2"), "sync": "full", "job-id": "d5"},
    ):
        await s.cmd("drive-backup", args)
    # a job in progress blocks another on its nodes; the names then match nothing
    await s.cmd(bb, {"device": "a", "target": "t", "sync": "none", "job-id": "j1"})
    await s.cmd(bb, {"device": "a", "target": "t", "sync": "full", "job-id": "j2"})
    await s.cmd(bb, {"device": "t2", "target": "t", "sync": "full", "job-id": "j1"})
    await s.cmd("block-job-cancel", {"device": "j1"})
    await s.wait_job("j1")
    nodes = await s.cmd("query-named-block-nodes", {"flat": True})
    s.log.append(("nodes", sorted(n["node-name"] for n in nodes if not
                                  n["node-name"].startswith("#"))))
    await s.stop()
    s.cleanup()
    return s.log


async def point_in_time(binary, drive, iothread=False):
    """Full backup of 0x11 data while the guest writes 0x22 everywhere (with `iothread`, the
    source's export and so the job and the filter's copies run in an iothread)."""
    s = await S(binary).start(["--object", "iothread,id=io0"] if iothread else [])
    src, tgt = s.p("src.qcow2"), s.p("tgt.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", src, str(SIZE))
    fill(src, "qcow2", "0x11")
    orig = s.p("orig.raw")
    sh("qemu-img", "convert", "-O", "raw", src, orig)
    await s.add("src", src)
    sock = s.p("nbd.sock")
    await s.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
    exp = {"type": "nbd", "id": "e", "node-name": "src", "writable": True}
    if iothread:
        exp["iothread"] = "io0"
    await s.cmd("block-export-add", exp)
    if drive:
        await s.cmd("drive-backup", {"job-id": "b", "device": "src", "target": tgt,
                                     "sync": "full", "speed": 4 * MiB, "compress": True})
    else:
        sh("qemu-img", "create", "-q", "-f", "qcow2", tgt, str(SIZE))
        await s.add("tgt", tgt)
        await s.cmd("blockdev-backup", {"job-id": "b", "device": "src", "target": "tgt",
                                        "sync": "full", "speed": 4 * MiB,
                                        "filter-node-name": "cbw0"})
        nodes = await s.cmd("query-named-block-nodes", {"flat": True})
        s.log.append(("filter", [n["drv"] for n in nodes if n["node-name"] == "cbw0"]))
    await nbd_overwrite(sock, "src", 0x22)
    await s.wait_job("b")
    nodes = await s.cmd("query-named-block-nodes", {"flat": True})
    s.log.append(("filters left", [n["node-name"] for n in nodes
                                   if n["drv"] == "copy-before-write"]))
    await s.cmd("block-export-del", {"id": "e"})
    await asyncio.sleep(0.2)
    await s.stop()
    r = subprocess.run(["qemu-img", "compare", "-q", "-F", "raw", tgt, orig])
    check_eq(r.returncode, 0, f"{binary}: drive={drive}: target is the point-in-time source")
    r = subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"read -P 0x22 0 {SIZE}", src],
                       capture_output=True, text=True)
    check("failed" not in r.stdout and r.returncode == 0,
          f"{binary}: drive={drive}: source has the guest's writes: {r.stdout}")
    check_eq(subprocess.run(["qemu-img", "check", "-q", tgt]).returncode, 0,
             f"{binary}: drive={drive}: qemu-img check of the target")
    if drive:
        m = sh("qemu-img", "map", "--output=json", tgt)
        check('"compressed": true' in m, f"{binary}: compressed clusters in the target")
    s.cleanup()
    return s.log


async def scenario_point_in_time(binary):
    log = await point_in_time(binary, False) + await point_in_time(binary, True)
    if binary == DAEMON:
        # blockd only: qemu-storage-daemon 10.0.2 aborts inserting the backup filter above a
        # node in an iothread when the target is in the main context
        # (bdrv_insert_node: Assertion `bdrv_get_aio_context(bs) == ctx' failed)
        await point_in_time(binary, False, iothread=True)
    return log


async def scenario_snapshot_during_backup(binary):
    """A transaction taking an external snapshot of a node while a backup of it runs and an
    NBD client overwrites it: the overlay goes between the backup's filter and the node, the
    backup still ends with the point-in-time data, the node keeps the data of before the
    snapshot and the overlay has the writes."""
    s = await S(binary).start()
    src, tgt = s.p("src.qcow2"), s.p("tgt.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", src, str(SIZE))
    fill(src, "qcow2", "0x11")
    orig = s.p("orig.raw")
    sh("qemu-img", "convert", "-O", "raw", src, orig)
    sh("qemu-img", "create", "-q", "-f", "qcow2", tgt, str(SIZE))
    await s.add("src", src)
    await s.add("tgt", tgt)
    sock = s.p("nbd.sock")
    await s.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
    await s.cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": "src",
                                     "writable": True})
    await s.cmd("blockdev-backup", {"job-id": "b", "device": "src", "target": "tgt",
                                    "sync": "full", "speed": 2 * MiB,
                                    "filter-node-name": "cbw0"})
    cl = await nbd_client.Client().connect(sock, "src")
    await cl.write(0, b"\x22" * MiB)
    await s.cmd("transaction", {"actions": [{"type": "blockdev-snapshot-sync", "data": {
        "node-name": "src", "snapshot-file": s.p("ov.qcow2"), "snapshot-node-name": "ov"}}]})
    for off in range(MiB, SIZE, 256 * 1024):
        await cl.write(off, b"\x33" * (256 * 1024))
    await cl.flush()
    await s.wait_job("b")
    await cl.close()
    await asyncio.sleep(0.2)  # the server sees the disconnect
    await s.cmd("block-export-del", {"id": "e"})
    await asyncio.sleep(0.2)
    await s.stop()
    r = subprocess.run(["qemu-img", "compare", "-q", "-F", "raw", tgt, orig])
    check_eq(r.returncode, 0, f"{binary}: backup across a snapshot is the point in time")
    r = subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"read -P 0x11 {MiB} {SIZE - MiB}",
                        src], capture_output=True, text=True)
    check("failed" not in r.stdout, f"{binary}: the old node has no later writes: {r.stdout}")
    r = subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"read -P 0x33 {MiB} {SIZE - MiB}",
                        s.p("ov.qcow2")], capture_output=True, text=True)
    check("failed" not in r.stdout, f"{binary}: the overlay has the writes: {r.stdout}")
    s.cleanup()
    return s.log


async def scenario_discard_source(binary):
    """discard-source: after the backup the source's clusters are discarded (the source opened
    with discard=unmap), the target has the data; without discard=unmap nothing is
    discarded. `qemu-img map` of the source compared."""
    s = await S(binary).start()
    out = []
    for unmap in (True, False):
        src, tgt = s.p(f"src{unmap}.qcow2"), s.p(f"tgt{unmap}.qcow2")
        sh("qemu-img", "create", "-q", "-f", "qcow2", src, str(SIZE))
        fill(src, "qcow2", "0x11", 2 * MiB)
        sh("qemu-img", "create", "-q", "-f", "qcow2", tgt, str(SIZE))
        extra = {"discard": "unmap"} if unmap else {}
        await s.add("src", src, **extra)
        await s.add("tgt", tgt)
        await s.cmd("blockdev-backup", {"job-id": "b", "device": "src", "target": "tgt",
                                        "sync": "full", "discard-source": True})
        await s.wait_job("b")
        await s.cmd("blockdev-del", {"node-name": "src"})
        await s.cmd("blockdev-del", {"node-name": "tgt"})
        out.append((src, tgt))
    await s.stop()
    for src, tgt in out:
        m = json.loads(sh("qemu-img", "map", "--output=json", src))
        runs = []
        for e in m:  # data or not, adjacent extents merged (discarded clusters may be zero
            # clusters or unallocated: both read as zeroes and hold no data)
            if runs and runs[-1][2] == e["data"]:
                runs[-1] = (runs[-1][0], runs[-1][1] + e["length"], e["data"])
            else:
                runs.append((e["start"], e["length"], e["data"]))
        s.log.append(("source map", runs))
        r = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read -P 0x11 0 2M", tgt],
                           capture_output=True, text=True)
        check("failed" not in r.stdout, f"{binary}: discard-source: the target has the data")
    s.cleanup()
    return s.log


async def scenario_top(binary):
    s = await S(binary).start()
    base, top, tgt = s.p("base.qcow2"), s.p("top.qcow2"), s.p("tgt.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", base, str(SIZE))
    fill(base, "qcow2", "0x33")
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x44 1M 1M", top)
    await s.add("top", top)
    await s.cmd("drive-backup", {"job-id": "b", "device": "top", "target": tgt,
                                 "sync": "top"})
    await s.wait_job("b")
    await s.stop()
    info = sh("qemu-img", "info", "--output=json", tgt)
    check(f'"backing-filename": "{base}"' in info, f"{binary}: sync=top target backing: {info}")
    r = subprocess.run(["qemu-img", "compare", "-q", tgt, top])
    check_eq(r.returncode, 0, f"{binary}: sync=top: target chain == source chain")
    m = sh("qemu-img", "map", "--output=json", tgt)
    # only the top's megabyte is in the target itself
    alloc = sum(e["length"] for e in json.loads(m) if e["data"] and e["depth"] == 0)
    check_eq(alloc, MiB, f"{binary}: sync=top: data in the target")
    s.cleanup()
    return s.log


async def scenario_fleecing(binary):
    s = await S(binary).start()
    src, tmp = s.p("src.qcow2"), s.p("tmp.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", src, str(SIZE))
    fill(src, "qcow2", "0x55")
    sh("qemu-img", "create", "-q", "-f", "qcow2", tmp, str(SIZE))
    await s.add("src", src)
    await s.add("tmp", tmp)
    await s.cmd("blockdev-add", {"driver": "copy-before-write", "node-name": "cbw",
                                 "file": "src", "target": "tmp"})
    await s.cmd("blockdev-add", {"driver": "snapshot-access", "node-name": "acc",
                                 "file": "cbw"})
    sock = s.p("nbd.sock")
    await s.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
    await s.cmd("block-export-add", {"type": "nbd", "id": "guest", "node-name": "cbw",
                                     "writable": True})
    await s.cmd("block-export-add", {"type": "nbd", "id": "view", "node-name": "acc"})
    reader = await nbd_client.Client().connect(sock, "acc")
    guest = await nbd_client.Client().connect(sock, "cbw")
    bad_view = bad_guest = 0
    chunk = 256 * 1024

    async def guest_writes():
        for i, off in enumerate(range(0, SIZE, chunk)):
            await guest.write(off, bytes([0x66 + i % 3]) * chunk)

    async def view_reads():
        nonlocal bad_view
        for _ in range(3):
            for off in range(0, SIZE, 64 * 1024):
                if await reader.read(off, 64 * 1024) != b"\x55" * 65536:
                    bad_view += 1

    await asyncio.gather(guest_writes(), view_reads())
    for i, off in enumerate(range(0, SIZE, chunk)):
        if await guest.read(off, chunk) != bytes([0x66 + i % 3]) * chunk:
            bad_guest += 1
    check_eq(bad_view, 0, f"{binary}: fleecing view blocks that are not the old data")
    check_eq(bad_guest, 0, f"{binary}: guest blocks that are not its new data")
    # the reader discards what it is done with: later guest writes are not copied
    await reader.close()
    await guest.flush()
    await guest.close()
    await s.cmd("block-export-del", {"id": "view"})
    await s.cmd("block-export-del", {"id": "guest"})
    await asyncio.sleep(0.2)
    await s.cmd("blockdev-del", {"node-name": "acc"})
    await s.cmd("blockdev-del", {"node-name": "cbw"})
    await s.stop()
    r = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read -P 0x66 0 256k", src],
                       capture_output=True, text=True)
    check("failed" not in r.stdout, f"{binary}: the image has the guest's data: {r.stdout}")
    s.cleanup()
    return s.log


async def scenario_fleecing_sync_none(binary):
    """The older fleecing: a backup with sync=none into a temporary qcow2 whose backing file
    is the source, the temporary node exported read-only: a reader sees the point-in-time
    data while the guest overwrites the source; the job runs until cancelled."""
    s = await S(binary).start()
    src, tmp = s.p("src.qcow2"), s.p("tmp.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", src, str(SIZE))
    fill(src, "qcow2", "0x55")
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", src, "-F", "qcow2", tmp)
    await s.add("src", src)
    await s.add("tmp", tmp, backing="src")
    sock = s.p("nbd.sock")
    await s.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
    await s.cmd("block-export-add", {"type": "nbd", "id": "guest", "node-name": "src",
                                     "writable": True})
    await s.cmd("blockdev-backup", {"job-id": "f", "device": "src", "target": "tmp",
                                    "sync": "none"})
    await s.cmd("block-export-add", {"type": "nbd", "id": "view", "node-name": "tmp"})
    guest = await nbd_client.Client().connect(sock, "src")
    reader = await nbd_client.Client().connect(sock, "tmp")
    chunk = 256 * 1024
    for off in range(0, SIZE, chunk):
        await guest.write(off, b"\x77" * chunk)
    bad = 0
    for off in range(0, SIZE, 64 * 1024):
        if await reader.read(off, 64 * 1024) != b"\x55" * 65536:
            bad += 1
    check_eq(bad, 0, f"{binary}: sync=none fleecing: blocks of the view that changed")
    jobs = await s.cmd("query-block-jobs")
    s.log.append(("running", [(j["device"], j["status"]) for j in jobs]))
    await reader.close()
    await guest.close()
    await asyncio.sleep(0.2)
    await s.cmd("block-export-del", {"id": "view"})
    await s.cmd("block-job-cancel", {"device": "f"})
    await s.wait_job("f")
    await s.cmd("block-export-del", {"id": "guest"})
    await asyncio.sleep(0.2)
    await s.stop()
    s.cleanup()
    return s.log


async def scenario_cbw_options(binary):
    """copy-before-write and snapshot-access options at blockdev-add: QEMU's refusals; two
    filters may share a target; snapshot-access opens on any node (reads need a filter)."""
    s = await S(binary).start()
    for n in ("a", "t", "t2"):
        sh("qemu-img", "create", "-q", "-f", "qcow2", s.p(n + ".img"), "1M")
        await s.add(n, s.p(n + ".img"))
    cbw = {"driver": "copy-before-write", "node-name": "c1", "file": "a", "target": "t"}
    for extra in ({"bitmap": {"node": "nope", "name": "b"}},
                  {"bitmap": {"node": "a", "name": "b"}},
                  {"on-cbw-error": "bogus"}, {"min-cluster-size": 1000},
                  {"target": None}, {"bogus": 1}):
        o = dict(cbw, **extra)
        if o.get("target") is None:
            del o["target"]
        await s.cmd("blockdev-add", o)
    await s.cmd("blockdev-add", dict(cbw, **{"on-cbw-error": "break-snapshot",
                                             "cbw-timeout": 5}))
    await s.cmd("blockdev-add", {"driver": "copy-before-write", "node-name": "c2",
                                 "file": "t2", "target": "t"})
    await s.cmd("blockdev-add", {"driver": "snapshot-access", "node-name": "s1", "file": "c1"})
    # (deleting c1 while s1 uses it: blockd's refusal text differs, graph code not compared)
    await s.cmd("blockdev-del", {"node-name": "s1"})
    await s.cmd("blockdev-del", {"node-name": "c1"})
    await s.stop()
    s.cleanup()
    return s.log


@contextlib.asynccontextmanager
async def small_tmpfs(s, scenario):
    """A 1 MiB tmpfs under session `s`'s directory, for real ENOSPC (mounting needs root).
    Yields its path, or None after a loud SKIPPED line when it cannot be mounted; the session
    is stopped, the tmpfs unmounted and the directory removed on the way out."""
    mnt = s.p("small")
    os.makedirs(mnt)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", mnt],
                       capture_output=True)
    if r.returncode != 0:
        print(f"SKIPPED {scenario}: cannot mount a tmpfs:", r.stderr.decode())
    try:
        yield mnt if r.returncode == 0 else None
    finally:
        await s.stop()
        if r.returncode == 0:
            subprocess.run(["umount", "-l", mnt], capture_output=True)
        s.cleanup()


async def scenario_error_policy(binary):
    """on-target-error with a real ENOSPC (the target on a 1 MiB tmpfs; needs root, else
    skipped loudly): `report` fails the job with the error; `stop` pauses it (io-status
    nospace) until it is cancelled."""
    s = await S(binary).start()
    async with small_tmpfs(s, "scenario_error_policy") as mnt:
        if mnt is None:
            return []
        src = s.p("src.qcow2")
        sh("qemu-img", "create", "-q", "-f", "qcow2", src, str(SIZE))
        fill(src, "qcow2", "0x11")
        await s.add("src", src)
        for policy in ("report", "stop"):
            tgt = os.path.join(mnt, "tgt.raw")
            with open(tgt, "wb") as f:
                f.truncate(SIZE)
            await s.add("tgt", tgt, "raw")
            await s.cmd("blockdev-backup", {"job-id": "b", "device": "src", "target": "tgt",
                                            "sync": "full", "on-target-error": policy})
            if policy == "stop":
                # (QEMU sends BLOCK_JOB_ERROR after the pause took effect, blockd before it,
                # and QEMU's other requests in flight fail again after the resume: the
                # events are compared as a set)
                seen = await s.wait_job("b", "paused", record=False)
                await asyncio.sleep(0.2)
                jobs = await s.cmd("query-block-jobs")
                s.log.append(("stopped", [(j["status"], j["io-status"], j["paused"])
                                          for j in jobs]))
                await s.cmd("block-job-cancel", {"device": "b", "force": True})
                seen += await s.wait_job("b", record=False)
                s.log.append(("stop events", sorted(set(seen))))
            else:
                await s.wait_job("b")
            await s.cmd("blockdev-del", {"node-name": "tgt"})
            os.unlink(tgt)
    return s.log


async def scenario_cbw_errors(binary):
    """on-cbw-error with a real ENOSPC (the fleecing target on a 1 MiB tmpfs; needs root):
    break-guest-write makes the guest's write fail; break-snapshot lets the guest write and
    makes the view unreadable. The NBD error codes are compared."""
    s = await S(binary).start()
    async with small_tmpfs(s, "scenario_cbw_errors") as mnt:
        if mnt is None:
            return []
        src = s.p("src.qcow2")
        sh("qemu-img", "create", "-q", "-f", "qcow2", src, str(SIZE))
        fill(src, "qcow2", "0x55")
        await s.add("src", src)
        sock = s.p("nbd.sock")
        await s.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
        for mode in ("break-guest-write", "break-snapshot"):
            tmp = os.path.join(mnt, "tmp.raw")
            with open(tmp, "wb") as f:
                f.truncate(SIZE)
            await s.add("tmp", tmp, "raw")
            await s.cmd("blockdev-add", {"driver": "copy-before-write", "node-name": "cbw",
                                         "file": "src", "target": "tmp",
                                         "on-cbw-error": mode})
            await s.cmd("blockdev-add", {"driver": "snapshot-access", "node-name": "acc",
                                         "file": "cbw"})
            await s.cmd("block-export-add", {"type": "nbd", "id": "guest", "node-name": "cbw",
                                             "writable": True})
            await s.cmd("block-export-add", {"type": "nbd", "id": "view", "node-name": "acc"})
            guest = await nbd_client.Client().connect(sock, "cbw")
            reader = await nbd_client.Client().connect(sock, "acc")
            outcome = []
            for off in range(0, SIZE, MiB):
                try:
                    await guest.write(off, b"\x66" * MiB)
                    outcome.append("ok")
                except nbd_client.NbdError as e:
                    outcome.append(str(e).split(" (")[0])
            try:
                await reader.read(3 * MiB, 65536)
                outcome.append("view ok")
            except nbd_client.NbdError as e:
                # (the filter fails it with EACCES, as QEMU's; both servers send EINVAL)
                outcome.append("view failed: " + str(e).split(" (")[0])
            s.log.append((mode, outcome))
            await guest.close()
            await reader.close()
            await asyncio.sleep(0.2)
            for e in ("view", "guest"):
                await s.cmd("block-export-del", {"id": e})
            await asyncio.sleep(0.2)
            for n in ("acc", "cbw", "tmp"):
                await s.cmd("blockdev-del", {"node-name": n})
            os.unlink(tmp)
    return s.log


async def scenario_cbw_timeout(binary):
    """cbw-timeout: the fleecing target is a null-co node that takes 3 s per request; with
    cbw-timeout=1 and on-cbw-error=break-snapshot a guest write returns after about a second
    (the copy is given up) and the view becomes unreadable."""
    s = await S(binary).start()
    src = s.p("src.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", src, str(SIZE))
    fill(src, "qcow2", "0x55")
    await s.add("src", src)
    await s.cmd("blockdev-add", {"driver": "null-co", "node-name": "slow", "size": SIZE,
                                 "latency-ns": 3_000_000_000})
    await s.cmd("blockdev-add", {"driver": "copy-before-write", "node-name": "cbw",
                                 "file": "src", "target": "slow",
                                 "on-cbw-error": "break-snapshot", "cbw-timeout": 1})
    await s.cmd("blockdev-add", {"driver": "snapshot-access", "node-name": "acc",
                                 "file": "cbw"})
    sock = s.p("nbd.sock")
    await s.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
    await s.cmd("block-export-add", {"type": "nbd", "id": "guest", "node-name": "cbw",
                                     "writable": True})
    await s.cmd("block-export-add", {"type": "nbd", "id": "view", "node-name": "acc"})
    guest = await nbd_client.Client().connect(sock, "cbw")
    reader = await nbd_client.Client().connect(sock, "acc")
    t0 = asyncio.get_running_loop().time()
    await guest.write(0, b"\x66" * 65536)
    took = asyncio.get_running_loop().time() - t0
    check(0.8 < took < 2.5, f"{binary}: the guest write waited for the timeout only: {took:.2f} s")
    try:
        await reader.read(MiB, 65536)
        s.log.append(("view", "ok"))
    except nbd_client.NbdError:
        s.log.append(("view", "failed"))
    # later writes do not copy at all
    t0 = asyncio.get_running_loop().time()
    await guest.write(MiB, b"\x66" * 65536)
    took = asyncio.get_running_loop().time() - t0
    check(took < 0.5, f"{binary}: after the break, writes do not copy: {took:.2f} s")
    await guest.close()
    await reader.close()
    await asyncio.sleep(0.2)
    await s.stop()
    s.cleanup()
    return s.log


async def scenario_transactions(binary):
    s = await S(binary).start()
    for n in ("a", "t", "b", "u"):
        sh("qemu-img", "create", "-q", "-f", "qcow2", s.p(n + ".qcow2"), str(SIZE))
        fill(s.p(n + ".qcow2"), "qcow2", "0x77")
        await s.add(n, s.p(n + ".qcow2"))
    before = await s.cmd("query-named-block-nodes", {"flat": True})
    bk = {"type": "blockdev-backup", "data": {"job-id": "j", "device": "a", "target": "t",
                                              "sync": "full"}}
    await s.cmd("transaction", {"actions": [bk, {"type": "abort", "data": {}}]})
    await s.wait_job("j")
    after = await s.cmd("query-named-block-nodes", {"flat": True})
    names = lambda ns: sorted(n["node-name"] for n in ns)  # noqa: E731
    check_eq(names(after), names(before), f"{binary}: nodes after an aborted backup")
    # grouped: cancelling one cancels the other
    slow = lambda j, dev, tgt: {"type": "blockdev-backup", "data": {  # noqa: E731
        "job-id": j, "device": dev, "target": tgt, "sync": "full", "speed": 64 * 1024}}
    await s.cmd("transaction", {"actions": [slow("g1", "a", "t"), slow("g2", "b", "u")],
                                "properties": {"completion-mode": "grouped"}})
    await asyncio.sleep(0.3)
    await s.cmd("block-job-cancel", {"device": "g1", "force": True})
    seen = {}
    while len(seen) < 2:
        ev = await asyncio.wait_for(s.c.events.get(), 30)
        d = ev.get("data", {})
        if ev["event"] in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"):
            seen[d["device"]] = ev["event"]
    s.log.append(("grouped ends", sorted(seen.items())))
    # individual: cancelling one leaves the other
    await s.cmd("transaction", {"actions": [slow("i1", "a", "t"), slow("i2", "b", "u")]})
    await asyncio.sleep(0.3)
    await s.cmd("block-job-cancel", {"device": "i1", "force": True})
    await s.cmd("block-job-set-speed", {"device": "i2", "speed": 0})
    seen = {}
    while len(seen) < 2:
        ev = await asyncio.wait_for(s.c.events.get(), 30)
        d = ev.get("data", {})
        if ev["event"] in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"):
            seen[d["device"]] = ev["event"]
    s.log.append(("individual ends", sorted(seen.items())))
    await s.stop()
    s.cleanup()
    return s.log


async def has_bitmaps(s):
    cmds = await s.c.execute("query-commands")
    return any(c["name"] == "block-dirty-bitmap-add" for c in cmds)


async def scenario_incremental(binary):
    """Incremental backup end to end: a bitmap, a full backup (the bitmap cleared in the same
    transaction), guest writes through NBD, an incremental backup (sync=incremental) into an
    overlay of the full one; the chain restored by qemu-img equals the disk. Then
    bitmap-mode: a cancelled sync=bitmap backup with on-success keeps the bitmap's bits
    (and the writes made meanwhile), `always` clears what was copied. A grouped transaction
    where one backup fails (target too small is refused in prepare: the whole transaction
    aborts and the bitmap is as before). Skipped (loudly) while the daemon has no
    block-dirty-bitmap-* commands."""
    s = await S(binary).start()
    if not await has_bitmaps(s):
        print(f"SKIPPED scenario_incremental on {binary}: no block-dirty-bitmap-add yet")
        await s.stop()
        s.cleanup()
        return None
    src, full, inc = s.p("src.qcow2"), s.p("full.qcow2"), s.p("inc.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", src, str(SIZE))
    fill(src, "qcow2", "0x11")
    await s.add("src", src)
    sock = s.p("nbd.sock")
    await s.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
    await s.cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": "src",
                                     "writable": True})
    await s.cmd("block-dirty-bitmap-add", {"node": "src", "name": "b0"})
    sh("qemu-img", "create", "-q", "-f", "qcow2", full, str(SIZE))
    await s.add("full", full)
    await s.cmd("transaction", {"actions": [
        {"type": "block-dirty-bitmap-clear", "data": {"node": "src", "name": "b0"}},
        {"type": "blockdev-backup", "data": {"job-id": "f", "device": "src",
                                             "target": "full", "sync": "full"}}]})
    await s.wait_job("f")
    cl = await nbd_client.Client().connect(sock, "src")
    await cl.write(MiB, b"\x22" * (64 * 1024))
    await cl.write(3 * MiB + 4096, b"\x33" * 4096)
    await cl.flush()
    q = await s.cmd("query-named-block-nodes", {"flat": True})
    bms = [b for n in q if n["node-name"] == "src" for b in n.get("dirty-bitmaps", [])]
    s.log.append(("dirty before inc", [(b["name"], b["count"]) for b in bms]))
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", full, "-F", "qcow2", inc)
    await s.add("inc", inc, backing=None)
    await s.cmd("blockdev-backup", {"job-id": "i", "device": "src", "target": "inc",
                                    "sync": "incremental", "bitmap": "b0"})
    await s.wait_job("i")
    q = await s.cmd("query-named-block-nodes", {"flat": True})
    bms = [b for n in q if n["node-name"] == "src" for b in n.get("dirty-bitmaps", [])]
    s.log.append(("dirty after inc", [(b["name"], b["count"]) for b in bms]))
    # the disk as the increment saw it (the job flushed; nothing writes now)
    disk = s.p("disk.raw")
    sh("qemu-img", "convert", "-U", "-O", "raw", src, disk)
    # cancelled bitmap backups: on-success keeps the bits, always drops the copied ones
    for mode in ("on-success", "always"):
        await cl.write(0, b"\x44" * (3 * MiB))
        await cl.flush()
        t = s.p(f"t-{mode}.qcow2")
        sh("qemu-img", "create", "-q", "-f", "qcow2", t, str(SIZE))
        await s.add(f"t{mode[0]}", t)
        await s.cmd("blockdev-backup", {"job-id": "c", "device": "src", "target": f"t{mode[0]}",
                                        "sync": "bitmap", "bitmap": "b0", "bitmap-mode": mode,
                                        "speed": 64 * 1024})
        await asyncio.sleep(0.3)
        await s.cmd("block-job-cancel", {"device": "c", "force": True})
        await s.wait_job("c", record=False)
        q = await s.cmd("query-named-block-nodes", {"flat": True})
        counts = [b["count"] for n in q if n["node-name"] == "src"
                  for b in n.get("dirty-bitmaps", []) if b["name"] == "b0"]
        if mode == "on-success":
            s.log.append(("on-success cancelled", counts))
        else:
            check(bool(counts) and 0 < counts[0] < 3 * MiB,
                  f"{binary}: always: copied clusters cleared, the rest kept: {counts}")
    # grouped: two bitmap backups, one cancelled: both abort, both bitmaps keep their bits
    src2 = s.p("src2.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", src2, str(SIZE))
    await s.add("src2", src2)
    await s.cmd("block-dirty-bitmap-add", {"node": "src2", "name": "c0"})
    await s.cmd("block-export-add", {"type": "nbd", "id": "e2", "node-name": "src2",
                                     "writable": True})
    cl2 = await nbd_client.Client().connect(sock, "src2")
    await cl2.write(0, b"\x55" * (3 * MiB))
    await cl.write(0, b"\x66" * (3 * MiB))
    for n in ("g1", "g2"):
        sh("qemu-img", "create", "-q", "-f", "qcow2", s.p(n + ".qcow2"), str(SIZE))
        await s.add(n, s.p(n + ".qcow2"))

    def counts_of(q):
        return sorted((n["node-name"], b["name"], b["count"]) for n in q
                      for b in n.get("dirty-bitmaps", []) if b.get("name"))

    before = counts_of(await s.cmd("query-named-block-nodes", {"flat": True}))
    await s.cmd("transaction", {"actions": [
        {"type": "blockdev-backup", "data": {"job-id": "g1", "device": "src", "target": "g1",
                                             "sync": "bitmap", "bitmap": "b0",
                                             "bitmap-mode": "on-success",
                                             "speed": 64 * 1024}},
        {"type": "blockdev-backup", "data": {"job-id": "g2", "device": "src2", "target": "g2",
                                             "sync": "bitmap", "bitmap": "c0",
                                             "bitmap-mode": "on-success",
                                             "speed": 64 * 1024}}],
        "properties": {"completion-mode": "grouped"}})
    await asyncio.sleep(0.3)
    await s.cmd("block-job-cancel", {"device": "g1", "force": True})
    await s.wait_job("g2", record=False)
    after = counts_of(await s.cmd("query-named-block-nodes", {"flat": True}))
    check_eq(after, before, f"{binary}: grouped backups aborted: bitmaps as before")
    s.log.append(("grouped bitmaps", after))
    await cl.close()
    await cl2.close()
    await asyncio.sleep(0.2)  # the server sees the disconnects
    await s.cmd("block-export-del", {"id": "e"})
    await s.cmd("block-export-del", {"id": "e2"})
    await asyncio.sleep(0.2)
    await s.stop()
    # the restored chain (full + incremental) equals the disk at the incremental's start
    r = subprocess.run(["qemu-img", "compare", "-q", "-F", "raw", inc, disk])
    check_eq(r.returncode, 0, f"{binary}: full + incremental == the disk")
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
            return


async def main():
    only = os.environ.get("TXN_ONLY")
    for sc in (scenario_errors, scenario_point_in_time, scenario_snapshot_during_backup,
               scenario_discard_source,
               scenario_top, scenario_fleecing, scenario_fleecing_sync_none,
               scenario_cbw_options, scenario_error_policy, scenario_cbw_errors,
               scenario_cbw_timeout,
               scenario_transactions,
               scenario_incremental):
        if only and only not in sc.__name__:
            continue
        ours = await sc(DAEMON)
        if ours is None:
            continue
        theirs = await sc(QSD) if QSD else None
        if os.environ.get("TXN_VERBOSE"):
            print(sc.__name__, "\n ours  ", ours, "\n theirs", theirs)
        compare(sc.__name__, ours, theirs)
    finish()


if __name__ == "__main__":
    # both daemons run every scenario: more than the default overall limit
    os.environ.setdefault("BLOCKD_TEST_TIMEOUT", "600")
    run(main())
