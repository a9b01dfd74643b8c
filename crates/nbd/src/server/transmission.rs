//! The transmission phase of one connection, run entirely on the export's context.
//!
//! One reader loop parses requests (and receives write payloads) and spawns a task per request,
//! at most [`MAX_IN_FLIGHT`] at a time; tasks finish in any order and queue their encoded
//! replies; one writer task sends whatever is queued, several replies per `sendmsg`. A reply is
//! queued whole, so chunks of different requests never interleave mid-chunk.
//!
//! Large reads of data that lies plainly in a host file (`raw` over `file`) are spliced: the
//! file's pages go into a pipe by reference and from the pipe into the socket, so the server
//! copies none of the bytes (QEMU's server reads into a buffer and sends it: two copies).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use blockd_aio::IoBuf;
use blockd_aio::ops::{self, Pipe};
use blockd_block::drivers::file::FileDriver;
use blockd_block::drivers::raw::RawDriver;
use blockd_block::{BlockBackend, Node, ReqFlags};
use event_listener::Event;

use crate::proto::{self, Put, Request};
use crate::server::handshake::Session;
use crate::server::{ConnSocket, DetectZeroes};
use crate::sock::{RecvBuf, discard, recv_fill_from, send_all};

/// Requests served concurrently per connection.
pub(crate) const MAX_IN_FLIGHT: usize = 64;
/// Extents per block status chunk at most (the spec allows 2^20; this keeps replies small).
const MAX_EXTENTS: usize = 1 << 16;
/// Iovecs per `sendmsg`.
const MAX_BATCH: usize = 256;
/// How far past a read a block status query may look, so that one query covers the reads that
/// follow (sequential readers then cost no query at all; see [`Conn::data_extent`]).
const STATUS_LOOKAHEAD: u64 = 64 << 20;
/// Data extents at least this long are spliced (see [`splice_in`]); below it copying costs less
/// than the extra ring operations.
const SPLICE_MIN: u64 = 64 << 10;
/// Pipe size asked for (the default `fs.pipe-max-size`); the kernel may give less.
const PIPE_SIZE: usize = 1 << 20;
/// Pipes per connection at most (two descriptors each).
const MAX_PIPES: usize = 16;

/// A reply chunk being built: type, payload bytes, then payload data waiting in pipes.
type Chunk = (u16, Vec<IoBuf>, Vec<(Pipe, usize)>);

/// An encoded reply: bytes, plus data waiting in pipes to go out between them.
struct Reply {
    bufs: Vec<IoBuf>,
    /// (index in `bufs` the pipe's bytes go before, pipe, bytes in it), in order.
    spliced: Vec<(usize, Pipe, usize)>,
}

impl From<Vec<IoBuf>> for Reply {
    fn from(bufs: Vec<IoBuf>) -> Reply {
        Reply {
            bufs,
            spliced: Vec::new(),
        }
    }
}

impl Reply {
    /// Append `other` (several replies go out in one send).
    fn append(&mut self, other: Reply) {
        let base = self.bufs.len();
        self.bufs.extend(other.bufs);
        self.spliced.extend(
            other
                .spliced
                .into_iter()
                .map(|(at, p, n)| (at + base, p, n)),
        );
    }

    fn parts(&self) -> usize {
        self.bufs.len() + self.spliced.len()
    }
}

struct Conn {
    fd: RawFd,
    session: Session,
    backend: BlockBackend,
    size: u64,
    out: RefCell<VecDeque<Reply>>,
    out_event: Event,
    closing: Cell<bool>,
    /// A send is in progress (by the writer task or a request task).
    sending: Cell<bool>,
    broken: Cell<bool>,
    in_flight: Cell<usize>,
    slot_event: Event,
    /// A range last reported as data (not reading as zeroes): reads inside it skip the block
    /// status query that decides between OFFSET_DATA and OFFSET_HOLE chunks (for a raw file,
    /// two lseek(2) calls per read). A stale entry is harmless: the bytes are always read from
    /// the backend, so at worst a range that became a hole is sent as data. Cleared by this
    /// connection's own TRIM and WRITE_ZEROES so its sparse reads stay sparse.
    data_extent: Cell<(u64, u64)>,
    /// Empty pipes for spliced reads, how many exist (in the pool or holding data), and a
    /// notification when one comes back.
    pipes: RefCell<Vec<Pipe>>,
    pipes_live: Cell<usize>,
    pipe_event: Event,
    /// Cleared when splicing fails in a way that will not change (no kernel support, a file
    /// system without splice): reads are then copied.
    splice_ok: Cell<bool>,
}

