//! The `copy-before-write` filter (QEMU's block/copy-before-write.c, by its documented
//! behaviour): a filter above `file` that, before any guest write (or write-zeroes, discard)
//! changes a cluster that still holds point-in-time data, copies that cluster to `target`.
//! Together with `snapshot-access` (`snapshot_access.rs`) it gives fleecing: a reader sees the
//! data as it was when the filter was inserted. The backup job (`backup.rs`) uses the same
//! state to copy every cluster in the background.
//!
//! [`BlockCopy`] holds the clusters still to copy (`to_copy`) and those on the target
//! (`copied`). Every copy and every snapshot read takes a lock on its cluster-aligned range
//! (`RangeLocks`), so a guest write never races a copy of the same cluster and a snapshot read
//! of a cluster not yet copied never sees the guest's new data. Copies and snapshot reads do
//! node-level I/O on the filter's children (as QEMU's block-copy does on BdrvChild); the
//! guest's own request is what drains wait for. Locks are held across I/O of these nodes only,
//! never across a drain (DESIGN.md rule 4).
//!
//! Options: `file`, `target`, `on-cbw-error` (break-guest-write: the guest write fails;
//! break-snapshot: the snapshot becomes unreadable, guest writes go on), `cbw-timeout`
//! (seconds a copy may take before it counts as failed), `min-cluster-size`, `bitmap` (only
//! the clusters dirty in that bitmap when the filter opens are copied).

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use blockd_aio::IoBuf;
use blockd_block::driver::{BlockStatus, BufResult, IoFuture, ReqFlags};
use blockd_block::drivers::{DriverEntry, Opened, child_edge};
use blockd_block::options::Opts;
use blockd_block::{BlockDriver, Graph, Node, OpenFlags, Perm};
use event_listener::Event;

/// QEMU's default copy unit (also the minimum).
pub const DEFAULT_CLUSTER: u64 = 64 * 1024;

/// What a failed copy-before-write does (QEMU's OnCbwError).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnCbwError {
    BreakGuestWrite,
    BreakSnapshot,
}

/// Ranges (cluster-aligned) being copied or read for the snapshot: overlapping ones wait.
#[derive(Default)]
struct RangeLocks {
    held: Mutex<Vec<(u64, u64)>>,
    released: Event,
}

pub struct RangeGuard<'a> {
    locks: &'a RangeLocks,
    range: (u64, u64),
}

impl RangeLocks {
    async fn lock(&self, off: u64, end: u64) -> RangeGuard<'_> {
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

/// One bit per cluster.
#[derive(Clone)]
pub struct Bits {
    words: Vec<u64>,
    n: u64,
}

impl Bits {
    pub fn new(n: u64, set: bool) -> Bits {
        let mut b = Bits {
            words: vec![0; n.div_ceil(64) as usize],
            n,
        };
        if set {
            for i in 0..n {
                b.set(i, true);
            }
        }
        b
    }
    pub fn get(&self, i: u64) -> bool {
        i < self.n && self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }
    pub fn set(&mut self, i: u64, v: bool) {
        if i >= self.n {
            return;
        }
        let w = &mut self.words[(i / 64) as usize];
        if v {
            *w |= 1 << (i % 64);
        } else {
            *w &= !(1 << (i % 64));
        }
    }
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| w.count_ones() as u64).sum()
    }
    /// The first set bit at or after `i`.
    pub fn next_set(&self, mut i: u64) -> Option<u64> {
        while i < self.n {
            let w = self.words[(i / 64) as usize] >> (i % 64);
            if w != 0 {
                let j = i + w.trailing_zeros() as u64;
                return (j < self.n).then_some(j);
            }
            i = (i / 64 + 1) * 64;
        }
        None
    }
}

struct Maps {
    to_copy: Bits,
    copied: Bits,
}

