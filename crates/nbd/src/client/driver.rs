//! The `nbd` block driver (QEMU's `driver=nbd`).
//!
//! Threads: the connection belongs to the context that opened the node (the owner, normally the
//! main context); it lives in that thread's connection table and only that thread submits on it
//! or reaps its replies (rule 5). A request from another thread is sent to the owner with
//! `ContextHandle::spawn` (its buffer travels with it) and the result comes back; one
//! connection per export keeps the flush/FUA semantics of servers without multi-conn.
//!
//! Reconnect (QEMU's behaviour): when the connection breaks, one background task on the owner
//! context retries connecting (ring operations, never a blocking socket; backoff from 250 ms
//! to 4 s) until it succeeds or the node is closed. Requests wait for it up to
//! `reconnect-delay` seconds after the loss, in-flight ones included (they are sent again on
//! the new connection); after the delay they fail with EIO at once until a reconnect succeeds.
//! With `reconnect-delay=0` nothing waits, but the background attempts still run, so the node
//! recovers when the server is back. `open-timeout` bounds the first connection, made by the
//! synchronous open on blocking sockets.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blockd_aio::{ContextHandle, IoBuf};
use blockd_block::drivers::{DriverEntry, Opened};
use blockd_block::options::Opts;
use blockd_block::{
    BlockDriver, BlockStatus, BufResult, Graph, IoFuture, Limits, Node, OpenFlags, ReqFlags,
};
use event_listener::Event;
use serde_json::Value;

use crate::client::conn::{Conn, NegInfo, Outcome, is_conn_lost};
use crate::client::{Address, Negotiated, negotiate, negotiate_on_ring, parse_uri};
use crate::proto::{self, Request};

/// Register the `nbd` driver on a graph.
pub fn register(graph: &mut Graph) {
    graph.register_driver(DriverEntry {
        name: "nbd",
        open,
        probe: None,
    });
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// Connection state of the nodes owned by this thread, by driver instance.
    static LINKS: RefCell<HashMap<u64, Rc<Link>>> = RefCell::new(HashMap::new());
}

/// Backoff between reconnect attempts.
const RETRY_FIRST: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(4);
/// Limit of one reconnect attempt (connect and handshake).
const ATTEMPT_LIMIT: Duration = Duration::from_secs(10);

/// One node's connection on its owner thread.
#[derive(Default)]
struct Link {
    conn: RefCell<Option<Rc<Conn>>>,
    /// When the connection was found lost (start of the reconnect-delay window).
    lost_at: Cell<Option<Instant>>,
    /// The background reconnect task runs.
    reconnecting: Cell<bool>,
    /// The node is gone: the reconnect task stops.
    closed: Cell<bool>,
    /// Notified when a reconnect succeeds or the node closes.
    changed: Event,
}

impl Link {
    fn live(&self) -> Option<Rc<Conn>> {
        self.conn
            .borrow()
            .as_ref()
            .filter(|c| !c.is_dead())
            .cloned()
    }
}

struct Shared {
    id: u64,
    owner: ContextHandle,
    addr: Address,
    export: String,
    reconnect_delay: Duration,
    info: NegInfo,
    /// The connection made by open, adopted by the owner on first use.
    first: Mutex<Option<Negotiated>>,
}

pub struct NbdDriver {
    shared: Arc<Shared>,
}

