//! `qemu-img amend` for qcow2: the options QEMU can change on an existing image (compat
//! upgrade 0.10 -> 1.1 and downgrade back, lazy_refcounts, refcount_bits; size is a resize
//! the caller does through the block layer first), with QEMU's checks and messages.
//!
//! Everything here runs on the image's file node with the image otherwise idle (the caller
//! flushed the open format node). Each step leaves a consistent image at every point: new
//! structures are written where nothing references them, then one header write switches to
//! them, then the old ones are dropped (a crash in between leaks at worst).

use std::collections::HashSet;
use std::sync::Arc;

use blockd_block::Node;

use crate::header::{self, Header};
use crate::image::{Image, pread, pwrite};
use crate::layout::*;

/// What `qemu-img amend -o` asked for (options already parsed and type-checked).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AmendOptions {
    /// `compat`: 2 or 3.
    pub version: Option<u32>,
    pub lazy_refcounts: Option<bool>,
    pub refcount_bits: Option<u64>,
    pub size: Option<u64>,
    /// `backing_file` / `backing_fmt` given (QEMU refuses both).
    pub backing: bool,
    pub data_file: Option<String>,
    pub data_file_raw: Option<bool>,
    /// Any `encrypt.*` option given.
    pub encrypt: bool,
}

/// The amend options of qcow2, as `qemu-img amend -o help` lists them.
pub const AMEND_HELP: &str = "\
Amend options for 'qcow2':
  backing_file=<str>     - File name of a base image
  backing_fmt=<str>      - Image format of the base image
  compat=<str>           - Compatibility level (v2 [0.10] or v3 [1.1])
  data_file=<str>        - File name of an external data file
  data_file_raw=<bool (on/off)> - The external data file must stay valid as a raw image
  encrypt.iter-time=<num> - Time to spend in PBKDF in milliseconds
  encrypt.keyslot=<num>  - Select a single keyslot to modify explicitly
  encrypt.new-secret=<str> - New secret to set in the matching keyslots. Empty string to erase
  encrypt.old-secret=<str> - Select all keyslots that match this password
  encrypt.state=<str>    - Select new state of affected keyslots (active/inactive)
  lazy_refcounts=<bool (on/off)> - Postpone refcount updates
  refcount_bits=<num>    - Width of a reference count entry in bits
  size=<size>            - Virtual disk size
";

/// Options of qcow2's creation that amend cannot change.
const CREATE_ONLY: &[&str] = &[
    "cluster_size",
    "preallocation",
    "encryption",
    "encrypt.format",
    "encrypt.key-secret",
    "encrypt.cipher-alg",
    "encrypt.cipher-mode",
    "encrypt.ivgen-alg",
    "encrypt.ivgen-hash-alg",
    "encrypt.hash-alg",
    "extended_l2",
    "compression_type",
];

fn parse_bool(k: &str, v: &str) -> Result<bool, String> {
    match v {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("Parameter '{k}' expects 'on' or 'off'")),
    }
}

impl AmendOptions {
    /// Parse `-o` pairs in order, with qemu-img's errors for unknown options, options only
    /// creation takes, and values of the wrong type.
    pub fn parse(pairs: &[(String, String)]) -> Result<AmendOptions, String> {
        let mut a = AmendOptions::default();
        for (k, v) in pairs {
            match k.as_str() {
                "size" => {
                    a.size = Some(blockd_block::options::parse_size(v).map_err(|_| {
                        "Parameter 'size' expects a non-negative number below 2^64\n\
                         Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
                         and exabytes, respectively."
                            .to_string()
                    })?)
                }
                "compat" => {
                    a.version = Some(match v.as_str() {
                        "0.10" | "v2" => 2,
                        "1.1" | "v3" => 3,
                        _ => return Err(format!("Unknown compatibility level {v}")),
                    })
                }
                "backing_file" | "backing_fmt" => a.backing = true,
                "data_file" => a.data_file = Some(v.clone()),
                "data_file_raw" => a.data_file_raw = Some(parse_bool(k, v)?),
                "lazy_refcounts" => a.lazy_refcounts = Some(parse_bool(k, v)?),
                "refcount_bits" => {
                    a.refcount_bits = Some(crate::create::parse_number(k, v)?);
                }
                "encrypt.iter-time" | "encrypt.keyslot" => {
                    crate::create::parse_number(k, v)?;
                    a.encrypt = true;
                }
                "encrypt.new-secret" | "encrypt.old-secret" | "encrypt.state" => {
                    a.encrypt = true
                }
                _ if CREATE_ONLY.contains(&k.as_str()) => {
                    return Err(format!(
                        "Invalid parameter '{k}'\nThis option is only supported for image creation"
                    ));
                }
                _ => return Err(format!("Invalid parameter '{k}'")),
            }
        }
        Ok(a)
    }

