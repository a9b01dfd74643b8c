//! Persistent dirty bitmaps (the bitmaps extension, 0x23852875; autoclear bit 0).
//!
//! On open, the bitmap directory is read and checked entry by entry (hostile images: offsets,
//! sizes, names, flags, table entries), and each bitmap becomes a block-layer
//! [`DirtyBitmap`] in the node's list (persistent; enabled when its `auto` flag is set;
//! inconsistent, with no data, when its `in_use` flag is set; read-only on a read-only open).
//! A writable open marks every consistent bitmap `in_use` on disk, as QEMU does, so a crash
//! leaves them inconsistent rather than silently stale.
//!
//! On close ([`Persist::store`]), every persistent bitmap of the node's list is written anew:
//! data clusters (all-zero clusters stay unallocated), a table, a directory, all with their
//! refcounts; then the header's extension points at the new directory (the switch), and only
//! then are the old directory, tables and data clusters freed. Inconsistent bitmaps keep their
//! old entries untouched. With no persistent bitmap left, the extension and autoclear bit 0 go.

use std::io;
use std::sync::{Arc, Mutex};

use blockd_block::{DirtyBitmap, DirtyBitmapList, Node};

use crate::header::{AUTOCLEAR_BITMAPS, BitmapsExt, Header};
use crate::image::{Image, pread, pwrite};

pub const FLAG_IN_USE: u32 = 1;
pub const FLAG_AUTO: u32 = 2;
pub const FLAG_EXTRA_DATA_COMPATIBLE: u32 = 4;
const KNOWN_FLAGS: u32 = 7;
/// The only bitmap type: dirty tracking.
const TYPE_DIRTY_TRACKING: u8 = 1;
const MIN_GRANULARITY_BITS: u8 = 9;
const MAX_GRANULARITY_BITS: u8 = 31;
const MAX_NAME_SIZE: usize = 1023;
/// QEMU's limits on one bitmap's table (entries) and data (bytes).
const MAX_TABLE_SIZE: u64 = 0x800_0000;
const MAX_PHYS_SIZE: u64 = 0x2000_0000;
pub const MAX_BITMAPS: usize = 65535;
/// Bits 9..55 of a table entry: the data cluster's offset.
const TABLE_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const TABLE_RESERVED_MASK: u64 = !(TABLE_OFFSET_MASK | 1);

/// One bitmap directory entry as on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub table_offset: u64,
    pub table_size: u32,
    pub flags: u32,
    pub kind: u8,
    pub granularity_bits: u8,
    pub name: String,
    pub extra_data: Vec<u8>,
}

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn be64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_be_bytes(a)
}

/// Table entries a bitmap of `size` bytes at this granularity needs.
pub fn table_size_for(size: u64, granularity_bits: u8, cluster_size: u64) -> u64 {
    let bits = size.div_ceil(1u64 << granularity_bits);
    bits.div_ceil(cluster_size * 8)
}

/// Parse and check the directory (`nb` entries in `buf`) of an image of `size` guest bytes,
/// `cs`-byte clusters, in a file of `file_len` bytes.
pub fn parse_directory(
    buf: &[u8],
    nb: u32,
    size: u64,
    cs: u64,
    file_len: u64,
) -> Result<Vec<DirEntry>, String> {
    let mut out: Vec<DirEntry> = Vec::new();
    let mut pos = 0usize;
    for _ in 0..nb {
        if pos + 24 > buf.len() {
            return Err("Bitmap directory is truncated".into());
        }
        let e = &buf[pos..];
        let name_size = u16::from_be_bytes([e[18], e[19]]) as usize;
        let extra_size = be32(e, 20) as usize;
        let entry_len = (24 + extra_size + name_size).div_ceil(8) * 8;
        if extra_size > buf.len() || pos + entry_len > buf.len() {
            return Err("Bitmap directory is truncated".into());
        }
        let entry = DirEntry {
            table_offset: be64(e, 0),
            table_size: be32(e, 8),
            flags: be32(e, 12),
            kind: e[16],
            granularity_bits: e[17],
            extra_data: e[24..24 + extra_size].to_vec(),
            name: String::from_utf8(e[24 + extra_size..24 + extra_size + name_size].to_vec())
                .map_err(|_| "Bitmap name is not valid UTF-8".to_string())?,
        };
        if e[24 + extra_size + name_size..entry_len]
            .iter()
            .any(|&b| b != 0)
        {
            return Err(format!("Bitmap '{}': non-zero padding", entry.name));
        }
        check_entry(&entry, size, cs, file_len)?;
        if out.iter().any(|x| x.name == entry.name) {
            return Err(format!("Duplicate bitmap name '{}'", entry.name));
        }
        out.push(entry);
        pos += entry_len;
    }
    if pos != buf.len() {
        return Err("Bitmap directory size does not match its entries".into());
    }
    Ok(out)
}

