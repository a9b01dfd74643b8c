//! Internal snapshots, offline (`qemu-img snapshot -l/-c/-a/-d`): creating copies the active
//! L1 table and counts one more reference to every L2 table and data cluster it reaches;
//! applying makes a snapshot's tables the active ones; deleting drops its references. The
//! COPIED flags of the active tables are recomputed afterwards. Each step is ordered so that
//! a crash leaves at worst leaked clusters.

use std::sync::Arc;

use blockd_block::Node;

use crate::cache::CacheConfig;
use crate::header::Header;
use crate::image::{Image, Snapshot, pread, pwrite};
use crate::layout::*;

fn ioerr(what: &str) -> impl Fn(std::io::Error) -> String + '_ {
    move |e| format!("{what}: {}", blockd_block::strerror(&e))
}

/// Open the image on `file` for a snapshot operation (or another offline update).
pub(crate) async fn load_for_update(file: &Arc<Node>, read_only: bool) -> Result<Image, String> {
    let flen = file.length();
    let first = pread(file, 0, flen.min(512) as usize)
        .await
        .map_err(ioerr("Could not read qcow2 header"))?;
    let cs = Header::needed_len(&first)?;
    let buf = pread(file, 0, cs.min(flen) as usize)
        .await
        .map_err(ioerr("Could not read qcow2 header"))?;
    let h = Header::parse(&buf, flen)?;
    if !read_only && h.incompatible & crate::header::INCOMPAT_CORRUPT != 0 {
        return Err("qcow2: Image is corrupt; cannot be opened read/write".into());
    }
    let cfg = CacheConfig {
        l2_entry_size: cs,
        l2_entries: 16,
        refcount_entries: 64,
        clean_interval: None,
    };
    Image::load(file, h, cfg, read_only, true, false).await
}

/// The snapshots of the image on `file`.
pub async fn list(file: &Arc<Node>) -> Result<Vec<Snapshot>, String> {
    Ok(load_for_update(file, true).await?.snapshots())
}

fn find(snaps: &[Snapshot], name: &str) -> Option<usize> {
    snaps
        .iter()
        .position(|s| s.id == name)
        .or_else(|| snaps.iter().position(|s| s.name == name))
}

async fn read_l1(file: &Arc<Node>, off: u64, n: u32) -> std::io::Result<Vec<u64>> {
    if n == 0 {
        return Ok(Vec::new());
    }
    let b = pread(file, off, n as usize * 8).await?;
    Ok(b.chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
        .collect())
}

impl Image {
    /// Add `delta` to the refcount of every L2 table and data cluster `l1` reaches. An
    /// increase that would overflow the refcount width is `EINVAL` with every change undone
    /// (QEMU refuses such a snapshot the same way).
    async fn tree_refcounts(
        &self,
        file: &Arc<Node>,
        l1: &[u64],
        delta: i64,
    ) -> std::io::Result<()> {
        let geo = self.geo;
        let cs = geo.cluster_size;
        // Every (first cluster, count) the tables reach, L2 tables included.
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for &e in l1 {
            let l2 = e & L1E_OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            let t = pread(file, l2, cs as usize).await?;
            for i in 0..geo.l2_entries as usize {
                let w = if geo.extended { 2 * i } else { i };
                let e2 = u64::from_be_bytes(t[w * 8..w * 8 + 8].try_into().unwrap());
                if e2 & OFLAG_COMPRESSED != 0 {
                    if let Ok(Kind::Compressed { offset, len }) = geo.classify(e2, 0, 0) {
                        let first = offset / cs;
                        ranges.push((first, (offset + len - 1) / cs - first + 1));
                    }
                } else if e2 & L2E_OFFSET_MASK != 0 {
                    ranges.push(((e2 & L2E_OFFSET_MASK) / cs, 1));
                }
            }
            ranges.push((l2 / cs, 1));
        }
        if delta > 0 {
            // Overflow is checked cluster by cluster before anything changes: a cluster
            // reached twice (compressed neighbours) counts twice.
            let mut need: std::collections::HashMap<u64, u64> = Default::default();
            for &(c, n) in &ranges {
                for k in c..c + n {
                    *need.entry(k).or_default() += delta as u64;
                }
            }
            let max = geo.max_refcount();
            for (&c, &add) in &need {
                if self.refcount(file, c).await?.saturating_add(add) > max {
                    return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
                }
            }
        }
        for &(c, n) in &ranges {
            self.update_refcounts(file, c, n, delta).await?;
        }
        Ok(())
    }