    /// QEMU's checks of the options against the image, before anything changes.
    pub fn validate(&self, h: &Header) -> Result<(), String> {
        let new_version = self.version.unwrap_or(h.version);
        if self.backing {
            return Err(
                "Cannot amend the backing file\nYou can use 'qemu-img rebase' instead.".into(),
            );
        }
        if self.data_file.is_some() && !h.has_data_file() {
            return Err(
                "data-file can only be set for images that use an external data file".into(),
            );
        }
        // Only a raw data file may stay raw: existing data may not be laid out as raw.
        if self.data_file_raw == Some(true) && !h.data_file_raw() {
            return Err("data-file-raw cannot be set on existing images".into());
        }
        if self.encrypt && h.crypt_method == 0 {
            return Err("Can't amend encryption options - encryption not present".into());
        }
        if let Some(b) = self.refcount_bits {
            if b == 0 || b > 64 || !b.is_power_of_two() {
                return Err(
                    "Refcount width must be a power of two and may not exceed 64 bits".into(),
                );
            }
            if new_version < 3 && b != 16 {
                return Err("Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)".into());
            }
        }
        // Checked only when it changes (an image with lazy refcounts on may be downgraded
        // with lazy_refcounts=on given again: the downgrade drops them).
        let lazy_now = h.compatible & header::COMPAT_LAZY_REFCOUNTS != 0;
        if self.lazy_refcounts == Some(true) && !lazy_now && new_version < 3 {
            return Err("Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)".into());
        }
        Ok(())
    }
}

fn ioerr(what: &str) -> impl Fn(std::io::Error) -> String + '_ {
    move |e| format!("{what}: {}", blockd_block::strerror(&e))
}

async fn load(file: &Arc<Node>) -> Result<Image, String> {
    crate::snapshot::load_for_update(file, false).await
}

/// Write `h` over cluster 0 (the rest of the cluster zeroed) and flush.
async fn write_header(file: &Arc<Node>, h: &Header) -> Result<(), String> {
    let mut bytes = h.serialize()?;
    let cs = h.cluster_size().min(file.length()) as usize;
    if bytes.len() < cs {
        bytes.resize(cs, 0);
    }
    let fail = ioerr("Could not update qcow2 header");
    pwrite(file, 0, &bytes).await.map_err(&fail)?;
    file.driver().flush(file).await.map_err(&fail)
}

/// Apply the validated `opts` (all but `size`, which the caller applied already) to the
/// image on `file`, in QEMU's order: upgrade, refcount width, lazy refcounts, downgrade.
/// `has_backing`: the image has a backing file (plain zero clusters then need data when
/// downgrading).
pub async fn amend(file: &Arc<Node>, opts: &AmendOptions, has_backing: bool) -> Result<(), String> {
    let h = load(file).await?.header();
    let new_version = opts.version.unwrap_or(h.version);
    if new_version > h.version {
        upgrade(file).await?;
    }
    if let Some(bits) = opts.refcount_bits
        && bits != h.refcount_bits() as u64
    {
        change_refcount_order(file, bits.trailing_zeros()).await?;
    }
    if let Some(lazy) = opts.lazy_refcounts {
        let mut h = load(file).await?.header();
        let on = h.compatible & header::COMPAT_LAZY_REFCOUNTS != 0;
        if lazy != on {
            h.compatible ^= header::COMPAT_LAZY_REFCOUNTS;
            write_header(file, &h).await?;
        }
    }
    // The data file's name in the header, and dropping the raw flag (its data stays valid).
    if opts.data_file.is_some() || opts.data_file_raw == Some(false) {
        let mut h = load(file).await?.header();
        let old = (h.data_file.clone(), h.autoclear);
        if let Some(name) = &opts.data_file {
            h.data_file = Some(name.clone());
        }
        if opts.data_file_raw == Some(false) {
            h.autoclear &= !header::AUTOCLEAR_DATA_FILE_RAW;
        }
        if (h.data_file.clone(), h.autoclear) != old {
            write_header(file, &h).await?;
        }
    }
    if new_version < h.version {
        downgrade(file, has_backing).await?;
    }
    Ok(())
}

