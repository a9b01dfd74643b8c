//! BlockBackend: the user of a node (a device, an export, a job, a CLI tool).
//!
//! It checks bounds, aligns requests the node cannot take as they are (read-modify-write for
//! O_DIRECT), counts requests in flight, and queues new requests while it is quiesced by a
//! drain. Admission is a Dekker-style handshake on two atomics: a request increments the
//! in-flight count and then checks the quiesce counter; a drain increments the quiesce counter
//! and then waits for the in-flight count to reach zero. No lock, no polling loop.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use arc_swap::ArcSwap;
use blockd_aio::IoBuf;
use event_listener::Event;

use crate::driver::{BlockStatus, BufResult, ReqFlags};
use crate::node::{Node, ParentRef};
use crate::perm::{Perm, Use};
use crate::status::Extent;

pub struct BackendShared {
    name: String,
    pub(crate) root: ArcSwap<Node>,
    quiesce: AtomicUsize,
    /// Admitted requests.
    in_flight: AtomicUsize,
    /// Requests between "announce" and "admitted or queued" (the admission handshake).
    entering: AtomicUsize,
    /// Notified when the in-flight count drops to zero while quiesced.
    idle: Event,
    /// Notified when the quiesce counter drops to zero.
    resume: Event,
    pub(crate) perm: Perm,
    pub(crate) stats: Stats,
    /// Failed requests send BLOCK_IO_ERROR (QEMU's error action `report`).
    report_errors: AtomicBool,
}

/// I/O accounting (QEMU's BlockAcctStats, the part query-blockstats reports).
#[derive(Default, Debug)]
pub struct Stats {
    pub rd_bytes: AtomicU64,
    pub wr_bytes: AtomicU64,
    pub rd_ops: AtomicU64,
    pub wr_ops: AtomicU64,
    pub flush_ops: AtomicU64,
    pub discard_ops: AtomicU64,
    pub failed_ops: AtomicU64,
}

impl BackendShared {
    pub(crate) fn quiesce_begin(&self) {
        self.quiesce.fetch_add(1, Ordering::SeqCst);
    }

    pub(crate) fn quiesce_end(&self) {
        if self.quiesce.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.resume.notify(usize::MAX);
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    pub fn is_quiesced(&self) -> bool {
        self.quiesce.load(Ordering::SeqCst) > 0
    }

    fn busy(&self) -> bool {
        // `entering` first: a request moves from `entering` to `in_flight` by incrementing
        // `in_flight` before decrementing `entering`, so this order cannot miss it.
        let entering = self.entering.load(Ordering::SeqCst);
        entering + self.in_flight.load(Ordering::SeqCst) > 0
    }

    /// Wait until no request is in flight or being admitted (called by a drain after
    /// quiescing).
    pub(crate) async fn wait_idle(&self) {
        loop {
            if !self.busy() {
                return;
            }
            let l = self.idle.listen();
            if !self.busy() {
                return;
            }
            l.await;
        }
    }

    /// Admission: announce (`entering`), then check the quiesce counter. A drain raises the
    /// counter first and then waits for `entering` and `in_flight` to reach zero, so a request
    /// is either admitted before the drain waits (and waited for) or queued. `in_flight`
    /// counts only admitted requests: inside a drained section it is zero.
    async fn enter(&self) {
        loop {
            self.entering.fetch_add(1, Ordering::SeqCst);
            if self.quiesce.load(Ordering::SeqCst) == 0 {
                self.in_flight.fetch_add(1, Ordering::SeqCst);
                self.counter_down(&self.entering);
                return;
            }
            let l = self.resume.listen();
            self.counter_down(&self.entering);
            if self.quiesce.load(Ordering::SeqCst) == 0 {
                continue;
            }
            l.await;
        }
    }

    fn leave(&self) {
        self.counter_down(&self.in_flight);
    }

    fn counter_down(&self, c: &AtomicUsize) {
        if c.fetch_sub(1, Ordering::SeqCst) == 1 && self.quiesce.load(Ordering::SeqCst) > 0 {
            self.idle.notify(usize::MAX);
        }
    }
}

/// Leaves the in-flight count when the request ends, however it ends (also when its future is
/// dropped).
struct InFlight<'a>(&'a BackendShared);

/// See [`BlockBackend::admit`].
#[must_use = "the admission ends when the guard is dropped"]
pub struct Admission<'a> {
    _in_flight: InFlight<'a>,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.leave();
    }
}

/// A user of a node. Cheap to clone; usable from any context.
#[derive(Clone)]
pub struct BlockBackend {
    pub(crate) shared: Arc<BackendShared>,
}

