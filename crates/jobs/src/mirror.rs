//! `blockdev-mirror`: copy a node to a target while its users keep writing; READY once the
//! target has caught up; `job-complete` moves the users to the target (QEMU's block/mirror.c,
//! by its documented behaviour).
//!
//! A `mirror_top` filter is inserted above the source (`Graph::insert_filter_above`), so every
//! user write goes through it; it marks what it wrote in a dirty bitmap after the write landed
//! in the source. The worker takes dirty runs (clearing them before reading, so a write that
//! lands after the read marks the run again) and copies them through the job's own backends.
//! The pivot runs in the main context: inside a drained section of the filter (users' requests
//! queue) the last dirty runs are copied, the target is flushed, the filter's parents move to
//! the target (`Graph::replace_node`) and the filter goes. Cancelling after READY without
//! `force`, or any other cancel, removes the filter and keeps the source.
//!
//! `copy-mode=write-blocking` (from the start, or switched on by `block-job-change`): while
//! the job runs, a user write through the filter goes to the source and then to the target
//! before it completes; the granules it covered wholly are clean afterwards. Background copies
//! and such writes of overlapping ranges are serialised (`RangeLocks`), so a copy that read
//! older data never lands after the newer write. Discards and write-zeroes are still copied
//! in the background (marked dirty).
//!
//! `replaces` names a node under the source through filters whose parents take the target at
//! the pivot instead of the source's users.
//!
//! Ranges that read as zeroes in the source are not read: they become write-zeroes on the
//! target (unmapping unless drive-mirror's `unmap=false`). `sync` incremental/bitmap are
//! refused as QEMU 10.0 refuses them for mirror.

use std::cell::RefCell;
use std::io;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use blockd_aio::IoBuf;
use blockd_block::driver::{BlockStatus, BufResult, IoFuture, ReqFlags};
use blockd_block::{BlockBackend, BlockDriver, Child, Node, Perm, drained, drained_all, strerror};

use crate::bitmap::DirtyBitmap;
use crate::control::{ErrorAction, JobCtx, OnError};
use crate::host::{GraphHost, run_drained};
use crate::job::{JobDriver, LocalFuture, Worker};

#[derive(Debug, Clone)]
pub enum Sync {
    Full,
    Top,
    None,
    /// What these layers hold (an active commit: the chain above the base).
    Layers(Vec<Arc<Node>>),
}

/// Ranges being copied or written to the target right now: overlapping ones wait.
#[derive(Default)]
struct RangeLocks {
    held: std::sync::Mutex<Vec<(u64, u64)>>,
    released: event_listener::Event,
}

struct RangeGuard<'a> {
    locks: &'a RangeLocks,
    range: (u64, u64),
}

impl RangeLocks {
    async fn lock(&self, off: u64, len: u64) -> RangeGuard<'_> {
        let end = off + len;
        loop {
            let listener = self.released.listen();
            {
                let mut h = self.held.lock().unwrap_or_else(|e| e.into_inner());
                if !h.iter().any(|&(o, e)| o < end && off < e) {
                    h.push((off, end));
                    return RangeGuard {
                        locks: self,
                        range: (off, end),
                    };
                }
            }
            listener.await;
        }
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut h = self.locks.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = h.iter().position(|&r| r == self.range) {
            h.swap_remove(i);
        }
        drop(h);
        self.locks.released.notify(usize::MAX);
    }
}

/// What the filter and the worker share for the write-blocking mode.
pub struct ActiveSync {
    write_blocking: AtomicBool,
    /// The worker runs (not cancelled, no error): write-blocking copies only then.
    running: AtomicBool,
    target: BlockBackend,
    ranges: RangeLocks,
    /// Zeroes of the source become write-zeroes on the target that may unmap (`unmap`).
    unmap: bool,
}

impl ActiveSync {
    fn copy_to_target(&self) -> bool {
        self.write_blocking.load(Ordering::SeqCst) && self.running.load(Ordering::SeqCst)
    }
}

