//! `qemu-img check` for qcow2: count the references to every host cluster by walking the
//! metadata (header, L1/L2 of the active image and of snapshots, refcount structures,
//! snapshot table, bitmaps), compare with the stored refcounts, check COPIED flags, and
//! repair leaks (`-r leaks`) or everything (`-r all`). Also the repair of a dirty image at a
//! writable open.

use std::collections::HashMap;
use std::sync::Arc;

use blockd_block::Node;
use serde_json::{Value, json};

use crate::cache::CacheConfig;
use crate::header::{self, Header};
use crate::image::{Image, pread, pwrite};
use crate::layout::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repair {
    None,
    Leaks,
    All,
}

/// QEMU's ImageCheck, plus the messages qemu-img prints while checking.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    pub corruptions: u64,
    pub leaks: u64,
    pub check_errors: u64,
    pub corruptions_fixed: u64,
    pub leaks_fixed: u64,
    pub image_end_offset: u64,
    pub total_clusters: u64,
    pub allocated_clusters: u64,
    pub fragmented_clusters: u64,
    pub compressed_clusters: u64,
    /// Lines printed to stderr during the check ("Leaked cluster ...", "ERROR ...").
    pub messages: Vec<String>,
    /// The check could not complete (qemu-img: "Check failed: <this>", exit code 1).
    pub failed: Option<String>,
}

/// Reference counts found by walking the metadata.
struct Refs {
    /// References per cluster: dense for files of up to [`DENSE_MAX`] clusters, else sparse.
    dense: Vec<u32>,
    sparse: HashMap<u64, u64>,
    cluster_bits: u32,
    highest: u64,
    /// Clusters the file has (rounded up); references further out are errors, not counted
    /// (so a hostile offset cannot make the check walk 2^56 clusters).
    file_clusters: u64,
    errors: Vec<String>,
}

/// Files of up to this many clusters get a flat counter array (64 MiB at most).
const DENSE_MAX: u64 = 1 << 24;

impl Refs {
    fn new(cluster_bits: u32, file_clusters: u64) -> Refs {
        Refs {
            dense: if file_clusters <= DENSE_MAX {
                vec![0; file_clusters as usize]
            } else {
                Vec::new()
            },
            sparse: HashMap::new(),
            cluster_bits,
            highest: 0,
            file_clusters,
            errors: Vec::new(),
        }
    }

    fn get(&self, c: u64) -> u64 {
        match self.dense.get(c as usize) {
            Some(&v) if v != u32::MAX => v as u64,
            _ => self.sparse.get(&c).copied().unwrap_or(0),
        }
    }

    fn add_range(&mut self, off: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = off >> self.cluster_bits;
        let last = off.saturating_add(len - 1) >> self.cluster_bits;
        if last >= self.file_clusters {
            self.errors.push(format!(
                "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset {off:#x} size {len:#x}"
            ));
            return;
        }
        for c in first..=last {
            match self.dense.get_mut(c as usize) {
                // A count that would reach u32::MAX moves to the sparse map.
                Some(v) if *v < u32::MAX - 1 => *v += 1,
                Some(v) => {
                    let n = if *v == u32::MAX {
                        self.sparse[&c] + 1
                    } else {
                        *v as u64 + 1
                    };
                    *v = u32::MAX;
                    self.sparse.insert(c, n);
                }
                None => *self.sparse.entry(c).or_insert(0) += 1,
            }
            self.highest = self.highest.max(c + 1);
        }
    }
}

