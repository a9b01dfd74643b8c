//! Dirty bitmaps (QEMU's BdrvDirtyBitmap): which parts of a node were written since a point in
//! time, at a granularity of a power of two bytes.
//!
//! # API
//!
//! - [`DirtyBitmap::new`]`(name, granularity, length)` → `Arc<DirtyBitmap>`;
//!   [`default_granularity`]`(cluster_size)` is QEMU's default (the cluster size clamped to
//!   4 KiB..64 KiB, 64 KiB without one); [`check_granularity`] gives QEMU's refusal.
//! - State (atomics, readable from any thread): `name`, `granularity`, `length`, `is_enabled`
//!   / `is_recording`, `is_persistent`, `is_busy` (an export or job uses it; a bitmap with a
//!   successor is busy too), `is_inconsistent`, `is_readonly`, `has_successor`, and the
//!   setters. [`DirtyBitmap::check`] is QEMU's `bdrv_dirty_bitmap_check` (busy, read-only,
//!   inconsistent refusals with QEMU's messages).
//! - Bits, in bytes of the node (safe to call from several threads at once): `set_range`,
//!   `reset_range` (whole granules only, plus the partial last one), `get`, `next_dirty`,
//!   `next_clean`, `next_dirty_area`, `dirty_runs`, `count` (QEMU's count: dirty granules ×
//!   granularity), `clear`, `merge_from` (different granularities allowed, equal lengths
//!   required, as QEMU), `copy_from`, `duplicate`.
//! - On-disk layout (qcow2 bitmap clusters, NBD): bit n covers `[n*gran, (n+1)*gran)`, least
//!   significant bit first in each byte: `serialize(first_bit, out)`, `deserialize(first_bit,
//!   data)`, `deserialize_fill(first_bit, nbits, ones)`; `hash_input()` is what QEMU's
//!   `x-debug-block-dirty-bitmap-sha256` hashes (the bits as little-endian 64-bit words).
//! - A node's bitmaps: [`Node::dirty_bitmaps`](crate::node::Node::dirty_bitmaps) →
//!   [`DirtyBitmapList`]: `add`, `remove`, `find`, `all`, `named`, and backup's successor
//!   mechanism `create_successor` (new writes go to an anonymous successor; the bitmap is
//!   frozen and busy), `abdicate` (success: the bitmap's bits become the successor's, as in
//!   QEMU where the successor takes the name), `reclaim` (failure: the successor is merged
//!   back). Every write, write-zeroes and discard through `blockd_block::io` marks the node's
//!   enabled bitmaps once it ends (or is dropped), under the list's mutex, so successor
//!   changes never lose a write.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use arc_swap::ArcSwap;

/// Smallest granularity QEMU accepts.
pub const MIN_GRANULARITY: u64 = 512;
/// Largest granularity QEMU accepts (2 GiB).
pub const MAX_GRANULARITY: u64 = 1 << 31;
/// Longest bitmap name (bytes), as QEMU.
pub const MAX_NAME_SIZE: usize = 1023;

const ENABLED: u32 = 1;
const PERSISTENT: u32 = 2;
const BUSY: u32 = 4;
const INCONSISTENT: u32 = 8;
const READONLY: u32 = 16;

/// QEMU's default granularity for a node with this cluster size.
pub fn default_granularity(cluster_size: Option<u64>) -> u64 {
    match cluster_size {
        Some(c) if c > 0 => c.clamp(4096, 65536),
        _ => 65536,
    }
}

/// QEMU's check of a requested granularity.
pub fn check_granularity(g: u64) -> Result<(), String> {
    if !(MIN_GRANULARITY..=MAX_GRANULARITY).contains(&g) || !g.is_power_of_two() {
        return Err("Granularity must be power of 2 and at least 512".to_string());
    }
    Ok(())
}

/// Which refusals [`DirtyBitmap::check`] applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckFlags(u32);

impl CheckFlags {
    pub const BUSY: CheckFlags = CheckFlags(1);
    pub const READONLY: CheckFlags = CheckFlags(2);
    pub const INCONSISTENT: CheckFlags = CheckFlags(4);
    /// Every refusal (QEMU's BDRV_BITMAP_DEFAULT).
    pub const DEFAULT: CheckFlags = CheckFlags(7);
    /// Busy and inconsistent, not read-only (QEMU's BDRV_BITMAP_ALLOW_RO).
    pub const ALLOW_RO: CheckFlags = CheckFlags(5);

    fn has(self, o: CheckFlags) -> bool {
        self.0 & o.0 != 0
    }
}

impl std::ops::BitOr for CheckFlags {
    type Output = CheckFlags;
    fn bitor(self, o: CheckFlags) -> CheckFlags {
        CheckFlags(self.0 | o.0)
    }
}

/// A refusal of [`DirtyBitmap::check`]: QEMU's message and, for inconsistent bitmaps, its hint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapError {
    pub message: String,
    pub hint: Option<String>,
}

impl std::fmt::Display for BitmapError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

