"""blockdev-reopen of qcow2 nodes: an overlay `top` on a backing node `base` (both made by
qemu-img, their files added as own nodes). The same QMP sequence runs on blockd-storage-daemon
and, with QSD set, on qemu-storage-daemon, and every QMP reply must match (success, or the
same error class and message; qemu-storage-daemon has no human-monitor-command, so the
monitor qemu-io steps run on blockd only and must succeed exactly while the node is writable): `top` goes read-only (a write
through `human-monitor-command` qemu-io then fails, reads still work) and read-write again;
`base` is made writable, written directly (no overlay on the path), and made read-only again;
runtime options (overlap-check, pass-discard-request) change and options left out return to
their defaults; `data-file` cannot change; a corrupt image refuses read-write (blockd only: QEMU's reopen allows it). Afterwards both
images pass `qemu-img check` and qemu-io reads back every pattern through the chain.
Then, blockd only: an image with the dirty bit set refuses read-write in a reopen (no repair
under users) and stays readable."""

import asyncio
import shutil
import struct
import subprocess

from common import QSD, Daemon, ExecuteError, check, check_eq, finish, run

QEMU_IO = shutil.which("qemu-io")
QEMU_IMG = shutil.which("qemu-img")


def img(*args):
    subprocess.run([QEMU_IMG, *args], check=True, capture_output=True)


def make_images(d):
    base, top, bad = d.path("base.qcow2"), d.path("top.qcow2"), d.path("bad.qcow2")
    img("create", "-q", "-f", "qcow2", base, "1M")
    subprocess.run([QEMU_IO, "-c", "write -P 1 0 64k", base], check=True, capture_output=True)
    img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    img("create", "-q", "-f", "qcow2", bad, "1M")
    with open(bad, "r+b") as f:  # the corrupt bit (incompatible features, bit 1)
        f.seek(72)
        bits = struct.unpack(">Q", f.read(8))[0]
        f.seek(72)
        f.write(struct.pack(">Q", bits | 2))
    return base, top, bad


OURS = "blockd only"


def sequence(base, top, bad):
    q = lambda name, file, **kw: {"driver": "qcow2", "node-name": name, "file": file, **kw}  # noqa: E731
    t = lambda **kw: q("top", "f-top", backing="base", **kw)  # noqa: E731
    b = lambda **kw: q("base", "f-base", **kw)  # noqa: E731
    reopen = lambda *opts: ("blockdev-reopen", {"options": list(opts)})  # noqa: E731
    io = lambda node, cmd: ("human-monitor-command",  # noqa: E731
                            {"command-line": f'qemu-io {node} "{cmd}"'})
    return [
        ("blockdev-add", {"driver": "file", "node-name": "f-base", "filename": base}),
        ("blockdev-add", {"driver": "file", "node-name": "f-top", "filename": top}),
        ("blockdev-add", {"driver": "file", "node-name": "f-bad", "filename": bad}),
        ("blockdev-add", b(**{"read-only": True})),
        ("blockdev-add", t()),
        ("blockdev-add", q("bad", "f-bad", **{"read-only": True})),
        io("top", "write -P 2 64k 64k"),
        # top read-only: writes refused, reads work
        reopen(t(**{"read-only": True})),
        ("query-named-block-nodes", {"flat": True}),
        io("top", "write -P 9 64k 4k"),
        io("top", "read -P 2 64k 64k"),
        io("top", "read -P 1 0 64k"),
        # and read-write again
        reopen(t(**{"read-only": False})),
        io("top", "write -P 3 128k 64k"),
        # the backing node writable, written directly, read-only again
        io("base", "write -P 8 192k 4k"),
        reopen(b(**{"read-only": False})),
        io("base", "write -P 4 192k 64k"),
        io("top", "read -P 4 192k 64k"),
        reopen(b(**{"read-only": True})),
        io("base", "write -P 8 192k 4k"),
        io("base", "read -P 4 192k 64k"),
        # runtime options change, and go back to their defaults when left out
        reopen(t(**{"overlap-check": "none", "pass-discard-request": False})),
        io("top", "write -P 5 256k 64k"),
        io("top", "discard 256k 64k"),
        reopen(t(**{"overlap-check": {"template": "all"}})),
        reopen(t(**{"overlap-check": "bogus"})),
        reopen(t(**{"data-file": "f-bad"})),
        io("top", "write -P 6 320k 64k"),
        # a corrupt image stays read-only (blockd only: QEMU's reopen does not look at the
        # corrupt bit and makes the node writable)
        reopen(q("bad", "f-bad", **{"read-only": True})),
        (*reopen(q("bad", "f-bad", **{"read-only": False})), OURS),
        (*reopen(q("bad", "f-bad", **{"read-only": True})), OURS),
        ("blockdev-del", {"node-name": "bad"}),
        ("blockdev-del", {"node-name": "top"}),
        ("blockdev-del", {"node-name": "base"}),
        ("blockdev-del", {"node-name": "f-top"}),
        ("blockdev-del", {"node-name": "f-base"}),
        ("blockdev-del", {"node-name": "f-bad"}),
    ]


