//! The NBD server: listeners, the export registry, connection bookkeeping.
//!
//! Threads: the [`NbdServer`] lives in the main context. It accepts connections there and runs
//! each handshake there (bounded by the handshake timeout; counted against max-connections).
//! When a client picks an export, the connection's socket is handed to the export's context
//! (its iothread, or the main context) and served entirely from that thread
//! (`transmission.rs`). Other threads never touch a connection; the only cross-thread act is
//! `shutdown(2)` of a socket to make its owner's reader see end-of-file, done under the
//! registry lock so the descriptor cannot be closed and reused meanwhile.

mod dirty;
mod handshake;
mod transmission;

pub use dirty::{BitmapSpec, ExportedBitmap, export_bitmaps};

use std::collections::BTreeMap;
use std::io;
use std::net::{TcpListener, ToSocketAddrs};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use blockd_aio::{ContextHandle, ops};
use blockd_block::{BlockBackend, Graph};
use event_listener::Event;

use crate::proto;

/// Server-wide settings (QMP `nbd-server-start`, qemu-nbd's `-e`).
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Most simultaneous connections (handshaking or serving); 0 = unlimited.
    pub max_connections: usize,
    /// How long a client may take to finish the handshake; zero = forever.
    pub handshake_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_connections: 100,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// What to export and how.
#[derive(Clone)]
pub struct ExportConfig {
    /// The block export id (QMP `id`); unique among exports.
    pub id: String,
    /// The NBD export name clients ask for.
    pub name: String,
    pub description: Option<String>,
    pub backend: BlockBackend,
    pub writable: bool,
    /// Every write is made durable before it is acknowledged (QMP `writethrough`).
    pub writethrough: bool,
    /// Offer the `qemu:allocation-depth` meta context.
    pub allocation_depth: bool,
    /// Dirty bitmaps offered as `qemu:dirty-bitmap:NAME` contexts (busy while exported).
    pub bitmaps: Vec<Arc<ExportedBitmap>>,
    /// Advertise NBD_FLAG_CAN_MULTI_CONN.
    pub multi_conn: bool,
    /// The context that serves this export's clients (`None`: the server's context).
    pub iothread: Option<ContextHandle>,
    /// Writes of all-zero data become write-zeroes requests (qemu-nbd `--detect-zeroes`).
    pub detect_zeroes: DetectZeroes,
}

/// QEMU's detect-zeroes modes, applied to the export's WRITE commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DetectZeroes {
    #[default]
    Off,
    /// All-zero writes are written as zeroes (the format may record them without data).
    On,
    /// Like `On`, and the range may be unmapped (only with discard=unmap, as QEMU requires).
    Unmap,
}

impl DetectZeroes {
    /// QEMU's spelling (`off`, `on`, `unmap`).
    pub fn parse(s: &str) -> Result<DetectZeroes, String> {
        match s {
            "off" => Ok(DetectZeroes::Off),
            "on" => Ok(DetectZeroes::On),
            "unmap" => Ok(DetectZeroes::Unmap),
            _ => Err(format!(
                "Failed to parse detect_zeroes mode: invalid parameter value: {s}"
            )),
        }
    }
}

/// How `remove_export` treats connected clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoveMode {
    /// Refuse while clients are connected (QEMU's `safe`).
    Safe,
    /// Disconnect clients once their in-flight requests finish, then remove (QEMU's `hard`).
    Hard,
}

/// Where to listen.
pub enum ListenAddr {
    Inet {
        host: String,
        port: String,
    },
    Unix(PathBuf),
    /// An already listening socket (systemd socket activation, `--nbd-server addr.type=fd`).
    Fd(OwnedFd),
}

/// An export in the registry. Shared (`Arc`) by the registry and by its connections.
pub struct Export {
    pub(crate) cfg: ExportConfig,
    state: Mutex<ExportState>,
    gone: AtomicBool,
    gone_event: Event,
}

#[derive(Default)]
struct ExportState {
    /// Connections in transmission: id → socket.
    conns: BTreeMap<u64, RawFd>,
    removing: bool,
}