pub struct DirtyBitmap {
    name: Option<String>,
    granularity: u64,
    shift: u32,
    /// The bits; replaced as a whole when the node is resized (under the node's list lock).
    bits: ArcSwap<Bits>,
    /// Set bits (kept exact: every change adds or removes the popcount of what it changed).
    set_bits: AtomicU64,
    flags: AtomicU32,
    /// Backup's successor (`DirtyBitmapList::create_successor`).
    successor: Mutex<Option<Arc<DirtyBitmap>>>,
}

/// The bits of a bitmap over `length` bytes.
struct Bits {
    length: u64,
    nbits: u64,
    words: Box<[AtomicU64]>,
}

impl Bits {
    fn new(length: u64, granularity: u64) -> Result<Bits, String> {
        let nbits = length.div_ceil(granularity);
        let nwords =
            usize::try_from(nbits.div_ceil(64)).map_err(|_| "Bitmap is too large".to_string())?;
        Ok(Bits {
            length,
            nbits,
            words: (0..nwords).map(|_| AtomicU64::new(0)).collect(),
        })
    }

    fn bit(&self, n: u64) -> bool {
        self.words[(n / 64) as usize].load(Ordering::Acquire) & (1 << (n % 64)) != 0
    }
}

impl std::fmt::Debug for DirtyBitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyBitmap")
            .field("name", &self.name)
            .field("granularity", &self.granularity)
            .field("length", &self.length())
            .field("count", &self.count())
            .field("flags", &self.flags.load(Ordering::Relaxed))
            .finish()
    }
}

impl DirtyBitmap {
    /// An empty, enabled bitmap over `length` bytes. `granularity` must pass
    /// [`check_granularity`]; names are at most 1023 bytes.
    pub fn new(
        name: Option<&str>,
        granularity: u64,
        length: u64,
    ) -> Result<Arc<DirtyBitmap>, String> {
        check_granularity(granularity)?;
        if let Some(n) = name
            && n.len() > MAX_NAME_SIZE
        {
            return Err(format!("Bitmap name too long: {n}"));
        }
        let shift = granularity.trailing_zeros();
        Ok(Arc::new(DirtyBitmap {
            name: name.map(str::to_string),
            granularity,
            shift,
            bits: ArcSwap::from_pointee(Bits::new(length, granularity)?),
            set_bits: AtomicU64::new(0),
            flags: AtomicU32::new(ENABLED),
            successor: Mutex::new(None),
        }))
    }

    /// A new bitmap with the same granularity, length and bits (QEMU's copy for merges).
    pub fn duplicate(&self, name: Option<&str>) -> Arc<DirtyBitmap> {
        let b = DirtyBitmap::new(name, self.granularity, self.length())
            .expect("granularity already checked");
        b.copy_from(self);
        b
    }

    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    /// Bytes of the node covered.
    pub fn length(&self) -> u64 {
        self.bits.load().length
    }

    /// Number of bits (granules).
    pub fn nbits(&self) -> u64 {
        self.bits.load().nbits
    }

    /// The node now has `length` bytes: bits past a shrunk end go, a grown area is clean (as
    /// QEMU's truncate of a bitmap). Call it with marking excluded ([`DirtyBitmapList::resize`]).
    pub fn resize(&self, length: u64) -> Result<(), String> {
        let old = self.bits.load_full();
        if old.length == length {
            return Ok(());
        }
        let new = Bits::new(length, self.granularity)?;
        let mut count = 0u64;
        for (w, n) in new.words.iter().enumerate() {
            if let Some(o) = old.words.get(w) {
                let mut v = o.load(Ordering::Acquire);
                if (w as u64 + 1) * 64 > new.nbits {
                    v &= u64::MAX
                        .checked_shr(((w as u64 + 1) * 64 - new.nbits) as u32)
                        .unwrap_or(0);
                }
                n.store(v, Ordering::Release);
                count += v.count_ones() as u64;
            }
        }
        self.bits.store(Arc::new(new));
        self.set_bits.store(count, Ordering::Release);
        Ok(())
    }

    fn flag(&self, f: u32) -> bool {
        self.flags.load(Ordering::Acquire) & f != 0
    }

    fn set_flag(&self, f: u32, on: bool) {
        if on {
            self.flags.fetch_or(f, Ordering::AcqRel);
        } else {
            self.flags.fetch_and(!f, Ordering::AcqRel);
        }
    }

    /// Writes mark this bitmap.
    pub fn is_enabled(&self) -> bool {
        self.flag(ENABLED)
    }

    pub fn set_enabled(&self, on: bool) {
        self.set_flag(ENABLED, on)
    }

    /// QEMU's `recording`: enabled, or frozen with a recording successor.
    pub fn is_recording(&self) -> bool {
        self.is_enabled() || self.successor().is_some_and(|s| s.is_enabled())
    }

    pub fn is_persistent(&self) -> bool {
        self.flag(PERSISTENT)
    }

    pub fn set_persistent(&self, on: bool) {
        self.set_flag(PERSISTENT, on)
    }

