//! The driver interface: what every format and protocol driver implements.
//!
//! Every I/O method returns a boxed future that runs on the calling thread's context (the ring
//! of the thread that submitted the request, DESIGN.md rule 5); drivers are `Send + Sync`
//! because a node serves requests from several contexts at once (multiqueue).

use std::any::Any;
use std::future::Future;
use std::io;
use std::pin::Pin;

use blockd_aio::IoBuf;

use crate::node::Node;

/// A request's future, local to the submitting thread.
pub type IoFuture<'a, T> = Pin<Box<dyn Future<Output = T> + 'a>>;

/// Result of a read or write: the outcome and the buffer back.
pub type BufResult = (io::Result<()>, IoBuf);

/// Request flags (QEMU's BDRV_REQ_*).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReqFlags(u32);

impl ReqFlags {
    pub const NONE: ReqFlags = ReqFlags(0);
    /// Forced unit access: the write is on stable storage when it completes.
    pub const FUA: ReqFlags = ReqFlags(1);
    /// Write-zeroes may deallocate (punch a hole) instead of writing zeroes.
    pub const MAY_UNMAP: ReqFlags = ReqFlags(2);
    /// Write-zeroes must be fast (no fallback to writing a buffer of zeroes).
    pub const NO_FALLBACK: ReqFlags = ReqFlags(4);
    /// Store the data compressed (qcow2's compressed clusters; `convert -c`, backup
    /// `compress`). Only whole, aligned clusters; drivers without it fail with ENOTSUP.
    pub const WRITE_COMPRESSED: ReqFlags = ReqFlags(8);

    pub fn contains(self, other: ReqFlags) -> bool {
        self.0 & other.0 == other.0
    }
    pub fn without(self, other: ReqFlags) -> ReqFlags {
        ReqFlags(self.0 & !other.0)
    }
}

impl std::ops::BitOr for ReqFlags {
    type Output = ReqFlags;
    fn bitor(self, o: ReqFlags) -> ReqFlags {
        ReqFlags(self.0 | o.0)
    }
}

/// What `block_status` reports for the extent starting at the queried offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockStatus {
    /// Length of the extent with this status (≥ 1, ≤ the queried length).
    pub len: u64,
    /// The extent holds data (as opposed to a hole).
    pub data: bool,
    /// The extent reads as zeroes.
    pub zero: bool,
    /// The extent is allocated in this node (not inherited from a backing file).
    pub allocated: bool,
    /// Where the data lives in `offset_node`, when known (QEMU's BDRV_BLOCK_OFFSET_VALID).
    pub offset: Option<u64>,
}

/// Request limits a node reports (QEMU's BlockLimits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Offsets and lengths of requests must be multiples of this.
    pub request_alignment: u32,
    /// Largest request the driver takes at once (0: no limit).
    pub max_transfer: u64,
    /// Memory alignment buffers need (O_DIRECT).
    pub min_mem_alignment: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            request_alignment: 1,
            max_transfer: 0,
            min_mem_alignment: 1,
        }
    }
}