impl Export {
    pub fn id(&self) -> &str {
        &self.cfg.id
    }
    pub fn name(&self) -> &str {
        &self.cfg.name
    }
    pub fn description(&self) -> Option<&str> {
        self.cfg.description.as_deref()
    }
    pub fn backend(&self) -> &BlockBackend {
        &self.cfg.backend
    }
    pub fn writable(&self) -> bool {
        self.cfg.writable
    }
    pub fn iothread(&self) -> Option<&ContextHandle> {
        self.cfg.iothread.as_ref()
    }
    pub fn size(&self) -> u64 {
        self.cfg.backend.length()
    }

    /// Clients connected to this export now.
    pub fn connections(&self) -> usize {
        self.lock().conns.len()
    }

    /// Being removed (hard mode, waiting for clients to go).
    pub fn is_removing(&self) -> bool {
        self.lock().removing
    }

    /// Wait until the export has been removed completely.
    pub async fn wait_gone(&self) {
        loop {
            if self.gone.load(Ordering::Acquire) {
                return;
            }
            let l = self.gone_event.listen();
            if self.gone.load(Ordering::Acquire) {
                return;
            }
            l.await;
        }
    }

    fn lock(&self) -> MutexGuard<'_, ExportState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Transmission flags for a client (DF only with structured replies).
    pub(crate) fn transmission_flags(&self, structured: bool) -> u16 {
        let mut f =
            proto::TF_HAS_FLAGS | proto::TF_SEND_FLUSH | proto::TF_SEND_FUA | proto::TF_SEND_CACHE;
        if self.cfg.writable {
            f |= proto::TF_SEND_TRIM | proto::TF_SEND_WRITE_ZEROES | proto::TF_SEND_FAST_ZERO;
        } else {
            f |= proto::TF_READ_ONLY;
        }
        if structured {
            f |= proto::TF_SEND_DF;
        }
        // Flush acts on the whole node and FUA writes are durable when acknowledged, whichever
        // connection they came from: safe for several connections.
        if self.cfg.multi_conn {
            f |= proto::TF_CAN_MULTI_CONN;
        }
        f
    }
}

pub(crate) struct ServerInner {
    cfg: Mutex<ServerConfig>,
    exports: Mutex<BTreeMap<String, Arc<Export>>>,
    /// Connections still in the handshake: id → socket.
    handshaking: Mutex<BTreeMap<u64, RawFd>>,
    active: AtomicUsize,
    served: AtomicU64,
    next_conn: AtomicU64,
    /// Notified when a connection ends (max-connections waiters, idle waiters).
    conn_closed: Event,
    shutting_down: AtomicBool,
    listeners: Mutex<Vec<RawFd>>,
    listening: AtomicUsize,
    /// Removed exports whose backends still need detaching from the graph (main context).
    deleted: Mutex<Vec<(String, BlockBackend)>>,
    on_deleted: Mutex<Option<DeletedCallback>>,
    main: ContextHandle,
}

/// Called on the main context with the id of each export that is gone (`BLOCK_EXPORT_DELETED`).
pub type DeletedCallback = Arc<dyn Fn(&str) + Send + Sync>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ServerInner {
    pub(crate) fn find_export(&self, name: &str) -> Option<Arc<Export>> {
        lock(&self.exports)
            .values()
            .find(|e| e.cfg.name == name && !e.is_removing())
            .cloned()
    }

    pub(crate) fn list_exports(&self) -> Vec<Arc<Export>> {
        lock(&self.exports)
            .values()
            .filter(|e| !e.is_removing())
            .cloned()
            .collect()
    }

    pub(crate) fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    fn conn_ended(&self) {
        self.active.fetch_sub(1, Ordering::SeqCst);
        self.conn_closed.notify(usize::MAX);
    }

    /// The export is removed and has no clients: take it out of the registry.
    fn finalize_export(&self, e: &Arc<Export>) {
        {
            let mut m = lock(&self.exports);
            if m.get(&e.cfg.id).is_some_and(|x| Arc::ptr_eq(x, e)) {
                m.remove(&e.cfg.id);
            }
        }
        lock(&self.deleted).push((e.cfg.id.clone(), e.cfg.backend.clone()));
        e.gone.store(true, Ordering::Release);
        e.gone_event.notify(usize::MAX);
        let cb = lock(&self.on_deleted).clone();
        if let Some(cb) = cb {
            let id = e.cfg.id.clone();
            self.main.schedule_oneshot(move || cb(&id));
        }
    }
}

