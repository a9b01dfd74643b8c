//! The open image: in-memory L1 and refcount tables, the metadata caches, and the metadata
//! operations (lookups, L2 table allocation, refcount updates, cluster allocation).
//!
//! Concurrency (DESIGN.md rule 4): `meta` is a std mutex held for a few instructions, never
//! across an await. Every metadata change happens under the async `alloc` mutex, held only
//! across I/O of this node's own children. Metadata is written through (the cache is always
//! clean) in crash-safe order: a refcount block before the L2 entry using its cluster, data
//! before the L2 entry pointing at it, an L2 table before the L1 entry pointing at it.
//! Writes into already-owned clusters skip `alloc` and hold `data_io` for reading; freeing
//! clusters holds it for writing, so no write can land in a cluster being given away.

use std::collections::HashSet;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use blockd_aio::IoBuf;
use blockd_block::Node;
use blockd_block::ReqFlags;
use blockd_block::io::{aligned_read, aligned_write};

use crate::cache::{Cache, CacheConfig};
use crate::header::{self, Header};
use crate::layout::*;

pub(crate) fn eio() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

fn err_msg(kind: i32, msg: &str) -> io::Error {
    let e = io::Error::from_raw_os_error(kind);
    io::Error::new(e.kind(), format!("{msg}: {}", blockd_block::strerror(&e)))
}

/// Read `len` bytes at `off` of `file`.
pub(crate) async fn pread(file: &Arc<Node>, off: u64, len: usize) -> io::Result<IoBuf> {
    if off
        .checked_add(len as u64)
        .is_none_or(|e| e > file.length())
    {
        return Err(eio());
    }
    let (r, b) = aligned_read(file, off, IoBuf::new(len, 4096)).await;
    r.map(|_| b)
}

pub(crate) async fn pwrite(file: &Arc<Node>, off: u64, data: &[u8]) -> io::Result<()> {
    let (r, _) = aligned_write(file, off, IoBuf::from_slice(data), ReqFlags::NONE).await;
    r
}

/// One internal snapshot's table entry (what check, info and the overlap checks need).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub l1_offset: u64,
    pub l1_size: u32,
    pub id: String,
    pub name: String,
    pub date_sec: u32,
    pub date_nsec: u32,
    pub vm_clock_nsec: u64,
    pub vm_state_size: u64,
    pub disk_size: Option<u64>,
    pub icount: Option<u64>,
}

/// A run of guest bytes with one mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// The mapping of the first byte (host offsets point at that byte).
    pub kind: Kind,
    pub len: u64,
    /// The L2 entry's COPIED bit (refcount exactly 1).
    pub copied: bool,
}

pub(crate) struct Meta {
    pub l1: Vec<u64>,
    pub l1_offset: u64,
    pub l2: Cache<Vec<u64>>,
    /// Bumped around every L2 change, so a reader that loaded a slice while it changed does
    /// not cache the stale copy.
    pub epoch: u64,
    pub reftable: Vec<u64>,
    pub reftable_offset: u64,
    pub rc: Cache<Vec<u8>>,
    pub free_hint: u64,
    /// Where the next compressed cluster may go (inside a partly used host cluster), or 0.
    pub free_byte_offset: u64,
    /// Host cluster runs to free once the L2 entries that dropped them are on disk.
    pub pending_frees: Vec<(u64, u64)>,
    /// Guest clusters whose new host clusters are being written (outside `alloc`); other
    /// metadata changes of these clusters wait for `inflight_done`.
    pub inflight: HashSet<u64>,
    /// Host offsets of the active L2 tables and of the refcount blocks (overlap checks).
    pub l2_tables: HashSet<u64>,
    pub refblocks: HashSet<u64>,
    /// The snapshot table's byte range.
    pub snapshot_area: (u64, u64),
    pub snapshots: Vec<Snapshot>,
}

pub struct Image {
    pub geo: Geometry,
    pub header: Mutex<Header>,
    pub size: AtomicU64,
    pub(crate) meta: Mutex<Meta>,
    pub(crate) alloc: async_lock::Mutex<()>,
    pub(crate) inflight_done: event_listener::Event,
    pub(crate) data_io: async_lock::RwLock<()>,
    /// Changed only by a reopen (blockdev-reopen), inside a drained section; read by the
    /// write paths, never by reads.
    pub read_only: AtomicBool,
    pub corrupt: AtomicBool,
    /// Runtime options a reopen may change (inside a drained section).
    pub overlap_check: AtomicBool,
    pub cache: CacheConfig,
    pub pass_discard: AtomicBool,
    /// Lazy refcounts in effect (compat bit or the `lazy-refcounts` option, version 3):
    /// refcount blocks are not flushed before the L2 tables that depend on them; the dirty
    /// bit covers the difference until a clean close.
    pub lazy_refcounts: AtomicBool,
    /// This open set the dirty bit (lazy refcounts); a clean close clears it.
    pub(crate) dirty_marked: AtomicBool,
    /// The file child, for writing cached metadata back when the image is dropped.
    pub(crate) file: Option<Arc<Node>>,
    /// The format node's name, for BLOCK_IMAGE_CORRUPTED (known from the first request).
    pub(crate) node_name: std::sync::OnceLock<String>,
}

/// Marks guest clusters in flight; unmarks them (and wakes waiters) when dropped, also when
/// the request is cancelled.
pub(crate) struct Inflight<'a> {
    img: &'a Image,
    first: u64,
    n: u64,
}

impl<'a> Inflight<'a> {
    pub(crate) fn new(img: &'a Image, first: u64, n: u64) -> Inflight<'a> {
        let mut m = img.meta();
        for c in first..first + n {
            m.inflight.insert(c);
        }
        Inflight { img, first, n }
    }
}

impl Drop for Inflight<'_> {
    fn drop(&mut self) {
        {
            let mut m = self.img.meta();
            for c in self.first..self.first + self.n {
                m.inflight.remove(&c);
            }
        }
        self.img.inflight_done.notify(usize::MAX);
    }
}

