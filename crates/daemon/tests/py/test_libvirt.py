"""A libvirt-style client: raw socket, CRLF-terminated lines, ids "libvirt-N", no oob,
qmp_capabilities without arguments, schema probing; parse errors and recovery on the same
connection compared with qemu-storage-daemon's."""

from common import QSD, Daemon, Raw, check, check_eq, finish

d = Daemon()
try:
    r = Raw(d.sock)
    g = r.recv_msg()
    check_eq(g["QMP"]["capabilities"], [], "no oob offered")
    n = 1
    r.send(b'{"execute":"qmp_capabilities","id":"libvirt-1"}\r\n')
    check_eq(r.recv_msg(), {"return": {}, "id": "libvirt-1"}, "negotiation")
    for cmd in ["query-version", "query-commands", "query-qmp-schema", "query-iothreads",
                "query-named-block-nodes", "query-block"]:
        n += 1
        reply = r.cmd(cmd, id=f"libvirt-{n}")
        check_eq(reply.get("id"), f"libvirt-{n}", f"{cmd} id")
        check("return" in reply, f"{cmd} succeeds")
    # several commands in one write, answered in order
    batch = b"".join(b'{"execute":"query-version","id":"libvirt-%d"}\r\n' % i
                     for i in range(100, 110))
    r.send(batch)
    ids = [r.recv_msg()["id"] for _ in range(10)]
    check_eq(ids, [f"libvirt-{i}" for i in range(100, 110)], "replies in request order")
    # a command split over several writes
    r.send(b'{"execute":"query-')
    r.send(b'version","id":"libvirt-200"')
    r.send(b'}\r\n')
    check_eq(r.recv_msg()["id"], "libvirt-200", "command split across writes")
    r.close()
finally:
    d.stop()

# Parse errors and recovery: the same bytes to both daemons, the same error replies.
CASES = [
    b'[1,2]\r\n', b'{"foo":1}\r\n', b'{"execute":1}\r\n', b'{"execute":"nope","id":"x"}\r\n',
    b'{"execute":"query-version","arguments":[]}\r\n', b'{"execute":"nope"}}\r\n',
    b']\r\n', b'{"execute" 1}\r\n', b'{"a":tru}\r\n', b'\x01{"execute":"nope"}\r\n',
    b'{"a":"\xff"}\r\n', b'{"a":"\xc3\x28"}\r\n', b'{"execute":"query-version",}\r\n',
    b'{"exec-oob":"query-version"}\r\n', b'"x"\r\n', b'{"a":[1,\x01 2]}{"execute":"nope"}\r\n',
    b'{"execute":"nope","id":"a\\qb"}\r\n', b'{"execute":"nope","id":"a\\ud83d"}\r\n',
    b'{"execute":"nope","id":01}\r\n', b'{"execute":"nope","id":1.}\r\n',
    b'{"execute":"nope","id":"tab\tx"}\r\n', b'{1:2}\r\n', b'[1 2]\r\n', b'{"a":1 "b":2}\r\n',
    b"{'execute':'nope','id':'it\\'s'}\r\n", b'{"execute":"nope","id":"\xed\xa0\x80"}\r\n',
    b'\xfe\r\n', b'[' * 1100 + b']' * 1100 + b'\r\n', b'{"execute":"nope","id":"\\u12"}\r\n',
]


def replies(binary):
    dd = Daemon(binary)
    out = []
    try:
        c = Raw(dd.sock)
        c.negotiate()
        for case in CASES:
            c.send(case)
            # a marker after each case: everything before it is that case's answer
            c.send(b'{"execute":"query-version","id":"marker"}\r\n')
            got = []
            while True:
                m = c.recv_msg()
                if m.get("id") == "marker":
                    break
                got.append(m)
            out.append(got)
        c.close()
    finally:
        dd.stop()
    return out


ours = replies(None)
check(all(len(r) > 0 for r in ours), "every bad input is answered")
if QSD:
    theirs = replies(QSD)
    for case, a, b in zip(CASES, ours, theirs):
        check_eq(a, b, f"replies to {case[:60]!r}")
else:
    print("qemu-storage-daemon not available: comparison skipped")


# pretty=on: the same bytes as qemu-storage-daemon's
def pretty_reply(binary):
    dd = Daemon(binary, pretty=True)
    try:
        c = Raw(dd.sock, timeout=0.5)

        def drain():
            data = b""
            try:
                while True:
                    data += c.s.recv(65536)
            except TimeoutError:
                return data
        c.send(b'{"execute":"qmp_capabilities"}')
        drain()
        c.send(b'{"execute":"query-block","id":[1,{"a":"x/y"}]}')
        data = drain()
        c.close()
    finally:
        dd.stop()
    return data


ours = pretty_reply(None)
check(b"\r\n    \"return\": [\r\n    ]" in ours, f"pretty layout: {ours!r}")
if QSD:
    check_eq(sorted(ours.split(b"\r\n")), sorted(pretty_reply(QSD).split(b"\r\n")),
             "pretty=on lines like qemu-storage-daemon's")
finish()