/// The filter above the source: passes everything to its child, marks writes dirty (or, in
/// write-blocking mode, writes them to the target too).
struct MirrorTop {
    dirty: Arc<DirtyBitmap>,
    active: std::sync::OnceLock<Arc<ActiveSync>>,
}

fn child(node: &Node) -> io::Result<Arc<Node>> {
    node.child("backing")
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEDIUM))
}

impl BlockDriver for MirrorTop {
    fn format_name(&self) -> &'static str {
        "mirror_top"
    }
    fn is_filter(&self) -> bool {
        true
    }
    fn read<'a>(&'a self, node: &'a Node, off: u64, buf: IoBuf) -> IoFuture<'a, BufResult> {
        Box::pin(async move {
            match child(node) {
                Ok(c) => blockd_block::io::aligned_read(&c, off, buf).await,
                Err(e) => (Err(e), buf),
            }
        })
    }
    fn write<'a>(
        &'a self,
        node: &'a Node,
        off: u64,
        buf: IoBuf,
        flags: ReqFlags,
    ) -> IoFuture<'a, BufResult> {
        Box::pin(async move {
            let len = buf.len() as u64;
            if let Some(a) = self.active.get().filter(|a| a.copy_to_target()) {
                let _range = a.ranges.lock(off, len).await;
                let (r, buf) = match child(node) {
                    Ok(c) => blockd_block::io::aligned_write(&c, off, buf, flags).await,
                    Err(e) => (Err(e), buf),
                };
                if r.is_err() {
                    self.dirty.mark(off, len);
                    return (r, buf);
                }
                let (t, buf) = a.target.write(off, buf, flags).await;
                // The whole granules are now equal on both sides; partial ones are copied.
                self.dirty.mark(off, len);
                if t.is_ok() {
                    self.dirty.clear_covered(off, len);
                }
                return (r, buf);
            }
            let r = match child(node) {
                Ok(c) => blockd_block::io::aligned_write(&c, off, buf, flags).await,
                Err(e) => (Err(e), buf),
            };
            // Marked after the data landed (also on failure: the range may have changed).
            self.dirty.mark(off, len);
            r
        })
    }
    fn flush<'a>(&'a self, node: &'a Node) -> IoFuture<'a, io::Result<()>> {
        Box::pin(async move {
            let c = child(node)?;
            c.driver().flush(&c).await
        })
    }
    fn discard<'a>(&'a self, node: &'a Node, off: u64, len: u64) -> IoFuture<'a, io::Result<()>> {
        Box::pin(async move {
            let c = child(node)?;
            let r = c.driver().discard(&c, off, len).await;
            self.dirty.mark(off, len);
            r
        })
    }
    fn write_zeroes<'a>(
        &'a self,
        node: &'a Node,
        off: u64,
        len: u64,
        flags: ReqFlags,
    ) -> IoFuture<'a, io::Result<()>> {
        Box::pin(async move {
            let c = child(node)?;
            let r = blockd_block::io::write_zeroes(&c, off, len, flags).await;
            self.dirty.mark(off, len);
            r
        })
    }
    fn block_status<'a>(
        &'a self,
        node: &'a Node,
        off: u64,
        len: u64,
    ) -> IoFuture<'a, io::Result<BlockStatus>> {
        Box::pin(async move {
            let c = child(node)?;
            c.driver().block_status(&c, off, len).await
        })
    }
    fn truncate<'a>(&'a self, _node: &'a Node, _len: u64) -> IoFuture<'a, io::Result<u64>> {
        // A mirror's source cannot change size under it.
        Box::pin(async { Err(blockd_block::driver::not_supported()) })
    }
}