/// Replace the refcount structure by one holding the counted references (QEMU's rebuild):
/// written after everything in use, the header switched to it, the image's tables and cache
/// following. Returns the clusters the old structure used, ascending.
async fn rebuild_refcounts(
    img: &Image,
    file: &Arc<Node>,
    refs: &Refs,
    last: u64,
) -> Result<Vec<u64>, String> {
    let geo = img.geo;
    let cs = geo.cluster_size;
    img.writeback(file).await.map_err(|e| e.to_string())?;
    let h = img.header();
    let mut old: Vec<u64> = (0..h.refcount_table_clusters as u64)
        .map(|k| h.refcount_table_offset / cs + k)
        .collect();
    old.extend(
        img.meta()
            .reftable
            .iter()
            .map(|e| e & REFT_OFFSET_MASK)
            .filter(|&o| o != 0)
            .map(|o| o / cs),
    );
    old.sort_unstable();
    old.dedup();
    let end = last.max(refs.highest).min(refs.file_clusters);
    let mut counts: Vec<u64> = (0..end).map(|c| refs.get(c)).collect();
    for &c in &old {
        if let Some(v) = counts.get_mut(c as usize) {
            *v = v.saturating_sub(1);
        }
    }
    let h2 = crate::amend::write_refcount_structure(
        file,
        &h,
        counts,
        geo.refcount_order,
        "Could not rebuild refcount structure",
    )
    .await?;
    let rt = pread(
        file,
        h2.refcount_table_offset,
        (h2.refcount_table_clusters as u64 * cs) as usize,
    )
    .await
    .map_err(|e| e.to_string())?;
    let table: Vec<u64> = rt
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
        .collect();
    {
        let mut m = img.meta();
        m.refblocks = table
            .iter()
            .map(|e| e & REFT_OFFSET_MASK)
            .filter(|&o| o != 0)
            .collect();
        m.reftable = table;
        m.reftable_offset = h2.refcount_table_offset;
        m.rc = crate::cache::Cache::new(img.cache.refcount_entries, img.cache.clean_interval);
        m.free_hint = 0;
    }
    *img.header.lock().unwrap_or_else(|e| e.into_inner()) = h2;
    Ok(old)
}

/// The refcount of cluster `c`, through a one-block cache of decoded values (the check reads
/// refcounts in ascending order, a block at a time).
async fn cached_refcount(
    img: &Image,
    file: &Arc<Node>,
    block: &mut (u64, Option<Vec<u64>>),
    c: u64,
) -> std::io::Result<u64> {
    let e = img.geo.rc_entries;
    if block.0 != c / e {
        *block = (c / e, img.refcount_block_values(file, c / e).await?);
    }
    Ok(block.1.as_ref().map_or(0, |v| v[(c % e) as usize]))
}

fn be64(b: &[u8], i: usize) -> u64 {
    u64::from_be_bytes(b[i * 8..i * 8 + 8].try_into().unwrap())
}

/// Check the image on `file`, repairing as asked.
pub async fn check(file: &Arc<Node>, repair: Repair) -> Result<CheckReport, String> {
    let flen = file.length();
    let first = pread(file, 0, flen.min(512) as usize).await.map_err(|e| {
        format!(
            "Could not read qcow2 header: {}",
            blockd_block::strerror(&e)
        )
    })?;
    let cs = Header::needed_len(&first)?;
    let buf = pread(file, 0, cs.min(flen) as usize).await.map_err(|e| {
        format!(
            "Could not read qcow2 header: {}",
            blockd_block::strerror(&e)
        )
    })?;
    let h = Header::parse(&buf, flen)?;
    let cfg = CacheConfig {
        l2_entry_size: cs,
        l2_entries: 16,
        refcount_entries: 64,
        clean_interval: None,
    };
    let img = Image::load(file, h, cfg, repair == Repair::None, true, false).await?;
    check_image(&img, file, repair).await
}

/// A dirty image opened writable: rebuild what lazy refcounts left stale, then clear the bit.
pub(crate) async fn repair_dirty(img: &Image, file: &Arc<Node>) -> Result<(), String> {
    let r = check_image(img, file, Repair::All).await?;
    if r.corruptions > r.corruptions_fixed || r.check_errors > 0 {
        return Err(
            "Could not repair dirty image: the image has corruptions that could not be fixed"
                .into(),
        );
    }
    let bits = {
        let mut h = img.header.lock().unwrap_or_else(|e| e.into_inner());
        h.incompatible &= !header::INCOMPAT_DIRTY;
        h.incompatible
    };
    file.driver()
        .flush(file)
        .await
        .map_err(|e| format!("Could not flush: {}", blockd_block::strerror(&e)))?;
    pwrite(file, 72, &bits.to_be_bytes()).await.map_err(|e| {
        format!(
            "Could not update qcow2 header: {}",
            blockd_block::strerror(&e)
        )
    })?;
    // Clean on disk: the next unordered write must set the bit again.
    img.dirty_marked
        .store(false, std::sync::atomic::Ordering::Release);
    Ok(())
}

