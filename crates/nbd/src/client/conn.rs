//! One client connection in transmission, owned by one context (rule 5): requests are sent by
//! tasks of that context, one reader task receives every reply and completes the matching
//! request by cookie. Every length in a reply is checked against the request it answers before
//! a byte is received into memory; a server that breaks the protocol gets the connection
//! dropped and its requests failed, never a crash or a write past a buffer.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::rc::Rc;

use blockd_aio::IoBuf;
use blockd_aio::oneshot;
use event_listener::Event;

use crate::client::Negotiated;
use crate::proto::{self, ReplyHeader, Request};
use crate::sock::{discard, recv_exact, recv_fill, send_all};

/// Error of a request whose connection was lost (the driver may retry it after reconnecting).
pub(crate) fn conn_lost() -> io::Error {
    io::Error::from_raw_os_error(libc::ECONNRESET)
}

pub(crate) fn is_conn_lost(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ECONNRESET)
}

/// Largest non-data chunk payload accepted (a block status chunk of 2^20 extended extents).
const MAX_CHUNK: u64 = 8 + 16 * (1 << 20);

/// The outcome of a request.
pub(crate) struct Outcome {
    pub result: io::Result<()>,
    /// The read buffer, filled.
    pub buf: Option<IoBuf>,
    /// First `base:allocation` extent: (length, flags).
    pub extent: Option<(u64, u64)>,
}

struct Pending {
    req: Request,
    buf: Option<IoBuf>,
    /// Bytes of a read covered by data/hole chunks so far.
    covered: u64,
    /// The read buffer was zeroed (after a partial chunk).
    zeroed: bool,
    extent: Option<(u64, u64)>,
    error: Option<io::Error>,
    tx: Option<oneshot::Sender<Outcome>>,
}

pub(crate) struct Conn {
    fd: OwnedFd,
    pub(crate) neg: NegInfo,
    next_cookie: Cell<u64>,
    pending: RefCell<HashMap<u64, Pending>>,
    writing: Cell<bool>,
    write_event: Event,
    dead: Cell<bool>,
}

/// What the handshake agreed on (without the socket).
#[derive(Debug, Clone, Copy)]
pub(crate) struct NegInfo {
    pub size: u64,
    pub flags: u16,
    pub structured: bool,
    pub extended: bool,
    pub base_ctx: Option<u32>,
    pub min_block: u32,
    pub max_block: u32,
}

impl Conn {
    /// Wrap a negotiated socket and start its reader on the current context.
    pub(crate) fn start(n: Negotiated) -> Rc<Conn> {
        let c = Rc::new(Conn {
            fd: n.fd,
            neg: NegInfo {
                size: n.size,
                flags: n.flags,
                structured: n.structured,
                extended: n.extended,
                base_ctx: n.base_ctx,
                min_block: n.min_block,
                max_block: n.max_block,
            },
            next_cookie: Cell::new(1),
            pending: RefCell::new(HashMap::new()),
            writing: Cell::new(false),
            write_event: Event::new(),
            dead: Cell::new(false),
        });
        let r = c.clone();
        blockd_aio::spawn(async move {
            let e = r.read_replies().await;
            r.kill(e);
        })
        .detach();
        c
    }

    fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    pub(crate) fn is_dead(&self) -> bool {
        self.dead.get()
    }

    /// Fail every pending request and stop using the socket.
    pub(crate) fn kill(&self, _why: io::Error) {
        self.dead.set(true);
        // SAFETY: our own open socket; shutdown touches no memory.
        unsafe {
            libc::shutdown(self.raw(), libc::SHUT_RDWR);
        }
        let all: Vec<Pending> = self.pending.borrow_mut().drain().map(|(_, p)| p).collect();
        for mut p in all {
            if let Some(tx) = p.tx.take() {
                tx.send(Outcome {
                    result: Err(conn_lost()),
                    buf: p.buf.take(),
                    extent: None,
                });
            }
        }
        self.write_event.notify(usize::MAX);
    }

    async fn lock_writer(&self) {
        loop {
            if !self.writing.get() {
                self.writing.set(true);
                return;
            }
            let l = self.write_event.listen();
            if !self.writing.get() {
                continue;
            }
            l.await;
        }
    }

    fn unlock_writer(&self) {
        self.writing.set(false);
        self.write_event.notify(1);
    }

    /// Send a request and wait for its reply.
    pub(crate) async fn request(
        &self,
        mut req: Request,
        payload: Option<IoBuf>,
        buf: Option<IoBuf>,
    ) -> Outcome {
        if self.dead.get() {
            return Outcome {
                result: Err(conn_lost()),
                buf,
                extent: None,
            };
        }
        let cookie = self.next_cookie.get();
        self.next_cookie.set(cookie.wrapping_add(1));
        req.cookie = cookie;
        if self.neg.extended && payload.is_some() {
            req.flags |= proto::CMD_FLAG_PAYLOAD_LEN;
        }
        let (tx, rx) = oneshot::channel();
        self.pending.borrow_mut().insert(
            cookie,
            Pending {
                req,
                buf,
                covered: 0,
                zeroed: false,
                extent: None,
                error: None,
                tx: Some(tx),
            },
        );
        self.lock_writer().await;
        let mut bufs = vec![IoBuf::from_slice(&req.encode(self.neg.extended))];
        bufs.extend(payload);
        let sent = if self.dead.get() {
            Err(conn_lost())
        } else {
            send_all(self.raw(), bufs).await
        };
        self.unlock_writer();
        if let Err(e) = sent {
            self.kill(e);
        }
        match rx.await {
            Ok(o) => o,
            Err(_) => Outcome {
                result: Err(conn_lost()),
                buf: None,
                extent: None,
            },
        }
    }