pub struct MirrorParams {
    /// "mirror", or "commit" for an active commit.
    pub job_type: &'static str,
    pub source: Arc<Node>,
    pub target: Arc<Node>,
    pub filter_name: String,
    pub sync: Sync,
    pub granularity: u64,
    pub buf_size: u64,
    pub on_source_error: OnError,
    pub on_target_error: OnError,
    /// `copy-mode=write-blocking` from the start.
    pub write_blocking: bool,
    /// `replaces`: a node below the source through filters whose parents move to the target
    /// at completion (instead of the source's users).
    pub replaces: Option<Arc<Node>>,
    /// drive-mirror's `unmap` (blockdev-mirror: always): ranges that read as zeroes in the
    /// source are written as zeroes that may unmap the target's blocks; otherwise as zeroes
    /// that keep them allocated.
    pub unmap: bool,
}

pub struct MirrorJob {
    active: Arc<ActiveSync>,
    replaces: Option<Arc<Node>>,
    job_type: &'static str,
    me: Weak<MirrorJob>,
    host: Weak<dyn GraphHost>,
    source: Arc<Node>,
    target: Arc<Node>,
    filter: RefCell<Option<Arc<Node>>>,
    dirty: Arc<DirtyBitmap>,
    source_be: BlockBackend,
    target_be: BlockBackend,
    chunk: u64,
    /// The worker ended because of `job-complete` (not a cancel): prepare pivots.
    pivot: Arc<AtomicBool>,
    layer_bes: Vec<BlockBackend>,
    /// The worker's job context (set when it starts): the pivot's last copies count as
    /// progress too.
    progress: Arc<std::sync::OnceLock<JobCtx>>,
}

/// Insert the filter and build the job. Async: the filter goes in inside a drained section.
pub async fn new_mirror(
    host: &Rc<dyn GraphHost>,
    p: MirrorParams,
) -> Result<(Rc<MirrorJob>, Worker), String> {
    if Arc::ptr_eq(&p.source, &p.target) {
        return Err("Can't mirror node into itself".into());
    }
    // An active commit grows a smaller base first (as QEMU's); a mirror needs equal sizes.
    let grow_target = p.job_type == "commit" && p.target.length() < p.source.length();
    if p.source.length() != p.target.length() && !grow_target {
        return Err("Source and target image have different sizes".into());
    }
    let len = p.source.length();
    let dirty = Arc::new(DirtyBitmap::new(len, p.granularity));
    let filter = {
        let mut g = host.graph().borrow_mut();
        g.add_node(
            &p.filter_name,
            Box::new(MirrorTop {
                dirty: dirty.clone(),
                active: std::sync::OnceLock::new(),
            }),
            vec![Child {
                name: "backing".into(),
                node: p.source.clone(),
                perm: Perm::CONSISTENT_READ | Perm::WRITE,
                shared: Perm::ALL,
            }],
            len,
        )?
    };
    // users of the source now write through the filter
    let guard = drained_all(&[p.source.clone(), filter.clone()]).await;
    let r = {
        let mut g = host.graph().borrow_mut();
        run_drained(g.insert_filter_above(&p.source, &filter))
    };
    drop(guard);
    let undo_filter = |host: &Rc<dyn GraphHost>, filter: &Arc<Node>| {
        let mut g = host.graph().borrow_mut();
        let _ = run_drained(g.remove_filter(filter));
    };
    if let Err(e) = r.unwrap_or_else(|| Err("could not insert the mirror filter".into())) {
        undo_filter(host, &filter);
        return Err(e);
    }
    let bes = {
        let g = host.graph().borrow();
        g.new_backend("", &p.source, Perm::CONSISTENT_READ, Perm::ALL)
            .and_then(|s| {
                let resize = if grow_target {
                    Perm::RESIZE
                } else {
                    Perm::NONE
                };
                match g.new_backend(
                    "",
                    &p.target,
                    Perm::CONSISTENT_READ | Perm::WRITE | resize,
                    Perm::ALL.minus(Perm::WRITE).minus(resize),
                ) {
                    Ok(t) => Ok((s, t)),
                    Err(e) => {
                        s.detach(&g);
                        Err(e)
                    }
                }
            })
    };
    let (source_be, target_be) = match bes {
        Ok(v) => v,
        Err(e) => {
            undo_filter(host, &filter);
            return Err(e);
        }
    };
    let mut layer_bes = Vec::new();
    if let Sync::Layers(layers) = &p.sync {
        let g = host.graph().borrow();
        for n in layers {
            match g.new_backend("", n, Perm::CONSISTENT_READ, Perm::ALL) {
                Ok(b) => layer_bes.push(b),
                Err(e) => {
                    for b in layer_bes
                        .drain(..)
                        .chain([source_be.clone(), target_be.clone()])
                    {
                        b.detach(&g);
                    }
                    drop(g);
                    undo_filter(host, &filter);
                    return Err(e);
                }
            }
        }
    }
    let chunk = (p.buf_size / MAX_IN_FLIGHT as u64).clamp(p.granularity, 4 << 20) / p.granularity
        * p.granularity;
    let pivot = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(std::sync::OnceLock::new());
    let active = Arc::new(ActiveSync {
        write_blocking: AtomicBool::new(p.write_blocking),
        running: AtomicBool::new(false),
        target: target_be.clone(),
        ranges: RangeLocks::default(),
        unmap: p.unmap,
    });
    let filter_node = job_filter_set_active(&filter, &active);
    debug_assert!(filter_node);
    let job = Rc::new_cyclic(|me| MirrorJob {
        active: active.clone(),
        replaces: p.replaces.clone(),
        job_type: p.job_type,
        layer_bes: layer_bes.clone(),
        me: me.clone(),
        host: Rc::downgrade(host),
        source: p.source.clone(),
        target: p.target.clone(),
        filter: RefCell::new(Some(filter)),
        dirty: dirty.clone(),
        source_be: source_be.clone(),
        target_be: target_be.clone(),
        chunk,
        pivot: pivot.clone(),
        progress: progress.clone(),
    });
    let w = WorkerState {
        buf_size: p.buf_size.max(chunk),
        source: source_be,
        target: target_be,
        dirty,
        chunk,
        sync: p.sync,
        layers: layer_bes,
        on_source_error: p.on_source_error,
        on_target_error: p.on_target_error,
        pivot,
        active,
        progress,
    };
    let worker: Worker = Box::new(move |ctx: JobCtx| Box::pin(async move { w.run(ctx).await }));
    Ok((job, worker))
}

