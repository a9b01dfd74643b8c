"""Every command through qemu.qmp's QMPClient: success shapes, error classes and messages,
argument checking; error replies compared with qemu-storage-daemon's where it has the command.
"""

import asyncio
import json
import os
import shutil
import subprocess
import time

from common import (QSD, Daemon, ExecuteError, Raw, check, check_eq, finish, run)


async def err(c, cmd, args=None):
    try:
        r = await c.execute(cmd, args)
    except ExecuteError as e:
        return (e.error_class, str(e))
    return ("no error", r)


# (command, arguments) whose errors must be the same as qemu-storage-daemon's
SAME_ERRORS = [
    ("nope", None),
    ("qmp_capabilities", None),
    ("query-version", {"a": 1}),
    ("block_resize", {"node-name": 1, "size": 2}),
    ("block_resize", {"node-name": "x"}),
    ("block_resize", {"node-name": "x", "size": 1, "zz": 1}),
    ("block_resize", {"node-name": "x", "size": 1}),
    ("block_resize", {"size": 1}),
    ("blockdev-add", {"driver": "nul", "node-name": "n0"}),
    ("blockdev-add", {"driver": "null-co", "node-name": "n0", "size": "x"}),
    ("blockdev-add", {"driver": "null-co", "node-name": 5}),
    ("blockdev-add", {"driver": "null-co", "node-name": "n0", "cache": {"direct": "on"}}),
    ("blockdev-add", {"driver": "file"}),
    ("blockdev-del", {"node-name": "n1"}),
    ("blockdev-del", {}),
    ("query-named-block-nodes", {"flat": "yes"}),
    ("query-blockstats", {"query-nodes": 1}),
    ("object-add", {"qom-type": "nope", "id": "x"}),
    ("object-del", {"id": "nope"}),
]


async def compare_with_qsd(ours):
    if not QSD:
        print("qemu-storage-daemon not available: error comparison skipped")
        return
    qsd = Daemon(QSD)
    try:
        theirs = await qsd.client()
        for cmd, args in SAME_ERRORS:
            a = await err(ours, cmd, args)
            b = await err(theirs, cmd, args)
            check_eq(a, b, f"error of {cmd} {args} vs qemu-storage-daemon")
        # blockdev-add duplicate and success shapes
        for c in (ours, theirs):
            await c.execute("blockdev-add", {"driver": "null-co", "node-name": "dup"})
        a = await err(ours, "blockdev-add", {"driver": "null-co", "node-name": "dup"})
        b = await err(theirs, "blockdev-add", {"driver": "null-co", "node-name": "dup"})
        check_eq(a, b, "duplicate node-name error")
        a = await ours.execute("query-named-block-nodes", {"flat": True})
        b = await theirs.execute("query-named-block-nodes", {"flat": True})
        na = [n for n in a if n["node-name"] == "dup"][0]
        nb = [n for n in b if n["node-name"] == "dup"][0]
        for k in ("node-name", "drv", "ro", "file", "backing_file_depth", "cache",
                  "encrypted", "detect_zeroes"):
            check_eq(na.get(k), nb.get(k), f"query-named-block-nodes member {k}")
        for k in ("virtual-size", "filename", "format"):
            check_eq(na["image"].get(k), nb["image"].get(k), f"image member {k}")
        check_eq(set(na) - set(nb), set(), "no member qemu-storage-daemon lacks")
        a = await ours.execute("query-blockstats", {"query-nodes": True})
        b = await theirs.execute("query-blockstats", {"query-nodes": True})
        sa = [s for s in a if s.get("node-name") == "dup"][0]["stats"]
        sb = [s for s in b if s.get("node-name") == "dup"][0]["stats"]
        check_eq(sorted(sa), sorted(sb), "blockstats members")
        check_eq(await ours.execute("query-block"), await theirs.execute("query-block"),
                 "query-block")
        for c in (ours, theirs):
            await c.execute("blockdev-del", {"node-name": "dup"})
        await theirs.disconnect()
    finally:
        qsd.stop()