/// Walk an L1 table: count references, and (for the active one) gather statistics and the
/// COPIED-flag candidates.
#[allow(clippy::too_many_arguments)]
async fn walk_l1(
    img: &Image,
    file: &Arc<Node>,
    l1: &[u64],
    refs: &mut Refs,
    rep: &mut CheckReport,
    active: bool,
    copied: &mut Vec<(u64, u64, u64)>,
    l1_copied: &mut Vec<(u64, u64)>,
) {
    let geo = img.geo;
    let cs = geo.cluster_size;
    let flen = file.length();
    // An L1 table names each L2 table once; a repeated one is counted but not walked again
    // (so the walk is bounded by the file's size, whatever the L1 says).
    let mut seen = std::collections::HashSet::new();
    for (l1i, &e) in l1.iter().enumerate() {
        let l2 = e & L1E_OFFSET_MASK;
        if l2 == 0 {
            continue;
        }
        if !seen.insert(l2) {
            refs.add_range(l2, cs);
            continue;
        }
        if !l2.is_multiple_of(cs) {
            rep.messages.push(format!(
                "ERROR l2_offset={l2:x}: Table is not cluster aligned; L1 entry corrupted"
            ));
            rep.corruptions += 1;
            continue;
        }
        refs.add_range(l2, cs);
        if active {
            l1_copied.push((l1i as u64, e));
        }
        if l2 + cs > flen {
            rep.messages.push(format!(
                "ERROR l2_offset={l2:x}: L2 table is outside the image file"
            ));
            rep.corruptions += 1;
            continue;
        }
        let table = match pread(file, l2, cs as usize).await {
            Ok(t) => t,
            Err(e) => {
                rep.messages.push(format!(
                    "ERROR: I/O error in check_refcounts_l2: {}",
                    blockd_block::strerror(&e)
                ));
                rep.check_errors += 1;
                continue;
            }
        };
        // QEMU counts fragmentation within each L2 table.
        let mut prev_host: Option<u64> = None;
        for i in 0..geo.l2_entries {
            let (e2, bm) = if geo.extended {
                (
                    be64(&table, 2 * i as usize),
                    be64(&table, 2 * i as usize + 1),
                )
            } else {
                (be64(&table, i as usize), 0)
            };
            if e2 & OFLAG_COMPRESSED != 0 && geo.data_file {
                rep.messages.push(format!(
                    "ERROR compressed cluster {i} with data file, entry={e2:#x}"
                ));
                rep.corruptions += 1;
                continue;
            }
            if e2 & OFLAG_COMPRESSED != 0 {
                match geo.classify(e2, bm, 0) {
                    Ok(Kind::Compressed { offset, len }) => {
                        let first = offset / 512 * 512;
                        let end = offset + len;
                        refs.add_range(first, end - first);
                        if active {
                            rep.allocated_clusters += 1;
                            rep.compressed_clusters += 1;
                            // Compressed clusters count as fragmented by nature.
                            rep.fragmented_clusters += 1;
                        }
                    }
                    _ => {
                        rep.messages
                            .push(format!("ERROR: invalid compressed cluster entry {e2:#x}"));
                        rep.corruptions += 1;
                    }
                }
                continue;
            }
            let host = e2 & L2E_OFFSET_MASK;
            if geo.extended && !geo.has_host(e2) && bm & 0xffff_ffff != 0 {
                rep.messages.push(format!(
                    "ERROR: Invalid cluster entry found (L2 offset: {l2:#x}, L2 index: {i:#x})"
                ));
                rep.corruptions += 1;
                continue;
            }
            if host == 0 && !geo.has_host(e2) {
                if e2 & OFLAG_ZERO != 0 && geo.version < 3 {
                    rep.messages.push(format!("ERROR: Zero cluster entry found in pre-v3 image (L2 offset: {l2:#x}, L2 index: {i:#x})"));
                    rep.corruptions += 1;
                }
                continue;
            }
            if !host.is_multiple_of(cs) {
                rep.messages.push(format!(
                    "ERROR offset={host:x}: Cluster is not properly aligned; L2 entry corrupted."
                ));
                rep.corruptions += 1;
                continue;
            }
            // Data file clusters are in another file and take no refcounts here.
            if !geo.data_file {
                refs.add_range(host, cs);
            }
            if active {
                rep.allocated_clusters += 1;
                if let Some(p) = prev_host
                    && p + cs != host
                {
                    rep.fragmented_clusters += 1;
                }
                prev_host = Some(host);
                if !geo.data_file {
                    copied.push((l2, i, e2));
                }
            }
        }
    }
}

