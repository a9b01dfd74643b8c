//! A node of the block graph (QEMU's BlockDriverState): a driver instance, its children, the
//! parents that use it, its quiesce counter and its length.
//!
//! Topology readers (requests, on any thread) see children through an atomically swapped `Arc`
//! of the child list; an in-flight request holds the `Arc<Node>`s it uses. Parents are only read
//! and changed by the main context (drain propagation and graph changes), under a mutex held for
//! a few instructions.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use arc_swap::ArcSwap;

use crate::backend::BackendShared;
use crate::driver::{BlockDriver, Limits};
use crate::perm::{Perm, Use};

/// An edge from a node to one of its children.
#[derive(Clone)]
pub struct Child {
    /// The child's name in the parent ("file", "backing", "data-file"...).
    pub name: String,
    pub node: Arc<Node>,
    pub perm: Perm,
    pub shared: Perm,
}

/// Who uses a node.
#[derive(Clone)]
pub(crate) enum ParentRef {
    Node(Weak<Node>),
    Backend(Weak<BackendShared>),
}

pub(crate) struct ParentLink {
    pub(crate) parent: ParentRef,
    /// This edge's parent was quiesced because the node was (QEMU's `quiesced_parent`).
    pub(crate) quiesced: bool,
    pub(crate) usage: Use,
}

pub struct Node {
    name: String,
    driver: Box<dyn BlockDriver>,
    children: ArcSwap<Vec<Child>>,
    pub(crate) parents: Mutex<Vec<ParentLink>>,
    quiesce: AtomicUsize,
    length: AtomicU64,
    read_only: AtomicBool,
    /// Opened with `force-share=on` (a reopen cannot change it, as in QEMU).
    force_share: AtomicBool,
    /// Swapped only by a reopen (cache.direct), inside a drained section.
    limits: ArcSwap<Limits>,
    /// Set by `generated names` so `query-named-block-nodes` can tell.
    auto_named: bool,
    /// Dirty bitmaps, marked by every write through `io.rs` (`dirty_bitmap.rs`).
    dirty_bitmaps: Arc<crate::dirty_bitmap::DirtyBitmapList>,
    /// Opened with `discard=unmap`: discards reach the driver and mark dirty bitmaps (QEMU
    /// drops other discards before either).
    discard_unmap: AtomicBool,
    /// Writes in flight and serialising requests (`serialise.rs`).
    requests: Arc<crate::serialise::RequestTracker>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("name", &self.name)
            .field("driver", &self.driver.format_name())
            .field("length", &self.length())
            .finish()
    }
}