fn open(_g: &mut Graph, _d: &str, o: &mut Opts, flags: OpenFlags) -> Result<Opened, String> {
    let mut addr = None;
    let mut export = None;
    if let Some(f) = o.take_str("filename")? {
        let (a, e) = parse_uri(&f)?;
        addr = Some(a);
        export = Some(e);
    }
    if let Some(v) = o.take("server") {
        let Value::Object(m) = v else {
            return Err("Invalid parameter type for 'server', expected: dict".into());
        };
        let mut s = Opts::nested(m, "server.");
        let typ = s
            .take_str("type")?
            .ok_or("Parameter 'server.type' is missing")?;
        addr = Some(match typ.as_str() {
            "inet" => {
                let host = s
                    .take_str("host")?
                    .ok_or("Parameter 'server.host' is missing")?;
                let port = match s.take("port") {
                    None => return Err("Parameter 'server.port' is missing".into()),
                    Some(Value::String(p)) => p,
                    Some(Value::Number(n)) => n.to_string(),
                    Some(_) => {
                        return Err(
                            "Invalid parameter type for 'server.port', expected: string".into()
                        );
                    }
                };
                let _ = s.take_bool("numeric")?;
                Address::Inet { host, port }
            }
            "unix" => {
                let path = s
                    .take_str("path")?
                    .ok_or("Parameter 'server.path' is missing")?;
                Address::Unix(path.into())
            }
            other => {
                return Err(format!(
                    "Parameter 'server.type' does not accept value '{other}'"
                ));
            }
        });
        s.finish("nbd", false)?;
    }
    let addr = addr.ok_or("NBD server address missing")?;
    if let Some(e) = o.take_str("export")? {
        export = Some(e);
    }
    let export = export.unwrap_or_default();
    if export.len() > proto::MAX_STRING {
        return Err("export name too long to send to server".into());
    }
    if o.take_str("tls-creds")?.is_some() {
        return Err("TLS for the nbd driver is not supported yet".into());
    }
    let reconnect_delay = Duration::from_secs(o.take_u64("reconnect-delay")?.unwrap_or(0));
    let open_timeout = Duration::from_secs(o.take_u64("open-timeout")?.unwrap_or(0));
    if let Some(x) = o.take_str("x-dirty-bitmap")? {
        return Err(format!("x-dirty-bitmap '{x}' is not supported yet"));
    }
    // Connect now (QEMU does too): the node's size comes from the server. With open-timeout,
    // keep trying until it passes.
    let started = Instant::now();
    let n = loop {
        match negotiate(&addr, &export, Duration::from_secs(10)) {
            Ok(n) => break n,
            Err(e) if started.elapsed() < open_timeout => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => return Err(format!("Failed to connect to '{addr}': {e}")),
        }
    };
    if n.flags & proto::TF_READ_ONLY != 0 && !flags.read_only {
        return Err("Block node is read-only".into());
    }
    let owner = blockd_aio::AioContext::current_or_new()
        .map_err(|e| format!("no event loop for the nbd connection: {e}"))?
        .handle();
    let info = NegInfo {
        size: n.size,
        flags: n.flags,
        structured: n.structured,
        extended: n.extended,
        base_ctx: n.base_ctx,
        min_block: n.min_block,
        max_block: n.max_block,
    };
    let length = info.size;
    let shared = Arc::new(Shared {
        id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        owner,
        addr,
        export,
        reconnect_delay,
        info,
        first: Mutex::new(Some(n)),
    });
    Ok(Opened {
        driver: Box::new(NbdDriver { shared }),
        children: Vec::new(),
        length,
    })
}

fn eio() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

impl Shared {
    /// This node's link on the owner thread (created on first use).
    fn link(&self) -> Rc<Link> {
        LINKS.with(|m| m.borrow_mut().entry(self.id).or_default().clone())
    }

    /// The owner's live connection: the one open made, the current one, or (after a loss) the
    /// one the background reconnect makes within the reconnect delay. Owner thread only.
    async fn conn(&self) -> io::Result<Rc<Conn>> {
        let link = self.link();
        loop {
            if let Some(c) = link.live() {
                return Ok(c);
            }
            let first = self.first.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(n) = first {
                let c = Conn::start(n);
                *link.conn.borrow_mut() = Some(c.clone());
                return Ok(c);
            }
            if link.closed.get() {
                return Err(eio());
            }
            let lost_at = match link.lost_at.get() {
                Some(t) => t,
                None => {
                    let t = Instant::now();
                    link.lost_at.set(Some(t));
                    t
                }
            };
            self.start_reconnect(&link);
            let waited = lost_at.elapsed();
            if waited >= self.reconnect_delay {
                return Err(eio());
            }
            let l = link.changed.listen();
            if link.live().is_some() || link.closed.get() {
                continue;
            }
            let _ = blockd_aio::timeout(self.reconnect_delay - waited, l).await;
        }
    }