    /// In use by an operation (an export, a job) or frozen with a successor.
    pub fn is_busy(&self) -> bool {
        self.flag(BUSY) || self.has_successor()
    }

    pub fn set_busy(&self, on: bool) {
        self.set_flag(BUSY, on)
    }

    /// Loaded from an image where it was not stored cleanly (qcow2's in_use flag).
    pub fn is_inconsistent(&self) -> bool {
        self.flag(INCONSISTENT)
    }

    pub fn set_inconsistent(&self, on: bool) {
        self.set_flag(INCONSISTENT, on)
    }

    /// Loaded from a read-only image: it cannot be changed.
    pub fn is_readonly(&self) -> bool {
        self.flag(READONLY)
    }

    pub fn set_readonly(&self, on: bool) {
        self.set_flag(READONLY, on)
    }

    pub fn has_successor(&self) -> bool {
        self.successor().is_some()
    }

    pub fn successor(&self) -> Option<Arc<DirtyBitmap>> {
        self.successor
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn display_name(&self) -> &str {
        self.name.as_deref().unwrap_or("")
    }

    /// QEMU's `bdrv_dirty_bitmap_check`: may an operation use this bitmap?
    pub fn check(&self, flags: CheckFlags) -> Result<(), BitmapError> {
        let name = self.display_name();
        if flags.has(CheckFlags::BUSY) && self.is_busy() {
            return Err(BitmapError {
                message: format!(
                    "Bitmap '{name}' is currently in use by another operation and cannot be used"
                ),
                hint: None,
            });
        }
        if flags.has(CheckFlags::READONLY) && self.is_readonly() {
            return Err(BitmapError {
                message: format!("Bitmap '{name}' is readonly and cannot be modified"),
                hint: None,
            });
        }
        if flags.has(CheckFlags::INCONSISTENT) && self.is_inconsistent() {
            return Err(BitmapError {
                message: format!("Bitmap '{name}' is inconsistent and cannot be used"),
                hint: Some("Try block-dirty-bitmap-remove to delete this bitmap from disk".into()),
            });
        }
        Ok(())
    }

    // ---- bits -------------------------------------------------------------------------
    // Each operation works on one snapshot of the bits (a concurrent resize swaps them).

    /// Bit range `[first, last]` (inclusive) covering bytes `[offset, offset+len)`, clamped to
    /// the bitmap.
    fn bit_span(&self, b: &Bits, offset: u64, len: u64) -> Option<(u64, u64)> {
        if len == 0 || offset >= b.length {
            return None;
        }
        let end = offset.saturating_add(len).min(b.length);
        Some((offset >> self.shift, (end - 1) >> self.shift))
    }

    /// OR `mask` into word `w`, counting the newly set bits.
    fn or_word(&self, b: &Bits, w: usize, mask: u64) {
        let old = b.words[w].fetch_or(mask, Ordering::AcqRel);
        let new_bits = (mask & !old).count_ones() as u64;
        if new_bits > 0 {
            self.set_bits.fetch_add(new_bits, Ordering::AcqRel);
        }
    }

    fn and_not_word(&self, b: &Bits, w: usize, mask: u64) {
        let old = b.words[w].fetch_and(!mask, Ordering::AcqRel);
        let gone = (mask & old).count_ones() as u64;
        if gone > 0 {
            self.set_bits.fetch_sub(gone, Ordering::AcqRel);
        }
    }

    /// Apply `op` to every word of the bit range `[first, last]` with the mask of the range's
    /// bits in that word.
    fn for_bits(first: u64, last: u64, mut op: impl FnMut(usize, u64)) {
        let (fw, lw) = (first / 64, last / 64);
        for w in fw..=lw {
            let lo = if w == fw { first % 64 } else { 0 };
            let hi = if w == lw { last % 64 } else { 63 };
            let mask = (u64::MAX >> (63 - hi)) & (u64::MAX << lo);
            op(w as usize, mask);
        }
    }

    /// Mark bytes `[offset, offset+len)` dirty (every granule they touch).
    pub fn set_range(&self, offset: u64, len: u64) {
        let b = self.bits.load();
        if let Some((f, l)) = self.bit_span(&b, offset, len) {
            self.set_bits_range(&b, f, l);
        }
    }

    fn set_bits_range(&self, b: &Bits, first: u64, last: u64) {
        Self::for_bits(first, last, |w, m| self.or_word(b, w, m));
    }

    fn reset_bits_range(&self, b: &Bits, first: u64, last: u64) {
        Self::for_bits(first, last, |w, m| self.and_not_word(b, w, m));
    }

    /// Mark bytes `[offset, offset+len)` clean. Only granules the range covers entirely are
    /// cleared (and the partial last granule when the range reaches the end).
    pub fn reset_range(&self, offset: u64, len: u64) {
        let b = self.bits.load();
        if len == 0 || offset >= b.length {
            return;
        }
        let end = offset.saturating_add(len).min(b.length);
        let first = offset.div_ceil(self.granularity);
        let stop = if end == b.length {
            b.nbits
        } else {
            end >> self.shift
        };
        if first < stop {
            self.reset_bits_range(&b, first, stop - 1);
        }
    }

    /// Is the granule holding byte `offset` dirty?
    pub fn get(&self, offset: u64) -> bool {
        let b = self.bits.load();
        offset < b.length && b.bit(offset >> self.shift)
    }

    /// First bit ≥ `from` and < `stop` whose value is `dirty`.
    fn find_bit(b: &Bits, from: u64, stop: u64, dirty: bool) -> Option<u64> {
        let stop = stop.min(b.nbits);
        let mut n = from;
        while n < stop {
            let w = b.words[(n / 64) as usize].load(Ordering::Acquire);
            let w = if dirty { w } else { !w };
            let w = w & (u64::MAX << (n % 64));
            if w != 0 {
                let bit = n / 64 * 64 + w.trailing_zeros() as u64;
                return (bit < stop).then_some(bit);
            }
            n = (n / 64 + 1) * 64;
        }
        None
    }

    fn next_with(&self, offset: u64, end: u64, dirty: bool) -> Option<u64> {
        let b = self.bits.load();
        let end = end.min(b.length);
        if offset >= end {
            return None;
        }
        let bit = Self::find_bit(
            &b,
            offset >> self.shift,
            (end - 1) / self.granularity + 1,
            dirty,
        )?;
        Some((bit << self.shift).max(offset))
    }

    /// First dirty byte offset in `[offset, end)` (the start of its granule or `offset`).
    pub fn next_dirty(&self, offset: u64, end: u64) -> Option<u64> {
        self.next_with(offset, end, true)
    }

    /// First clean byte offset in `[offset, end)`.
    pub fn next_clean(&self, offset: u64, end: u64) -> Option<u64> {
        self.next_with(offset, end, false)
    }

    /// The first dirty extent in `[offset, end)`, at most `max_len` bytes long, as
    /// (start, len) (QEMU's `bdrv_dirty_bitmap_next_dirty_area`).
    pub fn next_dirty_area(&self, offset: u64, end: u64, max_len: u64) -> Option<(u64, u64)> {
        let end = end.min(self.length());
        let start = self.next_dirty(offset, end)?;
        let stop = self.next_clean(start, end).unwrap_or(end);
        Some((start, (stop - start).min(max_len.max(1))))
    }

    /// The dirty extents in `[offset, end)` as (start, len) byte ranges, clamped to the range.
    pub fn dirty_runs(&self, offset: u64, end: u64) -> DirtyRuns<'_> {
        DirtyRuns {
            bitmap: self,
            pos: offset,
            end: end.min(self.length()),
        }
    }