def summarize(cmd, ret):
    """What must match between the daemons: for node queries, each node's ro flag."""
    if cmd == "query-named-block-nodes":
        return sorted((n["node-name"], n["ro"]) for n in ret)
    return ret


async def scenario(binary):
    """Run the sequence; qemu-storage-daemon has no human-monitor-command, so there the
    qemu-io steps are left out (their replies are blockd's alone) and so is the data check."""
    d = Daemon(binary=binary)
    name = binary or "blockd"
    try:
        base, top, bad = make_images(d)
        c = await d.client("c")
        replies = []
        for cmd, args, *tag in sequence(base, top, bad):
            if binary is not None and (cmd == "human-monitor-command" or tag):
                continue
            try:
                r = ("ok", summarize(cmd, await c.execute(cmd, args)))
            except ExecuteError as e:
                r = ("error", e.error_class, str(e))
            replies.append((cmd, args, r, tag))
        await c.disconnect()
        for f in (base, top):
            p = subprocess.run([QEMU_IMG, "check", f], capture_output=True, text=True)
            check_eq(p.returncode, 0, f"{name}: qemu-img check {f}: {p.stdout}{p.stderr}")
        if binary is None:
            reads = ["read -P 1 0 64k", "read -P 2 64k 64k", "read -P 3 128k 64k",
                     "read -P 4 192k 64k", "read -P 0 256k 64k", "read -P 6 320k 64k"]
            args = [QEMU_IO, "-f", "qcow2"]
            for r in reads:
                args += ["-c", r]
            p = subprocess.run(args + [top], capture_output=True, text=True)
            check(p.returncode == 0 and "fail" not in p.stdout.lower()
                  and p.stdout.count("read 65536/65536") == len(reads),
                  f"{name}: data through the chain: {p.stdout}{p.stderr}")
        return replies
    finally:
        d.stop()


async def dirty_refused():
    """blockd only: QEMU would repair the refcounts; blockd refuses instead."""
    d = Daemon()
    try:
        path = d.path("dirty.qcow2")
        img("create", "-q", "-f", "qcow2", path, "1M")
        subprocess.run([QEMU_IO, "-c", "write -P 7 0 64k", path], check=True,
                       capture_output=True)
        with open(path, "r+b") as f:  # the dirty bit (incompatible features, bit 0)
            f.seek(72)
            bits = struct.unpack(">Q", f.read(8))[0]
            f.seek(72)
            f.write(struct.pack(">Q", bits | 1))
        c = await d.client("c")
        opts = {"driver": "qcow2", "node-name": "dq", "read-only": True,
                "file": {"driver": "file", "filename": path}}
        await c.execute("blockdev-add", opts)
        try:
            await c.execute("blockdev-reopen", {"options": [{**opts, "read-only": False}]})
            check(False, "a dirty image is made writable in a reopen")
        except ExecuteError as e:
            check("dirty bit" in str(e) and "repair" in str(e),
                  f"the refusal names the dirty bit: {e}")
        out = await c.execute("human-monitor-command",
                              {"command-line": 'qemu-io dq "read -P 7 0 64k"'})
        check("Pattern verification failed" not in out and "read 65536/65536" in out,
              f"the dirty image stays readable: {out}")
        nodes = await c.execute("query-named-block-nodes", {"flat": True})
        check_eq([n["ro"] for n in nodes if n["node-name"] == "dq"], [True], "dq stays read-only")
        await c.disconnect()
    finally:
        d.stop()


async def main():
    ours = await scenario(None)
    for cmd, args, r, _ in ours:
        print("blockd:", cmd, args.get("command-line", ""), r)
    corrupt = [r for _, _, r, tag in ours if tag]
    check_eq(corrupt, [("error", "GenericError",
                        "qcow2: Image is corrupt; cannot be opened read/write"), ("ok", {})],
             "a corrupt image refuses read-write in a reopen")
    await dirty_refused()
    if QSD:
        theirs = await scenario(QSD)
        ours_qmp = [x for x in ours if x[0] != "human-monitor-command" and not x[3]]
        check_eq(len(ours_qmp), len(theirs), "step count")
        for (cmd, args, a, _), (_, _, b, _) in zip(ours_qmp, theirs):
            check_eq(a, b, f"{cmd} {args}")
    # The monitor qemu-io steps: writes succeed exactly while the node is writable.
    outs = [r[1] for cmd, _, r, _ in ours if cmd == "human-monitor-command"]
    refused = [o for o in outs if "read-only" in o]
    check_eq(len(refused), 3, f"writes refused while read-only: {outs}")
    check(all("wrote" in o or "read 65536" in o or "discard" in o
              for o in outs if o not in refused), f"the other qemu-io steps succeed: {outs}")

run(main())
finish()