impl Node {
    pub(crate) fn new(
        name: String,
        auto_named: bool,
        driver: Box<dyn BlockDriver>,
        children: Vec<Child>,
        length: u64,
        read_only: bool,
    ) -> Arc<Node> {
        let limits = driver.limits();
        let dirty_bitmaps = driver.dirty_bitmap_list().unwrap_or_default();
        Arc::new(Node {
            name,
            driver,
            children: ArcSwap::from_pointee(children),
            parents: Mutex::new(Vec::new()),
            quiesce: AtomicUsize::new(0),
            length: AtomicU64::new(round_to_sector(length)),
            read_only: AtomicBool::new(read_only),
            force_share: AtomicBool::new(false),
            limits: ArcSwap::from_pointee(limits),
            auto_named,
            dirty_bitmaps,
            discard_unmap: AtomicBool::new(false),
            requests: crate::serialise::RequestTracker::new(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn is_auto_named(&self) -> bool {
        self.auto_named
    }

    /// The node's request tracker (request serialisation, `serialise.rs`).
    pub fn requests(&self) -> &Arc<crate::serialise::RequestTracker> {
        &self.requests
    }

    /// The node's dirty bitmaps.
    pub fn dirty_bitmaps(&self) -> &Arc<crate::dirty_bitmap::DirtyBitmapList> {
        &self.dirty_bitmaps
    }

    /// Whether the node was opened with `discard=unmap`.
    pub fn discard_unmap(&self) -> bool {
        self.discard_unmap.load(Ordering::Acquire)
    }

    pub(crate) fn set_discard_unmap(&self, v: bool) {
        self.discard_unmap.store(v, Ordering::Release);
    }

    pub fn driver(&self) -> &dyn BlockDriver {
        &*self.driver
    }

    /// The node's length in bytes: one atomic load, from any thread, at any time (also while
    /// the node is being resized: readers see the old or the new length, never a torn value).
    pub fn length(&self) -> u64 {
        self.length.load(Ordering::Acquire)
    }

    /// Lengths are whole 512-byte sectors, rounded up, as in QEMU (the tail of a file whose
    /// size is not a multiple of 512 reads as zeroes).
    pub(crate) fn set_length(&self, len: u64) {
        self.length.store(round_to_sector(len), Ordering::Release);
        // Dirty bitmaps follow the node's size (QEMU's bdrv_dirty_bitmap_truncate).
        self.dirty_bitmaps.resize(round_to_sector(len));
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only.load(Ordering::Acquire)
    }

    pub fn is_force_share(&self) -> bool {
        self.force_share.load(Ordering::Acquire)
    }

    pub(crate) fn set_force_share(&self, v: bool) {
        self.force_share.store(v, Ordering::Release);
    }

    pub(crate) fn set_limits(&self, l: Limits) {
        self.limits.store(Arc::new(l));
    }

    /// A committed reopen changed the node's read-only state (graph code only).
    pub(crate) fn set_read_only(&self, ro: bool) {
        self.read_only.store(ro, Ordering::Release);
    }

    pub fn limits(&self) -> Limits {
        **self.limits.load()
    }

    /// The current children (a consistent snapshot).
    pub fn children(&self) -> Arc<Vec<Child>> {
        self.children.load_full()
    }

    /// The child named `name` ("file", "backing"...), if any.
    pub fn child(&self, name: &str) -> Option<Arc<Node>> {
        self.children
            .load()
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.node.clone())
    }

    pub(crate) fn set_children(&self, c: Vec<Child>) {
        self.children.store(Arc::new(c));
    }

    pub fn quiesce_counter(&self) -> usize {
        self.quiesce.load(Ordering::SeqCst)
    }

    pub(crate) fn lock_parents(&self) -> std::sync::MutexGuard<'_, Vec<ParentLink>> {
        self.parents.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Names of the parents' uses, for permission checks and error messages.
    pub(crate) fn uses(&self) -> Vec<Use> {
        self.lock_parents()
            .iter()
            .map(|p| p.usage.clone())
            .collect()
    }

    pub fn parent_count(&self) -> usize {
        self.lock_parents().len()
    }

    /// Begin quiescing: the first drain of a node quiesces each of its parents (recursively up
    /// to the BlockBackends, whose requests then queue). Backends reached are collected so the
    /// caller can wait for their in-flight requests.
    pub(crate) fn drained_begin(self: &Arc<Self>, backends: &mut Vec<Arc<BackendShared>>) {
        if self.quiesce.fetch_add(1, Ordering::SeqCst) > 0 {
            // Already quiesced: parents are; still report the backends to wait for.
            collect_backends(self, backends);
            return;
        }
        let parents: Vec<ParentRef> = {
            let mut ps = self.lock_parents();
            ps.iter_mut()
                .map(|p| {
                    p.quiesced = true;
                    p.parent.clone()
                })
                .collect()
        };
        for p in parents {
            quiesce_parent(&p, backends);
        }
    }

    pub(crate) fn drained_end(self: &Arc<Self>) {
        if self.quiesce.fetch_sub(1, Ordering::SeqCst) != 1 {
            return;
        }
        let parents: Vec<ParentRef> = {
            let mut ps = self.lock_parents();
            ps.iter_mut()
                .filter(|p| p.quiesced)
                .map(|p| {
                    p.quiesced = false;
                    p.parent.clone()
                })
                .collect()
        };
        for p in parents {
            unquiesce_parent(&p);
        }
    }

    /// Add a parent edge. The driver is told the new cumulative permissions first and may
    /// refuse (image locks held by another process). A quiesced node quiesces its new parent at
    /// once (so a request cannot slip in through a parent attached inside a drained section).
    pub(crate) fn add_parent(
        self: &Arc<Self>,
        parent: ParentRef,
        usage: Use,
    ) -> Result<(), String> {
        let (perm, shared) = {
            let ps = self.lock_parents();
            ps.iter().fold((usage.perm, usage.shared), |(p, s), l| {
                (p | l.usage.perm, Perm(s.0 & l.usage.shared.0))
            })
        };
        self.driver.set_perm(perm, shared)?;
        let quiesced = self.quiesce_counter() > 0;
        self.lock_parents().push(ParentLink {
            parent: parent.clone(),
            quiesced,
            usage,
        });
        if quiesced {
            quiesce_parent(&parent, &mut Vec::new());
        }
        Ok(())
    }

    /// Add a parent edge whose permissions the caller has already checked (a reopen's commit);
    /// a quiesced node quiesces its new parent, as in `add_parent`.
    pub(crate) fn add_parent_checked(self: &Arc<Self>, parent: ParentRef, usage: Use) {
        let quiesced = self.quiesce_counter() > 0;
        self.lock_parents().push(ParentLink {
            parent: parent.clone(),
            quiesced,
            usage,
        });
        if quiesced {
            quiesce_parent(&parent, &mut Vec::new());
        }
    }

    /// Change the use recorded for the edge from `parent` (a reopen changed its permissions).
    pub(crate) fn set_parent_usage(&self, parent: &ParentRef, perm: Perm, shared: Perm) {
        let mut ps = self.lock_parents();
        if let Some(l) = ps.iter_mut().find(|l| same_parent(&l.parent, parent)) {
            l.usage.perm = perm;
            l.usage.shared = shared;
        }
    }

    /// The parents' edges as (who, use), for a reopen's permission check.
    pub(crate) fn parent_uses(&self) -> Vec<(ParentRef, Use)> {
        self.lock_parents()
            .iter()
            .map(|l| (l.parent.clone(), l.usage.clone()))
            .collect()
    }

    /// What the node's parents need and share in total (QEMU's `bdrv_get_cumulative_perm`).
    pub fn cumulative_perm(&self) -> (Perm, Perm) {
        self.lock_parents()
            .iter()
            .fold((Perm::NONE, Perm::ALL), |(p, s), l| {
                (p | l.usage.perm, Perm(s.0 & l.usage.shared.0))
            })
    }

    /// Tell the driver the permissions of the current parents.
    pub(crate) fn refresh_perms(&self) {
        let (perm, shared) = {
            let ps = self.lock_parents();
            ps.iter().fold((Perm::NONE, Perm::ALL), |(p, s), l| {
                (p | l.usage.perm, Perm(s.0 & l.usage.shared.0))
            })
        };
        // Dropping permissions cannot conflict.
        let _ = self.driver.set_perm(perm, shared);
    }

    /// Remove the parent edge to `parent`; a parent quiesced through it is released.
    pub(crate) fn remove_parent(&self, parent: &ParentRef) {
        let removed = {
            let mut ps = self.lock_parents();
            let pos = ps.iter().position(|p| same_parent(&p.parent, parent));
            pos.map(|i| ps.remove(i))
        };
        if let Some(link) = removed {
            if link.quiesced {
                unquiesce_parent(&link.parent);
            }
            self.refresh_perms();
        }
    }
}

fn round_to_sector(len: u64) -> u64 {
    len.div_ceil(512).saturating_mul(512)
}

fn collect_backends(node: &Arc<Node>, out: &mut Vec<Arc<BackendShared>>) {
    let parents: Vec<ParentRef> = node
        .lock_parents()
        .iter()
        .map(|p| p.parent.clone())
        .collect();
    for p in parents {
        match p {
            ParentRef::Node(w) => {
                if let Some(n) = w.upgrade() {
                    collect_backends(&n, out);
                }
            }
            ParentRef::Backend(w) => {
                if let Some(b) = w.upgrade()
                    && !out.iter().any(|x| Arc::ptr_eq(x, &b))
                {
                    out.push(b);
                }
            }
        }
    }
}

fn quiesce_parent(p: &ParentRef, backends: &mut Vec<Arc<BackendShared>>) {
    match p {
        ParentRef::Node(w) => {
            if let Some(n) = w.upgrade() {
                n.drained_begin(backends);
            }
        }
        ParentRef::Backend(w) => {
            if let Some(b) = w.upgrade() {
                b.quiesce_begin();
                if !backends.iter().any(|x| Arc::ptr_eq(x, &b)) {
                    backends.push(b);
                }
            }
        }
    }
}

fn unquiesce_parent(p: &ParentRef) {
    match p {
        ParentRef::Node(w) => {
            if let Some(n) = w.upgrade() {
                n.drained_end();
            }
        }
        ParentRef::Backend(w) => {
            if let Some(b) = w.upgrade() {
                b.quiesce_end();
            }
        }
    }
}

pub(crate) fn same_parent(a: &ParentRef, b: &ParentRef) -> bool {
    match (a, b) {
        (ParentRef::Node(x), ParentRef::Node(y)) => Weak::ptr_eq(x, y),
        (ParentRef::Backend(x), ParentRef::Backend(y)) => Weak::ptr_eq(x, y),
        _ => false,
    }
}
