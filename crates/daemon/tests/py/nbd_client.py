"""A minimal asyncio NBD client (fixed newstyle, NBD_OPT_GO, simple replies) for tests that
need many writes in flight and to know exactly which of them completed (qemu-io runs one
process per batch and says little about timing)."""

import asyncio
import struct

OPTS_MAGIC = 0x49484156454F5054
REP_MAGIC = 0x3E889045565A9
REQ_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
OPT_GO = 7
REP_ACK = 1
REP_INFO = 3
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH = 0, 1, 2, 3


class NbdError(Exception):
    pass


class Client:
    async def connect(self, path, name):
        self.r, self.w = await asyncio.open_unix_connection(path)
        hdr = await self.r.readexactly(18)
        if hdr[:16] != b"NBDMAGICIHAVEOPT":
            raise NbdError(f"bad greeting {hdr!r}")
        # fixed newstyle, no zeroes
        self.w.write(struct.pack(">I", 3))
        nb = name.encode()
        data = struct.pack(">I", len(nb)) + nb + struct.pack(">H", 0)
        self.w.write(struct.pack(">QII", OPTS_MAGIC, OPT_GO, len(data)) + data)
        await self.w.drain()
        self.size = None
        while True:
            magic, opt, rtype, length = struct.unpack(">QIII", await self.r.readexactly(20))
            payload = await self.r.readexactly(length)
            if magic != REP_MAGIC:
                raise NbdError("bad option reply magic")
            if rtype & 0x80000000:
                raise NbdError(f"NBD_OPT_GO refused: {rtype:#x} {payload!r}")
            if rtype == REP_INFO and struct.unpack(">H", payload[:2])[0] == 0:
                self.size, self.flags = struct.unpack(">QH", payload[2:12])
            if rtype == REP_ACK:
                break
        self.handle = 0
        self.pending = {}
        self.reader = asyncio.ensure_future(self._read_replies())
        return self

    async def _read_replies(self):
        try:
            while True:
                magic, err, handle = struct.unpack(">IIQ", await self.r.readexactly(16))
                if magic != SIMPLE_MAGIC:
                    raise NbdError(f"bad reply magic {magic:#x}")
                fut, rlen = self.pending.pop(handle)
                data = await self.r.readexactly(rlen) if rlen and not err else b""
                if not fut.done():
                    fut.set_result((err, data))
        except Exception as e:  # noqa: BLE001 (every waiter learns of it)
            for fut, _ in self.pending.values():
                if not fut.done():
                    fut.set_exception(NbdError(f"connection lost: {e!r}"))
            self.pending.clear()

    async def _request(self, cmd, offset, length, data=b"", rlen=0):
        self.handle += 1
        h = self.handle
        fut = asyncio.get_running_loop().create_future()
        self.pending[h] = (fut, rlen)
        self.w.write(struct.pack(">IHHQQI", REQ_MAGIC, 0, cmd, h, offset, length) + data)
        await self.w.drain()
        err, out = await fut
        if err:
            raise NbdError(f"NBD error {err} (cmd {cmd} at {offset})")
        return out

    async def write(self, offset, data):
        await self._request(CMD_WRITE, offset, len(data), data)

    async def read(self, offset, length):
        return await self._request(CMD_READ, offset, length, rlen=length)

    async def flush(self):
        await self._request(CMD_FLUSH, 0, 0)

    async def close(self):
        try:
            self.w.write(struct.pack(">IHHQQI", REQ_MAGIC, 0, CMD_DISC, 0, 0, 0))
            await self.w.drain()
        except (ConnectionError, RuntimeError):
            pass
        self.reader.cancel()
        self.w.close()