    /// Set the active tables' COPIED flags from the refcounts (written to disk).
    async fn fix_copied(&self, file: &Arc<Node>) -> std::io::Result<()> {
        let geo = self.geo;
        let cs = geo.cluster_size;
        self.writeback(file).await?;
        let (l1, l1_off) = {
            let m = self.meta();
            (m.l1.clone(), m.l1_offset)
        };
        let mut new_l1 = l1.clone();
        for (i, &e) in l1.iter().enumerate() {
            let l2 = e & L1E_OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            let rc = self.refcount(file, l2 / cs).await?;
            new_l1[i] = if rc == 1 {
                e | OFLAG_COPIED
            } else {
                e & !OFLAG_COPIED
            };
            let mut t = pread(file, l2, cs as usize).await?.to_vec();
            let mut changed = false;
            for j in 0..geo.l2_entries as usize {
                let w = if geo.extended { 2 * j } else { j };
                let e2 = u64::from_be_bytes(t[w * 8..w * 8 + 8].try_into().unwrap());
                if e2 & OFLAG_COMPRESSED != 0 || e2 & L2E_OFFSET_MASK == 0 {
                    continue;
                }
                let rc2 = self.refcount(file, (e2 & L2E_OFFSET_MASK) / cs).await?;
                let n2 = if rc2 == 1 {
                    e2 | OFLAG_COPIED
                } else {
                    e2 & !OFLAG_COPIED
                };
                if n2 != e2 {
                    t[w * 8..w * 8 + 8].copy_from_slice(&n2.to_be_bytes());
                    changed = true;
                }
            }
            if changed {
                pwrite(file, l2, &t).await?;
                let sb = self.cache.l2_entry_size;
                let mut m = self.meta();
                for k in 0..cs / sb {
                    m.l2.remove(l2 + k * sb);
                }
            }
        }
        if new_l1 != l1 {
            let bytes: Vec<u8> = new_l1.iter().flat_map(|x| x.to_be_bytes()).collect();
            pwrite(file, l1_off, &bytes).await?;
            self.meta().l1 = new_l1;
        }
        Ok(())
    }

    /// `n` contiguous clusters.
    async fn alloc_run(&self, file: &Arc<Node>, n: u64) -> std::io::Result<u64> {
        loop {
            let (s, got) = self.alloc_clusters(file, n).await?;
            if got == n {
                return Ok(s);
            }
            if n > self.geo.rc_entries {
                return Err(std::io::Error::from_raw_os_error(libc::EFBIG));
            }
            let cs = self.geo.cluster_size;
            self.update_refcounts(file, s / cs, got, -1).await?;
            self.meta().free_hint = s / cs + got + 1;
        }
    }

    /// Write a new snapshot table and point the header at it; the old one is freed.
    pub(crate) async fn write_snapshot_table(
        &self,
        file: &Arc<Node>,
        snaps: &[Snapshot],
    ) -> std::io::Result<()> {
        let cs = self.geo.cluster_size;
        let size = self.size.load(std::sync::atomic::Ordering::Acquire);
        let mut table = Vec::new();
        for s in snaps {
            let mut e = Vec::with_capacity(64);
            e.extend_from_slice(&s.l1_offset.to_be_bytes());
            e.extend_from_slice(&s.l1_size.to_be_bytes());
            e.extend_from_slice(&(s.id.len() as u16).to_be_bytes());
            e.extend_from_slice(&(s.name.len() as u16).to_be_bytes());
            e.extend_from_slice(&s.date_sec.to_be_bytes());
            e.extend_from_slice(&s.date_nsec.to_be_bytes());
            e.extend_from_slice(&s.vm_clock_nsec.to_be_bytes());
            e.extend_from_slice(&(s.vm_state_size.min(u32::MAX as u64) as u32).to_be_bytes());
            e.extend_from_slice(&24u32.to_be_bytes());
            e.extend_from_slice(&s.vm_state_size.to_be_bytes());
            e.extend_from_slice(&s.disk_size.unwrap_or(size).to_be_bytes());
            e.extend_from_slice(&s.icount.unwrap_or(u64::MAX).to_be_bytes());
            e.extend_from_slice(s.id.as_bytes());
            e.extend_from_slice(s.name.as_bytes());
            e.resize(e.len().div_ceil(8) * 8, 0);
            table.extend_from_slice(&e);
        }
        let (old_off, old_len) = self.meta().snapshot_area;
        let new_off = if table.is_empty() {
            0
        } else {
            let n = (table.len() as u64).div_ceil(cs);
            let at = self.alloc_run(file, n).await?;
            // The refcounts of the new table first, then its bytes.
            self.writeback(file).await?;
            pwrite(file, at, &table).await?;
            at
        };
        file.driver().flush(file).await?;
        let mut hdr = (snaps.len() as u32).to_be_bytes().to_vec();
        hdr.extend_from_slice(&new_off.to_be_bytes());
        pwrite(file, 60, &hdr).await?;
        file.driver().flush(file).await?;
        {
            let mut h = self.header.lock().unwrap_or_else(|e| e.into_inner());
            h.nb_snapshots = snaps.len() as u32;
            h.snapshots_offset = new_off;
        }
        {
            let mut m = self.meta();
            m.snapshot_area = (new_off, table.len() as u64);
            m.snapshots = snaps.to_vec();
        }
        if old_len > 0 {
            self.update_refcounts(file, old_off / cs, old_len.div_ceil(cs), -1)
                .await?;
        }
        Ok(())
    }
}