    /// QEMU's dirty count: dirty granules × granularity.
    pub fn count(&self) -> u64 {
        self.set_bits.load(Ordering::Acquire) << self.shift
    }

    /// Dirty granules.
    pub fn count_bits(&self) -> u64 {
        self.set_bits.load(Ordering::Acquire)
    }

    /// Clear every bit.
    pub fn clear(&self) {
        let b = self.bits.load();
        for w in b.words.iter() {
            let old = w.swap(0, Ordering::AcqRel);
            if old != 0 {
                self.set_bits
                    .fetch_sub(old.count_ones() as u64, Ordering::AcqRel);
            }
        }
    }

    /// Can `src` be merged into this bitmap (QEMU: the lengths must be equal)?
    pub fn can_merge(&self, src: &DirtyBitmap) -> Result<(), String> {
        let (dl, sl) = (self.length(), src.length());
        if dl != sl {
            return Err(format!(
                "Bitmaps are of different sizes (destination size is {dl}, source size is {sl}) and can't be merged"
            ));
        }
        Ok(())
    }

    /// OR `src` into this bitmap; a source granule marks every granule of this bitmap it
    /// overlaps when the granularities differ.
    pub fn merge_from(&self, src: &DirtyBitmap) -> Result<(), String> {
        self.can_merge(src)?;
        if std::ptr::eq(self, src) {
            return Ok(());
        }
        let (b, sb) = (self.bits.load(), src.bits.load());
        if self.granularity == src.granularity && b.nbits == sb.nbits {
            for (w, s) in sb.words.iter().enumerate() {
                let v = s.load(Ordering::Acquire);
                if v != 0 {
                    self.or_word(&b, w, v);
                }
            }
        } else {
            for (start, len) in src.dirty_runs(0, sb.length) {
                self.set_range(start, len);
            }
        }
        Ok(())
    }