    /// Start the background reconnect task unless it runs.
    fn start_reconnect(&self, link: &Rc<Link>) {
        if link.reconnecting.get() {
            return;
        }
        link.reconnecting.set(true);
        let link = link.clone();
        let (addr, export, size) = (self.addr.clone(), self.export.clone(), self.info.size);
        blockd_aio::spawn(async move {
            let mut pause = RETRY_FIRST;
            while !link.closed.get() {
                match negotiate_on_ring(&addr, &export, ATTEMPT_LIMIT).await {
                    Ok(n) if n.size == size => {
                        if link.closed.get() {
                            break; // dropping `n` closes the socket
                        }
                        *link.conn.borrow_mut() = Some(Conn::start(n));
                        link.lost_at.set(None);
                        break;
                    }
                    // A different disk behind the same name is not this node's disk.
                    Ok(_) | Err(_) => {}
                }
                let l = link.changed.listen();
                if link.closed.get() {
                    break;
                }
                let _ = blockd_aio::timeout(pause, l).await;
                pause = (pause * 2).min(RETRY_MAX);
            }
            link.reconnecting.set(false);
            link.changed.notify(usize::MAX);
        })
        .detach();
    }

    /// Run one request on the owner's connection; a request whose connection is lost is sent
    /// again on the reconnected one while the reconnect delay lasts.
    async fn request(
        &self,
        req: Request,
        mut payload: Option<IoBuf>,
        mut buf: Option<IoBuf>,
    ) -> Outcome {
        loop {
            let c = match self.conn().await {
                Ok(c) => c,
                Err(e) => {
                    return Outcome {
                        result: Err(e),
                        buf,
                        extent: None,
                    };
                }
            };
            // Keep a copy of the payload only when a retry may need it.
            let p = if self.reconnect_delay.is_zero() {
                payload.take()
            } else {
                payload.as_ref().map(|p| IoBuf::from_slice(p))
            };
            let out = c.request(req, p, buf.take()).await;
            match &out.result {
                Err(e) if is_conn_lost(e) => {
                    buf = out.buf;
                    if self.reconnect_delay.is_zero() {
                        // Start the background reconnect; this request fails now.
                        let _ = self.conn().await;
                        return Outcome {
                            result: Err(eio()),
                            buf,
                            extent: None,
                        };
                    }
                }
                _ => return out,
            }
        }
    }

    async fn read(self: Arc<Self>, offset: u64, mut buf: IoBuf) -> BufResult {
        let max = self.info.max_block.clamp(4096, proto::MAX_PAYLOAD) as usize;
        if buf.len() <= max {
            let req = Request {
                flags: 0,
                typ: proto::CMD_READ,
                cookie: 0,
                offset,
                len: buf.len() as u64,
            };
            let len = buf.len();
            let out = self.request(req, None, Some(buf)).await;
            let buf = out.buf.unwrap_or_else(|| IoBuf::new(len, 4096));
            return (out.result, buf);
        }
        let mut done = 0;
        while done < buf.len() {
            let n = (buf.len() - done).min(max);
            let (r, part) =
                Box::pin(self.clone().read(offset + done as u64, IoBuf::new(n, 4096))).await;
            if let Err(e) = r {
                return (Err(e), buf);
            }
            buf[done..done + n].copy_from_slice(&part);
            done += n;
        }
        (Ok(()), buf)
    }

    async fn write(self: Arc<Self>, offset: u64, buf: IoBuf, flags: ReqFlags) -> BufResult {
        let max = self.info.max_block.clamp(4096, proto::MAX_PAYLOAD) as usize;
        let fua = flags.contains(ReqFlags::FUA);
        let native_fua = fua && self.info.flags & proto::TF_SEND_FUA != 0;
        let mut done = 0;
        while done < buf.len() || buf.is_empty() {
            let n = (buf.len() - done).min(max);
            let req = Request {
                flags: if native_fua { proto::CMD_FLAG_FUA } else { 0 },
                typ: proto::CMD_WRITE,
                cookie: 0,
                offset: offset + done as u64,
                len: n as u64,
            };
            let part = IoBuf::from_slice(&buf[done..done + n]);
            let out = self.request(req, Some(part), None).await;
            if let Err(e) = out.result {
                return (Err(e), buf);
            }
            done += n;
            if buf.is_empty() {
                break;
            }
        }
        if fua && !native_fua {
            let r = self.clone().flush().await;
            return (r, buf);
        }
        (Ok(()), buf)
    }