/// A connection's socket while it lives: registered (handshake or export) so others can shut
/// it down; closed under the registry lock on drop.
pub(crate) struct ConnSocket {
    fd: Option<OwnedFd>,
    id: u64,
    server: Arc<ServerInner>,
    export: Option<Arc<Export>>,
}

impl ConnSocket {
    pub(crate) fn raw(&self) -> RawFd {
        self.fd.as_ref().map_or(-1, |f| f.as_raw_fd())
    }

    /// Move from the handshake registry to `export`'s. Fails if the export is being removed.
    pub(crate) fn attach(&mut self, export: &Arc<Export>) -> bool {
        if self.export.is_some() {
            return self.export.as_ref().is_some_and(|e| Arc::ptr_eq(e, export));
        }
        let raw = self.raw();
        {
            let mut st = export.lock();
            if st.removing {
                return false;
            }
            st.conns.insert(self.id, raw);
        }
        lock(&self.server.handshaking).remove(&self.id);
        self.export = Some(export.clone());
        true
    }
}

impl Drop for ConnSocket {
    fn drop(&mut self) {
        match self.export.take() {
            Some(e) => {
                let finalize = {
                    let mut st = e.lock();
                    st.conns.remove(&self.id);
                    // Closed while holding the lock: a concurrent shutdown cannot hit a reused fd.
                    drop(self.fd.take());
                    st.removing && st.conns.is_empty()
                };
                if finalize {
                    self.server.finalize_export(&e);
                }
            }
            None => {
                let mut hs = lock(&self.server.handshaking);
                hs.remove(&self.id);
                drop(self.fd.take());
            }
        }
        self.server.conn_ended();
    }
}

fn shutdown_fd(fd: RawFd, how: i32) {
    // SAFETY: the caller holds the registry lock under which the descriptor stays open; shutdown
    // touches no memory.
    unsafe {
        libc::shutdown(fd, how);
    }
}

/// Whether the other end of a connected socket has closed (or shut down its writing side).
fn peer_hung_up(fd: RawFd) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: `p` is a valid pollfd for the call's duration; the caller holds the registry lock
    // under which the descriptor stays open; a zero timeout never blocks.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n == 1 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

/// The NBD server of a process. Create and use it on the main context.
#[derive(Clone)]
pub struct NbdServer {
    inner: Arc<ServerInner>,
}

impl NbdServer {
    /// A server with no listener and no exports, bound to the calling thread's context (which
    /// must exist: the main context).
    pub fn new(cfg: ServerConfig) -> io::Result<NbdServer> {
        let main = blockd_aio::AioContext::current_or_new()?.handle();
        Ok(NbdServer {
            inner: Arc::new(ServerInner {
                cfg: Mutex::new(cfg),
                exports: Mutex::new(BTreeMap::new()),
                handshaking: Mutex::new(BTreeMap::new()),
                active: AtomicUsize::new(0),
                served: AtomicU64::new(0),
                next_conn: AtomicU64::new(1),
                conn_closed: Event::new(),
                shutting_down: AtomicBool::new(false),
                listeners: Mutex::new(Vec::new()),
                listening: AtomicUsize::new(0),
                deleted: Mutex::new(Vec::new()),
                on_deleted: Mutex::new(None),
                main,
            }),
        })
    }

    pub fn set_config(&self, cfg: ServerConfig) {
        *lock(&self.inner.cfg) = cfg;
    }

    pub fn config(&self) -> ServerConfig {
        lock(&self.inner.cfg).clone()
    }