    /// Make this bitmap's bits those of `src` (same length; granularities may differ, then
    /// as `clear` + `merge_from`).
    pub fn copy_from(&self, src: &DirtyBitmap) {
        if std::ptr::eq(self, src) {
            return;
        }
        let (b, sb) = (self.bits.load(), src.bits.load());
        if self.granularity == src.granularity && b.nbits == sb.nbits {
            for (w, s) in sb.words.iter().enumerate() {
                let v = s.load(Ordering::Acquire);
                let old = b.words[w].swap(v, Ordering::AcqRel);
                let (add, sub) = ((v & !old).count_ones(), (old & !v).count_ones());
                if add > 0 {
                    self.set_bits.fetch_add(add as u64, Ordering::AcqRel);
                }
                if sub > 0 {
                    self.set_bits.fetch_sub(sub as u64, Ordering::AcqRel);
                }
            }
        } else {
            self.clear();
            for (start, len) in src.dirty_runs(0, sb.length.min(b.length)) {
                self.set_range(start, len);
            }
        }
    }

    // ---- on-disk layout ------------------------------------------------------------------

    /// Bytes needed for the on-disk layout of the whole bitmap.
    pub fn serialized_size(&self) -> u64 {
        self.nbits().div_ceil(8)
    }

    /// Write `out.len() * 8` bits starting at bit `first_bit` (a multiple of 8) in the on-disk
    /// layout; bits past the end are 0.
    pub fn serialize(&self, first_bit: u64, out: &mut [u8]) {
        debug_assert!(first_bit.is_multiple_of(8));
        let b = self.bits.load();
        let first_byte = first_bit / 8;
        for (i, o) in out.iter_mut().enumerate() {
            let byte = first_byte + i as u64;
            let w = (byte / 8) as usize;
            *o = if w < b.words.len() {
                (b.words[w].load(Ordering::Acquire) >> ((byte % 8) * 8)) as u8
            } else {
                0
            };
        }
    }

    /// Set bits from `first_bit` (a multiple of 8) to the on-disk layout `data` (overwriting
    /// them); bits past the end of the bitmap are ignored.
    pub fn deserialize(&self, first_bit: u64, data: &[u8]) {
        debug_assert!(first_bit.is_multiple_of(8));
        let b = self.bits.load();
        let first_byte = first_bit / 8;
        for (i, &d) in data.iter().enumerate() {
            let bit = (first_byte + i as u64) * 8;
            if bit >= b.nbits {
                break;
            }
            let last = (bit + 7).min(b.nbits - 1);
            let w = (bit / 64) as usize;
            let sh = bit % 64;
            let width_mask = u64::MAX >> (63 - (last - bit));
            let ones = (d as u64 & width_mask) << sh;
            let range = width_mask << sh;
            self.and_not_word(&b, w, range & !ones);
            if ones != 0 {
                self.or_word(&b, w, ones);
            }
        }
    }

    /// Set (`ones`) or clear `nbits` bits from `first_bit` (qcow2's all-ones / all-zeroes
    /// table entries).
    pub fn deserialize_fill(&self, first_bit: u64, nbits: u64, ones: bool) {
        let b = self.bits.load();
        if nbits == 0 || first_bit >= b.nbits {
            return;
        }
        let last = (first_bit + nbits - 1).min(b.nbits - 1);
        if ones {
            self.set_bits_range(&b, first_bit, last);
        } else {
            self.reset_bits_range(&b, first_bit, last);
        }
    }

    /// QEMU's `x-debug-block-dirty-bitmap-sha256`: the SHA-256 of the bits as little-endian
    /// 64-bit words, `ceil(nbits / 64) * 8` bytes (checked against qemu-storage-daemon).
    pub fn sha256_hex(&self) -> String {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(self.hash_input());
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The bytes [`DirtyBitmap::sha256_hex`] hashes.
    pub fn hash_input(&self) -> Vec<u8> {
        let b = self.bits.load();
        let mut v = Vec::with_capacity(b.words.len() * 8);
        for w in b.words.iter() {
            v.extend_from_slice(&w.load(Ordering::Acquire).to_le_bytes());
        }
        v
    }
}

/// Iterator of [`DirtyBitmap::dirty_runs`].
pub struct DirtyRuns<'a> {
    bitmap: &'a DirtyBitmap,
    pos: u64,
    end: u64,
}

impl Iterator for DirtyRuns<'_> {
    type Item = (u64, u64);

    fn next(&mut self) -> Option<(u64, u64)> {
        let start = self.bitmap.next_dirty(self.pos, self.end)?;
        let stop = self.bitmap.next_clean(start, self.end).unwrap_or(self.end);
        self.pos = stop;
        Some((start, stop - start))
    }
}

/// The dirty bitmaps of one node. Reading and marking work from any thread; adding, removing
/// and the successor changes are main-context operations (they take the [`Graph`] token).
///
/// [`Graph`]: crate::graph::Graph
#[derive(Default)]
pub struct DirtyBitmapList {
    /// Fast path for writes: no lock when the node has no bitmap.
    any: std::sync::atomic::AtomicBool,
    list: Mutex<Vec<Arc<DirtyBitmap>>>,
}

impl std::fmt::Debug for DirtyBitmapList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.lock().iter()).finish()
    }
}