impl Image {
    /// Take `alloc` once no guest cluster in [first, end) is in flight.
    pub(crate) async fn lock_clear_of(
        &self,
        first: u64,
        end: u64,
    ) -> async_lock::MutexGuard<'_, ()> {
        loop {
            let listener = self.inflight_done.listen();
            let guard = self.alloc.lock().await;
            let busy = self.meta().inflight.iter().any(|&c| c >= first && c < end);
            if !busy {
                return guard;
            }
            drop(guard);
            listener.await;
        }
    }
}

impl Drop for Image {
    /// Closing the image: cached metadata goes to disk (QEMU's close flushes too).
    fn drop(&mut self) {
        if self.is_read_only() || (!self.has_dirty() && !self.dirty_marked.load(Ordering::Acquire))
        {
            return;
        }
        let me: &Image = self;
        let r = crate::driver::run_sync(|| me.mark_clean());
        if let Err(e) = r {
            eprintln!(
                "qcow2: could not write cached metadata back at close: {}",
                blockd_block::strerror(&e)
            );
        }
    }
}

impl Image {
    /// Whether the image refuses writes now (a reopen may toggle it).
    pub fn is_read_only(&self) -> bool {
        self.read_only.load(Ordering::Acquire)
    }

    pub(crate) fn meta(&self) -> MutexGuard<'_, Meta> {
        self.meta.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn header(&self) -> Header {
        self.header
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn snapshots(&self) -> Vec<Snapshot> {
        self.meta().snapshots.clone()
    }

    /// Load the image's tables. `h` was parsed and validated from `file`.
    pub async fn load(
        file: &Arc<Node>,
        h: Header,
        cache: CacheConfig,
        read_only: bool,
        overlap_check: bool,
        pass_discard: bool,
    ) -> Result<Image, String> {
        let geo = Geometry::new(&h);
        let cs = geo.cluster_size;
        let l1_bytes = h.l1_size as usize * 8;
        let l1 = if l1_bytes > 0 {
            let b = pread(file, h.l1_table_offset, l1_bytes)
                .await
                .map_err(|e| format!("Could not read L1 table: {}", blockd_block::strerror(&e)))?;
            b.chunks_exact(8)
                .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
                .collect()
        } else {
            Vec::new()
        };
        let rt_bytes = h.refcount_table_clusters as usize * cs as usize;
        let rt = pread(file, h.refcount_table_offset, rt_bytes)
            .await
            .map_err(|e| {
                format!(
                    "Could not initialize refcount handling: {}",
                    blockd_block::strerror(&e)
                )
            })?;
        let reftable: Vec<u64> = rt
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
            .collect();
        let mut refblocks = HashSet::new();
        for &e in &reftable {
            let o = e & REFT_OFFSET_MASK;
            if o != 0 {
                refblocks.insert(o);
            }
        }
        let mut l2_tables = HashSet::new();
        for &e in &l1 {
            let o = e & L1E_OFFSET_MASK;
            if o != 0 {
                l2_tables.insert(o);
            }
        }
        let (snapshots, snap_len) = read_snapshots(file, &h).await?;
        let h_lazy = h.compatible & header::COMPAT_LAZY_REFCOUNTS != 0;
        let meta = Meta {
            l1,
            l1_offset: h.l1_table_offset,
            l2: Cache::new(cache.l2_entries, cache.clean_interval),
            epoch: 0,
            reftable,
            reftable_offset: h.refcount_table_offset,
            rc: Cache::new(cache.refcount_entries, cache.clean_interval),
            free_hint: 0,
            free_byte_offset: 0,
            pending_frees: Vec::new(),
            inflight: HashSet::new(),
            l2_tables,
            refblocks,
            snapshot_area: (h.snapshots_offset, snap_len),
            snapshots,
        };
        Ok(Image {
            geo,
            size: AtomicU64::new(h.size),
            header: Mutex::new(h),
            meta: Mutex::new(meta),
            alloc: async_lock::Mutex::new(()),
            inflight_done: event_listener::Event::new(),
            data_io: async_lock::RwLock::new(()),
            read_only: AtomicBool::new(read_only),
            corrupt: AtomicBool::new(false),
            overlap_check: AtomicBool::new(overlap_check),
            cache,
            pass_discard: AtomicBool::new(pass_discard),
            lazy_refcounts: AtomicBool::new(h_lazy && geo.version >= 3 && !read_only),
            dirty_marked: AtomicBool::new(false),
            file: Some(file.clone()),
            node_name: std::sync::OnceLock::new(),
        })
    }

    /// Remember the name of the node this image is the driver of (for events).
    pub(crate) fn remember_node(&self, node: &Node) {
        self.node_name.get_or_init(|| node.name().to_string());
    }

    /// QEMU's qcow2_signal_corruption: report once (stderr and BLOCK_IMAGE_CORRUPTED, with
    /// the host range concerned when known), set the corrupt bit when writable (the event is
    /// then fatal), and refuse writes from now on.
    pub(crate) async fn corruption(
        &self,
        file: &Arc<Node>,
        msg: &str,
        offset: Option<u64>,
        size: Option<u64>,
    ) -> io::Error {
        if !self.corrupt.swap(true, Ordering::SeqCst) {
            let fatal = !self.is_read_only();
            if fatal {
                eprintln!(
                    "qcow2: Marking image as corrupt: {msg}; further corruption events will be suppressed"
                );
                let bits = {
                    let mut h = self.header.lock().unwrap_or_else(|e| e.into_inner());
                    h.incompatible |= header::INCOMPAT_CORRUPT;
                    h.incompatible
                };
                if self.geo.version >= 3 {
                    let _ = pwrite(file, 72, &bits.to_be_bytes()).await;
                    let _ = file.driver().flush(file).await;
                }
            } else {
                eprintln!(
                    "qcow2: Image is corrupt: {msg}; further non-fatal corruption events will be suppressed"
                );
            }
            let name = self.node_name.get().map_or("", String::as_str);
            blockd_block::events::image_corrupted(name, msg, offset, size, fatal);
        }
        eio()
    }

    // ---------------------------------------------------------------- L2 lookups

    fn slice_entries(&self) -> u64 {
        self.cache.l2_entry_size / self.geo.l2_entry_bytes
    }

    /// Run `f` on the cached L2 slice at host offset `slice_off` (loading it if needed).
    async fn with_slice<R>(
        &self,
        file: &Arc<Node>,
        slice_off: u64,
        f: impl Fn(&[u64]) -> R,
    ) -> io::Result<R> {
        let epoch = {
            let mut m = self.meta();
            if let Some(s) = m.l2.get_mut(slice_off) {
                return Ok(f(s));
            }
            m.epoch
        };
        let raw = pread(file, slice_off, self.cache.l2_entry_size as usize).await?;
        let words: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
            .collect();
        let r = f(&words);
        let mut m = self.meta();
        if m.epoch == epoch && !m.l2.contains(slice_off) {
            m.l2.insert(slice_off, words);
        }
        Ok(r)
    }

    /// The L2 table of L1 index `l1i` (0 when none), checked.
    async fn l2_table(&self, file: &Arc<Node>, l1i: u64) -> io::Result<(u64, bool)> {
        let e = self.meta().l1.get(l1i as usize).copied().unwrap_or(0);
        let off = e & L1E_OFFSET_MASK;
        if off & (self.geo.cluster_size - 1) != 0 {
            return Err(self
                .corruption(
                    file,
                    &format!("L2 table offset {off:#x} unaligned (L1 index: {l1i:#x})"),
                    None,
                    None,
                )
                .await);
        }
        Ok((off, e & OFLAG_COPIED != 0))
    }

    /// The L2 entry (standard word, bitmap) of guest cluster index `cluster`.
    pub(crate) async fn l2_entry(
        &self,
        file: &Arc<Node>,
        l2_off: u64,
        l2i: u64,
    ) -> io::Result<(u64, u64)> {
        let se = self.slice_entries();
        let slice_off = l2_off + (l2i / se) * self.cache.l2_entry_size;
        let i = (l2i % se) as usize;
        let ext = self.geo.extended;
        self.with_slice(file, slice_off, |s| {
            if ext {
                (s[2 * i], s[2 * i + 1])
            } else {
                (s[i], 0)
            }
        })
        .await
    }

    /// The mapping of the guest bytes from `guest` on, at most `max` bytes, up to the end of
    /// the L2 slice.
    pub async fn map(&self, file: &Arc<Node>, guest: u64, max: u64) -> io::Result<Run> {
        let g = self.geo;
        let (l1i, l2i) = g.indices(guest);
        let (l2_off, _) = self.l2_table(file, l1i).await?;
        if l2_off == 0 {
            let end = (l1i + 1) * g.l2_coverage();
            return Ok(Run {
                kind: Kind::Unallocated,
                len: max.min(end - guest),
                copied: false,
            });
        }
        let se = self.slice_entries();
        let slice_off = l2_off + (l2i / se) * self.cache.l2_entry_size;
        let first = (l2i % se) as usize;
        let cluster_start = guest - g.offset_in_cluster(guest);
        let r = self
            .with_slice(file, slice_off, |s| -> Result<Run, String> {
                let entry = |i: usize| {
                    if g.extended {
                        (s[2 * i], s[2 * i + 1])
                    } else {
                        (s[i], 0)
                    }
                };
                let in_cl = g.offset_in_cluster(guest);
                let (e0, b0) = entry(first);
                let k0 = g.classify(e0, b0, in_cl)?;
                // A data file holds each guest cluster at its guest offset, nowhere else.
                if g.data_file && k0.host().is_some() && e0 & L2E_OFFSET_MASK != cluster_start {
                    return Err(format!(
                        "External data file host cluster offset {:#x} does not match guest cluster offset: {cluster_start:#x}",
                        e0 & L2E_OFFSET_MASK
                    ));
                }
                let copied = e0 & OFLAG_COPIED != 0;
                let unit_start = cluster_start + in_cl / g.unit * g.unit;
                let mut len = unit_start + g.unit - guest;
                if matches!(k0, Kind::Compressed { .. }) {
                    len = cluster_start + g.cluster_size - guest;
                    return Ok(Run {
                        kind: k0,
                        len: len.min(max),
                        copied,
                    });
                }
                // Walk following units while the mapping continues.
                let mut pos = unit_start + g.unit;
                while len < max {
                    let idx = first as u64 + (pos - cluster_start) / g.cluster_size;
                    if idx >= se {
                        break;
                    }
                    let (e, b) = entry(idx as usize);
                    if (e & OFLAG_COPIED != 0) != copied {
                        break;
                    }
                    let k = g.classify(e, b, g.offset_in_cluster(pos))?;
                    if !k0.continues(&k, pos - unit_start) {
                        break;
                    }
                    len += g.unit;
                    pos += g.unit;
                }
                let kind = match k0 {
                    Kind::Normal(h) => Kind::Normal(h + guest - unit_start),
                    Kind::ZeroAlloc(h) => Kind::ZeroAlloc(h + guest - unit_start),
                    Kind::UnallocatedAlloc(h) => Kind::UnallocatedAlloc(h + guest - unit_start),
                    k => k,
                };
                Ok(Run {
                    kind,
                    len: len.min(max),
                    copied,
                })
            })
            .await?;
        match r {
            Ok(run) => Ok(run),
            Err(msg) => {
                // C's %#x: plain "0" for zero.
                let idx = if l2i == 0 {
                    "0".to_string()
                } else {
                    format!("{l2i:#x}")
                };
                let full = format!("{msg} (L2 offset: {l2_off:#x}, L2 index: {idx})");
                Err(self.corruption(file, &full, None, None).await)
            }
        }
    }

    // ---------------------------------------------------------------- overlap checks

    /// Whether host range [off, off+len) touches metadata (QEMU's overlap check).
    pub(crate) fn overlaps_metadata(&self, off: u64, len: u64) -> Option<&'static str> {
        if !self.overlap_check.load(Ordering::Relaxed) || len == 0 {
            return None;
        }
        let cs = self.geo.cluster_size;
        let end = off + len;
        let within = |start: u64, size: u64| size > 0 && off < start + size && start < end;
        if off < cs {
            return Some("qcow2_header");
        }
        let m = self.meta();
        if within(m.l1_offset, m.l1.len() as u64 * 8) {
            return Some("active L1 table");
        }
        let rt_bytes = (m.reftable.len() as u64 * 8).div_ceil(cs) * cs;
        if within(m.reftable_offset, rt_bytes) {
            return Some("refcount table");
        }
        if within(m.snapshot_area.0, m.snapshot_area.1) {
            return Some("snapshot table");
        }
        let mut c = off / cs * cs;
        while c < end {
            if m.l2_tables.contains(&c) {
                return Some("active L2 table");
            }
            if m.refblocks.contains(&c) {
                return Some("refcount block");
            }
            c += cs;
        }
        None
    }