impl BlockBackend {
    /// Attach a backend named `name` to `root` with the given permissions, checking them
    /// against the node's other users. A graph change: it takes the main context's [`Graph`]
    /// token (`!Send`), so it cannot be called from another thread.
    ///
    /// [`Graph`]: crate::graph::Graph
    pub fn new(
        _main: &crate::graph::Graph,
        name: &str,
        root: &Arc<Node>,
        perm: Perm,
        shared: Perm,
    ) -> Result<BlockBackend, String> {
        let usage = Use {
            user: if name.is_empty() {
                "an unnamed block device".to_string()
            } else {
                format!("block device '{name}'")
            },
            role: "root".into(),
            perm,
            shared,
        };
        if perm.contains(Perm::WRITE) && root.is_read_only() {
            return Err("Block node is read-only".to_string());
        }
        crate::perm::check(root.name(), &root.uses(), &usage)?;
        let b = Arc::new(BackendShared {
            name: name.to_string(),
            root: ArcSwap::new(root.clone()),
            quiesce: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            entering: AtomicUsize::new(0),
            idle: Event::new(),
            resume: Event::new(),
            perm,
            stats: Stats::default(),
            report_errors: AtomicBool::new(false),
        });
        root.add_parent(ParentRef::Backend(Arc::downgrade(&b)), usage)?;
        Ok(BlockBackend { shared: b })
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The node requests go to now.
    pub fn root(&self) -> Arc<Node> {
        self.shared.root.load_full()
    }

    pub fn length(&self) -> u64 {
        self.shared.root.load().length()
    }

    pub fn in_flight(&self) -> usize {
        self.shared.in_flight()
    }

    pub fn is_quiesced(&self) -> bool {
        self.shared.is_quiesced()
    }

    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    /// Report failed requests as BLOCK_IO_ERROR events (through [`crate::events`]), as a
    /// QEMU device with `rerror`/`werror=report` does. Off by default.
    pub fn set_error_reporting(&self, on: bool) {
        self.shared.report_errors.store(on, Ordering::Relaxed);
    }

    pub fn reports_errors(&self) -> bool {
        self.shared.report_errors.load(Ordering::Relaxed)
    }

    /// A request the driver failed: tell the event sink when this backend reports errors.
    fn report<T>(&self, node: &Node, operation: &str, r: &io::Result<T>) {
        if let Err(e) = r
            && self.reports_errors()
        {
            crate::events::block_io_error(self.name(), node.name(), operation, e);
        }
    }

    pub(crate) fn parent_ref(&self) -> ParentRef {
        ParentRef::Backend(Arc::downgrade(&self.shared))
    }

    fn check_range(&self, node: &Node, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= node.length() => Ok(()),
            _ => Err(io::Error::from_raw_os_error(libc::EIO)),
        }
    }