async fn read_l1(file: &Arc<Node>, off: u64, n: u32) -> Result<Vec<u64>, String> {
    if n == 0 {
        return Ok(Vec::new());
    }
    let b = pread(file, off, n as usize * 8)
        .await
        .map_err(|e| format!("Could not read L1 table: {}", blockd_block::strerror(&e)))?;
    Ok((0..n as usize).map(|i| be64(&b, i)).collect())
}

pub(crate) async fn check_image(
    img: &Image,
    file: &Arc<Node>,
    repair: Repair,
) -> Result<CheckReport, String> {
    let geo = img.geo;
    let cs = geo.cluster_size;
    let h = img.header();
    let mut rep = CheckReport {
        total_clusters: h.size.div_ceil(cs),
        ..Default::default()
    };
    let mut refs = Refs::new(geo.cluster_bits, file.length().div_ceil(cs));
    refs.add_range(0, cs);
    let (l1, l1_off, reftable, rt_off, snap_area, snapshots) = {
        let m = img.meta();
        (
            m.l1.clone(),
            m.l1_offset,
            m.reftable.clone(),
            m.reftable_offset,
            m.snapshot_area,
            m.snapshots.clone(),
        )
    };
    refs.add_range(l1_off, l1.len() as u64 * 8);
    let mut copied = Vec::new();
    let mut l1_copied = Vec::new();
    walk_l1(
        img,
        file,
        &l1,
        &mut refs,
        &mut rep,
        true,
        &mut copied,
        &mut l1_copied,
    )
    .await;
    refs.add_range(snap_area.0, snap_area.1);
    if geo.data_file && !snapshots.is_empty() {
        rep.messages.push(format!(
            "ERROR {} snapshots in image with data file",
            snapshots.len()
        ));
        rep.corruptions += 1;
    }
    for s in &snapshots {
        refs.add_range(s.l1_offset, s.l1_size as u64 * 8);
        let sl1 = read_l1(file, s.l1_offset, s.l1_size).await?;
        walk_l1(
            img,
            file,
            &sl1,
            &mut refs,
            &mut rep,
            false,
            &mut Vec::new(),
            &mut Vec::new(),
        )
        .await;
    }
    refs.add_range(rt_off, reftable.len() as u64 * 8);
    for (t, &e) in reftable.iter().enumerate() {
        let o = e & REFT_OFFSET_MASK;
        if o == 0 {
            continue;
        }
        if !o.is_multiple_of(cs) {
            rep.messages.push(format!(
                "ERROR refcount block {t} is not cluster aligned; refcount table entry corrupted"
            ));
            rep.corruptions += 1;
            continue;
        }
        if o.checked_add(cs).is_none_or(|end| end > file.length()) {
            rep.messages
                .push(format!("ERROR refcount block {t} is outside image"));
            rep.corruptions += 1;
            continue;
        }
        refs.add_range(o, cs);
    }
    if let Some(b) = h.bitmaps
        && h.autoclear & header::AUTOCLEAR_BITMAPS != 0
    {
        count_bitmaps(file, &b, &mut refs, &mut rep, cs).await;
    }

    rep.corruptions += refs.errors.len() as u64;
    rep.messages.append(&mut refs.errors);

    // Compare with the stored refcounts.
    let file_clusters = file.length().div_ceil(cs);
    let covered = reftable.len() as u64 * geo.rc_entries;
    let last = file_clusters
        .max(refs.highest)
        .min(covered.max(refs.highest));
    let mut highest_used = 0;
    let mut mismatches: Vec<(u64, u64, u64)> = Vec::new();
    // The stored refcounts a block at a time (one lookup per block, not per cluster).
    let mut block: (u64, Option<Vec<u64>>) = (u64::MAX, None);
    for c in 0..last {
        let want = refs.get(c);
        let have = if c < covered {
            let t = c / geo.rc_entries;
            if block.0 != t {
                block = (
                    t,
                    img.refcount_block_values(file, t).await.map_err(|e| {
                        format!(
                            "Can't get refcount for cluster {c}: {}",
                            blockd_block::strerror(&e)
                        )
                    })?,
                );
            }
            block
                .1
                .as_ref()
                .map_or(0, |v| v[(c % geo.rc_entries) as usize])
        } else {
            0
        };
        if have > 0 || want > 0 {
            highest_used = c + 1;
        }
        if have == want {
            continue;
        }
        // First pass (QEMU's compare without fixing): every mismatch reported.
        rep.messages.push(if have > want {
            format!("Leaked cluster {c} refcount={have} reference={want}")
        } else {
            format!("ERROR cluster {c} refcount={have} reference={want}")
        });
        mismatches.push((c, have, want));
    }
    // Referenced clusters counted free: the whole refcount structure is rebuilt (-r all), or
    // the repair stops (-r leaks), as QEMU does.
    let rebuild = mismatches.iter().any(|&(_, have, _)| have == 0);
    let (n_leaks, n_corrupt) =
        mismatches.iter().fold(
            (0, 0),
            |(l, k), &(_, have, want)| {
                if have > want { (l + 1, k) } else { (l, k + 1) }
            },
        );
    if repair == Repair::None {
        rep.leaks += n_leaks;
        rep.corruptions += n_corrupt;
    } else if rebuild && repair == Repair::Leaks {
        rep.messages
            .push("ERROR need to rebuild refcount structures".into());
        rep.failed = Some("Input/output error".into());
        return Ok(rep);
    } else if rebuild {
        rep.leaks += n_leaks;
        rep.corruptions += n_corrupt;
        rep.messages.push("Rebuilding refcount structure".into());
        match rebuild_refcounts(img, file, &refs, last).await {
            Ok(old) => {
                // The old structures were counted as referenced; they are free now.
                for c in old {
                    let n = refs.get(c);
                    rep.messages.push(format!(
                        "Repairing cluster {c} refcount={n} reference={}",
                        n.saturating_sub(1)
                    ));
                }
                rep.leaks_fixed += n_leaks;
                rep.corruptions_fixed += n_corrupt;
            }
            Err(e) => {
                rep.check_errors += 1;
                rep.messages
                    .push(format!("ERROR rebuilding refcount structure: {e}"));
            }
        }
    } else {
        // Second pass: repaired what the mode allows, reported again what it does not.
        for &(c, have, want) in &mismatches {
            let leak = have > want;
            let fix = repair == Repair::All || leak;
            if fix {
                rep.messages.push(format!(
                    "Repairing cluster {c} refcount={have} reference={want}"
                ));
                let delta = want as i64 - have as i64;
                let ok = c < covered
                    && have_block(&reftable, geo, c)
                    && img.update_refcounts(file, c, 1, delta).await.is_ok();
                if ok {
                    if leak {
                        rep.leaks_fixed += 1;
                    } else {
                        rep.corruptions_fixed += 1;
                    }
                } else {
                    rep.check_errors += 1;
                    rep.messages.push(format!(
                        "ERROR: cannot repair the refcount of cluster {c} (not supported yet)"
                    ));
                }
            } else {
                rep.messages.push(format!(
                    "ERROR cluster {c} refcount={have} reference={want}"
                ));
            }
            if leak {
                rep.leaks += 1;
            } else {
                rep.corruptions += 1;
            }
        }
    }

    // COPIED flags of the active tables.
    for (l1i, e) in l1_copied {
        let l2 = e & L1E_OFFSET_MASK;
        let rc = img
            .refcount(file, l2 / cs)
            .await
            .map_err(|e| e.to_string())?;
        if (rc == 1) != (e & OFLAG_COPIED != 0) {
            rep.messages.push(format!(
                "{} OFLAG_COPIED L2 cluster: l1_index={l1i} l1_entry={e:x} refcount={rc}",
                if repair == Repair::All {
                    "Repairing"
                } else {
                    "ERROR"
                }
            ));
            rep.corruptions += 1;
            if repair == Repair::All {
                let ne = if rc == 1 {
                    e | OFLAG_COPIED
                } else {
                    e & !OFLAG_COPIED
                };
                let off = img.meta().l1_offset + l1i * 8;
                if pwrite(file, off, &ne.to_be_bytes()).await.is_ok() {
                    img.meta().l1[l1i as usize] = ne;
                    rep.corruptions_fixed += 1;
                }
            }
        }
    }
    let mut block: (u64, Option<Vec<u64>>) = (u64::MAX, None);
    for (l2, i, e) in copied {
        let host = e & L2E_OFFSET_MASK;
        let rc = cached_refcount(img, file, &mut block, host / cs)
            .await
            .map_err(|e| e.to_string())?;
        if (rc == 1) != (e & OFLAG_COPIED != 0) {
            rep.messages.push(format!(
                "{} OFLAG_COPIED data cluster: l2_entry={e:x} refcount={rc}",
                if repair == Repair::All {
                    "Repairing"
                } else {
                    "ERROR"
                }
            ));
            rep.corruptions += 1;
            if repair == Repair::All {
                let ne = if rc == 1 {
                    e | OFLAG_COPIED
                } else {
                    e & !OFLAG_COPIED
                };
                let bm = if geo.extended {
                    img.l2_entry(file, l2, i).await.map(|x| x.1).unwrap_or(0)
                } else {
                    0
                };
                if img.set_l2(file, l2, i, &[(ne, bm)]).await.is_ok() {
                    rep.corruptions_fixed += 1;
                }
            }
        }
    }
    if repair != Repair::None {
        img.writeback(file).await.map_err(|e| {
            format!(
                "Could not write back metadata: {}",
                blockd_block::strerror(&e)
            )
        })?;
        file.driver()
            .flush(file)
            .await
            .map_err(|e| format!("Could not flush: {}", blockd_block::strerror(&e)))?;
    }
    rep.image_end_offset = highest_used * cs;
    Ok(rep)
}