    async fn simple(&self, typ: u16, flags: u16, offset: u64, len: u64) -> io::Result<()> {
        let req = Request {
            flags,
            typ,
            cookie: 0,
            offset,
            len,
        };
        self.request(req, None, None).await.result
    }

    async fn flush(self: Arc<Self>) -> io::Result<()> {
        if self.info.flags & proto::TF_SEND_FLUSH == 0 {
            return Ok(());
        }
        self.simple(proto::CMD_FLUSH, 0, 0, 0).await
    }

    /// Split an effect length into pieces a compact request can carry.
    fn pieces(&self, offset: u64, len: u64) -> Vec<(u64, u64)> {
        let max = if self.info.extended {
            u64::MAX
        } else {
            // Largest multiple of the block size below 4 GiB.
            let b = self.info.min_block.max(1) as u64;
            (u32::MAX as u64 / b) * b
        };
        let mut v = Vec::new();
        let mut off = offset;
        while off < offset + len {
            let n = (offset + len - off).min(max);
            v.push((off, n));
            off += n;
        }
        v
    }

    async fn discard(self: Arc<Self>, offset: u64, len: u64) -> io::Result<()> {
        if self.info.flags & proto::TF_SEND_TRIM == 0 {
            return Ok(()); // advisory
        }
        for (off, n) in self.pieces(offset, len) {
            self.simple(proto::CMD_TRIM, 0, off, n).await?;
        }
        Ok(())
    }

    async fn write_zeroes(
        self: Arc<Self>,
        offset: u64,
        len: u64,
        flags: ReqFlags,
    ) -> io::Result<()> {
        let f = self.info.flags;
        if f & proto::TF_SEND_WRITE_ZEROES == 0 {
            return Err(blockd_block::driver::not_supported());
        }
        let mut cf = 0;
        if !flags.contains(ReqFlags::MAY_UNMAP) {
            cf |= proto::CMD_FLAG_NO_HOLE;
        }
        if flags.contains(ReqFlags::NO_FALLBACK) {
            if f & proto::TF_SEND_FAST_ZERO == 0 {
                return Err(blockd_block::driver::not_supported());
            }
            cf |= proto::CMD_FLAG_FAST_ZERO;
        }
        let fua = flags.contains(ReqFlags::FUA);
        if fua && f & proto::TF_SEND_FUA != 0 {
            cf |= proto::CMD_FLAG_FUA;
        }
        for (off, n) in self.pieces(offset, len) {
            self.simple(proto::CMD_WRITE_ZEROES, cf, off, n).await?;
        }
        if fua && f & proto::TF_SEND_FUA == 0 {
            return self.flush().await;
        }
        Ok(())
    }

    async fn block_status(self: Arc<Self>, offset: u64, len: u64) -> io::Result<BlockStatus> {
        let all_data = |l: u64| BlockStatus {
            len: l,
            data: true,
            zero: false,
            allocated: true,
            offset: Some(offset),
        };
        if self.info.base_ctx.is_none() || len == 0 {
            return Ok(all_data(len));
        }
        let (_, n) = self.pieces(offset, len)[0];
        let req = Request {
            flags: proto::CMD_FLAG_REQ_ONE,
            typ: proto::CMD_BLOCK_STATUS,
            cookie: 0,
            offset,
            len: n,
        };
        let out = self.request(req, None, None).await;
        out.result?;
        let (elen, eflags) = out.extent.ok_or_else(eio)?;
        let elen = elen.clamp(1, n);
        Ok(BlockStatus {
            len: elen,
            data: eflags & proto::STATE_HOLE as u64 == 0,
            zero: eflags & proto::STATE_ZERO as u64 != 0,
            allocated: true,
            offset: Some(offset),
        })
    }
}