impl Image {
    /// Take an internal snapshot of the open image (QEMU's order: the new references and
    /// the copied L1 table first, the snapshot table last, so a crash in between only
    /// leaks). An empty `sn.id` gets the next numeric id; a used id is `EEXIST`; a full
    /// table is `EFBIG`. Cached metadata is written first (the snapshot copies what is on
    /// disk) and everything is flushed at the end.
    pub async fn create_snapshot(&self, file: &Arc<Node>, mut sn: Snapshot) -> std::io::Result<()> {
        self.check_writable()?;
        // The data file holds only the active state (QEMU refuses too).
        if self.geo.data_file {
            return Err(blockd_block::driver::not_supported());
        }
        let _a = self.alloc.lock().await;
        self.apply_frees(file).await?;
        self.writeback(file).await?;
        let cs = self.geo.cluster_size;
        let mut snaps = self.snapshots();
        if snaps.len() >= crate::header::MAX_SNAPSHOTS as usize {
            return Err(std::io::Error::from_raw_os_error(libc::EFBIG));
        }
        if sn.id.is_empty() {
            let id = snaps
                .iter()
                .filter_map(|s| s.id.parse::<u64>().ok())
                .max()
                .unwrap_or(0)
                + 1;
            sn.id = id.to_string();
        } else if snaps.iter().any(|s| s.id == sn.id) {
            return Err(std::io::Error::from_raw_os_error(libc::EEXIST));
        }
        let l1 = self.meta().l1.clone();
        // One more reference to everything the active tables reach, then COPIED cleared.
        self.tree_refcounts(file, &l1, 1).await?;
        self.fix_copied(file).await?;
        let l1 = self.meta().l1.clone();
        let l1_off = if l1.is_empty() {
            0
        } else {
            let n = (l1.len() as u64 * 8).div_ceil(cs);
            let at = self.alloc_run(file, n).await?;
            self.writeback(file).await?;
            let bytes: Vec<u8> = l1.iter().flat_map(|x| x.to_be_bytes()).collect();
            pwrite(file, at, &bytes).await?;
            at
        };
        sn.l1_offset = l1_off;
        sn.l1_size = l1.len() as u32;
        sn.disk_size = Some(self.size.load(std::sync::atomic::Ordering::Acquire));
        snaps.push(sn);
        self.write_snapshot_table(file, &snaps).await?;
        self.writeback(file).await?;
        file.driver().flush(file).await
    }

    /// Delete the snapshot matching `id` and/or `name` (both when both are given; `ENOENT`
    /// when none does): out of the table first, then its references dropped, so a crash in
    /// between only leaks. Returns the deleted entry.
    pub async fn delete_snapshot(
        &self,
        file: &Arc<Node>,
        id: Option<&str>,
        name: Option<&str>,
    ) -> std::io::Result<Snapshot> {
        self.check_writable()?;
        let _a = self.alloc.lock().await;
        self.apply_frees(file).await?;
        self.writeback(file).await?;
        let cs = self.geo.cluster_size;
        let mut snaps = self.snapshots();
        let found = snaps
            .iter()
            .position(|s| id.is_none_or(|i| s.id == i) && name.is_none_or(|n| s.name == n));
        let Some(i) = found.filter(|_| id.is_some() || name.is_some()) else {
            return Err(std::io::Error::from_raw_os_error(libc::ENOENT));
        };
        let gone = snaps.remove(i);
        self.write_snapshot_table(file, &snaps).await?;
        let l1 = read_l1(file, gone.l1_offset, gone.l1_size).await?;
        self.tree_refcounts(file, &l1, -1).await?;
        if gone.l1_size > 0 {
            self.update_refcounts(
                file,
                gone.l1_offset / cs,
                (gone.l1_size as u64 * 8).div_ceil(cs),
                -1,
            )
            .await?;
        }
        self.fix_copied(file).await?;
        self.writeback(file).await?;
        file.driver().flush(file).await?;
        Ok(gone)
    }
}

