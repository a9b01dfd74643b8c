//! The backup job (`blockdev-backup`, `drive-backup`; QEMU's block/backup.c by its documented
//! behaviour): the target receives the source as it was when the job started, while guests
//! keep writing.
//!
//! A copy-before-write filter (`cbw.rs`) goes above the source in the main context, inside a
//! drained section; from then on every guest write first copies the clusters it changes that
//! still hold point-in-time data. The worker copies the remaining clusters in order through the
//! same [`BlockCopy`] state (so a cluster is never copied twice or after the guest changed
//! it), with the job's rate limit, pause points and error policy (`on-source-error` for
//! reads, `on-target-error` for writes; `ignore` and `stop` retry the cluster, as QEMU).
//! `sync=full` copies everything, `top` only what the source's top layer holds, `none` copies
//! nothing by itself (only on guest writes) and runs until cancelled. At the end the filter
//! goes (main context, drained). `sync=bitmap`/`incremental` need the block layer's dirty
//! bitmaps and are refused by the daemon until they exist.

use std::cell::RefCell;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::time::Duration;

use blockd_block::{BlockBackend, Node, Perm, drained_all, strerror};

use crate::cbw::{BlockCopy, CopyBeforeWrite, file_edge, target_edge};
use crate::control::{ErrorAction, JobCtx, OnError};
use crate::host::{GraphHost, run_drained};
use crate::job::{JobDriver, LocalFuture, Worker};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackupSync {
    Full,
    Top,
    None,
}

pub struct BackupParams {
    pub source: Arc<Node>,
    pub target: Arc<Node>,
    /// The name of the copy-before-write filter (`filter-node-name` or a generated one).
    pub filter_name: String,
    pub sync: BackupSync,
    pub compress: bool,
    pub on_source_error: OnError,
    pub on_target_error: OnError,
    /// Clusters to copy instead of all (sync=bitmap); `None`: by `sync`.
    pub to_copy: Option<crate::cbw::Bits>,
    /// `x-perf.min-cluster-size` (0: the default).
    pub min_cluster: u64,
    /// `x-perf.max-chunk`: the most the worker copies at once (0: its default).
    pub max_chunk: u64,
    /// `discard-source`: what is on the target is discarded on the source.
    pub discard_source: bool,
}

/// What runs when a backup ends: `true` on success, with the copy state (bitmap handling).
pub type OnEnd = Box<dyn FnOnce(bool, &BlockCopy)>;

pub struct BackupJob {
    me: Weak<BackupJob>,
    host: Weak<dyn GraphHost>,
    source: Arc<Node>,
    target: Arc<Node>,
    filter: RefCell<Option<Arc<Node>>>,
    bcs: Arc<BlockCopy>,
    /// Called at the end with `true` on success (bitmap handling of the daemon).
    on_end: RefCell<Option<OnEnd>>,
    /// Counts the worker's copies as in flight on the source (see `new_backup`).
    admit: BlockBackend,
}

/// Insert the filter and build the job (async: the filter goes in inside a drained section).
pub async fn new_backup(
    host: &Rc<dyn GraphHost>,
    p: BackupParams,
) -> Result<(Rc<BackupJob>, Worker), String> {
    if Arc::ptr_eq(&p.source, &p.target) {
        return Err("Source and target cannot be the same".into());
    }
    if p.source.length() != p.target.length() {
        return Err("Source and target image have different sizes".into());
    }
    let len = p.source.length();
    let cluster = crate::cbw::cluster_size_for(&p.target, p.min_cluster);
    let bcs = Arc::new(BlockCopy::new(
        len,
        cluster,
        p.compress,
        crate::cbw::OnCbwError::BreakGuestWrite,
        None,
    ));
    if let Some(bits) = p.to_copy.clone() {
        bcs.set_to_copy(bits);
    }
    bcs.set_skip_unallocated(p.sync == BackupSync::Top);
    bcs.set_discard_source(p.discard_source);
    let filter = {
        let mut g = host.graph().borrow_mut();
        g.add_node(
            &p.filter_name,
            Box::new(CopyBeforeWrite { bcs: bcs.clone() }),
            vec![file_edge(p.source.clone()), target_edge(p.target.clone())],
            len,
        )?
    };
    let guard = drained_all(&[p.source.clone(), filter.clone()]).await;
    let r = {
        let mut g = host.graph().borrow_mut();
        run_drained(g.insert_filter_above(&p.source, &filter))
            .unwrap_or_else(|| Err("could not insert the backup filter".into()))
    };
    drop(guard);
    if let Err(e) = r {
        let mut g = host.graph().borrow_mut();
        let _ = g.remove(filter.name());
        return Err(e);
    }
    // The worker's copies are node-level I/O (as QEMU's block-copy on the filter's children):
    // this backend on the source only counts them in flight, so drains of the source wait for
    // a copy and a copy waits out a drain (it is taken before the copy's range lock).
    let admit = {
        let g = host.graph().borrow();
        g.new_backend("", &p.source, Perm::NONE, Perm::ALL)
    };
    let admit = match admit {
        Ok(b) => b,
        Err(e) => {
            let guard = drained_all(&[p.source.clone(), filter.clone()]).await;
            let mut g = host.graph().borrow_mut();
            let _ = run_drained(g.remove_filter(&filter));
            drop(g);
            drop(guard);
            return Err(e);
        }
    };
    let job = Rc::new_cyclic(|me| BackupJob {
        me: me.clone(),
        host: Rc::downgrade(host),
        source: p.source.clone(),
        target: p.target.clone(),
        filter: RefCell::new(Some(filter.clone())),
        bcs: bcs.clone(),
        on_end: RefCell::new(None),
        admit: admit.clone(),
    });
    let chunk = match p.max_chunk {
        0 => CHUNK.max(cluster),
        m => m.min(CHUNK.max(cluster)) / cluster * cluster,
    };
    let w = WorkerState {
        admit,
        chunk,
        bcs,
        filter,
        sync: p.sync,
        on_source_error: p.on_source_error,
        on_target_error: p.on_target_error,
    };
    let worker: Worker = Box::new(move |ctx: JobCtx| Box::pin(async move { w.run(ctx).await }));
    Ok((job, worker))
}