fn have_block(reftable: &[u64], geo: Geometry, c: u64) -> bool {
    reftable
        .get((c / geo.rc_entries) as usize)
        .is_some_and(|e| e & REFT_OFFSET_MASK != 0)
}

/// References held by persistent bitmaps: the directory, each bitmap table, its clusters.
async fn count_bitmaps(
    file: &Arc<Node>,
    b: &header::BitmapsExt,
    refs: &mut Refs,
    rep: &mut CheckReport,
    cs: u64,
) {
    if b.directory_size > 64 << 20 {
        rep.check_errors += 1;
        return;
    }
    refs.add_range(b.directory_offset, b.directory_size);
    let dir = match pread(file, b.directory_offset, b.directory_size as usize).await {
        Ok(d) => d,
        Err(_) => {
            rep.check_errors += 1;
            return;
        }
    };
    let mut pos = 0usize;
    for _ in 0..b.nb_bitmaps {
        if pos + 24 > dir.len() {
            rep.check_errors += 1;
            return;
        }
        let table_off = u64::from_be_bytes(dir[pos..pos + 8].try_into().unwrap());
        let table_size = u32::from_be_bytes(dir[pos + 8..pos + 12].try_into().unwrap()) as u64;
        let name_size = u16::from_be_bytes([dir[pos + 18], dir[pos + 19]]) as usize;
        let extra = u32::from_be_bytes(dir[pos + 20..pos + 24].try_into().unwrap()) as usize;
        pos += (24 + extra + name_size).div_ceil(8) * 8;
        if table_size * 8 > 64 << 20 {
            rep.check_errors += 1;
            continue;
        }
        refs.add_range(table_off, table_size * 8);
        if let Ok(t) = pread(file, table_off, table_size as usize * 8).await {
            for i in 0..table_size as usize {
                let d = be64(&t, i) & L2E_OFFSET_MASK;
                if d != 0 {
                    refs.add_range(d, cs);
                }
            }
        }
    }
}