    /// Refuse (and mark the image corrupt) a data write that would hit metadata.
    pub(crate) async fn check_overlap(
        &self,
        file: &Arc<Node>,
        off: u64,
        len: u64,
    ) -> io::Result<()> {
        // Data clusters of an external data file are in another file than the metadata.
        if self.geo.data_file {
            return Ok(());
        }
        if let Some(what) = self.overlaps_metadata(off, len) {
            let msg = format!("Preventing invalid write on metadata (overlaps with {what})");
            return Err(self.corruption(file, &msg, Some(off), Some(len)).await);
        }
        Ok(())
    }

    // ---------------------------------------------------------------- refcounts

    fn rc_get_in(&self, block: &[u8], i: u64) -> u64 {
        let w = 1u64 << self.geo.refcount_order;
        if w >= 8 {
            let bytes = (w / 8) as usize;
            let s = &block[i as usize * bytes..(i as usize + 1) * bytes];
            s.iter().fold(0u64, |a, &b| a << 8 | b as u64)
        } else {
            let bit = i * w;
            let byte = block[(bit / 8) as usize];
            (byte as u64 >> (bit % 8)) & ((1 << w) - 1)
        }
    }

    fn rc_set_in(&self, block: &mut [u8], i: u64, v: u64) {
        let w = 1u64 << self.geo.refcount_order;
        if w >= 8 {
            let bytes = (w / 8) as usize;
            let be = v.to_be_bytes();
            block[i as usize * bytes..(i as usize + 1) * bytes].copy_from_slice(&be[8 - bytes..]);
        } else {
            let bit = i * w;
            let mask = ((1u64 << w) - 1) as u8;
            let b = &mut block[(bit / 8) as usize];
            *b = (*b & !(mask << (bit % 8))) | ((v as u8 & mask) << (bit % 8));
        }
    }