impl DirtyBitmapList {
    pub fn new() -> DirtyBitmapList {
        DirtyBitmapList::default()
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Arc<DirtyBitmap>>> {
        self.list.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update_any(&self, l: &[Arc<DirtyBitmap>]) {
        self.any.store(!l.is_empty(), Ordering::Release);
    }

    /// Attach `bm`. A named bitmap's name must be free.
    pub fn add(&self, _main: &crate::graph::Graph, bm: Arc<DirtyBitmap>) -> Result<(), String> {
        self.insert(bm)
    }

    /// [`DirtyBitmapList::add`] for a driver filling the list of the node it is opening (no
    /// node exists yet, so no one else can see the list).
    pub fn insert(&self, bm: Arc<DirtyBitmap>) -> Result<(), String> {
        let mut l = self.lock();
        if let Some(n) = bm.name()
            && l.iter().any(|b| b.name() == Some(n))
        {
            return Err(format!("Bitmap already exists: {n}"));
        }
        l.push(bm);
        self.update_any(&l);
        Ok(())
    }

    /// Detach `bm` (and its successor, if any).
    pub fn remove(&self, _main: &crate::graph::Graph, bm: &Arc<DirtyBitmap>) {
        let mut l = self.lock();
        let succ = bm
            .successor
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        l.retain(|b| !Arc::ptr_eq(b, bm) && !succ.as_ref().is_some_and(|s| Arc::ptr_eq(b, s)));
        self.update_any(&l);
    }

    /// The named bitmap `name`.
    pub fn find(&self, name: &str) -> Option<Arc<DirtyBitmap>> {
        self.lock().iter().find(|b| b.name() == Some(name)).cloned()
    }

    /// Every bitmap, anonymous ones included, in the order they were added.
    pub fn all(&self) -> Vec<Arc<DirtyBitmap>> {
        self.lock().clone()
    }

    /// The named bitmaps, newest first (the order QEMU lists them in query-block).
    pub fn named(&self) -> Vec<Arc<DirtyBitmap>> {
        self.lock()
            .iter()
            .rev()
            .filter(|b| b.name().is_some())
            .cloned()
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        !self.any.load(Ordering::Acquire)
    }

    /// A write, write-zeroes or discard of `[offset, offset+len)` happened: mark every enabled
    /// bitmap. Held under the list's mutex so a successor change is atomic against it.
    pub fn mark(&self, offset: u64, len: u64) {
        if self.is_empty() {
            return;
        }
        for b in self.lock().iter() {
            if b.is_enabled() && !b.is_readonly() {
                b.set_range(offset, len);
            }
        }
    }

    /// Marks `[offset, offset+len)` when dropped: after the request ends, or when its future is
    /// dropped midway (the data may have changed in part).
    pub fn mark_on_drop(&self, offset: u64, len: u64) -> MarkOnDrop<'_> {
        MarkOnDrop {
            list: self,
            offset,
            len,
        }
    }

    /// The node was resized to `length`: every bitmap follows, with marking excluded.
    pub fn resize(&self, length: u64) {
        let l = self.lock();
        for b in l.iter() {
            // (a length too large for memory keeps the old bits; marks past them are dropped)
            let _ = b.resize(length);
        }
    }

    /// Run `f` with marking excluded (a transaction's atomic clear-and-keep-a-copy).
    pub fn locked<R>(&self, f: impl FnOnce() -> R) -> R {
        let _g = self.lock();
        f()
    }

    /// Backup: freeze `bm` and send new writes to an anonymous successor (enabled when `bm`
    /// was). Returns the successor.
    pub fn create_successor(
        &self,
        _main: &crate::graph::Graph,
        bm: &Arc<DirtyBitmap>,
    ) -> Result<Arc<DirtyBitmap>, String> {
        let mut l = self.lock();
        if bm.flag(BUSY) {
            return Err(
                "Cannot create a successor for a bitmap that is in-use by an operation".to_string(),
            );
        }
        let mut slot = bm.successor.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_some() {
            return Err("Cannot create a successor for a bitmap that already has one".to_string());
        }
        let s = DirtyBitmap::new(None, bm.granularity, bm.length())?;
        s.set_enabled(bm.is_enabled());
        bm.set_enabled(false);
        *slot = Some(s.clone());
        l.push(s.clone());
        self.update_any(&l);
        Ok(s)
    }

    /// Backup succeeded: `bm` now holds exactly what its successor recorded (the writes since
    /// the successor was made), records as the successor did, and is no longer frozen.
    pub fn abdicate(
        &self,
        _main: &crate::graph::Graph,
        bm: &Arc<DirtyBitmap>,
    ) -> Result<(), String> {
        let mut l = self.lock();
        let s = bm
            .successor
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| {
                "Cannot relinquish control if there's no successor present".to_string()
            })?;
        bm.copy_from(&s);
        bm.set_enabled(s.is_enabled());
        l.retain(|b| !Arc::ptr_eq(b, &s));
        self.update_any(&l);
        Ok(())
    }