async def main():
    d = Daemon(args=["--object", "iothread,id=io0,poll-max-ns=1000"])
    try:
        c = await d.client()
        v = await c.execute("query-version")
        check_eq(sorted(v["qemu"]), ["major", "micro", "minor"], "query-version shape")
        check("package" in v, "query-version package")

        names = sorted(x["name"] for x in await c.execute("query-commands"))
        want = sorted([
            "block_resize", "blockdev-add", "blockdev-del", "blockdev-reopen",
            "human-monitor-command", "object-add", "object-del", "qmp_capabilities",
            "query-block", "query-blockstats", "query-commands", "query-iothreads",
            "query-named-block-nodes", "query-qmp-schema", "query-version", "quit",
            "x-blockdev-set-iothread", "x-debug-query-block-graph",
            "nbd-server-start", "nbd-server-stop", "block-export-add", "block-export-del",
            "query-block-exports", "nbd-server-add", "nbd-server-remove",
            # block jobs (crates/daemon/src/jobs.rs)
            "query-jobs", "query-block-jobs", "job-pause", "job-resume", "job-cancel",
            "job-complete", "job-finalize", "job-dismiss", "block-job-pause",
            "block-job-resume", "block-job-cancel", "block-job-complete", "block-job-finalize",
            "block-job-dismiss", "block-job-set-speed", "block-stream", "block-commit",
            "blockdev-mirror", "block-job-change", "drive-mirror", "blockdev-create",
            # transactions, snapshots, backup (transaction.rs, snapshot.rs, backup.rs)
            "transaction", "blockdev-snapshot-sync", "blockdev-snapshot",
            "blockdev-snapshot-internal-sync", "blockdev-snapshot-delete-internal-sync",
            "blockdev-backup", "drive-backup",
            # dirty bitmaps (bitmaps.rs)
            "block-dirty-bitmap-add", "block-dirty-bitmap-remove", "block-dirty-bitmap-clear",
            "block-dirty-bitmap-enable", "block-dirty-bitmap-disable",
            "block-dirty-bitmap-merge", "x-debug-block-dirty-bitmap-sha256"])
        check_eq(names, want, "query-commands lists exactly what works")

        schema = await c.execute("query-qmp-schema")
        by_name = {e["name"]: e for e in schema}
        cmds = sorted(e["name"] for e in schema if e["meta-type"] == "command")
        check_eq(cmds, want, "query-qmp-schema commands")
        resize_args = by_name[by_name["block_resize"]["arg-type"]]
        check_eq(sorted((m["name"], "default" in m) for m in resize_args["members"]),
                 [("device", True), ("node-name", True), ("size", False)],
                 "block_resize arguments in the schema")
        add = by_name[by_name["blockdev-add"]["arg-type"]]
        check_eq(add.get("tag"), "driver", "blockdev-add is a union on driver")
        drv_enum = by_name[[m for m in add["members"] if m["name"] == "driver"][0]["type"]]
        check("null-co" in drv_enum["values"] and "file" in drv_enum["values"],
              "driver enum lists the graph's drivers")
        refs = []
        for e in schema:
            refs += [e[k] for k in ("arg-type", "ret-type", "element-type") if k in e]
            refs += [m["type"] for m in e.get("members", []) if "type" in m]
            refs += [v["type"] for v in e.get("variants", [])]
        check_eq(sorted(set(r for r in refs if r not in by_name)), [],
                 "every type the schema refers to is defined")
        check_eq(len(by_name), len(schema), "schema names are unique")
        check_eq(by_name["x-blockdev-set-iothread"].get("features"), ["unstable"],
                 "x- commands are marked unstable")
        events = [e["name"] for e in schema if e["meta-type"] == "event"]
        check("BLOCK_IO_ERROR" in events and "SHUTDOWN" in events, "events in the schema")

        # unknown command, wrong types, unknown and missing arguments
        check_eq(await err(c, "nope"),
                 ("CommandNotFound", "The command nope has not been found"), "unknown command")
        check_eq(await err(c, "block_resize", {"node-name": 1, "size": 2}),
                 ("GenericError", "Invalid parameter type for 'node-name', expected: string"),
                 "wrong type")
        check_eq(await err(c, "block_resize", {"node-name": "x", "size": 1, "zz": 1}),
                 ("GenericError", "Parameter 'zz' is unexpected"), "unknown argument")
        check_eq(await err(c, "block_resize", {"node-name": "x"}),
                 ("GenericError", "Parameter 'size' is missing"), "missing argument")
        check_eq(await err(c, "x-blockdev-set-iothread", {"node-name": "x", "iothread": 1}),
                 ("GenericError", "Invalid parameter type for 'iothread', expected: value"),
                 "alternate type")

        # block nodes: a raw node over a file node, and null-co
        img = d.path("disk.img")
        with open(img, "wb") as f:
            f.truncate(1 << 20)
        await c.execute("blockdev-add", {"driver": "file", "node-name": "f0", "filename": img})
        await c.execute("blockdev-add", {"driver": "raw", "node-name": "r0", "file": "f0"})
        await c.execute("blockdev-add", {"driver": "null-co", "node-name": "n0",
                                         "size": 4096, "read-zeroes": True})
        nodes = {n["node-name"]: n for n in
                 await c.execute("query-named-block-nodes", {"flat": True})}
        check_eq(sorted(nodes), ["f0", "n0", "r0"], "named nodes")
        check_eq(nodes["r0"]["drv"], "raw", "raw drv")
        check_eq(nodes["r0"]["file"], img, "raw file name comes from its file child")
        check_eq(nodes["f0"]["image"]["virtual-size"], 1 << 20, "file virtual size")
        check_eq(nodes["n0"]["image"]["virtual-size"], 4096, "null size")
        check_eq(nodes["n0"]["file"], "null-co://", "null file name")
        graph = await c.execute("x-debug-query-block-graph")
        ids = {n["name"]: n["id"] for n in graph["nodes"]}
        edges = [(e["parent"], e["child"], e["name"]) for e in graph["edges"]]
        check_eq(edges, [(ids["r0"], ids["f0"], "file")], "block graph edges")
        stats = await c.execute("query-blockstats", {"query-nodes": True})
        r0 = [s for s in stats if s["node-name"] == "r0"][0]
        check_eq(r0["parent"]["node-name"], "f0", "blockstats parent is the file child")
        check_eq(await c.execute("query-block"), [], "query-block: no backends")
        check_eq(await c.execute("query-blockstats"), [], "query-blockstats: no backends")

        # block_resize
        await c.execute("block_resize", {"node-name": "r0", "size": 2 << 20})
        check_eq(os.path.getsize(img), 2 << 20, "block_resize grew the file")
        check_eq(await err(c, "block_resize", {"node-name": "r0", "size": -1}),
                 ("GenericError", "Parameter 'size' expects a >0 size"), "negative size")

        # blockdev-del: in use, then in order
        e = await err(c, "blockdev-del", {"node-name": "f0"})
        check(e[0] == "GenericError" and "busy" in e[1], f"deleting a used node fails: {e}")

        # blockdev-reopen: read-only on and off again
        await c.execute("blockdev-reopen", {"options": [
            {"driver": "raw", "node-name": "r0", "file": "f0", "read-only": True}]})
        nodes = {n["node-name"]: n for n in
                 await c.execute("query-named-block-nodes", {"flat": True})}
        check_eq(nodes["r0"]["ro"], True, "reopened read-only")
        out = await c.execute("human-monitor-command",
                              {"command-line": 'qemu-io r0 "write 0 512"'})
        check("read-only" in out, f"write to a read-only node refused: {out!r}")
        await c.execute("blockdev-reopen", {"options": [
            {"driver": "raw", "node-name": "r0", "file": "f0"}]})
        out = await c.execute("human-monitor-command",
                              {"command-line": 'qemu-io r0 "write -P 0x5a 0 512"'})
        check("wrote 512/512 bytes at offset 0" in out, f"writable again: {out!r}")
        check(out.endswith("\r\n"), "HMP output lines end with CRLF")
        e = await err(c, "blockdev-reopen", {"options": [
            {"driver": "file", "node-name": "f0", "filename": img, "read-only": True}]})
        check_eq(e, ("GenericError", "Read-only block node 'f0' cannot support read-write users"),
                 "reopen read-only under a writer")
        e = await err(c, "blockdev-reopen", {"options": [
            {"driver": "null-co", "node-name": "r0"}]})
        check_eq(e, ("GenericError", "Cannot change the option 'driver'"), "reopen driver")

        await c.execute("blockdev-del", {"node-name": "r0"})
        await c.execute("blockdev-del", {"node-name": "f0"})
        with open(img, "rb") as f:
            check_eq(f.read(512), b"\x5a" * 512, "data written through the monitor")

        # a format driver from another crate (qcow2), with its file opened inline
        if "qcow2" in drv_enum["values"] and shutil.which("qemu-img"):
            q = d.path("q.qcow2")
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", q, "8M"], check=True)
            await c.execute("blockdev-add", {"driver": "qcow2", "node-name": "q",
                                             "file": {"driver": "file", "filename": q}})
            out = await c.execute("human-monitor-command",
                                  {"command-line": 'qemu-io q "write -P 0x66 64k 64k"'})
            check("wrote 65536/65536" in out, f"qcow2 write: {out!r}")
            info = {n["node-name"]: n for n in await c.execute("query-named-block-nodes")}["q"]
            check_eq((info["drv"], info["file"], info["image"]["virtual-size"],
                      info["image"].get("cluster-size")),
                     ("qcow2", q, 8 << 20, 65536), "qcow2 node info")
            await c.execute("blockdev-del", {"node-name": "q"})
            # a backing chain the qcow2 driver opens itself
            base = d.path("base.raw")
            top = d.path("top.qcow2")
            subprocess.run(["qemu-img", "create", "-q", "-f", "raw", base, "4M"], check=True)
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw",
                            "-F", "raw", top], check=True)
            spec = {"driver": "qcow2", "node-name": "top",
                    "file": {"driver": "file", "filename": top}}
            await c.execute("blockdev-add", spec)
            ours = {n["node-name"]: n for n in await c.execute("query-named-block-nodes")}["top"]
            graph = await c.execute("x-debug-query-block-graph")
            perms = {p for e in graph["edges"] for p in e["perm"] + e["shared-perm"]}
            check(perms <= {"consistent-read", "write", "write-unchanged", "resize"},
                  f"QAPI permission names: {perms}")
            await c.execute("blockdev-del", {"node-name": "top"})
            if QSD:
                qd = Daemon(QSD, args=["--blockdev", json.dumps(spec)])
                try:
                    qc = await qd.client()
                    theirs = {n["node-name"]: n for n in
                              await qc.execute("query-named-block-nodes")}["top"]
                    await qc.disconnect()
                finally:
                    qd.stop()
                for k in ("drv", "file", "backing_file", "backing_file_depth", "ro"):
                    check_eq(ours.get(k), theirs.get(k), f"chain top member {k}")
                for k in ("filename", "format", "virtual-size", "cluster-size",
                          "full-backing-filename"):
                    check_eq(ours["image"].get(k), theirs["image"].get(k), f"chain image {k}")
                for k in ("filename", "format", "virtual-size"):
                    check_eq(ours["image"]["backing-image"].get(k),
                             theirs["image"]["backing-image"].get(k), f"backing-image {k}")
            p = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read -P 0x66 64k 64k", q],
                               capture_output=True, text=True)
            check("read 65536/65536" in p.stdout, f"qemu-io reads blockd's qcow2 write: {p.stdout}")
        else:
            print("qcow2 driver or qemu-img missing: qcow2 check skipped")

        # human-monitor-command errors come back as text
        out = await c.execute("human-monitor-command", {"command-line": 'qemu-io zz "read 0 1"'})
        check_eq(out, "Error: Cannot find device='' nor node-name='zz'\r\n", "HMP unknown node")
        out = await c.execute("human-monitor-command", {"command-line": 'qemu-io n0 "abort"'})
        check("refused" in out, f"qemu-io abort does not end the daemon: {out!r}")
        out = await c.execute("human-monitor-command", {"command-line": 'qemu-io n0 "open x"'})
        check_eq(out, 'command "open" not found\r\n', "open is not a monitor qemu-io command")
        out = await c.execute("human-monitor-command", {"command-line": "info block"})
        check_eq(out, "unknown command: 'info'\r\n", "HMP unknown command")
        out = await c.execute("human-monitor-command",
                              {"command-line": 'qemu-io n0 "read -P 0 0 4096"'})
        check("read 4096/4096 bytes at offset 0" in out, f"HMP read: {out!r}")

        # iothreads
        its = await c.execute("query-iothreads")
        check_eq([(t["id"], t["poll-max-ns"]) for t in its], [("io0", 1000)], "query-iothreads")
        check(its[0]["thread-id"] > 0, "iothread thread-id")
        await c.execute("object-add", {"qom-type": "iothread", "id": "io1", "poll-grow": 4})
        check_eq(await err(c, "object-add", {"qom-type": "iothread", "id": "io1"}),
                 ("GenericError",
                  "attempt to add duplicate property 'io1' to object (type 'container')"),
                 "duplicate iothread")
        check_eq(await err(c, "object-add", {"qom-type": "iothread", "id": "io2", "bogus": 1}),
                 ("GenericError", "Parameter 'bogus' is unexpected"), "unknown property")
        await c.execute("x-blockdev-set-iothread", {"node-name": "n0", "iothread": "io1"})
        check_eq(await err(c, "object-del", {"id": "io1"}),
                 ("GenericError", "object 'io1' is in use, can not be deleted"), "iothread in use")
        check_eq(await err(c, "x-blockdev-set-iothread", {"node-name": "n0", "iothread": "zz"}),
                 ("GenericError", "Cannot find iothread zz"), "unknown iothread")
        check_eq(await err(c, "x-blockdev-set-iothread", {"node-name": "zz", "iothread": "io1"}),
                 ("GenericError", "Cannot find node zz"), "unknown node")
        await c.execute("x-blockdev-set-iothread", {"node-name": "n0", "iothread": None})
        await c.execute("object-del", {"id": "io1"})
        check_eq([t["id"] for t in await c.execute("query-iothreads")], ["io0"], "io1 deleted")

        await compare_with_qsd(c)

        # a slow command (qemu-io's sleep, awaited on the main context) holds up neither
        # another monitor nor the main loop
        slow_client = await d.client("slow")
        slow = asyncio.ensure_future(slow_client.execute(
            "human-monitor-command", {"command-line": 'qemu-io n0 "sleep 3000"'}))
        await asyncio.sleep(0.2)
        t = time.time()
        await c.execute("query-named-block-nodes")
        check(time.time() - t < 2 and not slow.done(),
              f"other monitor answered during a slow command ({time.time() - t:.2f}s)")
        check_eq(await slow, "", "qemu-io sleep output")
        await slow_client.disconnect()

        # negotiation mode, through a raw client
        raw = Raw(d.sock)
        greeting = raw.recv_msg()
        check_eq(sorted(greeting["QMP"]), ["capabilities", "version"], "greeting")
        check_eq(raw.cmd("query-version"),
                 {"error": {"class": "CommandNotFound",
                            "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}},
                 "negotiation mode refuses other commands")
        check_eq(raw.cmd("qmp_capabilities", {"enable": ["oob"]}, id=1)["error"]["desc"],
                 "Capability 'oob' not available", "oob is not offered")
        check_eq(raw.cmd("qmp_capabilities", id={"x": [1, None]}),
                 {"return": {}, "id": {"x": [1, None]}}, "any id is echoed")
        raw.close()

        # a second monitor receives events: monitor B quits, A gets SHUTDOWN
        b = await d.client("second")
        await b.execute("quit")
        ev = await c.events.get()
        check_eq(ev["event"], "SHUTDOWN", "event name")
        check_eq(ev["data"], {"guest": False, "reason": "host-qmp-quit"}, "event data")
        check(ev["timestamp"]["seconds"] > 1600000000 and
              0 <= ev["timestamp"]["microseconds"] < 1000000, "event timestamp")
        await c.disconnect()
        await b.disconnect()
        check_eq(d.proc.wait(10), 0, "exit status after quit")
    finally:
        d.stop()


run(main())
finish()