    /// Make sure the refcount block at `off` is cached (call with `alloc` held).
    async fn load_refblock(&self, file: &Arc<Node>, off: u64) -> io::Result<()> {
        if self.meta().rc.get_mut(off).is_some() {
            return Ok(());
        }
        if off & (self.geo.cluster_size - 1) != 0 {
            return Err(self
                .corruption(
                    file,
                    &format!("Refblock offset {off:#x} unaligned"),
                    None,
                    None,
                )
                .await);
        }
        let b = pread(file, off, self.geo.cluster_size as usize).await?;
        self.meta().rc.insert(off, b.to_vec());
        Ok(())
    }

    /// Refcount of host cluster index `c` (call with `alloc` held).
    pub(crate) async fn refcount(&self, file: &Arc<Node>, c: u64) -> io::Result<u64> {
        let e = self.geo.rc_entries;
        let rb = {
            let m = self.meta();
            m.reftable
                .get((c / e) as usize)
                .map_or(0, |x| x & REFT_OFFSET_MASK)
        };
        if rb == 0 {
            return Ok(0);
        }
        self.load_refblock(file, rb).await?;
        let mut m = self.meta();
        let blk = m.rc.get_mut(rb).ok_or_else(eio)?;
        let blk = std::mem::take(blk);
        let v = self.rc_get_in(&blk, c % e);
        *m.rc.get_mut(rb).ok_or_else(eio)? = blk;
        Ok(v)
    }

    /// Every refcount of refcount block `t` (None when the table has no block there), read
    /// through the cache (call with `alloc` held or the image otherwise idle).
    pub(crate) async fn refcount_block_values(
        &self,
        file: &Arc<Node>,
        t: u64,
    ) -> io::Result<Option<Vec<u64>>> {
        let rb = {
            let m = self.meta();
            m.reftable
                .get(t as usize)
                .map_or(0, |x| x & REFT_OFFSET_MASK)
        };
        if rb == 0 {
            return Ok(None);
        }
        self.load_refblock(file, rb).await?;
        let mut m = self.meta();
        let blk = m.rc.get_mut(rb).ok_or_else(eio)?;
        Ok(Some(self.decode_refblock(blk)))
    }