    fn check_write(&self) -> io::Result<()> {
        if self.shared.perm.contains(Perm::WRITE) {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(libc::EPERM))
        }
    }

    /// Count as a request in flight until the guard drops, admitted past drains like one: for
    /// a user that does node-level I/O of its own (a backup's copies), so that drains wait
    /// for that I/O and new I/O waits out a drain.
    pub async fn admit(&self) -> Admission<'_> {
        self.shared.enter().await;
        Admission {
            _in_flight: InFlight(&self.shared),
        }
    }

    /// Read `buf.len()` bytes at `offset`.
    pub async fn read(&self, offset: u64, buf: IoBuf) -> BufResult {
        self.shared.enter().await;
        let _g = InFlight(&self.shared);
        let node = self.shared.root.load_full();
        let len = buf.len() as u64;
        if let Err(e) = self.check_range(&node, offset, len) {
            return (Err(e), buf);
        }
        let r = crate::io::aligned_read(&node, offset, buf).await;
        self.report(&node, "read", &r.0);
        self.account(&r.0, |s| {
            s.rd_ops.fetch_add(1, Ordering::Relaxed);
            s.rd_bytes.fetch_add(len, Ordering::Relaxed);
        });
        r
    }

    /// Write `buf` at `offset`.
    pub async fn write(&self, offset: u64, buf: IoBuf, flags: ReqFlags) -> BufResult {
        self.shared.enter().await;
        let _g = InFlight(&self.shared);
        let node = self.shared.root.load_full();
        let len = buf.len() as u64;
        if let Err(e) = self
            .check_write()
            .and_then(|_| self.check_range(&node, offset, len))
        {
            return (Err(e), buf);
        }
        let r = crate::io::aligned_write(&node, offset, buf, flags).await;
        self.report(&node, "write", &r.0);
        self.account(&r.0, |s| {
            s.wr_ops.fetch_add(1, Ordering::Relaxed);
            s.wr_bytes.fetch_add(len, Ordering::Relaxed);
        });
        r
    }

    pub async fn flush(&self) -> io::Result<()> {
        self.shared.enter().await;
        let _g = InFlight(&self.shared);
        let node = self.shared.root.load_full();
        let r = node.driver().flush(&node).await;
        self.report(&node, "write", &r);
        self.account(&r, |s| {
            s.flush_ops.fetch_add(1, Ordering::Relaxed);
        });
        r
    }

    pub async fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.shared.enter().await;
        let _g = InFlight(&self.shared);
        let node = self.shared.root.load_full();
        self.check_write()?;
        self.check_range(&node, offset, len)?;
        let r = crate::io::discard(&node, offset, len).await;
        self.report(&node, "write", &r);
        self.account(&r, |s| {
            s.discard_ops.fetch_add(1, Ordering::Relaxed);
        });
        r
    }

    pub async fn write_zeroes(&self, offset: u64, len: u64, flags: ReqFlags) -> io::Result<()> {
        self.shared.enter().await;
        let _g = InFlight(&self.shared);
        let node = self.shared.root.load_full();
        self.check_write()?;
        self.check_range(&node, offset, len)?;
        let r = crate::io::write_zeroes(&node, offset, len, flags).await;
        self.report(&node, "write", &r);
        self.account(&r, |s| {
            s.wr_ops.fetch_add(1, Ordering::Relaxed);
            s.wr_bytes.fetch_add(len, Ordering::Relaxed);
        });
        r
    }

    /// Copy-on-read of `[offset, offset+len)` of the root node without returning the data
    /// (QEMU's prefetch read through copy-on-read; [`crate::io::copy_on_read`]): the parts the
    /// root does not hold itself are copied into it from its backing chain, serialised
    /// against concurrent writes of the range. Needs `write` or `write unchanged`.
    pub async fn copy_on_read(&self, offset: u64, len: u64) -> io::Result<()> {
        self.shared.enter().await;
        let _g = InFlight(&self.shared);
        if !self.shared.perm.contains(Perm::WRITE)
            && !self.shared.perm.contains(Perm::WRITE_UNCHANGED)
        {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        let node = self.shared.root.load_full();
        self.check_range(&node, offset, len)?;
        let r = crate::io::copy_on_read(&node, offset, len, None).await;
        self.report(&node, "read", &r);
        self.account(&r, |s| {
            s.rd_ops.fetch_add(1, Ordering::Relaxed);
            s.rd_bytes.fetch_add(len, Ordering::Relaxed);
        });
        r
    }

    /// Admission of a status query at `offset`: the in-flight guard, the root node and the
    /// bytes left from `offset` to its end.
    async fn status_entry(&self, offset: u64) -> io::Result<(InFlight<'_>, Arc<Node>, u64)> {
        self.shared.enter().await;
        let g = InFlight(&self.shared);
        let node = self.shared.root.load_full();
        let end = node.length();
        if offset >= end {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        Ok((g, node, end - offset))
    }

    pub async fn block_status(&self, offset: u64, len: u64) -> io::Result<BlockStatus> {
        let (_g, node, left) = self.status_entry(offset).await?;
        node.driver()
            .block_status(&node, offset, len.min(left))
            .await
    }

    /// Status through the backing chain and into the data's file
    /// ([`crate::status::status_above`]): what an NBD client's `base:allocation` sees.
    pub async fn block_status_above(&self, offset: u64, len: u64) -> io::Result<Extent> {
        let (_g, node, left) = self.status_entry(offset).await?;
        crate::status::status_above(&node, offset, len.min(left), u32::MAX).await
    }

    pub async fn truncate(&self, len: u64) -> io::Result<u64> {
        self.shared.enter().await;
        let _g = InFlight(&self.shared);
        if !self.shared.perm.contains(Perm::RESIZE) {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        let node = self.shared.root.load_full();
        let n = node.driver().truncate(&node, len).await?;
        node.set_length(n);
        Ok(n)
    }

    fn account<T>(&self, r: &io::Result<T>, ok: impl FnOnce(&Stats)) {
        match r {
            Ok(_) => ok(&self.shared.stats),
            Err(_) => {
                self.shared.stats.failed_ops.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Detach from the root node (a graph change: main context only).
    pub fn detach(self, _main: &crate::graph::Graph) {
        let root = self.shared.root.load_full();
        root.remove_parent(&self.parent_ref());
    }
}