    /// Say NBD_CMD_DISC (best effort, without waiting) and close at once. Synchronous, so it
    /// works from a destructor even when the owner's loop is not running any more.
    pub(crate) fn disconnect_now(&self) {
        if !self.dead.get() && !self.writing.get() {
            let r = Request {
                flags: 0,
                typ: proto::CMD_DISC,
                cookie: 0,
                offset: 0,
                len: 0,
            };
            let b = r.encode(self.neg.extended);
            // SAFETY: sends from a live local buffer on our own socket; never blocks.
            unsafe {
                libc::send(
                    self.raw(),
                    b.as_ptr().cast(),
                    b.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                );
            }
        }
        self.kill(conn_lost());
    }

    fn finish(&self, cookie: u64) {
        let p = self.pending.borrow_mut().remove(&cookie);
        if let Some(mut p) = p {
            let mut result = match p.error.take() {
                Some(e) => Err(e),
                None => Ok(()),
            };
            if result.is_ok() && p.req.typ == proto::CMD_READ && p.covered != p.req.len {
                result = Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "server reply did not cover the whole read",
                ));
            }
            if result.is_ok() && p.req.typ == proto::CMD_BLOCK_STATUS && p.extent.is_none() {
                result = Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "server sent no extent for base:allocation",
                ));
            }
            if let Some(tx) = p.tx.take() {
                tx.send(Outcome {
                    result,
                    buf: p.buf.take(),
                    extent: p.extent,
                });
            }
        }
    }

    fn with_pending<R>(&self, cookie: u64, f: impl FnOnce(&mut Pending) -> R) -> Option<R> {
        self.pending.borrow_mut().get_mut(&cookie).map(f)
    }

    async fn read_replies(&self) -> io::Error {
        loop {
            match self.read_one().await {
                Ok(()) => {}
                Err(e) => return e,
            }
        }
    }

    async fn read_one(&self) -> io::Result<()> {
        let m = recv_exact(self.raw(), 4).await?;
        let magic = u32::from_be_bytes(m[..4].try_into().expect("4"));
        let hlen = ReplyHeader::len_for_magic(magic)?;
        let rest = recv_exact(self.raw(), hlen - 4).await?;
        let mut hb = m.to_vec();
        hb.extend_from_slice(&rest);
        let h = ReplyHeader::parse(&hb)?;
        let proto_err =
            |msg: &str| Err(io::Error::new(io::ErrorKind::InvalidData, msg.to_string()));
        let req = match self.with_pending(h.cookie(), |p| p.req) {
            Some(r) => r,
            None => return proto_err("reply for an unknown cookie"),
        };
        match h {
            ReplyHeader::Simple { error, cookie } => {
                if self.neg.extended {
                    return proto_err("simple reply with extended headers");
                }
                if error != 0 {
                    self.with_pending(cookie, |p| p.error = Some(proto::nbd_to_errno(error)));
                } else if req.typ == proto::CMD_READ {
                    if self.neg.structured {
                        return proto_err("simple reply to a read with structured replies");
                    }
                    let buf = self.with_pending(cookie, |p| p.buf.take()).flatten();
                    let Some(buf) = buf else {
                        return proto_err("read without a buffer");
                    };
                    let (r, buf) = recv_fill(self.raw(), buf).await;
                    self.with_pending(cookie, |p| {
                        p.buf = Some(buf);
                        p.covered = req.len;
                    });
                    r?;
                }
                self.finish(cookie);
                Ok(())
            }
            ReplyHeader::Chunk {
                flags,
                typ,
                cookie,
                offset: _,
                len,
            } => {
                if !self.neg.structured {
                    return proto_err("structured reply that was not negotiated");
                }
                if self.neg.extended != (magic == proto::EXTENDED_REPLY_MAGIC) {
                    return proto_err("reply header of the wrong kind");
                }
                self.chunk(req, cookie, typ, len).await?;
                if flags & proto::REPLY_FLAG_DONE != 0 {
                    self.finish(cookie);
                }
                Ok(())
            }
        }
    }

    async fn chunk(&self, req: Request, cookie: u64, typ: u16, len: u64) -> io::Result<()> {
        let proto_err = |msg: String| Err(io::Error::new(io::ErrorKind::InvalidData, msg));
        match typ {
            proto::REPLY_TYPE_NONE => {
                if len != 0 {
                    return proto_err(format!("NONE chunk with {len} bytes"));
                }
            }
            proto::REPLY_TYPE_OFFSET_DATA => {
                if req.typ != proto::CMD_READ {
                    return proto_err("data chunk for a request other than read".into());
                }
                if len <= 8 || len - 8 > req.len {
                    return proto_err(format!(
                        "data chunk of {len} bytes for a {} byte read",
                        req.len
                    ));
                }
                let ob = recv_exact(self.raw(), 8).await?;
                let off = u64::from_be_bytes(ob[..8].try_into().expect("8"));
                let n = len - 8;
                if off < req.offset || off.checked_add(n).is_none_or(|e| e > req.offset + req.len) {
                    return proto_err("data chunk outside the request".into());
                }
                let at = (off - req.offset) as usize;
                let whole = at == 0 && n == req.len;
                let buf = self.with_pending(cookie, |p| p.buf.take()).flatten();
                let Some(mut buf) = buf else {
                    return proto_err("read without a buffer".into());
                };
                if whole {
                    let (r, b) = recv_fill(self.raw(), buf).await;
                    self.with_pending(cookie, |p| p.buf = Some(b));
                    r?;
                } else {
                    let zeroed = self.with_pending(cookie, |p| p.zeroed).unwrap_or(true);
                    if !zeroed {
                        buf.as_mut_slice().fill(0);
                    }
                    let tmp = recv_exact(self.raw(), n as usize).await;
                    match tmp {
                        Ok(t) => buf[at..at + n as usize].copy_from_slice(&t),
                        Err(e) => {
                            self.with_pending(cookie, |p| p.buf = Some(buf));
                            return Err(e);
                        }
                    }
                    self.with_pending(cookie, |p| {
                        p.buf = Some(buf);
                        p.zeroed = true;
                    });
                }
                self.with_pending(cookie, |p| p.covered += n);
            }
            proto::REPLY_TYPE_OFFSET_HOLE => {
                if req.typ != proto::CMD_READ || len != 12 {
                    return proto_err(format!("bad hole chunk ({len} bytes)"));
                }
                let b = recv_exact(self.raw(), 12).await?;
                let mut r = proto::Reader::new(&b);
                let off = r.u64()?;
                let n = r.u32()? as u64;
                if n == 0
                    || off < req.offset
                    || off.checked_add(n).is_none_or(|e| e > req.offset + req.len)
                {
                    return proto_err("hole chunk outside the request".into());
                }
                let at = (off - req.offset) as usize;
                self.with_pending(cookie, |p| {
                    if let Some(b) = p.buf.as_mut() {
                        if p.zeroed {
                            // Already zero there.
                        } else {
                            b[at..at + n as usize].fill(0);
                        }
                    }
                    p.covered += n;
                });
            }
            proto::REPLY_TYPE_BLOCK_STATUS | proto::REPLY_TYPE_BLOCK_STATUS_EXT => {
                let ext = typ == proto::REPLY_TYPE_BLOCK_STATUS_EXT;
                if req.typ != proto::CMD_BLOCK_STATUS || ext != self.neg.extended {
                    return proto_err("unexpected block status chunk".into());
                }
                if len > MAX_CHUNK {
                    return proto_err(format!("block status chunk of {len} bytes"));
                }
                let b = recv_exact(self.raw(), len as usize).await?;
                let (id, extents) = proto::parse_block_status(&b, ext)?;
                if Some(id) == self.neg.base_ctx {
                    let first = extents[0];
                    if first.len > req.len && extents.len() > 1 {
                        return proto_err("extents exceed the request".into());
                    }
                    self.with_pending(cookie, |p| {
                        if p.extent.is_none() {
                            p.extent = Some((first.len.min(req.len), first.flags));
                        }
                    });
                }
            }
            t if t & 0x8000 != 0 => {
                if len > 8 + proto::MAX_STRING as u64 + 8 || len < 6 {
                    return proto_err(format!("error chunk of {len} bytes"));
                }
                let b = recv_exact(self.raw(), len as usize).await?;
                let mut r = proto::Reader::new(&b);
                let code = r.u32()?;
                let msg_len = r.u16()? as usize;
                if msg_len > r.remaining() {
                    return proto_err("error message longer than its chunk".into());
                }
                let e = if code == 0 {
                    return proto_err("error chunk with error 0".into());
                } else if t == proto::REPLY_TYPE_ERROR || t == proto::REPLY_TYPE_ERROR_OFFSET {
                    proto::nbd_to_errno(code)
                } else {
                    // An unknown error type: the request failed, the stream is fine.
                    io::Error::from_raw_os_error(libc::EINVAL)
                };
                self.with_pending(cookie, |p| {
                    if p.error.is_none() {
                        p.error = Some(e)
                    }
                });
            }
            t => {
                // Skip what we can, but the spec asks to hang up on unknown non-error chunks.
                let _ = discard(self.raw(), len.min(MAX_CHUNK)).await;
                return proto_err(format!("unknown reply chunk type {t}"));
            }
        }
        Ok(())
    }
}