/// Run `f` on the owner context: directly when already there, else by message.
async fn on_owner<T, F, Fut>(shared: &Arc<Shared>, f: F, fallback: impl FnOnce() -> T) -> T
where
    F: FnOnce(Arc<Shared>) -> Fut + Send + 'static,
    Fut: Future<Output = T> + 'static,
    T: Send + 'static,
{
    if shared.owner.is_current() {
        return f(shared.clone()).await;
    }
    let s = shared.clone();
    match shared.owner.spawn(move || f(s)).await {
        Ok(v) => v,
        Err(_) => fallback(),
    }
}

impl BlockDriver for NbdDriver {
    fn format_name(&self) -> &'static str {
        "nbd"
    }

    fn limits(&self) -> Limits {
        Limits {
            request_alignment: self.shared.info.min_block.max(1),
            max_transfer: self.shared.info.max_block.clamp(4096, proto::MAX_PAYLOAD) as u64,
            min_mem_alignment: 1,
        }
    }

    fn read<'a>(&'a self, _n: &'a Node, offset: u64, buf: IoBuf) -> IoFuture<'a, BufResult> {
        let len = buf.len();
        Box::pin(on_owner(
            &self.shared,
            move |s| s.read(offset, buf),
            move || (Err(eio()), IoBuf::new(len, 4096)),
        ))
    }

    fn write<'a>(
        &'a self,
        _n: &'a Node,
        offset: u64,
        buf: IoBuf,
        flags: ReqFlags,
    ) -> IoFuture<'a, BufResult> {
        let len = buf.len();
        Box::pin(on_owner(
            &self.shared,
            move |s| s.write(offset, buf, flags),
            move || (Err(eio()), IoBuf::new(len, 4096)),
        ))
    }

    fn flush<'a>(&'a self, _n: &'a Node) -> IoFuture<'a, io::Result<()>> {
        Box::pin(on_owner(&self.shared, |s| s.flush(), || Err(eio())))
    }

    fn discard<'a>(&'a self, _n: &'a Node, offset: u64, len: u64) -> IoFuture<'a, io::Result<()>> {
        Box::pin(on_owner(
            &self.shared,
            move |s| s.discard(offset, len),
            || Err(eio()),
        ))
    }

    fn write_zeroes<'a>(
        &'a self,
        _n: &'a Node,
        offset: u64,
        len: u64,
        flags: ReqFlags,
    ) -> IoFuture<'a, io::Result<()>> {
        Box::pin(on_owner(
            &self.shared,
            move |s| s.write_zeroes(offset, len, flags),
            || Err(eio()),
        ))
    }

    fn block_status<'a>(
        &'a self,
        _n: &'a Node,
        offset: u64,
        len: u64,
    ) -> IoFuture<'a, io::Result<BlockStatus>> {
        Box::pin(on_owner(
            &self.shared,
            move |s| s.block_status(offset, len),
            || Err(eio()),
        ))
    }

    fn truncate<'a>(&'a self, _n: &'a Node, _len: u64) -> IoFuture<'a, io::Result<u64>> {
        Box::pin(async { Err(blockd_block::driver::not_supported()) })
    }

    fn info(&self) -> Vec<(String, String)> {
        Vec::new()
    }
}

impl Drop for NbdDriver {
    fn drop(&mut self) {
        // Say goodbye on the owner's thread, where the connection lives.
        let id = self.shared.id;
        let close = move || {
            if let Some(link) = LINKS.with(|m| m.borrow_mut().remove(&id)) {
                link.closed.set(true);
                link.changed.notify(usize::MAX);
                if let Some(c) = link.conn.borrow_mut().take() {
                    c.disconnect_now();
                }
            }
        };
        if self.shared.owner.is_current() {
            close();
        } else {
            self.shared.owner.schedule_oneshot(close);
        }
    }
}