/// Bytes copied to the target after which a flush of the target starts in the background
/// while the copy goes on: the page cache's writeback then overlaps the copying instead of all
/// of it waiting for the flush before READY (the kernel itself starts writing back only at a
/// share of the memory far above a typical image).
const BACKGROUND_FLUSH_BYTES: u64 = 16 << 20;

/// Copies a mirror has in flight at most (QEMU's default is 16).
const MAX_IN_FLIGHT: usize = 16;

struct WorkerState {
    buf_size: u64,
    source: BlockBackend,
    target: BlockBackend,
    dirty: Arc<DirtyBitmap>,
    chunk: u64,
    sync: Sync,
    layers: Vec<BlockBackend>,
    on_source_error: OnError,
    on_target_error: OnError,
    pivot: Arc<AtomicBool>,
    active: Arc<ActiveSync>,
    progress: Arc<std::sync::OnceLock<JobCtx>>,
}

/// Give the filter the job's shared write-blocking state.
fn job_filter_set_active(filter: &Arc<Node>, active: &Arc<ActiveSync>) -> bool {
    let any: &dyn std::any::Any = filter.driver();
    any.downcast_ref::<MirrorTop>()
        .is_some_and(|f| f.active.set(active.clone()).is_ok())
}

/// Clears `running` when the worker ends, however it ends.
struct RunningFlag(Arc<ActiveSync>);

impl Drop for RunningFlag {
    fn drop(&mut self) {
        self.0.running.store(false, Ordering::SeqCst);
    }
}