    /// Register the `BLOCK_EXPORT_DELETED` callback (run on the main context).
    pub fn on_export_deleted(&self, cb: DeletedCallback) {
        *lock(&self.inner.on_deleted) = Some(cb);
    }

    /// Is any listener open?
    pub fn is_listening(&self) -> bool {
        !lock(&self.inner.listeners).is_empty()
    }

    /// Connections open now (handshaking or serving).
    pub fn active_connections(&self) -> usize {
        self.inner.active.load(Ordering::SeqCst)
    }

    /// Connections that reached transmission so far.
    pub fn served_connections(&self) -> u64 {
        self.inner.served.load(Ordering::SeqCst)
    }

    /// Wait until at least one client was served and none is connected (qemu-nbd without
    /// `--persistent`).
    pub async fn wait_all_clients_gone(&self) {
        loop {
            let done = self.served_connections() > 0 && self.active_connections() == 0;
            if done {
                return;
            }
            let l = self.inner.conn_closed.listen();
            if self.served_connections() > 0 && self.active_connections() == 0 {
                return;
            }
            l.await;
        }
    }

    /// Open a listener and start accepting on the calling (main) context.
    pub fn listen(&self, addr: ListenAddr) -> Result<(), String> {
        let fds = bind(addr)?;
        self.inner.shutting_down.store(false, Ordering::Release);
        for fd in fds {
            lock(&self.inner.listeners).push(fd.as_raw_fd());
            self.inner.listening.fetch_add(1, Ordering::SeqCst);
            let inner = self.inner.clone();
            blockd_aio::spawn(accept_loop(inner, fd)).detach();
        }
        Ok(())
    }

    /// Close the listeners and drop the clients still in the handshake (CVE-2024-7409: stray
    /// clients must not outlive the server). Exports and their connected clients stay.
    pub fn stop_listening(&self) {
        self.inner.shutting_down.store(true, Ordering::Release);
        for fd in lock(&self.inner.listeners).drain(..) {
            // The accept loop owns the descriptor; shutting it down makes its accept fail, and
            // the loop closes it. It cannot be closed before: it is in this list until then.
            shutdown_fd(fd, libc::SHUT_RDWR);
        }
        for fd in lock(&self.inner.handshaking).values() {
            shutdown_fd(*fd, libc::SHUT_RDWR);
        }
    }

    /// Add an export. Fails on a duplicate id or export name.
    pub fn add_export(&self, cfg: ExportConfig) -> Result<Arc<Export>, String> {
        let mut m = lock(&self.inner.exports);
        if m.contains_key(&cfg.id) {
            return Err(format!("Block export id '{}' is already in use", cfg.id));
        }
        if cfg.name.len() > proto::MAX_STRING {
            return Err(format!(
                "export name '{}' too long",
                proto::clamp_string(&cfg.name)
            ));
        }
        if cfg
            .description
            .as_ref()
            .is_some_and(|d| d.len() > proto::MAX_STRING)
        {
            return Err("description too long".into());
        }
        if m.values()
            .any(|e| e.cfg.name == cfg.name && !e.is_removing())
        {
            return Err(format!(
                "NBD server already has export named '{}'",
                cfg.name
            ));
        }
        let e = Arc::new(Export {
            cfg,
            state: Mutex::new(ExportState::default()),
            gone: AtomicBool::new(false),
            gone_event: Event::new(),
        });
        m.insert(e.cfg.id.clone(), e.clone());
        Ok(e)
    }

    /// The export with block export id `id`.
    pub fn export(&self, id: &str) -> Option<Arc<Export>> {
        lock(&self.inner.exports).get(id).cloned()
    }

    /// The export clients reach by `name`.
    pub fn export_by_name(&self, name: &str) -> Option<Arc<Export>> {
        self.inner.find_export(name)
    }

    /// Every export (also those being removed), ordered by id.
    pub fn exports(&self) -> Vec<Arc<Export>> {
        lock(&self.inner.exports).values().cloned().collect()
    }