fn check_entry(e: &DirEntry, size: u64, cs: u64, file_len: u64) -> Result<(), String> {
    let bad = |why: &str| Err(format!("Bitmap '{}' is invalid: {why}", e.name));
    if e.name.is_empty() || e.name.len() > MAX_NAME_SIZE || e.name.contains('\0') {
        return bad("bad name");
    }
    if e.kind != TYPE_DIRTY_TRACKING {
        return bad("unknown type");
    }
    if !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&e.granularity_bits) {
        return bad("granularity out of range");
    }
    if e.flags & !KNOWN_FLAGS != 0 {
        return bad("reserved flags set");
    }
    if !e.extra_data.is_empty() && e.flags & FLAG_EXTRA_DATA_COMPATIBLE == 0 {
        return bad("unknown extra data");
    }
    let want = table_size_for(size, e.granularity_bits, cs);
    if e.table_size as u64 != want || want > MAX_TABLE_SIZE {
        return bad("table size does not match the image size");
    }
    if size.div_ceil(1u64 << e.granularity_bits).div_ceil(8) > MAX_PHYS_SIZE {
        return bad("too large");
    }
    if e.flags & FLAG_IN_USE == 0 {
        let end = e.table_offset.checked_add(e.table_size as u64 * 8);
        if e.table_offset == 0
            || !e.table_offset.is_multiple_of(cs)
            || end.is_none_or(|x| x > file_len)
        {
            return bad("table offset out of range");
        }
    }
    Ok(())
}

/// Serialize a directory (each entry padded to 8 bytes).
pub fn serialize_directory(entries: &[DirEntry]) -> Vec<u8> {
    let mut v = Vec::new();
    for e in entries {
        v.extend_from_slice(&e.table_offset.to_be_bytes());
        v.extend_from_slice(&e.table_size.to_be_bytes());
        v.extend_from_slice(&e.flags.to_be_bytes());
        v.push(e.kind);
        v.push(e.granularity_bits);
        v.extend_from_slice(&(e.name.len() as u16).to_be_bytes());
        v.extend_from_slice(&(e.extra_data.len() as u32).to_be_bytes());
        v.extend_from_slice(&e.extra_data);
        v.extend_from_slice(e.name.as_bytes());
        while !v.len().is_multiple_of(8) {
            v.push(0);
        }
    }
    v
}

async fn read_table(file: &Arc<Node>, e: &DirEntry, cs: u64) -> Result<Vec<u64>, String> {
    let b = pread(file, e.table_offset, e.table_size as usize * 8)
        .await
        .map_err(|x| {
            format!(
                "Could not read bitmap table: {}",
                blockd_block::strerror(&x)
            )
        })?;
    let flen = file.length();
    let mut t = Vec::with_capacity(e.table_size as usize);
    for i in 0..e.table_size as usize {
        let v = be64(&b, i * 8);
        let off = v & TABLE_OFFSET_MASK;
        if v & TABLE_RESERVED_MASK != 0
            || (off != 0 && (!off.is_multiple_of(cs) || off + cs > flen))
        {
            return Err(format!(
                "Bitmap '{}' is invalid: bad table entry {i}",
                e.name
            ));
        }
        t.push(v);
    }
    Ok(t)
}

/// A bitmap of the directory as a block-layer bitmap, with its data when consistent.
async fn load_one(
    file: &Arc<Node>,
    e: &DirEntry,
    size: u64,
    cs: u64,
    read_only: bool,
) -> Result<Arc<DirtyBitmap>, String> {
    let b = DirtyBitmap::new(Some(&e.name), 1u64 << e.granularity_bits, size)?;
    b.set_persistent(true);
    b.set_readonly(read_only);
    if e.flags & FLAG_IN_USE != 0 {
        b.set_inconsistent(true);
        b.set_enabled(false);
        return Ok(b);
    }
    b.set_enabled(e.flags & FLAG_AUTO != 0);
    let bits_per_cluster = cs * 8;
    for (i, v) in read_table(file, e, cs).await?.into_iter().enumerate() {
        let first = i as u64 * bits_per_cluster;
        let off = v & TABLE_OFFSET_MASK;
        if off == 0 {
            if v & 1 != 0 {
                b.deserialize_fill(first, bits_per_cluster, true);
            }
            continue;
        }
        let data = pread(file, off, cs as usize)
            .await
            .map_err(|x| format!("Could not read bitmap data: {}", blockd_block::strerror(&x)))?;
        b.deserialize(first, &data);
    }
    Ok(b)
}