/// Copy one run; on failure the run is dirty again. What reads as zeroes in the source (a
/// hole, a zero cluster: no need to read it) becomes a write-zeroes on the target, as QEMU's
/// mirror does.
async fn copy_run(
    active: &ActiveSync,
    source: &BlockBackend,
    target: &BlockBackend,
    off: u64,
    n: u64,
) -> Result<(), (bool, io::Error)> {
    let _range = active.ranges.lock(off, n).await;
    // Unallocated ranges read as zeroes without a backing file and as the backing file's
    // data with one (QEMU's block status adds "zero" for the former).
    let no_backing = source.root().child("backing").is_none();
    let end = off + n;
    let mut pos = off;
    while pos < end {
        let st = source
            .block_status(pos, end - pos)
            .await
            .map_err(|e| (true, e))?;
        let len = st.len.clamp(1, end - pos);
        let zero = if st.allocated { st.zero } else { no_backing };
        if zero && !st.data {
            let flags = if active.unmap {
                ReqFlags::MAY_UNMAP
            } else {
                ReqFlags::NONE
            };
            target
                .write_zeroes(pos, len, flags)
                .await
                .map_err(|e| (false, e))?;
        } else {
            let (r, buf) = source.read(pos, IoBuf::new(len as usize, 4096)).await;
            r.map_err(|e| (true, e))?;
            target
                .write(pos, buf, ReqFlags::NONE)
                .await
                .0
                .map_err(|e| (false, e))?;
        }
        pos += len;
    }
    Ok(())
}

impl WorkerState {
    async fn run(self, ctx: JobCtx) -> Result<(), String> {
        let _ = self.progress.set(ctx.clone());
        let len = self.source.length();
        if self.target.length() < len {
            self.target.truncate(len).await.map_err(|e| strerror(&e))?;
        }
        self.active.running.store(true, Ordering::SeqCst);
        let _running = RunningFlag(self.active.clone());
        match self.sync {
            Sync::Full => self.dirty.mark(0, len),
            Sync::Layers(_) => {
                let mut off = 0;
                while off < len {
                    let (alloc, n) = crate::copy::allocated_in_layers(
                        &self.layers,
                        off,
                        (len - off).min(1 << 30),
                    )
                    .await
                    .map_err(|e| strerror(&e))?;
                    if alloc {
                        self.dirty.mark(off, n);
                    }
                    off += n.max(1);
                }
            }
            Sync::None => {}
            Sync::Top => {
                let mut off = 0;
                while off < len {
                    let st = self
                        .source
                        .block_status(off, len - off)
                        .await
                        .map_err(|e| strerror(&e))?;
                    if st.allocated {
                        self.dirty.mark(off, st.len);
                    }
                    off += st.len.max(1);
                }
            }
        }
        ctx.set_total(self.dirty.dirty_bytes());
        let mut ready = false;
        // A flush of the target running beside the copies, and what was written since the
        // last one started (see BACKGROUND_FLUSH_BYTES). Dropping the task cancels it.
        let mut bg_flush: Option<blockd_aio::Task<io::Result<()>>> = None;
        let mut unflushed = 0u64;
        loop {
            if ctx.is_cancelled() {
                return Ok(());
            }
            if ready && (ctx.complete_requested() || ctx.cancel_requested()) {
                self.pivot.store(
                    ctx.complete_requested() && !ctx.cancel_requested(),
                    Ordering::SeqCst,
                );
                return Ok(());
            }
            // Up to MAX_IN_FLIGHT runs at once, within buf-size, each its own task on this
            // context (the requests overlap in the ring).
            let mut runs = Vec::new();
            let mut bytes = 0;
            while runs.len() < MAX_IN_FLIGHT && bytes < self.buf_size {
                match self.dirty.take(self.chunk) {
                    Some((off, n)) => {
                        bytes += n;
                        let (src, tgt) = (self.source.clone(), self.target.clone());
                        let active = self.active.clone();
                        let task = blockd_aio::spawn(async move {
                            copy_run(&active, &src, &tgt, off, n).await
                        });
                        runs.push((off, n, task));
                    }
                    None => break,
                }
            }
            match runs.is_empty() {
                false => {
                    let mut failure = None;
                    let mut done = 0;
                    for (off, n, task) in runs {
                        match task.await {
                            Ok(()) => done += n,
                            Err(err) => {
                                self.dirty.mark(off, n);
                                failure.get_or_insert(err);
                            }
                        }
                    }
                    ctx.add_progress(done);
                    let (cur, _) = ctx.ctl.progress();
                    ctx.set_total(cur + self.dirty.dirty_bytes());
                    unflushed += done;
                    if bg_flush.as_ref().is_some_and(|t| t.is_finished())
                        && let Some(t) = bg_flush.take()
                        && let Err(e) = t.await
                    {
                        failure.get_or_insert((false, e));
                    }
                    if failure.is_none()
                        && bg_flush.is_none()
                        && unflushed >= BACKGROUND_FLUSH_BYTES
                    {
                        unflushed = 0;
                        let tgt = self.target.clone();
                        bg_flush = Some(blockd_aio::spawn(async move { tgt.flush().await }));
                    }
                    if let Some((read, e)) = failure {
                        let policy = if read {
                            self.on_source_error
                        } else {
                            self.on_target_error
                        };
                        match ctx.error_action(policy, read, &e) {
                            ErrorAction::Report => return Err(strerror(&e)),
                            ErrorAction::Stop => ctx.pause_point().await,
                            ErrorAction::Ignore => ctx.sleep(Duration::from_millis(10)).await,
                        }
                        continue;
                    }
                    ctx.rate_limit(done).await;
                }
                true => {
                    if !ready {
                        self.target.flush().await.map_err(|e| strerror(&e))?;
                        if self.dirty.dirty_bytes() == 0 {
                            ready = true;
                            ctx.set_ready();
                        }
                        continue;
                    }
                    // converged: wait for new writes, complete or cancel
                    ctx.sleep(Duration::from_millis(5)).await;
                    let (cur, _) = ctx.ctl.progress();
                    ctx.set_total(cur + self.dirty.dirty_bytes());
                }
            }
        }
    }
}