    /// Every refcount of a refcount block: whole-byte widths decoded a word at a time
    /// (`check` decodes every block of the image).
    fn decode_refblock(&self, blk: &[u8]) -> Vec<u64> {
        let n = self.geo.rc_entries as usize;
        let be = |c: &[u8]| c.iter().fold(0u64, |a, &b| a << 8 | b as u64);
        match 1usize << self.geo.refcount_order {
            8 => blk[..n].iter().map(|&b| b as u64).collect(),
            16 => blk[..2 * n]
                .chunks_exact(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]) as u64)
                .collect(),
            32 => blk[..4 * n]
                .chunks_exact(4)
                .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as u64)
                .collect(),
            64 => blk[..8 * n].chunks_exact(8).map(be).collect(),
            _ => (0..n as u64).map(|i| self.rc_get_in(blk, i)).collect(),
        }
    }

    /// Add `delta` to the refcounts of clusters [c, c+n) in the cached blocks (written back
    /// later, before any L2 table). Freed clusters lower the allocation hint and are discarded
    /// in the file when asked. Call with `alloc` held.
    pub(crate) async fn update_refcounts(
        &self,
        file: &Arc<Node>,
        c: u64,
        n: u64,
        delta: i64,
    ) -> io::Result<()> {
        let e = self.geo.rc_entries;
        let cs = self.geo.cluster_size;
        let mut i = c;
        let end = c + n;
        let mut freed: Vec<u64> = Vec::new();
        while i < end {
            let t = i / e;
            let chunk_end = end.min((t + 1) * e);
            let rb = {
                let m = self.meta();
                m.reftable
                    .get(t as usize)
                    .map_or(0, |x| x & REFT_OFFSET_MASK)
            };
            if rb == 0 {
                if delta < 0 {
                    return Err(self
                        .corruption(
                            file,
                            &format!("Freeing cluster {:#x} without a refcount block", i * cs),
                            None,
                            None,
                        )
                        .await);
                }
                return Err(eio());
            }
            self.load_refblock(file, rb).await?;
            let bad = {
                let mut m = self.meta();
                let blk = m.rc.get_mut(rb).ok_or_else(eio)?;
                // Check the whole chunk before changing anything.
                let bad = (i..chunk_end).find(|&j| {
                    let new = self.rc_get_in(blk, j % e) as i128 + delta as i128;
                    new < 0 || new > self.geo.max_refcount() as i128
                });
                if bad.is_none() {
                    for j in i..chunk_end {
                        let new = (self.rc_get_in(blk, j % e) as i128 + delta as i128) as u64;
                        self.rc_set_in(blk, j % e, new);
                        if new == 0 {
                            freed.push(j);
                        }
                    }
                    m.rc.mark_dirty(rb);
                }
                bad
            };
            if let Some(j) = bad {
                let msg = format!("Invalid refcount update for cluster {:#x}", j * cs);
                return Err(self.corruption(file, &msg, None, None).await);
            }
            i = chunk_end;
        }
        if let Some(&first) = freed.first() {
            let mut m = self.meta();
            if first < m.free_hint {
                m.free_hint = first;
            }
            // A freed cluster may not take further compressed data.
            let fbo = m.free_byte_offset / cs;
            if m.free_byte_offset != 0 && freed.contains(&fbo) {
                m.free_byte_offset = 0;
            }
        }
        if self.pass_discard.load(Ordering::Relaxed) {
            for c in freed {
                let _ = file.driver().discard(file, c * cs, cs).await;
            }
        }
        Ok(())
    }

    /// Allocate up to `n` contiguous free clusters (at least one); refcounts are set to 1
    /// and on disk before this returns. Returns (host offset, count). Call with `alloc` held.
    pub(crate) async fn alloc_clusters(&self, file: &Arc<Node>, n: u64) -> io::Result<(u64, u64)> {
        let e = self.geo.rc_entries;
        let cb = self.geo.cluster_bits;
        loop {
            let mut c = self.meta().free_hint.max(1);
            while self.refcount(file, c).await? != 0 {
                c += 1;
            }
            let range_end = (c / e + 1) * e;
            let mut k = 1;
            while k < n && c + k < range_end && self.refcount(file, c + k).await? == 0 {
                k += 1;
            }
            if (c + k) << cb > header::MAX_HOST_OFFSET {
                return Err(io::Error::from_raw_os_error(libc::EFBIG));
            }
            let t = c / e;
            let (rt_len, entry) = {
                let m = self.meta();
                (
                    m.reftable.len() as u64,
                    m.reftable.get(t as usize).copied().unwrap_or(0),
                )
            };
            if t >= rt_len {
                self.grow_reftable(file, t).await?;
                continue;
            }
            if entry & REFT_OFFSET_MASK == 0 {
                // The range is uncovered, hence wholly free: its new block goes inside it.
                let x = if c > t * e {
                    t * e
                } else {
                    if c + k == range_end {
                        k -= 1;
                    }
                    c + k
                };
                self.create_refblock(file, t, x).await?;
                if k == 0 {
                    continue;
                }
            }
            if let Some(what) = self.overlaps_metadata(c << cb, k << cb) {
                let msg = format!(
                    "Preventing invalid allocation of cluster {:#x} (overlaps with {what})",
                    c << cb
                );
                return Err(self
                    .corruption(file, &msg, Some(c << cb), Some(k << cb))
                    .await);
            }
            self.update_refcounts(file, c, k, 1).await?;
            self.meta().free_hint = c + k;
            return Ok((c << cb, k));
        }
    }

    /// Room for `size` bytes of compressed data (less than a cluster): after the previous
    /// compressed cluster when it fits in its host cluster (whose refcount then counts one
    /// more user), else at the start of a new cluster. Call with `alloc` held.
    pub(crate) async fn alloc_bytes(&self, file: &Arc<Node>, size: u64) -> io::Result<u64> {
        let cs = self.geo.cluster_size;
        let fbo = self.meta().free_byte_offset;
        if fbo != 0 && !fbo.is_multiple_of(cs) && cs - fbo % cs >= size {
            self.update_refcounts(file, fbo / cs, 1, 1).await?;
            let mut m = self.meta();
            let next = fbo + size;
            m.free_byte_offset = if next.is_multiple_of(cs) { 0 } else { next };
            return Ok(fbo);
        }
        let (h, _) = self.alloc_clusters(file, 1).await?;
        let mut m = self.meta();
        m.free_byte_offset = if size == cs { 0 } else { h + size };
        Ok(h)
    }

    async fn create_refblock(&self, file: &Arc<Node>, t: u64, x: u64) -> io::Result<()> {
        let cs = self.geo.cluster_size;
        let e = self.geo.rc_entries;
        let mut blk = vec![0u8; cs as usize];
        self.rc_set_in(&mut blk, x % e, 1);
        let off = x * cs;
        pwrite(file, off, &blk).await?;
        let rt_off = self.meta().reftable_offset;
        pwrite(file, rt_off + t * 8, &off.to_be_bytes()).await?;
        let mut m = self.meta();
        m.reftable[t as usize] = off;
        m.refblocks.insert(off);
        m.rc.insert(off, blk);
        Ok(())
    }

    /// Grow the refcount table so it covers range `need_t`: the new table and the blocks
    /// describing it go at the first uncovered cluster; the header then points at it.
    async fn grow_reftable(&self, file: &Arc<Node>, need_t: u64) -> io::Result<()> {
        let cs = self.geo.cluster_size;
        let e = self.geo.rc_entries;
        let (old, old_off) = {
            let m = self.meta();
            (m.reftable.clone(), m.reftable_offset)
        };
        let old_len = old.len() as u64;
        let l = old_len * e;
        let mut new_len = (need_t + 1).max(old_len + old_len / 2).max(old_len + 1);
        let (k, m_blocks) = loop {
            let k = (new_len * 8).div_ceil(cs);
            let mut m = 1;
            loop {
                let m2 = (k + m).div_ceil(e);
                if m2 <= m {
                    break;
                }
                m = m2;
            }
            let need = (l + k + m).div_ceil(e);
            if need <= new_len {
                break (k, m);
            }
            new_len = need;
        };
        let new_len = k * cs / 8;
        if new_len * 8 > header::MAX_REFTABLE_BYTES {
            return Err(err_msg(
                libc::EFBIG,
                "This operation would make the refcount table grow beyond the maximum size supported by QEMU, aborting",
            ));
        }
        let area_end = l + k + m_blocks;
        let mut table = old.clone();
        table.resize(new_len as usize, 0);
        let mut blocks = Vec::new();
        for j in 0..m_blocks {
            let t = old_len + j;
            let mut blk = vec![0u8; cs as usize];
            let lo = (t * e).max(l);
            let hi = ((t + 1) * e).min(area_end);
            for c in lo..hi {
                self.rc_set_in(&mut blk, c % e, 1);
            }
            let at = (l + k + j) * cs;
            pwrite(file, at, &blk).await?;
            table[t as usize] = at;
            blocks.push((at, blk));
        }
        let bytes: Vec<u8> = table.iter().flat_map(|x| x.to_be_bytes()).collect();
        pwrite(file, l * cs, &bytes).await?;
        file.driver().flush(file).await?;
        let mut hdr = (l * cs).to_be_bytes().to_vec();
        hdr.extend_from_slice(&(k as u32).to_be_bytes());
        pwrite(file, 48, &hdr).await?;
        file.driver().flush(file).await?;
        {
            let mut h = self.header.lock().unwrap_or_else(|e| e.into_inner());
            h.refcount_table_offset = l * cs;
            h.refcount_table_clusters = k as u32;
        }
        {
            let mut m = self.meta();
            m.reftable = table;
            m.reftable_offset = l * cs;
            for (at, blk) in blocks {
                m.refblocks.insert(at);
                m.rc.insert(at, blk);
            }
        }
        let old_clusters = (old_len * 8).div_ceil(cs);
        self.update_refcounts(file, old_off / cs, old_clusters, -1)
            .await
    }

    // ---------------------------------------------------------------- L1 / L2 updates

    /// The L2 table for `l1i`, allocated (or copied, when shared with a snapshot) so it can
    /// be written. Call with `alloc` held.
    pub(crate) async fn writable_l2(&self, file: &Arc<Node>, l1i: u64) -> io::Result<u64> {
        if l1i as usize >= self.meta().l1.len() {
            return Err(eio());
        }
        let (old, copied) = self.l2_table(file, l1i).await?;
        if old != 0 && copied {
            return Ok(old);
        }
        let cs = self.geo.cluster_size;
        let (new, _) = self.alloc_clusters(file, 1).await?;
        // The new table's refcount, and the old table's cached changes (copied below), go to
        // disk before the L1 entry points at the new table.
        self.writeback(file).await?;
        let content = if old != 0 {
            pread(file, old, cs as usize).await?.to_vec()
        } else {
            vec![0u8; cs as usize]
        };
        pwrite(file, new, &content).await?;
        let l1_off = self.meta().l1_offset;
        let entry = new | OFLAG_COPIED;
        pwrite(file, l1_off + l1i * 8, &entry.to_be_bytes()).await?;
        {
            let mut m = self.meta();
            m.l1[l1i as usize] = entry;
            m.l2_tables.insert(new);
            if old != 0 {
                m.l2_tables.remove(&old);
            }
        }
        if old != 0 {
            self.update_refcounts(file, old / cs, 1, -1).await?;
        }
        Ok(new)
    }

    /// Set L2 entries `entries` (standard word, bitmap) starting at index `l2i` of the table
    /// at `l2_off`, in the cache (dirty, written back after the refcount blocks). Call with
    /// `alloc` held.
    pub(crate) async fn set_l2(
        &self,
        file: &Arc<Node>,
        l2_off: u64,
        l2i: u64,
        entries: &[(u64, u64)],
    ) -> io::Result<()> {
        let se = self.slice_entries();
        let sb = self.cache.l2_entry_size;
        let mut j = 0usize;
        while j < entries.len() {
            let idx = l2i + j as u64;
            let slice_off = l2_off + (idx / se) * sb;
            // Readers may have evicted the (clean) slice: load it again.
            if !self.meta().l2.contains(slice_off) {
                let raw = pread(file, slice_off, sb as usize).await?;
                let words: Vec<u64> = raw
                    .chunks_exact(8)
                    .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
                    .collect();
                let mut m = self.meta();
                if !m.l2.contains(slice_off) {
                    m.l2.insert(slice_off, words);
                }
            }
            let mut m = self.meta();
            m.epoch += 1;
            let Some(s) = m.l2.get_mut(slice_off) else {
                continue;
            };
            while j < entries.len() && (l2i + j as u64) / se == idx / se {
                let i = ((l2i + j as u64) % se) as usize;
                let (e, b) = entries[j];
                if self.geo.extended {
                    s[2 * i] = e;
                    s[2 * i + 1] = b;
                } else {
                    s[i] = e;
                }
                j += 1;
            }
            m.l2.mark_dirty(slice_off);
        }
        Ok(())
    }

    /// Release the host clusters an L2 entry owned (compressed sectors included), once the
    /// changed L2 entries are on disk ([`Image::apply_frees`]).
    pub(crate) fn free_entry(&self, e: u64) {
        // Data file clusters take no refcounts in the image (the caller discards them).
        if self.geo.data_file {
            return;
        }
        let cs = self.geo.cluster_size;
        let range = if e & OFLAG_COMPRESSED != 0 {
            match self.geo.classify(e, 0, 0) {
                Ok(Kind::Compressed { offset, len }) => {
                    let first = offset / cs;
                    Some((first, (offset + len - 1) / cs - first + 1))
                }
                _ => None,
            }
        } else {
            let host = e & L2E_OFFSET_MASK;
            (host != 0).then_some((host / cs, 1))
        };
        if let Some(r) = range {
            self.meta().pending_frees.push(r);
        }
    }

    /// Drop the references of freed entries: first the L2 tables that no longer point at
    /// them go to disk, then the refcounts drop (so a crash never leaves a reference to a
    /// cluster counted free). Call with `alloc` held.
    pub(crate) async fn apply_frees(&self, file: &Arc<Node>) -> io::Result<()> {
        if self.meta().pending_frees.is_empty() {
            return self.maybe_writeback(file).await;
        }
        self.writeback(file).await?;
        let frees = std::mem::take(&mut self.meta().pending_frees);
        for (c, n) in frees {
            self.update_refcounts(file, c, n, -1).await?;
        }
        self.maybe_writeback(file).await
    }

    /// Write back when a cache had to grow past its size because its entries are dirty
    /// (where QEMU would evict and write a dirty entry).
    pub(crate) async fn maybe_writeback(&self, file: &Arc<Node>) -> io::Result<()> {
        let full = {
            let m = self.meta();
            (m.l2.len() > m.l2.capacity() && m.l2.dirty_count() > 0)
                || (m.rc.len() > m.rc.capacity() && m.rc.dirty_count() > 0)
        };
        if full {
            self.writeback(file).await
        } else {
            Ok(())
        }
    }

    /// Write every dirty cache entry: refcount blocks, a flush, then L2 slices. Call with
    /// `alloc` held (nothing else changes metadata meanwhile).
    pub(crate) async fn writeback(&self, file: &Arc<Node>) -> io::Result<()> {
        let rbs = self.meta().rc.dirty_offsets();
        for off in &rbs {
            let data = self.meta().rc.get_mut(*off).map(|b| b.clone());
            if let Some(d) = data {
                pwrite(file, *off, &d).await?;
                self.meta().rc.mark_clean(*off);
            }
        }
        let l2s = self.meta().l2.dirty_offsets();
        if l2s.is_empty() {
            return Ok(());
        }
        if self.lazy_refcounts.load(Ordering::Relaxed) {
            // No ordering between refcounts and L2 tables: the dirty bit says so on disk.
            self.mark_dirty(file).await?;
        } else if !rbs.is_empty() {
            file.driver().flush(file).await?;
        }
        for off in &l2s {
            let data: Option<Vec<u8>> = self
                .meta()
                .l2
                .get_mut(*off)
                .map(|s| s.iter().flat_map(|w| w.to_be_bytes()).collect());
            if let Some(d) = data {
                pwrite(file, *off, &d).await?;
                self.meta().l2.mark_clean(*off);
            }
        }
        Ok(())
    }

    /// Set the dirty bit (durably, after what is on disk already) before the first metadata
    /// write that lazy refcounts leave unordered. Call with `alloc` held.
    async fn mark_dirty(&self, file: &Arc<Node>) -> io::Result<()> {
        if self.dirty_marked.load(Ordering::Acquire) {
            return Ok(());
        }
        file.driver().flush(file).await?;
        let bits = self.header().incompatible | header::INCOMPAT_DIRTY;
        pwrite(file, 72, &bits.to_be_bytes()).await?;
        file.driver().flush(file).await?;
        self.header
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .incompatible = bits;
        self.dirty_marked.store(true, Ordering::Release);
        Ok(())
    }

    /// Everything cached written and durable, then the dirty bit this open set cleared (a
    /// clean close, a reopen read-only, before amend).
    pub async fn mark_clean(&self) -> io::Result<()> {
        let Some(file) = self.file.clone() else {
            return Ok(());
        };
        let _a = self.alloc.lock().await;
        self.apply_frees(&file).await?;
        self.writeback(&file).await?;
        file.driver().flush(&file).await?;
        if self.dirty_marked.load(Ordering::Acquire) {
            let bits = self.header().incompatible & !header::INCOMPAT_DIRTY;
            pwrite(&file, 72, &bits.to_be_bytes()).await?;
            file.driver().flush(&file).await?;
            self.header
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .incompatible = bits;
            self.dirty_marked.store(false, Ordering::Release);
        }
        Ok(())
    }

    /// Whether cached metadata waits to be written.
    pub(crate) fn has_dirty(&self) -> bool {
        let m = self.meta();
        m.l2.dirty_count() > 0 || m.rc.dirty_count() > 0 || !m.pending_frees.is_empty()
    }

    /// Everything cached on disk and durable (the driver's flush and close).
    pub async fn flush_metadata(&self) -> io::Result<()> {
        let Some(file) = self.file.clone() else {
            return Ok(());
        };
        if self.has_dirty() {
            let _a = self.alloc.lock().await;
            self.apply_frees(&file).await?;
            self.writeback(&file).await?;
        }
        file.driver().flush(&file).await
    }

    /// Make the L1 table hold at least `entries` entries (truncate growing the image).
    pub(crate) async fn grow_l1(&self, file: &Arc<Node>, entries: u64) -> io::Result<()> {
        let cs = self.geo.cluster_size;
        let (old_len, old_off) = {
            let m = self.meta();
            (m.l1.len() as u64, m.l1_offset)
        };
        if entries <= old_len {
            return Ok(());
        }
        if entries * 8 > header::MAX_L1_BYTES {
            return Err(io::Error::from_raw_os_error(libc::EFBIG));
        }
        // QEMU grows by half again, to amortise repeated growth.
        let new_len = entries
            .max(old_len + old_len / 2)
            .min(header::MAX_L1_BYTES / 8);
        let clusters = (new_len * 8).div_ceil(cs);
        let mut got = 0;
        let mut start = 0;
        // Needs contiguous clusters; retry until a long enough run is found.
        while got < clusters {
            let (s, n) = self.alloc_clusters(file, clusters).await?;
            if n == clusters {
                start = s;
                got = n;
            } else {
                // Too short: keep it allocated (leaked by design would be wrong), free it.
                self.update_refcounts(file, s / cs, n, -1).await?;
                let mut m = self.meta();
                m.free_hint = s / cs + n + 1;
            }
        }
        let mut table = self.meta().l1.clone();
        table.resize(new_len as usize, 0);
        let mut bytes: Vec<u8> = table.iter().flat_map(|x| x.to_be_bytes()).collect();
        bytes.resize((clusters * cs) as usize, 0);
        pwrite(file, start, &bytes).await?;
        file.driver().flush(file).await?;
        let mut hdr = (new_len as u32).to_be_bytes().to_vec();
        hdr.extend_from_slice(&start.to_be_bytes());
        pwrite(file, 36, &hdr).await?;
        file.driver().flush(file).await?;
        {
            let mut h = self.header.lock().unwrap_or_else(|e| e.into_inner());
            h.l1_size = new_len as u32;
            h.l1_table_offset = start;
        }
        {
            let mut m = self.meta();
            m.l1 = table;
            m.l1_offset = start;
        }
        if old_len > 0 {
            self.update_refcounts(file, old_off / cs, (old_len * 8).div_ceil(cs), -1)
                .await?;
        }
        Ok(())
    }
}