/// The persistent-bitmap state of one open qcow2 image: the node's bitmap list (shared with
/// the node) and the directory as it is on disk.
#[derive(Default)]
pub struct Persist {
    pub list: Arc<DirtyBitmapList>,
    pub on_disk: Mutex<Vec<DirEntry>>,
}

impl Persist {
    /// Read the image's bitmaps into a new list (`h` parsed from `file`). A writable open marks
    /// the consistent ones in use on disk.
    pub async fn load(img: &Image, file: &Arc<Node>, read_only: bool) -> Result<Persist, String> {
        let p = Persist::default();
        let h = img.header();
        let Some(ext) = h.bitmaps.filter(|_| h.autoclear & AUTOCLEAR_BITMAPS != 0) else {
            return Ok(p);
        };
        let cs = img.geo.cluster_size;
        if ext.directory_offset == 0
            || ext
                .directory_offset
                .checked_add(ext.directory_size)
                .is_none_or(|e| e > file.length())
        {
            return Err("Could not load bitmaps: bitmap directory out of the file".into());
        }
        let buf = pread(file, ext.directory_offset, ext.directory_size as usize)
            .await
            .map_err(|e| {
                format!(
                    "Could not read bitmap directory: {}",
                    blockd_block::strerror(&e)
                )
            })?;
        let entries = parse_directory(&buf, ext.nb_bitmaps, h.size, cs, file.length())
            .map_err(|e| format!("Could not load bitmaps: {e}"))?;
        for e in &entries {
            let b = load_one(file, e, h.size, cs, read_only)
                .await
                .map_err(|e| format!("Could not load bitmaps: {e}"))?;
            p.list.insert(b)?;
        }
        if !read_only && entries.iter().any(|e| e.flags & FLAG_IN_USE == 0) {
            let marked: Vec<DirEntry> = entries
                .iter()
                .cloned()
                .map(|mut e| {
                    e.flags |= FLAG_IN_USE;
                    e
                })
                .collect();
            let dir = serialize_directory(&marked);
            // Same size and place: only the flags change.
            pwrite(file, ext.directory_offset, &dir)
                .await
                .and(file.driver().flush(file).await)
                .map_err(|e| {
                    format!(
                        "Could not update bitmap directory: {}",
                        blockd_block::strerror(&e)
                    )
                })?;
            *p.on_disk.lock().unwrap_or_else(|e| e.into_inner()) = marked;
        } else {
            *p.on_disk.lock().unwrap_or_else(|e| e.into_inner()) = entries;
        }
        Ok(p)
    }