impl MirrorJob {
    /// Remove the filter: its users go back to the source (main context, drained).
    async fn remove_filter(&self) -> Result<(), String> {
        let Some(filter) = self.filter.borrow_mut().take() else {
            return Ok(());
        };
        let host = self.host.upgrade().ok_or("the block graph is gone")?;
        let guard = drained_all(&[filter.clone(), self.source.clone()]).await;
        let r = {
            let mut g = host.graph().borrow_mut();
            run_drained(g.remove_filter(&filter))
        };
        drop(guard);
        r.unwrap_or_else(|| Err("could not remove the mirror filter".into()))
    }

    /// The pivot: last dirty runs copied while the users are drained, then they use the target.
    async fn pivot(&self) -> Result<(), String> {
        let Some(filter) = self.filter.borrow().clone() else {
            return Err("the mirror filter is gone".into());
        };
        let host = self.host.upgrade().ok_or("the block graph is gone")?;
        let users = drained(&filter).await;
        while let Some((off, n)) = self.dirty.take(self.chunk) {
            if let Err((_, e)) =
                copy_run(&self.active, &self.source_be, &self.target_be, off, n).await
            {
                self.dirty.mark(off, n);
                return Err(strerror(&e));
            }
            if let Some(ctx) = self.progress.get() {
                ctx.add_progress(n);
            }
        }
        // Nothing is left to copy: the job's length is what it did (QEMU's COMPLETED has
        // offset == len), also when writes came after the worker last counted.
        if let Some(ctx) = self.progress.get() {
            let (done, _) = ctx.ctl.progress();
            ctx.set_total(done);
        }
        self.target_be.flush().await.map_err(|e| strerror(&e))?;
        let mut nodes = vec![filter.clone(), self.source.clone(), self.target.clone()];
        nodes.extend(self.replaces.iter().cloned());
        let all = drained_all(&nodes).await;
        // `replaces` (below the source): its parents take the target, the source's users
        // stay on the source; else the source's users (the filter's parents) take it
        let replaced = match &self.replaces {
            Some(n) if !Arc::ptr_eq(n, &self.source) => n.clone(),
            _ => filter.clone(),
        };
        let r = {
            let mut g = host.graph().borrow_mut();
            run_drained(g.replace_node(&replaced, &self.target))
                .unwrap_or_else(|| Err("could not pivot".into()))
                .and_then(|_| {
                    run_drained(g.remove_filter(&filter))
                        .unwrap_or_else(|| Err("could not remove the mirror filter".into()))
                })
        };
        drop(all);
        drop(users);
        self.filter.borrow_mut().take();
        r
    }
}