/// The copy state the filter, the backup job and snapshot-access share.
pub struct BlockCopy {
    cluster: u64,
    len: u64,
    maps: Mutex<Maps>,
    locks: RangeLocks,
    compress: bool,
    /// sync=top: clusters the source's top layer does not hold are dropped, not copied.
    skip_unallocated: AtomicBool,
    on_error: OnCbwError,
    timeout: Option<Duration>,
    /// A failed copy with break-snapshot: the snapshot is gone.
    broken: AtomicBool,
    /// Copies stop (the job ended; the filter is about to go).
    stopped: AtomicBool,
    /// Discard what was copied from the source (backup's `discard-source`).
    discard_source: AtomicBool,
}

/// Where a failed copy failed.
#[derive(Debug)]
pub struct CopyError {
    pub read: bool,
    pub err: io::Error,
}

impl BlockCopy {
    pub fn new(
        len: u64,
        cluster: u64,
        compress: bool,
        on_error: OnCbwError,
        timeout: Option<Duration>,
    ) -> BlockCopy {
        let n = len.div_ceil(cluster);
        BlockCopy {
            cluster,
            len,
            maps: Mutex::new(Maps {
                to_copy: Bits::new(n, true),
                copied: Bits::new(n, false),
            }),
            locks: RangeLocks::default(),
            compress,
            skip_unallocated: AtomicBool::new(false),
            on_error,
            timeout,
            broken: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            discard_source: AtomicBool::new(false),
        }
    }

    fn maps(&self) -> MutexGuard<'_, Maps> {
        self.maps.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn cluster_size(&self) -> u64 {
        self.cluster
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Replace what is to copy (sync=bitmap: the bitmap's clusters; sync=none: everything,
    /// but only on guest writes). Before the job starts.
    pub fn set_to_copy(&self, bits: Bits) {
        self.maps().to_copy = bits;
    }

    /// Discard each run on the source once it is on the target (a node without
    /// `discard=unmap` ignores it, as QEMU's generic layer does).
    pub fn set_discard_source(&self, v: bool) {
        self.discard_source.store(v, Ordering::SeqCst);
    }

    pub fn set_skip_unallocated(&self, v: bool) {
        self.skip_unallocated.store(v, Ordering::SeqCst);
    }

    /// Bytes still to copy.
    pub fn remaining(&self) -> u64 {
        (self.maps().to_copy.count() * self.cluster).min(self.len)
    }

    /// The first cluster still to copy at or after `off`: its offset.
    pub fn next_to_copy(&self, off: u64) -> Option<u64> {
        self.maps()
            .to_copy
            .next_set(off / self.cluster)
            .map(|i| i * self.cluster)
    }

    /// Clusters still to copy (a failed backup with bitmap-mode=always keeps these dirty).
    pub fn to_copy(&self) -> Bits {
        self.maps().to_copy.clone()
    }

    /// Clusters copied (sync=bitmap with bitmap-mode=always clears these in the bitmap).
    pub fn copied(&self) -> Bits {
        self.maps().copied.clone()
    }

    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::SeqCst)
    }