/// A driver instance, owned by its node (`Any`: a caller may downcast to reach a format's own API).
pub trait BlockDriver: Any + Send + Sync + 'static {
    /// QEMU's driver name (`file`, `raw`, `null-co`...).
    fn format_name(&self) -> &'static str;

    /// A format driver (as opposed to a protocol driver).
    fn is_format(&self) -> bool {
        false
    }

    /// A filter that passes I/O to its one child.
    fn is_filter(&self) -> bool {
        false
    }

    fn limits(&self) -> Limits {
        Limits::default()
    }

    /// Read `buf.len()` bytes at `offset` (within the node's length).
    fn read<'a>(&'a self, node: &'a Node, offset: u64, buf: IoBuf) -> IoFuture<'a, BufResult>;

    /// Write `buf` at `offset`.
    fn write<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        buf: IoBuf,
        flags: ReqFlags,
    ) -> IoFuture<'a, BufResult>;

    fn flush<'a>(&'a self, node: &'a Node) -> IoFuture<'a, io::Result<()>>;

    /// Discard (the range may read back as anything afterwards, usually zeroes).
    fn discard<'a>(&'a self, node: &'a Node, offset: u64, len: u64)
    -> IoFuture<'a, io::Result<()>>;

    /// Make the range read as zeroes.
    fn write_zeroes<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        len: u64,
        flags: ReqFlags,
    ) -> IoFuture<'a, io::Result<()>>;

    /// Status of the extent starting at `offset`, at most `len` bytes long.
    fn block_status<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        len: u64,
    ) -> IoFuture<'a, io::Result<BlockStatus>>;

    /// The child that holds the guest data at the offsets `block_status` reports (QEMU's
    /// `*file` out-parameter): the `file` child, or a qcow2 image's external data file.
    fn data_child(&self, node: &Node) -> Option<std::sync::Arc<Node>> {
        node.child("file")
    }

    /// QEMU's BDRV_BLOCK_RECURSE: whether holes of the data child under extents this driver
    /// reports as data read as zeroes for want-zero queries (map, NBD `base:allocation`).
    /// qcow2 says yes for images that look metadata-preallocated.
    fn status_recurses<'a>(&'a self, _node: &'a Node) -> IoFuture<'a, bool> {
        Box::pin(async { false })
    }

    /// Resize to `len`. Returns the new length.
    fn truncate<'a>(&'a self, node: &'a Node, len: u64) -> IoFuture<'a, io::Result<u64>>;

    /// The node's users now hold `perm` and share `shared` in total. A protocol driver that
    /// enforces this across processes (the file driver's image locks) refuses with QEMU's
    /// message when another process conflicts.
    fn set_perm(&self, _perm: crate::perm::Perm, _shared: crate::perm::Perm) -> Result<(), String> {
        Ok(())
    }

    /// Extra lines for qemu-io's `info` (format-specific), as (label, value) pairs.
    fn info(&self) -> Vec<(String, String)> {
        Vec::new()
    }

    /// The cluster size, for formats that have one (qemu-img info's `cluster-size`).
    fn cluster_size(&self) -> Option<u64> {
        None
    }

    /// QEMU's ImageInfoSpecific for this driver (`{"type": "qcow2", "data": {...}}`), as
    /// `qemu-img info --output=json` prints it under `format-specific`.
    fn format_specific(&self) -> Option<serde_json::Value> {
        None
    }

    /// The file a protocol driver opened (QEMU's `filename` in query-named-block-nodes).
    fn filename(&self) -> Option<String> {
        None
    }

    /// Whether the image was not closed cleanly (qemu-img info's `dirty-flag`).
    fn is_dirty(&self) -> bool {
        false
    }

    /// The node's dirty bitmaps, when the driver keeps them (qcow2's persistent bitmaps, loaded
    /// at open and stored at close); the node then shares this list. `None`: the node makes an
    /// empty one.
    fn dirty_bitmap_list(&self) -> Option<std::sync::Arc<crate::dirty_bitmap::DirtyBitmapList>> {
        None
    }

    /// The internal snapshots of the image (qcow2), in table order.
    fn snapshots(&self) -> Vec<SnapshotInfo> {
        Vec::new()
    }

    /// Take an internal snapshot of the open image (`blockdev-snapshot-internal-sync`). An
    /// empty `sn.id` gets the next free numeric id; an id already in use is `EEXIST`. The
    /// caller runs this in the main context inside a drained section.
    fn snapshot_create<'a>(
        &'a self,
        _node: &'a Node,
        _sn: SnapshotInfo,
    ) -> IoFuture<'a, io::Result<()>> {
        Box::pin(async { Err(io::Error::from_raw_os_error(libc::ENOTSUP)) })
    }

    /// Delete the internal snapshot matching `id` and/or `name` (both must match when both
    /// are given); `ENOENT` when none does. Returns what was deleted. Main context, drained.
    fn snapshot_delete<'a>(
        &'a self,
        _node: &'a Node,
        _id: Option<&'a str>,
        _name: Option<&'a str>,
    ) -> IoFuture<'a, io::Result<SnapshotInfo>> {
        Box::pin(async { Err(io::Error::from_raw_os_error(libc::ENOTSUP)) })
    }

    /// First phase of a reopen (blockdev-reopen): check the new options and prepare
    /// everything that can fail (a new file descriptor, a flushed cache), without changing
    /// what requests see. `req.opts` holds the driver's own options: take what you handle,
    /// refuse a change you cannot make with QEMU's "Cannot change the option '...'"; what is
    /// left is an error. The node is drained and the caller is the main context.
    fn reopen_prepare(
        &self,
        node: &Node,
        _req: &mut ReopenRequest<'_>,
    ) -> Result<ReopenPrepared, String> {
        Err(format!(
            "Block format '{}' used by node '{}' does not support reopening files",
            self.format_name(),
            node.name()
        ))
    }

    /// The format can have a `backing` child (a reopen may attach one where there was none).
    fn supports_backing(&self) -> bool {
        false
    }

    /// Second phase: make the prepared state current. Cannot fail.
    fn reopen_commit(&self, _node: &Node, _state: Box<dyn Any + Send>) {}

    /// The reopen was abandoned (this or another node of the same reopen failed): release
    /// what `reopen_prepare` made. Dropping the state must be enough for most drivers.
    fn reopen_abort(&self, _node: &Node, _state: Box<dyn Any + Send>) {}

    /// Every node of a committed reopen has its new state (descriptors, read-only flags):
    /// work that needs the children reopened too, e.g. writing to a file that just became
    /// writable (QEMU's commit_post). It cannot undo the reopen; failures are reported.
    fn reopen_commit_post(&self, _node: &Node) {}

    /// Could the node's users hold `perm` and share `shared` (a reopen about to change them)?
    /// A protocol driver that enforces this across processes checks it without taking
    /// anything; [`BlockDriver::set_perm`] applies it afterwards.
    fn check_perm(
        &self,
        _perm: crate::perm::Perm,
        _shared: crate::perm::Perm,
    ) -> Result<(), String> {
        Ok(())
    }
}