    /// Mark every consistent bitmap of the directory in use on disk again (a writable image
    /// whose bitmaps were stored for a reopen to read-only that did not happen).
    pub async fn mark_in_use(&self, img: &Image, file: &Arc<Node>) -> io::Result<()> {
        let _alloc = img.alloc.lock().await;
        let h = img.header();
        let Some(ext) = h.bitmaps.filter(|_| h.autoclear & AUTOCLEAR_BITMAPS != 0) else {
            return Ok(());
        };
        let marked: Vec<DirEntry> = self
            .on_disk
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .map(|mut e| {
                e.flags |= FLAG_IN_USE;
                e
            })
            .collect();
        let dir = serialize_directory(&marked);
        if dir.len() as u64 != ext.directory_size {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        pwrite(file, ext.directory_offset, &dir).await?;
        file.driver().flush(file).await?;
        *self.on_disk.lock().unwrap_or_else(|e| e.into_inner()) = marked;
        Ok(())
    }

    /// QEMU's checks before a bitmap is made persistent in this image.
    pub fn can_store_new(&self, img: &Image, name: &str, granularity: u64) -> Result<(), String> {
        let h = img.header();
        if h.version < 3 {
            return Err("Cannot store dirty bitmaps in qcow2 v2 files".into());
        }
        // (QEMU accepts one on a read-only image too; it is never stored.)
        let persistent = self
            .list
            .named()
            .iter()
            .filter(|b| b.is_persistent())
            .count();
        if persistent >= MAX_BITMAPS {
            return Err("Maximum number of persistent bitmaps is already reached".into());
        }
        let bits = granularity.trailing_zeros() as u8;
        if table_size_for(h.size, bits, img.geo.cluster_size) > MAX_TABLE_SIZE {
            return Err("Bitmap is too large".into());
        }
        let _ = name;
        Ok(())
    }

    /// Write every persistent bitmap of the list to the image (see the module comment). Call
    /// at close of a writable image, with no request in flight.
    pub async fn store(&self, img: &Image, file: &Arc<Node>) -> io::Result<()> {
        if img.is_read_only() {
            return Ok(());
        }
        let _alloc = img.alloc.lock().await;
        let cs = img.geo.cluster_size;
        let old = self
            .on_disk
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        // QEMU's order: the bitmaps already in the directory where they were, then the new
        // ones, newest first.
        let mut bitmaps: Vec<Arc<DirtyBitmap>> = self
            .list
            .named()
            .into_iter()
            .filter(|b| b.is_persistent())
            .collect();
        let pos = |b: &Arc<DirtyBitmap>| {
            old.iter()
                .position(|e| Some(e.name.as_str()) == b.name())
                .unwrap_or(usize::MAX)
        };
        bitmaps.sort_by_key(pos);
        if old.is_empty() && bitmaps.is_empty() {
            return Ok(());
        }
        let h = img.header();
        // Clusters the old directory holds, freed once the new one is in place.
        let mut old_clusters: Vec<u64> = Vec::new();
        let mut entries = Vec::new();
        let mut keep: Vec<String> = Vec::new();
        for b in &bitmaps {
            let name = b.name().unwrap_or_default().to_string();
            if b.is_inconsistent() {
                if let Some(e) = old.iter().find(|e| e.name == name) {
                    entries.push(e.clone());
                    keep.push(name);
                }
                continue;
            }
            entries.push(self.write_bitmap(img, file, b).await?);
        }
        for e in &old {
            if keep.contains(&e.name) || e.flags & FLAG_IN_USE != 0 && e.table_offset == 0 {
                continue;
            }
            if let Ok(t) = read_table(file, e, cs).await {
                old_clusters.extend(
                    t.iter()
                        .map(|v| v & TABLE_OFFSET_MASK)
                        .filter(|&o| o != 0)
                        .map(|o| o / cs),
                );
                let n = (e.table_size as u64 * 8).div_ceil(cs);
                old_clusters.extend((0..n).map(|i| e.table_offset / cs + i));
            }
        }
        if let Some(ext) = h.bitmaps.filter(|_| h.autoclear & AUTOCLEAR_BITMAPS != 0) {
            let n = ext.directory_size.div_ceil(cs);
            old_clusters.extend((0..n).map(|i| ext.directory_offset / cs + i));
        }
        let mut new_h = h.clone();
        if entries.is_empty() {
            new_h.bitmaps = None;
            new_h.autoclear &= !AUTOCLEAR_BITMAPS;
        } else {
            let dir = serialize_directory(&entries);
            let off = alloc_contiguous(img, file, (dir.len() as u64).div_ceil(cs)).await?;
            pwrite(file, off, &dir).await?;
            new_h.bitmaps = Some(BitmapsExt {
                nb_bitmaps: entries.len() as u32,
                directory_size: dir.len() as u64,
                directory_offset: off,
            });
            new_h.autoclear |= AUTOCLEAR_BITMAPS;
        }
        // New refcounts and data durable before the header points at them.
        img.writeback(file).await?;
        file.driver().flush(file).await?;
        write_header(img, file, &new_h).await?;
        *self.on_disk.lock().unwrap_or_else(|e| e.into_inner()) = entries;
        for c in old_clusters {
            img.update_refcounts(file, c, 1, -1).await?;
        }
        img.writeback(file).await?;
        file.driver().flush(file).await
    }

    /// Write one bitmap's data clusters and table; its directory entry.
    async fn write_bitmap(
        &self,
        img: &Image,
        file: &Arc<Node>,
        b: &DirtyBitmap,
    ) -> io::Result<DirEntry> {
        let cs = img.geo.cluster_size;
        let gbits = b.granularity().trailing_zeros() as u8;
        let size = table_size_for(b.length(), gbits, cs);
        let mut table = Vec::with_capacity(size as usize);
        let mut buf = vec![0u8; cs as usize];
        for i in 0..size {
            let first = i * cs * 8;
            let byte = |bit: u64| ((bit as u128) << gbits).min(u64::MAX as u128) as u64;
            if b.next_dirty(byte(first), byte(first + cs * 8)).is_none() {
                table.push(0u64);
                continue;
            }
            b.serialize(first, &mut buf);
            let off = alloc_contiguous(img, file, 1).await?;
            pwrite(file, off, &buf).await?;
            table.push(off);
        }
        let bytes: Vec<u8> = table.iter().flat_map(|v| v.to_be_bytes()).collect();
        let toff = alloc_contiguous(img, file, (bytes.len() as u64).div_ceil(cs).max(1)).await?;
        pwrite(file, toff, &bytes).await?;
        Ok(DirEntry {
            table_offset: toff,
            table_size: size as u32,
            flags: if b.is_enabled() { FLAG_AUTO } else { 0 },
            kind: TYPE_DIRTY_TRACKING,
            granularity_bits: gbits,
            name: b.name().unwrap_or_default().to_string(),
            extra_data: Vec::new(),
        })
    }
}

/// `n` contiguous new clusters (refcount 1); returns the offset of the first.
async fn alloc_contiguous(img: &Image, file: &Arc<Node>, n: u64) -> io::Result<u64> {
    let mut wasted = Vec::new();
    let r = loop {
        let (off, k) = img.alloc_clusters(file, n).await?;
        if k == n {
            break off;
        }
        // Too short a run: keep it (so the next try starts after it) and give it back after.
        wasted.push((off / img.geo.cluster_size, k));
    };
    for (c, k) in wasted {
        img.update_refcounts(file, c, k, -1).await?;
    }
    Ok(r)
}

/// Rewrite the header in cluster 0 (it must fit there, as in QEMU) and make it durable; the
/// in-memory header follows.
async fn write_header(img: &Image, file: &Arc<Node>, h: &Header) -> io::Result<()> {
    let mut bytes = h
        .serialize()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let cs = h.cluster_size().min(file.length()) as usize;
    if bytes.len() < cs {
        bytes.resize(cs, 0);
    }
    pwrite(file, 0, &bytes).await?;
    file.driver().flush(file).await?;
    let mut cur = img.header.lock().unwrap_or_else(|e| e.into_inner());
    cur.bitmaps = h.bitmaps;
    cur.autoclear = h.autoclear;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str) -> DirEntry {
        DirEntry {
            table_offset: 0x30000,
            table_size: 1,
            flags: FLAG_AUTO,
            kind: 1,
            granularity_bits: 16,
            name: name.into(),
            extra_data: Vec::new(),
        }
    }