    /// No more copies (the owner is going away).
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
    }

    fn align(&self, off: u64, len: u64) -> (u64, u64) {
        let start = off / self.cluster * self.cluster;
        let end = (off + len).div_ceil(self.cluster) * self.cluster;
        (
            start,
            end.min(self.len.div_ceil(self.cluster) * self.cluster),
        )
    }

    /// Copy the clusters of `[off, off+len)` that still hold point-in-time data from `source`
    /// to `target`. Returns the bytes of data copied (zeroes and skipped ranges not counted).
    pub async fn copy(
        &self,
        source: &Arc<Node>,
        target: &Arc<Node>,
        off: u64,
        len: u64,
    ) -> Result<u64, CopyError> {
        if self.stopped.load(Ordering::SeqCst) || len == 0 {
            return Ok(0);
        }
        let (start, end) = self.align(off, len);
        let _lock = self.locks.lock(start, end).await;
        let mut done = 0;
        let mut c = start / self.cluster;
        let last = end / self.cluster;
        while c < last {
            // the next run of clusters to copy
            let run_start = {
                let m = self.maps();
                match m.to_copy.next_set(c) {
                    Some(i) if i < last => i,
                    _ => break,
                }
            };
            let mut run_end = run_start + 1;
            {
                let m = self.maps();
                while run_end < last && m.to_copy.get(run_end) && run_end - run_start < 64 {
                    run_end += 1;
                }
            }
            let o = run_start * self.cluster;
            let n = (run_end * self.cluster).min(self.len) - o;
            let (copied, data) = self.copy_run(source, target, o, n).await?;
            if copied && self.discard_source.load(Ordering::SeqCst) && source.discard_unmap() {
                // (a failed discard loses nothing: the data is on the target)
                let _ = blockd_block::io::discard(source, o, n).await;
            }
            {
                let mut m = self.maps();
                for i in run_start..run_end {
                    m.to_copy.set(i, false);
                    if copied {
                        m.copied.set(i, true);
                    }
                }
            }
            done += data;
            c = run_end;
        }
        Ok(done)
    }

    /// One run, extent by extent of the source's block status: skipped when unallocated in
    /// the top (sync=top), zeroes written as zeroes, data read and written (compressed
    /// cluster by cluster with `compress`). Returns whether the run is on the target now
    /// and the bytes of data copied (what the rate limit counts, as in QEMU).
    async fn copy_run(
        &self,
        source: &Arc<Node>,
        target: &Arc<Node>,
        off: u64,
        n: u64,
    ) -> Result<(bool, u64), CopyError> {
        let rd = |err| CopyError { read: true, err };
        let wr = |err| CopyError { read: false, err };
        let skip = self.skip_unallocated.load(Ordering::SeqCst);
        let (mut on_target, mut data) = (false, 0);
        let mut pos = off;
        while pos < off + n {
            let st = status_through(source, pos, off + n - pos)
                .await
                .map_err(rd)?;
            let k = st.len.clamp(1, off + n - pos);
            if skip && !st.allocated {
                pos += k;
                continue;
            }
            on_target = true;
            if st.zero && !self.compress {
                blockd_block::io::write_zeroes(target, pos, k, ReqFlags::MAY_UNMAP)
                    .await
                    .map_err(wr)?;
                pos += k;
                continue;
            }
            // compressed writes are whole clusters: from the run's cluster boundary
            let (from, to) = if self.compress {
                let a = (pos - off) / self.cluster * self.cluster + off;
                (
                    a,
                    ((pos + k - off).div_ceil(self.cluster) * self.cluster + off).min(off + n),
                )
            } else {
                (pos, pos + k)
            };
            let len = (to - from) as usize;
            let (r, buf) =
                blockd_block::io::aligned_read(source, from, IoBuf::new(len, 4096)).await;
            r.map_err(rd)?;
            if self.compress {
                let mut o = 0;
                while o < len {
                    let c = (self.cluster as usize).min(len - o);
                    let piece = IoBuf::from_slice(&buf[o..o + c]);
                    let (r, _) = blockd_block::io::aligned_write(
                        target,
                        from + o as u64,
                        piece,
                        ReqFlags::WRITE_COMPRESSED,
                    )
                    .await;
                    r.map_err(wr)?;
                    o += c;
                }
            } else {
                let (r, _) =
                    blockd_block::io::aligned_write(target, from, buf, ReqFlags::NONE).await;
                r.map_err(wr)?;
            }
            data += to - from;
            pos = to;
        }
        Ok((on_target, data))
    }

    /// A guest write is about to change `[off, off+len)`: copy first (QEMU's
    /// `cbw_do_copy_before_write`). An error fails the guest write only with
    /// break-guest-write.
    async fn before_write(
        &self,
        source: &Arc<Node>,
        target: &Arc<Node>,
        off: u64,
        len: u64,
    ) -> io::Result<()> {
        if self.is_broken() {
            return Ok(());
        }
        let copy = self.copy(source, target, off, len);
        let r = match self.timeout {
            Some(t) => match blockd_aio::timeout(t, copy).await {
                Ok(r) => r.map_err(|e| e.err),
                Err(_) => Err(io::Error::from_raw_os_error(libc::ETIMEDOUT)),
            },
            None => copy.await.map_err(|e| e.err),
        };
        match (r, self.on_error) {
            (Ok(_), _) => Ok(()),
            (Err(e), OnCbwError::BreakGuestWrite) => Err(e),
            (Err(_), OnCbwError::BreakSnapshot) => {
                self.broken.store(true, Ordering::SeqCst);
                Ok(())
            }
        }
    }

    /// A read of the point-in-time view (snapshot-access): copied clusters from the target,
    /// the others from the source, which no guest write can change meanwhile (the range is
    /// locked, and a guest write copies the cluster out before it writes).
    pub async fn snapshot_read(
        &self,
        source: &Arc<Node>,
        target: &Arc<Node>,
        off: u64,
        mut buf: IoBuf,
    ) -> BufResult {
        if self.is_broken() {
            return (Err(io::Error::from_raw_os_error(libc::EACCES)), buf);
        }
        let len = buf.len() as u64;
        let (start, end) = self.align(off, len);
        let _lock = self.locks.lock(start, end).await;
        let mut pos = off;
        while pos < off + len {
            let c = pos / self.cluster;
            let from_target = self.maps().copied.get(c);
            // the run of clusters with the same source
            let mut stop = ((c + 1) * self.cluster).min(off + len);
            while stop < off + len && self.maps().copied.get(stop / self.cluster) == from_target {
                stop = ((stop / self.cluster + 1) * self.cluster).min(off + len);
            }
            let n = (stop - pos) as usize;
            let node = if from_target { target } else { source };
            let (r, piece) = blockd_block::io::aligned_read(node, pos, IoBuf::new(n, 4096)).await;
            if let Err(e) = r {
                return (Err(e), buf);
            }
            let at = (pos - off) as usize;
            buf[at..at + n].copy_from_slice(&piece);
            pos = stop;
        }
        (Ok(()), buf)
    }

    /// The reader no longer needs `[off, off+len)` (snapshot-access discard): whole clusters
    /// are not copied any more.
    pub fn snapshot_discard(&self, off: u64, len: u64) {
        let first = off.div_ceil(self.cluster);
        let last = if off + len >= self.len {
            self.len.div_ceil(self.cluster)
        } else {
            (off + len) / self.cluster
        };
        let mut m = self.maps();
        for i in first..last {
            m.to_copy.set(i, false);
        }
    }

    /// Block status of the point-in-time view.
    pub async fn snapshot_block_status(
        &self,
        source: &Arc<Node>,
        off: u64,
        len: u64,
    ) -> io::Result<BlockStatus> {
        let c = off / self.cluster;
        let end = ((c + 1) * self.cluster).min(off + len);
        if self.maps().copied.get(c) {
            return Ok(BlockStatus {
                len: end - off,
                data: true,
                zero: false,
                allocated: true,
                offset: None,
            });
        }
        let mut st = source.driver().block_status(source, off, end - off).await?;
        st.offset = None;
        Ok(st)
    }
}