pub(crate) async fn run(sock: ConnSocket, session: Session) {
    let backend = session.export.backend().clone();
    let conn = Rc::new(Conn {
        fd: sock.raw(),
        size: backend.length(),
        backend,
        session,
        out: RefCell::new(VecDeque::new()),
        out_event: Event::new(),
        closing: Cell::new(false),
        sending: Cell::new(false),
        broken: Cell::new(false),
        in_flight: Cell::new(0),
        slot_event: Event::new(),
        data_extent: Cell::new((0, 0)),
        pipes: RefCell::new(Vec::new()),
        pipes_live: Cell::new(0),
        pipe_event: Event::new(),
        splice_ok: Cell::new(true),
    });
    let writer = blockd_aio::spawn(writer(conn.clone()));
    reader(&conn).await;
    // Answer what was admitted, then close.
    wait_until(&conn.slot_event, || conn.in_flight.get() == 0).await;
    conn.closing.set(true);
    conn.out_event.notify(usize::MAX);
    writer.await;
    drop(sock);
}

async fn wait_until(ev: &Event, cond: impl Fn() -> bool) {
    loop {
        if cond() {
            return;
        }
        let l = ev.listen();
        if cond() {
            return;
        }
        l.await;
    }
}

async fn writer(conn: Rc<Conn>) {
    loop {
        if conn.sending.get() {
            // A request task is sending its own reply; it wakes us when done.
            let l = conn.out_event.listen();
            if conn.sending.get() {
                l.await;
            }
            continue;
        }
        let batch: Reply = {
            let mut q = conn.out.borrow_mut();
            let mut b = Reply::from(Vec::new());
            while let Some(front) = q.front() {
                if b.parts() > 0 && b.parts() + front.parts() > MAX_BATCH {
                    break;
                }
                b.append(q.pop_front().expect("front"));
            }
            b
        };
        if batch.parts() == 0 {
            if conn.closing.get() {
                return;
            }
            let l = conn.out_event.listen();
            if !conn.out.borrow().is_empty() || conn.closing.get() {
                continue;
            }
            l.await;
            continue;
        }
        if conn.broken.get() {
            // Drop replies nobody can receive (and count their pipes out).
            lose_pipes(&conn, batch.spliced.len());
            continue;
        }
        send_locked(&conn, batch).await;
    }
}

/// Send under the `sending` flag; a failed send breaks the connection.
async fn send_locked(conn: &Conn, reply: Reply) {
    conn.sending.set(true);
    let r = send_reply(conn, reply).await;
    conn.sending.set(false);
    if r.is_err() {
        conn.broken.set(true);
        // Make the reader stop too.
        // SAFETY: our own open socket; shutdown touches no memory.
        unsafe {
            libc::shutdown(conn.fd, libc::SHUT_RDWR);
        }
    }
    conn.out_event.notify(usize::MAX);
}

/// The bytes of `reply` in order, pipes spliced between them; emptied pipes go back to the
/// pool (a pipe that failed is dropped: it may still hold data).
async fn send_reply(conn: &Conn, reply: Reply) -> io::Result<()> {
    let Reply { mut bufs, spliced } = reply;
    let mut done = 0;
    let mut left = spliced.len();
    for (at, pipe, len) in spliced {
        let rest = bufs.split_off(at - done);
        done = at;
        let r = send_all(conn.fd, std::mem::replace(&mut bufs, rest)).await;
        let r = match r {
            Ok(()) => splice_out(conn.fd, pipe, len).await,
            Err(e) => Err(e),
        };
        left -= 1;
        match r {
            Ok(pipe) => put_pipe(conn, pipe),
            Err(e) => {
                // This pipe and the ones not reached are dropped with the reply.
                lose_pipes(conn, left + 1);
                return Err(e);
            }
        }
    }
    send_all(conn.fd, bufs).await
}