/// `qemu-img snapshot -c NAME`.
pub async fn create(file: &Arc<Node>, name: &str, date: (u32, u32)) -> Result<(), String> {
    let img = load_for_update(file, false).await?;
    if img.snapshots().len() >= crate::header::MAX_SNAPSHOTS as usize {
        return Err(format!(
            "Could not create snapshot '{name}': Too many snapshots"
        ));
    }
    let sn = Snapshot {
        l1_offset: 0,
        l1_size: 0,
        id: String::new(),
        name: name.to_string(),
        date_sec: date.0,
        date_nsec: date.1,
        vm_clock_nsec: 0,
        vm_state_size: 0,
        disk_size: None,
        icount: Some(0),
    };
    img.create_snapshot(file, sn).await.map_err(|e| {
        format!(
            "Could not create snapshot '{name}': {}",
            blockd_block::strerror(&e)
        )
    })
}

/// `qemu-img snapshot -d NAME`.
pub async fn delete(file: &Arc<Node>, name: &str) -> Result<(), String> {
    let img = load_for_update(file, false).await?;
    // qemu-img deletes by name only.
    match img.delete_snapshot(file, None, Some(name)).await {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Err(format!(
            "Could not delete snapshot '{name}': snapshot not found"
        )),
        Err(e) => Err(format!(
            "Could not delete snapshot '{name}': {}",
            blockd_block::strerror(&e)
        )),
    }
}

/// `qemu-img snapshot -a NAME`: the active image becomes the snapshot's contents.
pub async fn apply(file: &Arc<Node>, name: &str) -> Result<(), String> {
    let img = load_for_update(file, false).await?;
    let _a = img.alloc.lock().await;
    let fail = |e: std::io::Error| {
        format!(
            "Could not apply snapshot '{name}': Failed to load snapshot: {}",
            blockd_block::strerror(&e)
        )
    };
    let snaps = img.snapshots();
    let Some(i) = find(&snaps, name) else {
        return Err(format!(
            "Could not apply snapshot '{name}': Failed to load snapshot: No such file or directory"
        ));
    };
    // Snapshots cannot describe data file contents (QEMU: ENOTSUP).
    if img.geo.data_file {
        return Err(fail(blockd_block::driver::not_supported()));
    }
    let sn = &snaps[i];
    // A snapshot of another size: the active L1 table grows to hold it when needed (entries
    // past the snapshot's table become unallocated) and the image takes its size.
    if sn.l1_size as usize > img.meta().l1.len() {
        img.grow_l1(file, sn.l1_size as u64).await.map_err(fail)?;
    }
    let (old, l1_off) = {
        let m = img.meta();
        (m.l1.clone(), m.l1_offset)
    };
    let mut new = read_l1(file, sn.l1_offset, sn.l1_size)
        .await
        .map_err(fail)?;
    new.resize(old.len(), 0);
    let size = img.size.load(std::sync::atomic::Ordering::Acquire);
    if let Some(ds) = sn.disk_size
        && ds != size
    {
        pwrite(file, 24, &ds.to_be_bytes()).await.map_err(fail)?;
        file.driver().flush(file).await.map_err(fail)?;
        img.header.lock().unwrap_or_else(|e| e.into_inner()).size = ds;
        img.size.store(ds, std::sync::atomic::Ordering::Release);
    }
    // New references first, then the switch, then the old references go.
    img.tree_refcounts(file, &new, 1).await.map_err(fail)?;
    img.writeback(file).await.map_err(fail)?;
    file.driver().flush(file).await.map_err(fail)?;
    let bytes: Vec<u8> = new.iter().flat_map(|x| x.to_be_bytes()).collect();
    pwrite(file, l1_off, &bytes).await.map_err(fail)?;
    file.driver().flush(file).await.map_err(fail)?;
    {
        let mut m = img.meta();
        m.l1 = new.clone();
        m.l2.clear_clean();
    }
    img.tree_refcounts(file, &old, -1).await.map_err(fail)?;
    img.fix_copied(file).await.map_err(fail)?;
    img.writeback(file).await.map_err(fail)?;
    file.driver().flush(file).await.map_err(fail)
}