impl CheckReport {
    /// qemu-img check's exit code: 0 clean, 2 corruptions, 3 leaks only (1: not completed).
    pub fn exit_code(&self) -> i32 {
        if self.check_errors > 0 {
            1
        } else if self.corruptions > self.corruptions_fixed {
            2
        } else if self.leaks > self.leaks_fixed {
            3
        } else {
            0
        }
    }

    /// QEMU's ImageCheck as `qemu-img check --output=json` prints it (its key order, the
    /// optional counters only when non-zero).
    pub fn to_json(&self, filename: &str) -> String {
        let leaks = self.leaks - self.leaks_fixed;
        let corruptions = self.corruptions - self.corruptions_fixed;
        let mut items: Vec<(&str, Value)> =
            vec![("image-end-offset", json!(self.image_end_offset))];
        let opt = |items: &mut Vec<(&str, Value)>, k, v: u64| {
            if v > 0 {
                items.push((k, json!(v)));
            }
        };
        opt(&mut items, "compressed-clusters", self.compressed_clusters);
        items.push(("total-clusters", json!(self.total_clusters)));
        opt(&mut items, "corruptions", corruptions);
        opt(&mut items, "corruptions-fixed", self.corruptions_fixed);
        items.push(("check-errors", json!(self.check_errors)));
        opt(&mut items, "leaks", leaks);
        opt(&mut items, "leaks-fixed", self.leaks_fixed);
        opt(&mut items, "allocated-clusters", self.allocated_clusters);
        items.push(("filename", json!(filename)));
        items.push(("format", json!("qcow2")));
        opt(&mut items, "fragmented-clusters", self.fragmented_clusters);
        let body: Vec<String> = items
            .iter()
            .map(|(k, v)| format!("    \"{k}\": {v}"))
            .collect();
        format!("{{\n{}\n}}\n", body.join(",\n"))
    }