/// Block status as a reader sees it (QEMU's generic layer over the driver's answer): a range
/// a format does not hold reads from its backing file, or as zeroes without one; a filter
/// answers for its child. `allocated` stays the top node's own answer.
pub async fn status_through(node: &Arc<Node>, off: u64, len: u64) -> io::Result<BlockStatus> {
    let mut st = node.driver().block_status(node, off, len).await?;
    st.len = st.len.clamp(1, len);
    if node.driver().is_filter() {
        if let Some(c) = node.children().first().map(|c| c.node.clone()) {
            let below = Box::pin(status_through(&c, off, st.len)).await?;
            return Ok(below);
        }
        return Ok(st);
    }
    if !st.allocated && !st.zero {
        match node.child("backing") {
            None => st.zero = true,
            Some(b) if off >= b.length() => st.zero = true,
            Some(b) => {
                let n = st.len.min(b.length() - off);
                let below = Box::pin(status_through(&b, off, n)).await?;
                st.len = below.len;
                st.zero = below.zero;
                st.data = below.data;
            }
        }
    }
    Ok(st)
}

/// The filter's driver.
pub struct CopyBeforeWrite {
    pub bcs: Arc<BlockCopy>,
}

fn file_of(node: &Node) -> io::Result<Arc<Node>> {
    node.child("file")
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEDIUM))
}