impl MirrorJob {
    /// `block-job-change`: only background -> write-blocking (as QEMU).
    pub fn change_copy_mode(&self, write_blocking: bool) -> Result<(), String> {
        let cur = self.active.write_blocking.load(Ordering::SeqCst);
        if cur == write_blocking {
            return Ok(());
        }
        if !write_blocking {
            return Err("Change to copy mode 'background' is not implemented".into());
        }
        self.active.write_blocking.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// QEMU's `actively-synced`: write-blocking, READY and nothing left to copy.
    pub fn actively_synced(&self) -> bool {
        self.active.copy_to_target() && self.dirty.dirty_bytes() == 0
    }
}

impl JobDriver for MirrorJob {
    fn job_type(&self) -> &'static str {
        self.job_type
    }

    fn nodes(&self) -> Vec<Arc<Node>> {
        vec![self.source.clone(), self.target.clone()]
    }

    fn can_complete(&self) -> bool {
        true
    }

    fn change(&self, opts: &serde_json::Map<String, serde_json::Value>) -> Result<(), String> {
        match opts.get("copy-mode").and_then(|v| v.as_str()) {
            Some("write-blocking") => self.change_copy_mode(true),
            // absent (options of another job type): QEMU reads the default, background
            _ => self.change_copy_mode(false),
        }
    }

    fn block_info_extra(&self) -> Option<(&'static str, serde_json::Value)> {
        // only mirror jobs report it (an active commit is a "commit" job)
        (self.job_type == "mirror").then(|| {
            (
                "actively-synced",
                serde_json::Value::Bool(self.actively_synced()),
            )
        })
    }

    fn soft_cancel_when_ready(&self) -> bool {
        true
    }

    fn prepare(&self) -> LocalFuture<'_, Result<(), String>> {
        Box::pin(async move {
            if self.pivot.load(Ordering::SeqCst) {
                self.pivot().await
            } else {
                self.remove_filter().await
            }
        })
    }

    fn abort(&self) {
        // The filter goes in a drained section, which is awaited: on its own task.
        if let Some(me) = self.me.upgrade() {
            blockd_aio::spawn(async move {
                if let Err(e) = me.remove_filter().await {
                    eprintln!("blockd-jobs: mirror: {e}");
                }
            })
            .detach();
        }
    }

    fn clean(&self) {
        if let Some(host) = self.host.upgrade() {
            let g = host.graph().borrow();
            self.source_be.clone().detach(&g);
            self.target_be.clone().detach(&g);
            for b in &self.layer_bes {
                b.clone().detach(&g);
            }
            drop(g);
            // a target drive-mirror opened, unused after a cancel, is closed
            let t = &self.target;
            let mut g = host.graph().borrow_mut();
            if t.is_auto_named() && t.parent_count() == 0 && g.node(t.name()).is_some() {
                let _ = g.remove(t.name());
            }
            drop(g);
            host.graph_changed();
        }
    }
}