    /// qemu-img check's text summary (stdout).
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let leaks = self.leaks - self.leaks_fixed;
        let corruptions = self.corruptions - self.corruptions_fixed;
        if self.leaks_fixed > 0 || self.corruptions_fixed > 0 {
            s += &format!(
                "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\nDouble checking the fixed image now...\n",
                self.leaks_fixed, self.corruptions_fixed
            );
        }
        if corruptions == 0 && leaks == 0 && self.check_errors == 0 {
            s += "No errors were found on the image.\n";
        } else {
            if corruptions > 0 {
                s += &format!(
                    "\n{corruptions} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n"
                );
            }
            if leaks > 0 {
                s += &format!(
                    "\n{leaks} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n"
                );
            }
            if self.check_errors > 0 {
                s += &format!(
                    "\n{} internal errors have occurred during the check.\n",
                    self.check_errors
                );
            }
        }
        if self.total_clusters > 0 && self.allocated_clusters > 0 {
            let pct = |n: u64| n as f64 * 100.0 / self.allocated_clusters as f64;
            s += &format!(
                "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters\n",
                self.allocated_clusters,
                self.total_clusters,
                self.allocated_clusters as f64 * 100.0 / self.total_clusters as f64,
                pct(self.fragmented_clusters),
                pct(self.compressed_clusters)
            );
        }
        if self.image_end_offset > 0 {
            s += &format!("Image end offset: {}\n", self.image_end_offset);
        }
        s
    }
}