    /// Remove an export. `Safe` refuses while clients are connected; `Hard` asks each client's
    /// thread to stop reading (in-flight requests are answered) and the export goes when the
    /// last one is gone. Returns the export (await [`Export::wait_gone`] to see it go).
    pub fn remove_export(&self, id: &str, mode: RemoveMode) -> Result<Arc<Export>, String> {
        let e = self
            .export(id)
            .ok_or_else(|| format!("Export '{id}' is not found"))?;
        let finalize_now = {
            let mut st = e.lock();
            if st.removing {
                return Err(format!("Export '{id}' is already shutting down"));
            }
            // A client that has already hung up (its process gone) is not a user any more,
            // though its connection may not have seen the end of the stream yet.
            if mode == RemoveMode::Safe && st.conns.values().any(|&fd| !peer_hung_up(fd)) {
                return Err(format!("export '{id}' still in use"));
            }
            st.removing = true;
            for fd in st.conns.values() {
                shutdown_fd(*fd, libc::SHUT_RD);
            }
            st.conns.is_empty()
        };
        if finalize_now {
            self.inner.finalize_export(&e);
        }
        Ok(e)
    }

    /// Detach the backends of removed exports (a graph change: main context) and return their
    /// ids, oldest first.
    pub fn reap_deleted(&self, graph: &Graph) -> Vec<String> {
        let list: Vec<_> = lock(&self.inner.deleted).drain(..).collect();
        list.into_iter()
            .map(|(id, b)| {
                b.detach(graph);
                id
            })
            .collect()
    }
}

fn bind(addr: ListenAddr) -> Result<Vec<OwnedFd>, String> {
    match addr {
        ListenAddr::Inet { host, port } => {
            let h = if host.is_empty() {
                "0.0.0.0".to_string()
            } else {
                host.clone()
            };
            let addrs: Vec<_> = (h.as_str(), 0u16)
                .to_socket_addrs()
                .map_err(|e| format!("address resolution failed for {host}:{port}: {e}"))?
                .collect();
            let port: u16 = port.parse().map_err(|_| format!("Invalid port '{port}'"))?;
            let mut out = Vec::new();
            let mut last_err = None;
            for mut a in addrs {
                a.set_port(port);
                match TcpListener::bind(a) {
                    Ok(l) => out.push(OwnedFd::from(l)),
                    Err(e) => last_err = Some(format!("Failed to bind socket: {e}")),
                }
                if port == 0 && !out.is_empty() {
                    break;
                }
            }
            if out.is_empty() {
                return Err(last_err.unwrap_or_else(|| "no address to listen on".into()));
            }
            Ok(out)
        }
        ListenAddr::Unix(path) => {
            let _ = std::fs::remove_file(&path);
            let l = UnixListener::bind(&path)
                .map_err(|e| format!("Failed to bind socket to {}: {e}", path.display()))?;
            Ok(vec![OwnedFd::from(l)])
        }
        ListenAddr::Fd(fd) => Ok(vec![fd]),
    }
}