    /// Backup failed: the successor's bits are merged back into `bm`, which records again if
    /// the successor did.
    pub fn reclaim(
        &self,
        _main: &crate::graph::Graph,
        bm: &Arc<DirtyBitmap>,
    ) -> Result<(), String> {
        let mut l = self.lock();
        let s = bm
            .successor
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| "Cannot reclaim a successor when none is present".to_string())?;
        bm.merge_from(&s)?;
        bm.set_enabled(s.is_enabled());
        l.retain(|b| !Arc::ptr_eq(b, &s));
        self.update_any(&l);
        Ok(())
    }
}

/// See [`DirtyBitmapList::mark_on_drop`].
pub struct MarkOnDrop<'a> {
    list: &'a DirtyBitmapList,
    offset: u64,
    len: u64,
}

impl Drop for MarkOnDrop<'_> {
    fn drop(&mut self) {
        self.list.mark(self.offset, self.len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bm(g: u64, len: u64) -> Arc<DirtyBitmap> {
        DirtyBitmap::new(Some("b"), g, len).unwrap()
    }

    #[test]
    fn sha256_of_the_words() {
        // 64 granules: one little-endian word; granule 0 dirty sets its lowest bit.
        let b = bm(512, 64 * 512);
        assert_eq!(
            b.sha256_hex(),
            "af5570f5a1810b7af78caf4bc70a660f0df51e42baf91d4de5b2328de0e83dfc"
        );
        b.set_range(0, 512);
        assert_eq!(
            b.sha256_hex(),
            "7c9fa136d4413fa6173637e883b6998d32e1d675f88cddff9dcbcf331820f4b8"
        );
    }

    #[test]
    fn granularity_rules() {
        assert_eq!(default_granularity(None), 65536);
        assert_eq!(default_granularity(Some(512)), 4096);
        assert_eq!(default_granularity(Some(65536)), 65536);
        assert_eq!(default_granularity(Some(2 << 20)), 65536);
        assert_eq!(default_granularity(Some(16384)), 16384);
        assert!(check_granularity(512).is_ok());
        assert!(check_granularity(1 << 31).is_ok());
        assert!(check_granularity(256).is_err());
        assert!(check_granularity(1 << 32).is_err());
        assert!(check_granularity(3 * 512).is_err());
        assert!(DirtyBitmap::new(None, 1000, 1 << 20).is_err());
    }

    #[test]
    fn set_get_count_and_search() {
        let b = bm(4096, 1 << 20);
        assert_eq!(b.nbits(), 256);
        b.set_range(5000, 1);
        assert!(b.get(4096) && b.get(8191) && !b.get(8192) && !b.get(0));
        assert_eq!(b.count(), 4096);
        b.set_range(4096 * 63, 4096 * 3); // crosses a word boundary
        assert_eq!(b.count_bits(), 4);
        assert_eq!(b.next_dirty(0, 1 << 20), Some(4096));
        assert_eq!(b.next_dirty(4097, 1 << 20), Some(4097));
        assert_eq!(b.next_dirty(8192, 1 << 20), Some(4096 * 63));
        assert_eq!(b.next_clean(4096, 1 << 20), Some(8192));
        assert_eq!(b.next_clean(4096 * 63, 1 << 20), Some(4096 * 66));
        assert_eq!(b.next_dirty(4096 * 66, 1 << 20), None);
        let runs: Vec<_> = b.dirty_runs(0, 1 << 20).collect();
        assert_eq!(runs, vec![(4096, 4096), (4096 * 63, 4096 * 3)]);
        assert_eq!(b.next_dirty_area(0, 1 << 20, 1 << 30), Some((4096, 4096)));
        // Re-marking does not count twice.
        b.set_range(0, 1 << 20);
        assert_eq!(b.count(), 1 << 20);
        assert_eq!(b.next_clean(0, 1 << 20), None);
        b.clear();
        assert_eq!(b.count(), 0);
        assert_eq!(b.next_dirty(0, u64::MAX), None);
    }

    #[test]
    fn reset_keeps_partial_granules() {
        let b = bm(65536, 200_000); // last granule partial
        b.set_range(0, 200_000);
        assert_eq!(b.count_bits(), 4);
        b.reset_range(1000, 65536); // covers no whole granule
        assert_eq!(b.count_bits(), 4);
        b.reset_range(65536, 65536);
        assert!(!b.get(65536) && b.get(0) && b.get(131072));
        b.reset_range(131072, 200_000 - 131072); // reaches the end: the partial one goes
        assert_eq!(b.count_bits(), 1);
        assert!(b.get(0));
    }

    #[test]
    fn out_of_range_is_ignored() {
        let b = bm(512, 4096);
        b.set_range(4096, 10);
        b.set_range(u64::MAX - 5, 100);
        assert_eq!(b.count(), 0);
        b.set_range(4000, 1000);
        assert_eq!(b.count_bits(), 1);
        assert!(!b.get(1 << 40));
    }

    #[test]
    fn merge_and_copy() {
        let a = bm(4096, 1 << 20);
        let c = bm(65536, 1 << 20);
        c.set_range(70000, 1);
        a.merge_from(&c).unwrap();
        assert_eq!(
            a.dirty_runs(0, 1 << 20).collect::<Vec<_>>(),
            vec![(65536, 65536)]
        );
        let d = bm(4096, 1 << 20);
        d.set_range(0, 1);
        a.merge_from(&d).unwrap();
        assert_eq!(a.count_bits(), 17);
        c.merge_from(&d).unwrap();
        assert_eq!(c.count_bits(), 2);
        let e = bm(4096, 2 << 20);
        assert_eq!(
            a.merge_from(&e).unwrap_err(),
            "Bitmaps are of different sizes (destination size is 1048576, source size is 2097152) and can't be merged"
        );
        let f = a.duplicate(Some("f"));
        assert_eq!(f.count(), a.count());
        d.copy_from(&c);
        assert_eq!(
            d.dirty_runs(0, 1 << 20).collect::<Vec<_>>(),
            vec![(0, 131072)]
        );
        a.copy_from(&d);
        assert_eq!(a.count_bits(), 32);
    }

    #[test]
    fn serialisation_round_trip() {
        let b = bm(512, 512 * 100); // 100 bits: 13 bytes, tail bits 0
        for n in [0u64, 3, 9, 63, 64, 99] {
            b.set_range(n * 512, 1);
        }
        let mut out = vec![0u8; 16];
        b.serialize(0, &mut out);
        assert_eq!(out[0], 0b0000_1001);
        assert_eq!(out[1], 0b0000_0010);
        assert_eq!(out[7], 0x80);
        assert_eq!(out[8], 0x01);
        assert_eq!(out[12], 0x08);
        assert_eq!(&out[13..], &[0, 0, 0]);
        let c = bm(512, 512 * 100);
        c.set_range(512 * 20, 512 * 5); // overwritten by deserialize
        c.deserialize(0, &out);
        assert_eq!(c.hash_input(), b.hash_input());
        assert_eq!(c.count_bits(), 6);
        assert_eq!(b.hash_input().len(), 16);
        // Partial deserialisation at an offset, and fills.
        let d = bm(512, 512 * 100);
        d.deserialize(64, &out[8..]);
        assert_eq!(d.count_bits(), 2);
        d.deserialize_fill(8, 16, true);
        assert_eq!(d.count_bits(), 18);
        d.deserialize_fill(96, 1000, true); // clamped: bits 96..99
        assert_eq!(d.count_bits(), 21);
        d.deserialize_fill(0, 100, false);
        assert_eq!(d.count_bits(), 0);
        // Tail bits beyond the bitmap are ignored.
        let e = bm(512, 512 * 100);
        e.deserialize(96, &[0xff, 0xff]);
        assert_eq!(e.count_bits(), 4);
    }

    #[test]
    fn resize_keeps_bits_and_trims_the_tail() {
        let b = bm(512, 512 * 100);
        b.set_range(512 * 10, 512);
        b.set_range(512 * 99, 512);
        b.resize(512 * 200).unwrap();
        assert_eq!(b.nbits(), 200);
        assert_eq!(b.count_bits(), 2);
        assert!(b.get(512 * 99) && !b.get(512 * 150));
        b.set_range(512 * 150, 1);
        b.resize(512 * 64).unwrap(); // cuts at a word boundary
        assert_eq!(b.count_bits(), 1);
        b.resize(512 * 11).unwrap(); // inside a word: bit 10 stays, nothing past the end
        assert_eq!(b.count_bits(), 1);
        assert_eq!(b.hash_input(), (1u64 << 10).to_le_bytes().to_vec());
        b.resize(512 * 10).unwrap();
        assert_eq!(b.count_bits(), 0);
        assert_eq!(b.length(), 5120);
    }

    #[test]
    fn checks_and_flags() {
        let b = bm(65536, 1 << 20);
        assert!(b.check(CheckFlags::DEFAULT).is_ok());
        b.set_busy(true);
        assert_eq!(
            b.check(CheckFlags::DEFAULT).unwrap_err().message,
            "Bitmap 'b' is currently in use by another operation and cannot be used"
        );
        b.set_busy(false);
        b.set_readonly(true);
        assert!(b.check(CheckFlags::ALLOW_RO).is_ok());
        assert!(b.check(CheckFlags::DEFAULT).is_err());
        b.set_readonly(false);
        b.set_inconsistent(true);
        let e = b.check(CheckFlags::DEFAULT).unwrap_err();
        assert!(e.hint.is_some());
        assert!(b.is_enabled() && b.is_recording() && !b.is_persistent());
    }

    #[test]
    fn concurrent_marking_counts_exactly() {
        let b = bm(512, 64 << 20);
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let b = &b;
                s.spawn(move || {
                    for i in 0..20_000u64 {
                        let off = ((i * 7919 + t * 104_729) % (64 << 11)) * 512;
                        b.set_range(off, 1024);
                    }
                });
            }
        });
        let mut n = 0;
        for (_, len) in b.dirty_runs(0, 64 << 20) {
            n += len / 512;
        }
        assert_eq!(n, b.count_bits());
    }
}