async fn upgrade(file: &Arc<Node>) -> Result<(), String> {
    let img = load(file).await?;
    // Version 3 wants every snapshot entry to carry the disk size.
    let snaps = img.snapshots();
    if snaps.iter().any(|s| s.disk_size.is_none()) {
        let _a = img.alloc.lock().await;
        img.write_snapshot_table(file, &snaps)
            .await
            .map_err(ioerr("Failed to update the snapshot table"))?;
        img.writeback(file)
            .await
            .map_err(ioerr("Failed to update the snapshot table"))?;
    }
    let mut h = img.header();
    h.version = 3;
    h.header_length = header::V3_HEADER_LEN;
    h.incompatible = 0;
    h.compatible = 0;
    h.autoclear = 0;
    h.refcount_order = 4;
    h.compression_type = 0;
    h.feature_table = Header::qemu_feature_table();
    write_header(file, &h).await
}

fn rc_get(order: u32, block: &[u8], i: u64) -> u64 {
    let w = 1u64 << order;
    if w >= 8 {
        let bytes = (w / 8) as usize;
        let s = &block[i as usize * bytes..(i as usize + 1) * bytes];
        s.iter().fold(0u64, |a, &b| a << 8 | b as u64)
    } else {
        let bit = i * w;
        (block[(bit / 8) as usize] as u64 >> (bit % 8)) & ((1 << w) - 1)
    }
}