fn target_of(node: &Node) -> io::Result<Arc<Node>> {
    node.child("target")
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEDIUM))
}

impl CopyBeforeWrite {
    async fn guard(&self, node: &Node, off: u64, len: u64) -> io::Result<Arc<Node>> {
        let (file, target) = (file_of(node)?, target_of(node)?);
        self.bcs.before_write(&file, &target, off, len).await?;
        Ok(file)
    }
}

impl BlockDriver for CopyBeforeWrite {
    fn format_name(&self) -> &'static str {
        "copy-before-write"
    }
    fn is_filter(&self) -> bool {
        true
    }
    fn read<'a>(&'a self, node: &'a Node, off: u64, buf: IoBuf) -> IoFuture<'a, BufResult> {
        Box::pin(async move {
            match file_of(node) {
                Ok(f) => blockd_block::io::aligned_read(&f, off, buf).await,
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
            match self.guard(node, off, buf.len() as u64).await {
                Ok(f) => blockd_block::io::aligned_write(&f, off, buf, flags).await,
                Err(e) => (Err(e), buf),
            }
        })
    }
    fn flush<'a>(&'a self, node: &'a Node) -> IoFuture<'a, io::Result<()>> {
        Box::pin(async move {
            let f = file_of(node)?;
            let r = f.driver().flush(&f).await;
            let t = target_of(node)?;
            t.driver().flush(&t).await?;
            r
        })
    }
    fn discard<'a>(&'a self, node: &'a Node, off: u64, len: u64) -> IoFuture<'a, io::Result<()>> {
        Box::pin(async move {
            let f = self.guard(node, off, len).await?;
            blockd_block::io::discard(&f, off, len).await
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
            let f = self.guard(node, off, len).await?;
            blockd_block::io::write_zeroes(&f, off, len, flags).await
        })
    }
    fn block_status<'a>(
        &'a self,
        node: &'a Node,
        off: u64,
        len: u64,
    ) -> IoFuture<'a, io::Result<BlockStatus>> {
        Box::pin(async move {
            let f = file_of(node)?;
            f.driver().block_status(&f, off, len).await
        })
    }
    fn truncate<'a>(&'a self, _node: &'a Node, _len: u64) -> IoFuture<'a, io::Result<u64>> {
        // the point-in-time view has a fixed size
        Box::pin(async { Err(blockd_block::driver::not_supported()) })
    }
}

/// The copy unit for a target: its cluster size, at least 64 KiB (QEMU's
/// `backup_calculate_cluster_size`), and at least `min`.
pub fn cluster_size_for(target: &Node, min: u64) -> u64 {
    target
        .driver()
        .cluster_size()
        .unwrap_or(DEFAULT_CLUSTER)
        .max(DEFAULT_CLUSTER)
        .max(min)
}

/// Permissions of the filter's edges: it writes the source for its parents and the target
/// for the copies, and nobody else may write the target.
pub fn file_edge(node: Arc<Node>) -> blockd_block::Child {
    child_edge("file", node, Perm::CONSISTENT_READ | Perm::WRITE, Perm::ALL)
}

pub fn target_edge(node: Arc<Node>) -> blockd_block::Child {
    // QEMU lets other users write the target too (two filters may share one)
    child_edge(
        "target",
        node,
        Perm::WRITE | Perm::CONSISTENT_READ,
        Perm::ALL,
    )
}