/// Bound address of an inet listener (tests use port 0).
pub fn local_port(fd: RawFd) -> Option<u16> {
    // SAFETY: getsockname writes at most `len` bytes into the storage we own.
    unsafe {
        let mut ss: libc::sockaddr_storage = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        if libc::getsockname(
            fd,
            (&mut ss as *mut libc::sockaddr_storage).cast(),
            &mut len,
        ) != 0
        {
            return None;
        }
        match ss.ss_family as i32 {
            libc::AF_INET => {
                let sin = &*(&ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>();
                Some(u16::from_be(sin.sin_port))
            }
            libc::AF_INET6 => {
                let sin6 = &*(&ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>();
                Some(u16::from_be(sin6.sin6_port))
            }
            _ => None,
        }
    }
}

impl NbdServer {
    /// Ports of the inet listeners (for `port=0`).
    pub fn local_ports(&self) -> Vec<u16> {
        lock(&self.inner.listeners)
            .iter()
            .filter_map(|fd| local_port(*fd))
            .collect()
    }
}

/// Send buffer asked for per connection (the kernel caps it at `net.core.wmem_max`).
const SEND_BUFFER: libc::c_int = 4 << 20;

/// A send buffer that holds whole large read replies: with the default (~208 KiB) a 256 KiB or
/// larger reply needs several wake-ups of the sending thread as the client drains the socket.
fn set_send_buffer(fd: RawFd) {
    // SAFETY: setsockopt reads an int we own; failure leaves the default, which still works.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&SEND_BUFFER as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

fn set_nodelay(fd: RawFd) {
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads an int we own; failure (a unix socket) is harmless.
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

async fn accept_loop(inner: Arc<ServerInner>, lfd: OwnedFd) {
    let raw = lfd.as_raw_fd();
    loop {
        // max-connections: stop accepting (clients wait in the backlog) while full.
        loop {
            let max = lock(&inner.cfg).max_connections;
            if max == 0 || inner.active.load(Ordering::SeqCst) < max {
                break;
            }
            let l = inner.conn_closed.listen();
            if inner.active.load(Ordering::SeqCst) < max {
                break;
            }
            l.await;
        }
        if !lock(&inner.listeners).contains(&raw) {
            break;
        }
        let fd = match ops::accept(raw).await {
            Ok(fd) => fd,
            Err(e) => {
                if !lock(&inner.listeners).contains(&raw) {
                    break;
                }
                match e.raw_os_error() {
                    Some(libc::EINVAL) | Some(libc::EBADF) | Some(libc::ENOTSOCK) => break,
                    _ => {
                        // Out of descriptors or memory: back off rather than spin.
                        blockd_aio::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                }
            }
        };
        if inner.is_shutting_down() {
            drop(fd);
            break;
        }
        set_nodelay(fd.as_raw_fd());
        set_send_buffer(fd.as_raw_fd());
        let id = inner.next_conn.fetch_add(1, Ordering::SeqCst);
        inner.active.fetch_add(1, Ordering::SeqCst);
        lock(&inner.handshaking).insert(id, fd.as_raw_fd());
        let sock = ConnSocket {
            fd: Some(fd),
            id,
            server: inner.clone(),
            export: None,
        };
        blockd_aio::spawn(serve_client(inner.clone(), sock)).detach();
    }
    {
        let mut ls = lock(&inner.listeners);
        ls.retain(|f| *f != raw);
        drop(lfd);
    }
    inner.listening.fetch_sub(1, Ordering::SeqCst);
}

/// Serve a client on an inherited connected socket (qemu-nbd `--fork` style tests, socket
/// pairs): the same path as an accepted connection.
pub fn serve_socket(server: &NbdServer, fd: OwnedFd) {
    let inner = server.inner.clone();
    let id = inner.next_conn.fetch_add(1, Ordering::SeqCst);
    inner.active.fetch_add(1, Ordering::SeqCst);
    lock(&inner.handshaking).insert(id, fd.as_raw_fd());
    let sock = ConnSocket {
        fd: Some(fd),
        id,
        server: inner.clone(),
        export: None,
    };
    blockd_aio::spawn(serve_client(inner, sock)).detach();
}

async fn serve_client(inner: Arc<ServerInner>, mut sock: ConnSocket) {
    let limit = lock(&inner.cfg).handshake_timeout;
    let negotiated = if limit.is_zero() {
        handshake::negotiate(&mut sock, &inner).await
    } else {
        match blockd_aio::timeout(limit, handshake::negotiate(&mut sock, &inner)).await {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "handshake timed out",
            )),
        }
    };
    let session = match negotiated {
        Ok(Some(s)) => s,
        Ok(None) | Err(_) => return, // `sock` closes on drop
    };
    let export = session.export.clone();
    inner.served.fetch_add(1, Ordering::SeqCst);
    match export.cfg.iothread.clone() {
        Some(h) if !h.is_current() => {
            // Hand the socket to the export's thread; the connection runs there to the end.
            let _detached = h.spawn(move || transmission::run(sock, session));
        }
        _ => transmission::run(sock, session).await,
    }
}