fn rc_set(order: u32, block: &mut [u8], i: u64, v: u64) {
    let w = 1u64 << order;
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

/// Rebuild the refcount structures with `2^order`-bit entries: the new refcount blocks and
/// table go after everything in use, the header switches to them, and the old ones are simply
/// no longer counted.
async fn change_refcount_order(file: &Arc<Node>, order: u32) -> Result<(), String> {
    let img = load(file).await?;
    let h = img.header();
    let cs = h.cluster_size();
    let old_order = h.refcount_order;
    let old_entries = (cs * 8) >> old_order;
    let fail = ioerr("Failed to change the refcount width");
    // Every cluster's refcount, with the old structures' own clusters dropped.
    let rt = pread(
        file,
        h.refcount_table_offset,
        (h.refcount_table_clusters as u64 * cs) as usize,
    )
    .await
    .map_err(&fail)?;
    let mut counts: Vec<u64> = Vec::new();
    let mut old_structs: Vec<u64> = (0..h.refcount_table_clusters as u64)
        .map(|k| h.refcount_table_offset / cs + k)
        .collect();
    for (t, e) in rt.chunks_exact(8).enumerate() {
        let rb = u64::from_be_bytes(e.try_into().unwrap()) & REFT_OFFSET_MASK;
        if rb == 0 {
            continue;
        }
        old_structs.push(rb / cs);
        let blk = pread(file, rb, cs as usize).await.map_err(&fail)?;
        for i in 0..old_entries {
            let v = rc_get(old_order, &blk, i);
            if v != 0 {
                let c = (t as u64 * old_entries + i) as usize;
                if counts.len() <= c {
                    counts.resize(c + 1, 0);
                }
                counts[c] = v;
            }
        }
    }
    let new_max = if order == 6 {
        u64::MAX
    } else {
        (1u64 << (1u64 << order)) - 1
    };
    if let Some((c, &v)) = counts.iter().enumerate().find(|(_, v)| **v > new_max) {
        return Err(format!(
            "Cannot decrease refcount entry width to {} bits: Cluster at offset {:#x} has a refcount of {v}",
            1u64 << order,
            c as u64 * cs
        ));
    }
    for c in &old_structs {
        if let Some(v) = counts.get_mut(*c as usize) {
            *v = 0;
        }
    }
    write_refcount_structure(
        file,
        &h,
        counts,
        order,
        "Failed to change the refcount width",
    )
    .await?;
    Ok(())
}

/// Write refcount blocks and a refcount table of `2^order`-bit entries holding `counts`
/// (one per cluster) after the last cluster in use (or the file end), then switch the header
/// to them. The new structures count themselves; whatever the old ones used is not counted
/// (so it is free afterwards). Returns the header now on disk.
pub(crate) async fn write_refcount_structure(
    file: &Arc<Node>,
    h: &Header,
    mut counts: Vec<u64>,
    order: u32,
    what: &str,
) -> Result<Header, String> {
    let cs = h.cluster_size();
    let fail = ioerr(what);
    // Place the new structures after the last cluster in use (or the file end).
    let used = counts.iter().rposition(|&v| v != 0).map_or(0, |i| i + 1) as u64;
    let start = used.max(file.length().div_ceil(cs));
    let new_entries = (cs * 8) >> order;
    let (mut blocks, mut tclusters) = (0u64, 0u64);
    loop {
        let total = start + tclusters + blocks;
        let b = total.div_ceil(new_entries);
        let t = (b * 8).div_ceil(cs).max(1);
        if b == blocks && t == tclusters {
            break;
        }
        blocks = b;
        tclusters = t;
    }
    if tclusters * cs > header::MAX_REFTABLE_BYTES {
        return Err(format!("{what}: refcount table too large"));
    }
    let table_at = start;
    let blocks_at = start + tclusters;
    let total = blocks_at + blocks;
    counts.resize(total as usize, 0);
    for c in start..total {
        counts[c as usize] = 1;
    }
    let mut table = vec![0u8; (tclusters * cs) as usize];
    let mut data = vec![0u8; (blocks * cs) as usize];
    for b in 0..blocks {
        let off = (blocks_at + b) * cs;
        table[b as usize * 8..b as usize * 8 + 8].copy_from_slice(&off.to_be_bytes());
        let blk = &mut data[(b * cs) as usize..((b + 1) * cs) as usize];
        for i in 0..new_entries {
            let c = b * new_entries + i;
            if let Some(&v) = counts.get(c as usize)
                && v != 0
            {
                rc_set(order, blk, i, v);
            }
        }
    }
    pwrite(file, blocks_at * cs, &data).await.map_err(&fail)?;
    pwrite(file, table_at * cs, &table).await.map_err(&fail)?;
    file.driver().flush(file).await.map_err(&fail)?;
    let mut h2 = h.clone();
    h2.refcount_order = order;
    h2.refcount_table_offset = table_at * cs;
    h2.refcount_table_clusters = tclusters as u32;
    write_header(file, &h2).await?;
    Ok(h2)
}

/// Every L2 table reachable from the active and the snapshots' L1 tables, once each.
async fn all_l2_tables(img: &Image, file: &Arc<Node>) -> Result<Vec<u64>, String> {
    let fail = ioerr("Could not read L1 table");
    let mut l1s = vec![img.meta().l1.clone()];
    for s in img.snapshots() {
        if s.l1_size > 0 {
            let b = pread(file, s.l1_offset, s.l1_size as usize * 8)
                .await
                .map_err(&fail)?;
            l1s.push(
                b.chunks_exact(8)
                    .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
                    .collect(),
            );
        }
    }
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for l1 in l1s {
        for e in l1 {
            let o = e & L1E_OFFSET_MASK;
            if o != 0 && seen.insert(o) {
                out.push(o);
            }
        }
    }
    Ok(out)
}

async fn downgrade(file: &Arc<Node>, has_backing: bool) -> Result<(), String> {
    let img = load(file).await?;
    let mut h = img.header();
    let cs = h.cluster_size();
    if h.refcount_order != 4 {
        return Err("compat=0.10 requires refcount_bits=16".into());
    }
    if h.incompatible & header::INCOMPAT_DATA_FILE != 0 {
        return Err("Cannot downgrade an image with a data file".into());
    }
    let size = h.size;
    if img
        .snapshots()
        .iter()
        .any(|s| s.vm_state_size > u32::MAX as u64 || s.disk_size.is_some_and(|d| d != size))
    {
        return Err("Internal snapshots prevent downgrade of image".into());
    }
    let tables = all_l2_tables(&img, file).await?;
    let fail = ioerr("Failed to downgrade the image");
    let geo = img.geo;
    if h.incompatible & header::INCOMPAT_COMPRESSION != 0 && h.compression_type != 0 {
        for &t in &tables {
            let b = pread(file, t, cs as usize).await.map_err(&fail)?;
            if b.chunks_exact(8)
                .any(|c| u64::from_be_bytes(c.try_into().unwrap()) & OFLAG_COMPRESSED != 0)
            {
                return Err("Cannot downgrade an image with zstd compression type and existing compressed clusters".into());
            }
        }
    }
    let other = h.incompatible & !(header::INCOMPAT_DIRTY | header::INCOMPAT_COMPRESSION);
    if other != 0 {
        return Err(format!(
            "Cannot downgrade an image with incompatible features {other:#x} set"
        ));
    }
    // Persistent bitmaps stay behind as QEMU leaves them: the extension is kept but the
    // autoclear bit that vouches for it goes (below), so readers treat them as inconsistent.
    // Version 2 has no zero flag: zero clusters become unallocated (nothing below them) or
    // clusters of zeroes.
    let zeroes = vec![0u8; cs as usize];
    let _a = img.alloc.lock().await;
    for &t in &tables {
        let raw = pread(file, t, cs as usize).await.map_err(&fail)?;
        let mut words: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
            .collect();
        let l2_rc = img.refcount(file, t / cs).await.map_err(&fail)?;
        let mut changed = false;
        for w in words.iter_mut().take(geo.l2_entries as usize) {
            let e = *w;
            if e & OFLAG_COMPRESSED != 0 || e & OFLAG_ZERO == 0 {
                continue;
            }
            let host = e & L2E_OFFSET_MASK;
            *w = if host != 0 {
                pwrite(file, host, &zeroes).await.map_err(&fail)?;
                e & !OFLAG_ZERO
            } else if !has_backing {
                0
            } else {
                let (at, _) = img.alloc_clusters(file, 1).await.map_err(&fail)?;
                if l2_rc > 1 {
                    img.update_refcounts(file, at / cs, 1, l2_rc as i64 - 1)
                        .await
                        .map_err(&fail)?;
                }
                pwrite(file, at, &zeroes).await.map_err(&fail)?;
                at | if l2_rc == 1 { OFLAG_COPIED } else { 0 }
            };
            changed = true;
        }
        if changed {
            // The new clusters' refcounts and zeroes are durable before the table uses them.
            img.writeback(file).await.map_err(&fail)?;
            file.driver().flush(file).await.map_err(&fail)?;
            let bytes: Vec<u8> = words.iter().flat_map(|x| x.to_be_bytes()).collect();
            pwrite(file, t, &bytes).await.map_err(&fail)?;
        }
    }
    img.writeback(file).await.map_err(&fail)?;
    file.driver().flush(file).await.map_err(&fail)?;
    h.version = 2;
    h.header_length = header::V2_HEADER_LEN;
    h.incompatible = 0;
    h.compatible = 0;
    h.autoclear = 0;
    h.compression_type = 0;
    h.refcount_order = 4;
    // The image is dropped without writing anything more (its caches were written above).
    img.read_only
        .store(true, std::sync::atomic::Ordering::Release);
    write_header(file, &h).await
}