/// Move `len` bytes from `pipe` into the socket.
async fn splice_out(fd: RawFd, mut pipe: Pipe, mut len: usize) -> io::Result<Pipe> {
    while len > 0 {
        let (r, p) = ops::splice_pipe_to(pipe, fd, len).await;
        pipe = p;
        match r {
            Ok(0) => return Err(io::Error::from_raw_os_error(libc::EPIPE)),
            Ok(n) => len -= n.min(len),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // A non-blocking socket (an inherited one) is full: wait for room.
                ops::poll_add(fd, libc::POLLOUT).await?;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(pipe)
}

fn put_pipe(conn: &Conn, pipe: Pipe) {
    conn.pipes.borrow_mut().push(pipe);
    conn.pipe_event.notify(1);
}

/// `n` pipes were dropped (they may have held data).
fn lose_pipes(conn: &Conn, n: usize) {
    conn.pipes_live.set(conn.pipes_live.get() - n);
    conn.pipe_event.notify(n);
}

fn queue(conn: &Conn, reply: Reply) {
    conn.out.borrow_mut().push_back(reply);
    conn.out_event.notify(usize::MAX);
}

/// Send a reply: directly when nothing else is being sent or waits (one task hop less at low
/// queue depth), else through the writer's queue (batched).
async fn deliver(conn: &Conn, reply: Reply) {
    if !conn.sending.get() && conn.out.borrow().is_empty() && !conn.broken.get() {
        send_locked(conn, reply).await;
    } else {
        queue(conn, reply);
    }
}

/// All bytes zero (word-wise: this runs on every write when detect-zeroes is on).
fn is_zero(b: &[u8]) -> bool {
    let mut chunks = b.chunks_exact(64);
    for c in &mut chunks {
        let mut acc = 0u64;
        for w in c.chunks_exact(8) {
            acc |= u64::from_ne_bytes(w.try_into().expect("8 bytes"));
        }
        if acc != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&x| x == 0)
}

fn buf(v: &[u8]) -> IoBuf {
    IoBuf::from_slice(v)
}

/// Receive buffer of a connection: room for many request headers with small payloads.
const RECV_BUF: usize = 64 << 10;
/// Write payloads from this size on are received in place, not through the receive buffer.
const LARGE_PAYLOAD: u64 = 32 << 10;

async fn reader(conn: &Rc<Conn>) {
    let extended = conn.session.extended;
    let hlen = if extended {
        proto::EXTENDED_REQUEST_LEN
    } else {
        proto::COMPACT_REQUEST_LEN
    };
    let mut rb = RecvBuf::new(RECV_BUF);
    // After a large write, expect another: receive its header alone, its payload in place.
    let mut recv_max = RECV_BUF;
    loop {
        wait_until(&conn.slot_event, || conn.in_flight.get() < MAX_IN_FLIGHT).await;
        if conn.broken.get() {
            return;
        }
        if rb.fill(conn.fd, hlen, recv_max).await.is_err() {
            return;
        }
        let Ok(req) = Request::parse(rb.take(hlen), extended) else {
            // Wrong magic: the stream cannot be resynchronised.
            return;
        };
        if req.typ == proto::CMD_DISC {
            // No reply, whatever its flags, offset or length: finish in-flight work and close.
            return;
        }
        let payload_len = req.payload_len(extended);
        recv_max = if payload_len >= LARGE_PAYLOAD {
            hlen
        } else {
            RECV_BUF
        };
        let mut payload = None;
        if let Err(errno) = validate(conn, &req) {
            if payload_len > 0 {
                let rest = payload_len - rb.skip(payload_len);
                if payload_len > u32::MAX as u64 || discard(conn.fd, rest).await.is_err() {
                    return;
                }
            }
            queue(conn, error_reply(conn, &req, errno, "").into());
            continue;
        }
        if payload_len > 0 {
            // What came with the header is copied; the rest is received in place.
            let mut b = IoBuf::new(payload_len as usize, 4096);
            let have = rb.take_into(&mut b);
            let (r, b) = recv_fill_from(conn.fd, b, have).await;
            if r.is_err() {
                return;
            }
            payload = Some(b);
        }
        conn.in_flight.set(conn.in_flight.get() + 1);
        let c = conn.clone();
        blockd_aio::spawn(async move {
            let reply = handle(&c, req, payload).await;
            deliver(&c, reply).await;
            c.in_flight.set(c.in_flight.get() - 1);
            c.slot_event.notify(usize::MAX);
        })
        .detach();
        // With another header already received, go on parsing: the requests started this turn
        // all submit their I/O in one io_uring_enter. Before asking for more bytes, let them
        // start (submit their I/O), so that it reaches the kernel with the receive and is not
        // queued behind a receive that at low depth only completes after the reply.
        if rb.available() < hlen {
            blockd_aio::yield_now().await;
        }
    }
}

/// Checks before serving: an error value for a request that must be refused.
fn validate(conn: &Conn, r: &Request) -> Result<(), u32> {
    let s = &conn.session;
    let writable = s.export.writable();
    let known = match r.typ {
        proto::CMD_READ => proto::CMD_FLAG_FUA | if s.structured { proto::CMD_FLAG_DF } else { 0 },
        proto::CMD_WRITE => proto::CMD_FLAG_FUA,
        proto::CMD_WRITE_ZEROES => {
            proto::CMD_FLAG_FUA | proto::CMD_FLAG_NO_HOLE | proto::CMD_FLAG_FAST_ZERO
        }
        proto::CMD_BLOCK_STATUS => proto::CMD_FLAG_FUA | proto::CMD_FLAG_REQ_ONE,
        proto::CMD_DISC | proto::CMD_FLUSH | proto::CMD_TRIM | proto::CMD_CACHE => {
            proto::CMD_FLAG_FUA
        }
        _ => return Err(proto::EINVAL),
    };
    let known = known
        | if s.extended && r.typ == proto::CMD_WRITE {
            proto::CMD_FLAG_PAYLOAD_LEN
        } else {
            0
        };
    if r.flags & !known != 0 {
        return Err(proto::EINVAL);
    }
    if (r.typ == proto::CMD_READ || r.typ == proto::CMD_WRITE) && r.len > proto::MAX_PAYLOAD as u64
    {
        return Err(proto::EINVAL);
    }
    let is_write = matches!(
        r.typ,
        proto::CMD_WRITE | proto::CMD_TRIM | proto::CMD_WRITE_ZEROES
    );
    if is_write && !writable {
        return Err(proto::EPERM);
    }
    let in_range = r.offset.checked_add(r.len).is_some_and(|e| e <= conn.size);
    match r.typ {
        proto::CMD_READ | proto::CMD_TRIM | proto::CMD_CACHE | proto::CMD_BLOCK_STATUS
            if !in_range =>
        {
            return Err(proto::EINVAL);
        }
        proto::CMD_WRITE | proto::CMD_WRITE_ZEROES if !in_range => return Err(proto::ENOSPC),
        _ => {}
    }
    if r.typ == proto::CMD_BLOCK_STATUS {
        if !s.structured
            || (s.base_ctx.is_none() && s.depth_ctx.is_none() && s.bitmap_ctx.is_empty())
        {
            return Err(proto::EINVAL);
        }
        if r.len == 0 {
            return Err(proto::EINVAL);
        }
    }
    Ok(())
}

fn done_reply(conn: &Conn, r: &Request) -> Vec<IoBuf> {
    if conn.session.structured {
        vec![buf(&proto::chunk_header(
            conn.session.extended,
            proto::REPLY_FLAG_DONE,
            proto::REPLY_TYPE_NONE,
            r.cookie,
            r.offset,
            0,
        ))]
    } else {
        vec![buf(&proto::simple_reply(0, r.cookie))]
    }
}

fn error_reply(conn: &Conn, r: &Request, errno: u32, msg: &str) -> Vec<IoBuf> {
    if conn.session.structured {
        let msg = proto::clamp_string(msg);
        let mut p = Vec::new();
        p.put_u32(errno);
        p.put_u16(msg.len() as u16);
        p.extend_from_slice(msg.as_bytes());
        let mut h = proto::chunk_header(
            conn.session.extended,
            proto::REPLY_FLAG_DONE,
            proto::REPLY_TYPE_ERROR,
            r.cookie,
            r.offset,
            p.len() as u64,
        );
        h.extend_from_slice(&p);
        vec![buf(&h)]
    } else {
        vec![buf(&proto::simple_reply(errno, r.cookie))]
    }
}

fn io_reply(conn: &Conn, r: &Request, res: io::Result<()>) -> Vec<IoBuf> {
    match res {
        Ok(()) => done_reply(conn, r),
        Err(e) => error_reply(conn, r, proto::errno_to_nbd(&e), ""),
    }
}

async fn handle(conn: &Conn, r: Request, payload: Option<IoBuf>) -> Reply {
    match r.typ {
        proto::CMD_READ => read(conn, &r).await,
        _ => handle_other(conn, r, payload).await.into(),
    }
}

async fn handle_other(conn: &Conn, r: Request, payload: Option<IoBuf>) -> Vec<IoBuf> {
    let b = &conn.backend;
    let fua = r.flags & proto::CMD_FLAG_FUA != 0;
    match r.typ {
        proto::CMD_WRITE => {
            let Some(data) = payload else {
                return done_reply(conn, &r); // zero-length write
            };
            let cfg = &conn.session.export.cfg;
            let durable = fua || cfg.writethrough;
            let flags = if durable {
                ReqFlags::FUA
            } else {
                ReqFlags::NONE
            };
            if cfg.detect_zeroes != DetectZeroes::Off && is_zero(&data) {
                let flags = if cfg.detect_zeroes == DetectZeroes::Unmap {
                    flags | ReqFlags::MAY_UNMAP
                } else {
                    flags
                };
                conn.data_extent.set((0, 0));
                let res = b.write_zeroes(r.offset, data.len() as u64, flags).await;
                return io_reply(conn, &r, res);
            }
            let (res, _) = b.write(r.offset, data, flags).await;
            io_reply(conn, &r, res)
        }
        proto::CMD_FLUSH => io_reply(conn, &r, b.flush().await),
        proto::CMD_TRIM => {
            conn.data_extent.set((0, 0));
            let mut res = if r.len == 0 {
                Ok(())
            } else {
                b.discard(r.offset, r.len).await
            };
            if res.is_ok() && fua {
                res = b.flush().await;
            }
            io_reply(conn, &r, res)
        }
        proto::CMD_WRITE_ZEROES => {
            conn.data_extent.set((0, 0));
            let mut flags = if fua { ReqFlags::FUA } else { ReqFlags::NONE };
            if r.flags & proto::CMD_FLAG_NO_HOLE == 0 {
                flags = flags | ReqFlags::MAY_UNMAP;
            }
            if r.flags & proto::CMD_FLAG_FAST_ZERO != 0 {
                flags = flags | ReqFlags::NO_FALLBACK;
            }
            let res = if r.len == 0 {
                Ok(())
            } else {
                b.write_zeroes(r.offset, r.len, flags).await
            };
            io_reply(conn, &r, res)
        }
        proto::CMD_CACHE => {
            // Advisory: read (part of) the range so it is warm; the data is dropped.
            let mut off = r.offset;
            let end = r.offset + r.len.min(proto::MAX_PAYLOAD as u64);
            let mut res = Ok(());
            while off < end && res.is_ok() {
                let n = (end - off).min(1 << 20);
                let (x, _) = b.read(off, IoBuf::new(n as usize, 4096)).await;
                res = x;
                off += n;
            }
            io_reply(conn, &r, res)
        }
        proto::CMD_BLOCK_STATUS => match block_status(conn, &r).await {
            Ok(v) => v,
            Err(e) => error_reply(conn, &r, proto::errno_to_nbd(&e), ""),
        },
        _ => error_reply(conn, &r, proto::EINVAL, "unknown command"),
    }
}

/// Encode chunks: (type, payload pieces), the last one flagged DONE.
fn chunks(conn: &Conn, r: &Request, parts: Vec<(u16, Vec<IoBuf>)>) -> Vec<IoBuf> {
    let parts = parts.into_iter().map(|(t, p)| (t, p, Vec::new())).collect();
    chunks_spliced(conn, r, parts).bufs
}

/// [`chunks`] whose payloads may end with data in pipes.
fn chunks_spliced(conn: &Conn, r: &Request, parts: Vec<Chunk>) -> Reply {
    let n = parts.len();
    let mut out = Vec::with_capacity(n * 2);
    let mut spliced = Vec::new();
    for (i, (typ, pieces, pipes)) in parts.into_iter().enumerate() {
        let len: usize = pieces.iter().map(|p| p.len()).sum::<usize>()
            + pipes.iter().map(|(_, n)| n).sum::<usize>();
        let flags = if i + 1 == n {
            proto::REPLY_FLAG_DONE
        } else {
            0
        };
        out.push(buf(&proto::chunk_header(
            conn.session.extended,
            flags,
            typ,
            r.cookie,
            r.offset,
            len as u64,
        )));
        out.extend(pieces);
        for (p, n) in pipes {
            spliced.push((out.len(), p, n));
        }
    }
    Reply { bufs: out, spliced }
}

async fn read(conn: &Conn, r: &Request) -> Reply {
    let b = &conn.backend;
    let len = r.len as usize;
    if !conn.session.structured {
        if len == 0 {
            return done_reply(conn, r).into();
        }
        let header = buf(&proto::simple_reply(0, r.cookie));
        if let Some(pipes) = splice_in(conn, r.offset, r.len).await {
            return Reply {
                bufs: vec![header],
                spliced: pipes.into_iter().map(|(p, n)| (1, p, n)).collect(),
            };
        }
        let (res, data) = b.read(r.offset, IoBuf::new(len, 4096)).await;
        return match res {
            Ok(()) => vec![header, data],
            Err(e) => error_reply(conn, r, proto::errno_to_nbd(&e), ""),
        }
        .into();
    }
    if len == 0 {
        return done_reply(conn, r).into();
    }
    let df = r.flags & proto::CMD_FLAG_DF != 0;
    let mut parts: Vec<Chunk> = Vec::new();
    let end = r.offset + r.len;
    let mut off = r.offset;
    while off < end {
        // Holes go out as OFFSET_HOLE chunks (unless the client wants one data chunk).
        let (ext_len, zero) = if df {
            (end - off, false)
        } else {
            data_or_hole(conn, off, end - off).await
        };
        if zero {
            let mut p = Vec::with_capacity(12);
            p.put_u64(off);
            p.put_u32(ext_len as u32);
            parts.push((proto::REPLY_TYPE_OFFSET_HOLE, vec![buf(&p)], Vec::new()));
        } else if let Some(pipes) = splice_in(conn, off, ext_len).await {
            parts.push((
                proto::REPLY_TYPE_OFFSET_DATA,
                vec![buf(&off.to_be_bytes())],
                pipes,
            ));
        } else {
            let (res, data) = b.read(off, IoBuf::new(ext_len as usize, 4096)).await;
            if let Err(e) = res {
                // Pipes already filled for this reply are dropped with `parts`.
                let lost: usize = parts.iter().map(|p| p.2.len()).sum();
                lose_pipes(conn, lost);
                return error_reply(conn, r, proto::errno_to_nbd(&e), "").into();
            }
            parts.push((
                proto::REPLY_TYPE_OFFSET_DATA,
                vec![buf(&off.to_be_bytes()), data],
                Vec::new(),
            ));
        }
        off += ext_len;
    }
    chunks_spliced(conn, r, parts)
}

/// The open host file and offset that hold the bytes of `node` at `off` as they are: a `file`
/// node, or `raw` nodes (with their window offset) over one. Other drivers transform or
/// place data themselves and are read the ordinary way.
fn host_file(node: &Arc<Node>, off: u64) -> Option<(Arc<std::fs::File>, u64, Arc<Node>)> {
    let d: &dyn std::any::Any = node.driver();
    if let Some(f) = d.downcast_ref::<FileDriver>() {
        return Some((f.open_file(), off, node.clone()));
    }
    let r = d.downcast_ref::<RawDriver>()?;
    host_file(&node.child("file")?, off.checked_add(r.window_offset())?)
}

/// Take `n` empty pipes, creating them up to [`MAX_PIPES`], waiting for pipes in use to come
/// back when the connection has that many. `None` if pipes cannot be made.
async fn take_pipes(conn: &Conn, n: usize) -> Option<Vec<Pipe>> {
    let available = || conn.pipes.borrow().len() + (MAX_PIPES - conn.pipes_live.get());
    loop {
        if available() >= n {
            let mut out = {
                let mut pool = conn.pipes.borrow_mut();
                let k = pool.len().saturating_sub(n);
                pool.split_off(k)
            };
            while out.len() < n {
                match Pipe::new(PIPE_SIZE) {
                    Ok(p) => {
                        conn.pipes_live.set(conn.pipes_live.get() + 1);
                        out.push(p);
                    }
                    Err(_) => {
                        conn.splice_ok.set(false);
                        conn.pipes.borrow_mut().extend(out);
                        return None;
                    }
                }
            }
            return Some(out);
        }
        let l = conn.pipe_event.listen();
        if available() >= n {
            continue;
        }
        l.await;
        if conn.broken.get() {
            return None;
        }
    }
}

/// Read `len` bytes at `off` into pipes (page cache pages by reference, no copy), when the
/// export's data lies plainly in a host file and the read is large. `None`: read it the
/// ordinary way (also after any failure here, so that errors are reported as for any read).
async fn splice_in(conn: &Conn, off: u64, len: u64) -> Option<Vec<(Pipe, usize)>> {
    if len < SPLICE_MIN || !conn.splice_ok.get() || conn.broken.get() {
        return None;
    }
    let cap = conn
        .pipes
        .borrow()
        .first()
        .map_or(PIPE_SIZE, Pipe::capacity) as u64;
    // Pipes hold whole pages: a read that starts inside a page fills the first one short.
    let n = (off % 4096 + len).div_ceil(cap) as usize;
    if n > MAX_PIPES {
        return None;
    }
    // Pipes first: waiting for one must not hold up a drain.
    let mut pipes = take_pipes(conn, n).await?;
    let b = &conn.backend;
    let filled = {
        let _admitted = b.admit().await;
        let root = b.root();
        match host_file(&root, off) {
            Some((file, host_off, file_node))
                if off.checked_add(len).is_some_and(|e| e <= root.length())
                    && aligned(&file_node, host_off, len) =>
            {
                fill_pipes(conn, file, host_off, len, &mut pipes).await
            }
            _ => Err(0),
        }
    };
    // Pipes not used go back to the pool.
    for p in pipes {
        put_pipe(conn, p);
    }
    match filled {
        Ok(out) => {
            let s = b.stats();
            s.rd_ops.fetch_add(1, Ordering::Relaxed);
            s.rd_bytes.fetch_add(len, Ordering::Relaxed);
            Some(out)
        }
        Err(dropped) => {
            lose_pipes(conn, dropped);
            None
        }
    }
}

fn aligned(node: &Node, off: u64, len: u64) -> bool {
    let a = (node.limits().request_alignment as u64).max(1);
    off.is_multiple_of(a) && len.is_multiple_of(a)
}

/// Fill pipes taken from `pipes` with `len` bytes of `file` at `off`, one splice per pipe (a
/// pipe holds whole pages: one that starts inside a page takes a page's worth less). On
/// failure, or when the pipes run short, the pipes filled are dropped and their number is
/// returned.
async fn fill_pipes(
    conn: &Conn,
    file: Arc<std::fs::File>,
    mut off: u64,
    mut len: u64,
    pipes: &mut Vec<Pipe>,
) -> Result<Vec<(Pipe, usize)>, usize> {
    let mut out = Vec::with_capacity(pipes.len());
    while len > 0 {
        let Some(pipe) = pipes.pop() else {
            return Err(out.len());
        };
        let want = (pipe.capacity() as u64).min(len) as usize;
        let (r, _, pipe) = ops::splice_file_to_pipe(file.clone(), off, pipe, want).await;
        match r {
            Ok(n) if n > 0 => {
                off += n as u64;
                len -= n as u64;
                out.push((pipe, n));
            }
            other => {
                if let Err(e) = &other
                    && matches!(
                        e.raw_os_error(),
                        Some(libc::EINVAL | libc::EOPNOTSUPP | libc::ENOSYS)
                    )
                {
                    // This file (or kernel) does not splice: stop trying.
                    conn.splice_ok.set(false);
                }
                return Err(out.len() + 1);
            }
        }
    }
    Ok(out)
}

/// Length and zero-ness of the extent at `off` (≤ `len`), from the cached data range when it
/// covers `off`, else from one block status query that looks ahead of the read.
async fn data_or_hole(conn: &Conn, off: u64, len: u64) -> (u64, bool) {
    let (start, end) = conn.data_extent.get();
    if start <= off && off < end {
        return ((end - off).min(len), false);
    }
    let want = len.max((conn.size - off).min(STATUS_LOOKAHEAD));
    match conn.backend.block_status_above(off, want).await {
        Ok(s) => {
            let n = s.len.clamp(1, want);
            if !s.zero {
                conn.data_extent.set((off, off + n));
            }
            (n.min(len), s.zero)
        }
        Err(_) => (len, false),
    }
}

/// One extent seen through the backing chain and into the data's file (QEMU's want-zero
/// block status): length, data, zero, depth (0 = unallocated, 1 = the export's node, ...).
async fn status_above(b: &BlockBackend, off: u64, len: u64) -> io::Result<(u64, bool, bool, u32)> {
    let e = b.block_status_above(off, len).await?;
    let depth = if e.present { e.depth + 1 } else { 0 };
    Ok((e.len.clamp(1, len), e.data, e.zero, depth))
}

async fn block_status(conn: &Conn, r: &Request) -> io::Result<Vec<IoBuf>> {
    let s = &conn.session;
    let req_one = r.flags & proto::CMD_FLAG_REQ_ONE != 0;
    let cap = if req_one { 1 } else { MAX_EXTENTS };
    let end = r.offset + r.len;
    let mut base: Vec<(u64, u64)> = Vec::new();
    let mut depth: Vec<(u64, u64)> = Vec::new();
    // Only the bitmap contexts: no need to ask the node.
    let mut off = if s.base_ctx.is_none() && s.depth_ctx.is_none() {
        end
    } else {
        r.offset
    };
    // Merge runs of equal flags; stop when both lists are full or the range is covered.
    let push = |v: &mut Vec<(u64, u64)>, len: u64, flags: u64| -> bool {
        if let Some(last) = v.last_mut()
            && last.1 == flags
        {
            last.0 += len;
            return true;
        }
        if v.len() >= cap {
            return false;
        }
        v.push((len, flags));
        true
    };
    while off < end {
        let (len, data, zero, d) = status_above(&conn.backend, off, end - off).await?;
        let mut flags = 0u64;
        if !data {
            flags |= proto::STATE_HOLE as u64;
        }
        if zero {
            flags |= proto::STATE_ZERO as u64;
        }
        let a = s.base_ctx.is_none() || push(&mut base, len, flags);
        let b = s.depth_ctx.is_none() || push(&mut depth, len, d as u64);
        if !a || !b {
            break;
        }
        off += len;
    }
    let mut parts = Vec::new();
    let mut lists = vec![(s.base_ctx, base), (s.depth_ctx, depth)];
    for (id, b) in &s.bitmap_ctx {
        lists.push((Some(*id), super::dirty::extents(b, r.offset, end, cap)));
    }
    for (id, list) in lists {
        let Some(id) = id else { continue };
        let mut p = Vec::with_capacity(8 + list.len() * 16);
        p.put_u32(id);
        if s.extended {
            p.put_u32(list.len() as u32);
            for (len, flags) in &list {
                p.put_u64(*len);
                p.put_u64(*flags);
            }
            parts.push((proto::REPLY_TYPE_BLOCK_STATUS_EXT, vec![buf(&p)]));
        } else {
            for (len, flags) in &list {
                // Compact requests are < 4 GiB, so each extent fits.
                p.put_u32(*len as u32);
                p.put_u32(*flags as u32);
            }
            parts.push((proto::REPLY_TYPE_BLOCK_STATUS, vec![buf(&p)]));
        }
    }
    Ok(chunks(conn, r, parts))
}