    #[test]
    fn directory_round_trip_and_refusals() {
        let es = vec![entry("a"), entry("bitmap-two")];
        let buf = serialize_directory(&es);
        assert_eq!(buf.len(), 32 + 40);
        let flen = 1 << 20;
        assert_eq!(parse_directory(&buf, 2, 10 << 20, 65536, flen).unwrap(), es);
        // Truncated, wrong count, duplicate names.
        assert!(parse_directory(&buf[..60], 2, 10 << 20, 65536, flen).is_err());
        assert!(parse_directory(&buf, 1, 10 << 20, 65536, flen).is_err());
        assert!(parse_directory(&buf, 3, 10 << 20, 65536, flen).is_err());
        let dup = serialize_directory(&[entry("a"), entry("a")]);
        assert!(parse_directory(&dup, 2, 10 << 20, 65536, flen).is_err());
        let bad = |f: &dyn Fn(&mut DirEntry)| {
            let mut e = entry("x");
            f(&mut e);
            parse_directory(&serialize_directory(&[e]), 1, 10 << 20, 65536, flen).is_err()
        };
        assert!(bad(&|e| e.kind = 2));
        assert!(bad(&|e| e.granularity_bits = 8));
        assert!(bad(&|e| e.granularity_bits = 32));
        assert!(bad(&|e| e.flags = 8));
        assert!(bad(&|e| e.table_size = 2));
        assert!(bad(&|e| e.table_offset = 0x30001));
        assert!(bad(&|e| e.table_offset = 0));
        assert!(bad(&|e| e.table_offset = flen));
        assert!(bad(&|e| e.name = String::new()));
        assert!(bad(&|e| e.extra_data = vec![1, 2, 3]));
        assert!(!bad(&|e| {
            e.extra_data = vec![1, 2, 3];
            e.flags |= FLAG_EXTRA_DATA_COMPATIBLE
        }));
        // An in-use entry may have no table.
        assert!(!bad(&|e| {
            e.flags = FLAG_IN_USE;
            e.table_offset = 0
        }));
        // Huge name and extra sizes do not overflow.
        let mut raw = serialize_directory(&[entry("x")]);
        raw[18] = 0xff;
        raw[19] = 0xff;
        raw[20..24].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_directory(&raw, 1, 10 << 20, 65536, flen).is_err());
    }

    #[test]
    fn table_sizes() {
        assert_eq!(table_size_for(10 << 20, 16, 65536), 1);
        assert_eq!(table_size_for(0, 16, 65536), 0);
        // 512-byte clusters hold 4096 bits: 1 GiB at 512 B granularity is 2 Mi bits.
        assert_eq!(table_size_for(1 << 30, 9, 512), 512);
    }
}