/// One internal snapshot, as QEMU's QEMUSnapshotInfo.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SnapshotInfo {
    pub id: String,
    pub name: String,
    pub vm_state_size: u64,
    pub date_sec: u64,
    pub date_nsec: u32,
    pub vm_clock_nsec: u64,
    pub icount: Option<u64>,
}

/// What a reopen asks of one node's driver.
pub struct ReopenRequest<'a> {
    /// The node is read-only after the reopen.
    pub read_only: bool,
    /// The generic flags after the reopen (cache, discard, force-share), inherited ones
    /// included.
    pub flags: crate::graph::OpenFlags,
    /// The driver's own options (generic ones and children already taken).
    pub opts: &'a mut crate::options::Opts,
    /// The node's children after the reopen (a `file` may have been replaced).
    pub children: &'a [crate::node::Child],
}

/// A driver's prepared reopen.
pub struct ReopenPrepared {
    /// Handed back to `reopen_commit` or `reopen_abort`.
    pub state: Box<dyn Any + Send>,
    /// New permissions on children, as (child name, perm, shared); unlisted ones keep theirs.
    pub child_perms: Vec<(String, crate::perm::Perm, crate::perm::Perm)>,
    /// The node's length after the commit, when it changes.
    pub length: Option<u64>,
    /// The node's request limits after the commit, when they change (cache.direct).
    pub limits: Option<Limits>,
}

impl ReopenPrepared {
    /// Nothing to commit but the generic state (read-only flag, children).
    pub fn nothing() -> ReopenPrepared {
        ReopenPrepared {
            state: Box::new(()),
            child_perms: Vec::new(),
            length: None,
            limits: None,
        }
    }
}

/// QEMU's refusal of an option a reopen cannot change.
pub fn cannot_change(option: &str) -> String {
    format!("Cannot change the option '{option}'")
}

/// The error of an operation a driver does not support.
pub fn not_supported() -> io::Error {
    io::Error::from_raw_os_error(libc::ENOTSUP)
}
