"""Hostile input on one monitor while another keeps being served: a 100 MiB JSON token,
2000 nested arrays, invalid UTF-8, control characters, a command flood from a client that
does not read its replies. The bad monitor gets error replies and stays usable."""

import threading
import time

from common import Daemon, Raw, check, check_eq, finish

d = Daemon(monitors=2)
try:
    bad = Raw(d.sock, timeout=60)
    bad.negotiate()
    good = Raw(d.socks[1])
    good.negotiate()

    def good_still_served(what):
        t = time.time()
        r = good.cmd("query-version", id=what)
        check_eq(r.get("id"), what, f"other monitor answered during {what}")
        return time.time() - t

    def send_in_background(data):
        th = threading.Thread(target=bad.send, args=(data,))
        th.start()
        return th

    # 100 MiB token: the size limit error, then the rest of the input resynchronises
    th = send_in_background(b'{"execute":"query-version","id":"' + b"a" * (100 << 20) + b'"}')
    lat = good_still_served("big-token")
    check(lat < 5, f"other monitor waited {lat:.1f}s")
    th.join()
    check_eq(bad.recv_msg(), {"error": {"class": "GenericError",
                                        "desc": "JSON token size limit exceeded"}},
             "token size limit")
    check_eq(bad.recv_msg()["error"]["desc"], "JSON parse error, expecting value",
             "the stray '}' after resynchronising")

    # 2000 nested arrays
    bad.send(b"[" * 2000 + b"]" * 2000)
    check_eq(bad.recv_msg()["error"]["desc"], "JSON nesting depth limit exceeded", "nesting")
    check_eq(bad.recv_msg()["error"]["desc"], "QMP input must be a JSON object",
             "the rest of the arrays")
    for _ in range(1025):
        m = bad.recv_msg()
    check_eq(m["error"]["desc"], "JSON parse error, expecting value", "each extra ']'")

    # invalid UTF-8 in a string, and outside one
    bad.send(b'{"execute":"query-version","id":"\xc3\x28"}')
    check_eq(bad.recv_msg()["error"]["desc"], "JSON parse error, invalid UTF-8 sequence in string",
             "invalid UTF-8")
    bad.send(b'\xff')
    check_eq(bad.recv_msg()["error"]["desc"], "JSON parse error, stray '\ufffd'", "0xff")
    r = bad.cmd("query-version", id="after-utf8")
    check_eq(r.get("id"), "after-utf8", "bad monitor still usable")

    # a flood: 20000 commands written without reading a reply
    flood = b"".join(b'{"execute":"query-version","id":%d}\r\n' % i for i in range(20000))
    th = send_in_background(flood)
    time.sleep(0.5)
    lat = good_still_served("flood")
    check(lat < 5, f"other monitor waited {lat:.1f}s during the flood")
    ids = [bad.recv_msg()["id"] for _ in range(20000)]
    th.join()
    check_eq(ids, list(range(20000)), "every flooded command answered, in order")
    r = bad.cmd("query-version", id="after-flood")
    check_eq(r.get("id"), "after-flood", "bad monitor usable after the flood")

    # a client that disconnects in the middle of a message
    r3 = Raw(d.sock)
    r3.recv_msg()
    r3.send(b'{"execute":"qmp_capabilities"}{"execute":"query-')
    r3.close()
    good_still_served("half-message disconnect")
    bad.close()
    good.close()
finally:
    check_eq(d.stop(), 0, "clean exit on SIGTERM")
finish()