/// Bytes following the 40-byte fixed part of a snapshot table entry (extra data, id, name).
pub(crate) fn snapshot_rest_len(fixed: &[u8]) -> Result<u64, String> {
    let id_len = u16::from_be_bytes([fixed[12], fixed[13]]) as u64;
    let name_len = u16::from_be_bytes([fixed[14], fixed[15]]) as u64;
    let extra_len = u32::from_be_bytes(fixed[36..40].try_into().unwrap()) as u64;
    if extra_len > 1024 {
        return Err("Too much extra metadata in snapshot table entry".into());
    }
    Ok(extra_len + id_len + name_len)
}

/// One snapshot table entry from its fixed part and the bytes after it.
pub(crate) fn parse_snapshot(fixed: &[u8], var: &[u8], h: &Header) -> Result<Snapshot, String> {
    let be32 = |o: usize| u32::from_be_bytes(fixed[o..o + 4].try_into().unwrap());
    let be64 = |o: usize| u64::from_be_bytes(fixed[o..o + 8].try_into().unwrap());
    let l1_offset = be64(0);
    let l1_size = be32(8);
    let id_len = u16::from_be_bytes([fixed[12], fixed[13]]) as usize;
    let extra_len = be32(36) as usize;
    let ex = &var[..extra_len];
    let ex64 = |o: usize| {
        (ex.len() >= o + 8).then(|| u64::from_be_bytes(ex[o..o + 8].try_into().unwrap()))
    };
    let id = String::from_utf8_lossy(&var[extra_len..extra_len + id_len]).into_owned();
    let name = String::from_utf8_lossy(&var[extra_len + id_len..]).into_owned();
    if !l1_offset.is_multiple_of(h.cluster_size()) {
        return Err("Snapshot L1 table offset invalid".into());
    }
    if l1_size as u64 * 8 > header::MAX_L1_BYTES {
        return Err("Snapshot L1 table too large".into());
    }
    Ok(Snapshot {
        l1_offset,
        l1_size,
        id,
        name,
        date_sec: be32(16),
        date_nsec: be32(20),
        vm_clock_nsec: be64(24),
        vm_state_size: ex64(0).unwrap_or(be32(32) as u64),
        disk_size: ex64(8),
        icount: ex64(16).filter(|&v| v != u64::MAX),
    })
}

/// Read and check the snapshot table; returns the snapshots and the table's byte length.
async fn read_snapshots(file: &Arc<Node>, h: &Header) -> Result<(Vec<Snapshot>, u64), String> {
    let mut out = Vec::new();
    let mut off = h.snapshots_offset;
    let fail = |e: io::Error| format!("Could not read snapshots: {}", blockd_block::strerror(&e));
    for _ in 0..h.nb_snapshots {
        let fixed = pread(file, off, 40).await.map_err(fail)?;
        let rest = snapshot_rest_len(&fixed)?;
        let var = pread(file, off + 40, rest as usize).await.map_err(fail)?;
        out.push(parse_snapshot(&fixed, &var, h)?);
        off += (40 + rest).div_ceil(8) * 8;
    }
    Ok((out, off - h.snapshots_offset))
}