struct WorkerState {
    admit: BlockBackend,
    chunk: u64,
    bcs: Arc<BlockCopy>,
    filter: Arc<Node>,
    sync: BackupSync,
    on_source_error: OnError,
    on_target_error: OnError,
}

/// Bytes the worker copies at once (QEMU's backup works in chunks of clusters too).
const CHUNK: u64 = 1 << 20;

impl WorkerState {
    async fn run(self, ctx: JobCtx) -> Result<(), String> {
        let len = self.bcs.len();
        ctx.set_total(self.bcs.remaining());
        if self.sync == BackupSync::None {
            // only guest writes copy; the job ends when cancelled
            while !ctx.is_cancelled() {
                ctx.sleep(Duration::from_millis(50)).await;
            }
            return Ok(());
        }
        let mut off = 0;
        while off < len {
            if ctx.is_cancelled() {
                return Ok(());
            }
            let Some(next) = self.bcs.next_to_copy(off) else {
                break;
            };
            let n = self.chunk.min(len - next);
            // the filter's current children (a graph change above does not move them)
            let (Some(source), Some(target)) =
                (self.filter.child("file"), self.filter.child("target"))
            else {
                return Err("the backup filter lost its children".into());
            };
            let admitted = self.admit.admit().await;
            let copied = self.bcs.copy(&source, &target, next, n).await;
            drop(admitted);
            match copied {
                Ok(done) => {
                    ctx.add_progress(n);
                    ctx.rate_limit(done).await;
                    off = next + n;
                }
                Err(e) => {
                    let policy = if e.read {
                        self.on_source_error
                    } else {
                        self.on_target_error
                    };
                    match ctx.error_action(policy, e.read, &e.err) {
                        ErrorAction::Report => return Err(strerror(&e.err)),
                        ErrorAction::Stop => ctx.pause_point().await,
                        ErrorAction::Ignore => ctx.sleep(Duration::from_millis(10)).await,
                    }
                    // the same chunk again
                    off = next;
                }
            }
        }
        if let Some(t) = self.filter.child("target") {
            t.driver().flush(&t).await.map_err(|e| strerror(&e))?;
        }
        Ok(())
    }
}

impl BackupJob {
    /// Run `f` at the end with the outcome (the daemon's bitmap handling).
    pub fn set_on_end(&self, f: OnEnd) {
        *self.on_end.borrow_mut() = Some(f);
    }

    pub fn block_copy(&self) -> Arc<BlockCopy> {
        self.bcs.clone()
    }

    /// The filter's name (filter-node-name or the generated one).
    pub fn filter_name(&self) -> Option<String> {
        self.filter.borrow().as_ref().map(|f| f.name().to_string())
    }

    /// Remove the filter: its users go back to the source (main context, drained).
    async fn remove_filter(&self) -> Result<(), String> {
        let Some(filter) = self.filter.borrow_mut().take() else {
            return Ok(());
        };
        self.bcs.stop();
        let host = self.host.upgrade().ok_or("the block graph is gone")?;
        self.admit.clone().detach(&host.graph().borrow());
        let below = filter.child("file").unwrap_or_else(|| self.source.clone());
        let guard = drained_all(&[filter.clone(), below]).await;
        let r = {
            let mut g = host.graph().borrow_mut();
            run_drained(g.remove_filter(&filter))
                .unwrap_or_else(|| Err("could not remove the backup filter".into()))
        };
        drop(guard);
        host.graph_changed();
        r
    }

    /// After a failure or cancel: the filter goes, then an unused target drive-backup opened.
    async fn finish(&self) -> Result<(), String> {
        self.remove_filter().await?;
        self.close_unused_target();
        Ok(())
    }

    fn close_unused_target(&self) {
        if let Some(host) = self.host.upgrade() {
            let t = &self.target;
            let mut g = host.graph().borrow_mut();
            if t.is_auto_named() && t.parent_count() == 0 && g.node(t.name()).is_some() {
                let _ = g.remove(t.name());
            }
            drop(g);
            host.graph_changed();
        }
    }

    fn end(&self, ok: bool) {
        if let Some(f) = self.on_end.borrow_mut().take() {
            f(ok, &self.bcs);
        }
    }
}

impl JobDriver for BackupJob {
    fn job_type(&self) -> &'static str {
        "backup"
    }

    /// As QEMU: the target and the job's own filter; the source stays usable by other jobs
    /// (a second backup stacks its filter above the first).
    fn nodes(&self) -> Vec<Arc<Node>> {
        let mut v = vec![self.target.clone()];
        v.extend(self.filter.borrow().iter().cloned());
        v
    }

    fn prepare(&self) -> LocalFuture<'_, Result<(), String>> {
        Box::pin(async move { self.remove_filter().await })
    }

    fn commit(&self) {
        self.end(true);
    }

    fn abort(&self) {
        self.end(false);
        // The filter goes in a drained section, which is awaited: on its own task.
        if let Some(me) = self.me.upgrade() {
            blockd_aio::spawn(async move {
                if let Err(e) = me.finish().await {
                    eprintln!("blockd-jobs: backup: {e}");
                }
            })
            .detach();
        }
    }

    fn clean(&self) {
        // after a success the filter is gone already (prepare)
        if self.filter.borrow().is_none() {
            self.close_unused_target();
        }
    }
}