/// `blockdev-add` of a copy-before-write node.
fn open(g: &mut Graph, _d: &str, o: &mut Opts, flags: OpenFlags) -> Result<Opened, String> {
    let file = g
        .open_child(o, "file", flags)?
        .ok_or_else(|| "Parameter 'file' is missing".to_string())?;
    let target = g
        .open_child(o, "target", flags)?
        .ok_or_else(|| "Parameter 'target' is missing".to_string())?;
    // `bitmap`: only its dirty clusters hold data to keep (read once, at open, as QEMU)
    let bitmap = match o.take("bitmap") {
        None => None,
        Some(serde_json::Value::Object(m)) => {
            let field = |k: &str| {
                m.get(k)
                    .and_then(|v| v.as_str())
                    .unwrap_or_default()
                    .to_string()
            };
            let (node, name) = (field("node"), field("name"));
            let n = g
                .node(&node)
                .ok_or_else(|| format!("Node '{node}' not found"))?;
            let bm = n
                .dirty_bitmaps()
                .find(&name)
                .ok_or_else(|| format!("Dirty bitmap '{name}' not found"))?;
            Some(bm)
        }
        Some(_) => return Err("Invalid parameter type for 'bitmap', expected: object".into()),
    };
    let on_error = match o.take_str("on-cbw-error")?.as_deref() {
        None | Some("break-guest-write") => OnCbwError::BreakGuestWrite,
        Some("break-snapshot") => OnCbwError::BreakSnapshot,
        Some(v) => {
            return Err(format!(
                "Parameter 'on-cbw-error' does not accept value '{v}'"
            ));
        }
    };
    let timeout = match o.take_u64("cbw-timeout")? {
        None | Some(0) => None,
        Some(s) if s > u32::MAX as u64 => {
            return Err("Parameter 'cbw-timeout' expects uint32_t".into());
        }
        Some(s) => Some(Duration::from_secs(s)),
    };
    let min = o.take_size("min-cluster-size")?.unwrap_or(0);
    if min != 0 && !min.is_power_of_two() {
        return Err(
            "Cannot create block-copy-state: min-cluster-size needs to be a power of 2".into(),
        );
    }
    if min > 1 << 30 {
        return Err("Cannot create block-copy-state: min-cluster-size too large".into());
    }
    if file.length() != target.length() {
        return Err("Source and target image have different sizes".into());
    }
    let len = file.length();
    let cluster = cluster_size_for(&target, min);
    let bcs = Arc::new(BlockCopy::new(len, cluster, false, on_error, timeout));
    if let Some(bm) = bitmap {
        let mut bits = Bits::new(len.div_ceil(cluster), false);
        for (off, n) in bm.dirty_runs(0, len) {
            for c in off / cluster..(off + n).div_ceil(cluster) {
                bits.set(c, true);
            }
        }
        bcs.set_to_copy(bits);
    }
    Ok(Opened {
        driver: Box::new(CopyBeforeWrite { bcs }),
        children: vec![file_edge(file), target_edge(target)],
        length: len,
    })
}

pub fn driver_entry() -> DriverEntry {
    DriverEntry {
        name: "copy-before-write",
        open,
        probe: None,
    }
}

/// The copy state of a copy-before-write node.
pub fn block_copy_of(node: &Node) -> Option<Arc<BlockCopy>> {
    let any: &dyn std::any::Any = node.driver();
    any.downcast_ref::<CopyBeforeWrite>().map(|c| c.bcs.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_next_set() {
        let mut b = Bits::new(200, false);
        assert_eq!(b.next_set(0), None);
        b.set(3, true);
        b.set(130, true);
        assert_eq!(b.next_set(0), Some(3));
        assert_eq!(b.next_set(4), Some(130));
        assert_eq!(b.next_set(131), None);
        assert_eq!(b.count(), 2);
        let all = Bits::new(70, true);
        assert_eq!(all.count(), 70);
        assert_eq!(all.next_set(69), Some(69));
        assert_eq!(all.next_set(70), None);
    }
}
