//! Metadata caches (L2 slices, refcount blocks) and their sizes from QEMU's options
//! (`l2-cache-size`, `refcount-cache-size`, `cache-size`, `l2-cache-entry-size`,
//! `cache-clean-interval`), as described in QEMU's docs/qcow2-cache.txt.
//!
//! Changed entries are dirty until the image writes them back (in dependency order: refcount
//! blocks, then L2 tables); dirty entries are never evicted. The cache lives inside the
//! driver's short std mutex; nothing here awaits.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use blockd_block::options::Opts;

/// QEMU's default ceiling for the L2 cache (Linux).
const DEFAULT_L2_CACHE_MAX: u64 = 32 << 20;
const MIN_L2_CACHE_CLUSTERS: u64 = 2;
const MIN_REFCOUNT_CACHE_CLUSTERS: u64 = 4;
/// The default `cache-clean-interval` (seconds), as in QEMU on Linux.
const DEFAULT_CLEAN_INTERVAL: u64 = 600;

/// Cache sizes chosen at open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheConfig {
    /// Bytes of each L2 cache entry (a slice of an L2 table).
    pub l2_entry_size: u64,
    /// Number of L2 slices kept.
    pub l2_entries: usize,
    /// Number of refcount blocks kept.
    pub refcount_entries: usize,
    /// Drop entries unused for this long (None: never).
    pub clean_interval: Option<Duration>,
}

impl CacheConfig {
    /// Take the cache options from `o` and size the caches for an image of `size` bytes with
    /// `cluster_size` clusters and `l2_entry_bytes`-byte L2 entries, with QEMU's rules and
    /// error messages.
    pub fn from_opts(
        o: &mut Opts,
        size: u64,
        cluster_size: u64,
        l2_entry_bytes: u64,
    ) -> Result<CacheConfig, String> {
        let combined = o.take_size("cache-size")?;
        let l2 = o.take_size("l2-cache-size")?;
        let rc = o.take_size("refcount-cache-size")?;
        let entry = o.take_size("l2-cache-entry-size")?.unwrap_or(cluster_size);
        let interval = o
            .take_u64("cache-clean-interval")?
            .unwrap_or(DEFAULT_CLEAN_INTERVAL);
        if interval > u32::MAX as u64 {
            return Err("Cache clean interval too big".into());
        }
        let max_l2_cache = {
            let clusters = size.div_ceil(cluster_size);
            (clusters.saturating_mul(l2_entry_bytes)).div_ceil(cluster_size) * cluster_size
        };
        let (mut l2_size, mut rc_size);
        match combined {
            Some(c) => {
                if l2.is_some() && rc.is_some() {
                    return Err(
                        "l2-cache-size, refcount-cache-size, and cache-size may not be set at the same time"
                            .into(),
                    );
                }
                if let Some(l) = l2 {
                    if l > c {
                        return Err("l2-cache-size may not exceed cache-size".into());
                    }
                    l2_size = l;
                    rc_size = c - l;
                } else if let Some(r) = rc {
                    if r > c {
                        return Err("refcount-cache-size may not exceed cache-size".into());
                    }
                    rc_size = r;
                    l2_size = c - r;
                } else {
                    l2_size = max_l2_cache.min(c);
                    rc_size = c - l2_size;
                }
            }
            None => {
                l2_size = l2.unwrap_or(max_l2_cache.min(DEFAULT_L2_CACHE_MAX));
                rc_size = rc.unwrap_or(MIN_REFCOUNT_CACHE_CLUSTERS * cluster_size);
            }
        }
        if !entry.is_power_of_two() || entry < 512 || entry > cluster_size {
            return Err(format!(
                "L2 cache entry size must be a power of two between 512 and the cluster size ({cluster_size})"
            ));
        }
        if l2_size / entry > i32::MAX as u64 {
            return Err("L2 cache size too big".into());
        }
        if rc_size / cluster_size > i32::MAX as u64 {
            return Err("Refcount cache size too big".into());
        }
        l2_size = l2_size.max(MIN_L2_CACHE_CLUSTERS * cluster_size);
        rc_size = rc_size.max(MIN_REFCOUNT_CACHE_CLUSTERS * cluster_size);
        Ok(CacheConfig {
            l2_entry_size: entry,
            l2_entries: (l2_size / entry) as usize,
            refcount_entries: (rc_size / cluster_size) as usize,
            clean_interval: (interval > 0).then(|| Duration::from_secs(interval)),
        })
    }
}

struct Slot<T> {
    data: T,
    last_use: u64,
    used_since_clean: bool,
    dirty: bool,
}

/// A bounded map from a table's host offset to its contents, least recently used out first.
pub struct Cache<T> {
    map: HashMap<u64, Slot<T>>,
    capacity: usize,
    dirty: usize,
    tick: u64,
    interval: Option<Duration>,
    last_clean: Instant,
}

impl<T> Cache<T> {
    pub fn new(capacity: usize, interval: Option<Duration>) -> Cache<T> {
        Cache {
            map: HashMap::new(),
            capacity: capacity.max(1),
            dirty: 0,
            tick: 0,
            interval,
            last_clean: Instant::now(),
        }
    }

    /// The entry for `offset`, marked used.
    pub fn get_mut(&mut self, offset: u64) -> Option<&mut T> {
        self.tick += 1;
        let t = self.tick;
        self.map.get_mut(&offset).map(|s| {
            s.last_use = t;
            s.used_since_clean = true;
            &mut s.data
        })
    }

    pub fn contains(&self, offset: u64) -> bool {
        self.map.contains_key(&offset)
    }

    /// Insert (or replace) an entry, evicting the least recently used one when full, and
    /// dropping entries unused for a whole clean interval.
    pub fn insert(&mut self, offset: u64, data: T) {
        self.maybe_clean();
        if !self.map.contains_key(&offset)
            && self.map.len() >= self.capacity
            && let Some(victim) = self
                .map
                .iter()
                .filter(|(_, s)| !s.dirty)
                .min_by_key(|(_, s)| s.last_use)
                .map(|(k, _)| *k)
        {
            self.map.remove(&victim);
        }
        self.tick += 1;
        let old = self.map.insert(
            offset,
            Slot {
                data,
                last_use: self.tick,
                used_since_clean: true,
                dirty: false,
            },
        );
        if old.is_some_and(|s| s.dirty) {
            self.dirty -= 1;
        }
    }

    /// Mark a present entry changed (to be written back).
    pub fn mark_dirty(&mut self, offset: u64) {
        if let Some(s) = self.map.get_mut(&offset)
            && !s.dirty
        {
            s.dirty = true;
            self.dirty += 1;
        }
    }

    pub fn mark_clean(&mut self, offset: u64) {
        if let Some(s) = self.map.get_mut(&offset)
            && s.dirty
        {
            s.dirty = false;
            self.dirty -= 1;
        }
    }

    /// Forget every clean entry.
    pub fn clear_clean(&mut self) {
        self.map.retain(|_, s| s.dirty);
    }

    pub fn dirty_count(&self) -> usize {
        self.dirty
    }

    /// Offsets of the dirty entries, in ascending order.
    pub fn dirty_offsets(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .map
            .iter()
            .filter(|(_, s)| s.dirty)
            .map(|(k, _)| *k)
            .collect();
        v.sort_unstable();
        v
    }

    /// Drop a clean entry (dirty ones stay until written back).
    pub fn remove(&mut self, offset: u64) {
        if self.map.get(&offset).is_some_and(|s| !s.dirty) {
            self.map.remove(&offset);
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// `cache-clean-interval`: entries not used since the previous clean are dropped.
    fn maybe_clean(&mut self) {
        let Some(iv) = self.interval else { return };
        if self.last_clean.elapsed() < iv {
            return;
        }
        self.map.retain(|_, s| s.used_since_clean || s.dirty);
        for s in self.map.values_mut() {
            s.used_since_clean = false;
        }
        self.last_clean = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockd_block::options::parse;

    fn cfg(s: &str, size: u64) -> Result<CacheConfig, String> {
        let mut o = Opts::new(parse(s).unwrap());
        CacheConfig::from_opts(&mut o, size, 65536, 8)
    }

    #[test]
    fn defaults_and_limits() {
        // 1 GiB image, 64 KiB clusters: 16384 clusters * 8 bytes = 128 KiB of L2 = 2 entries.
        let c = cfg("", 1 << 30).unwrap();
        assert_eq!(c.l2_entries, 2);
        assert_eq!(c.refcount_entries, 4);
        // A huge image is capped at 32 MiB of L2 cache.
        assert_eq!(cfg("", 1 << 50).unwrap().l2_entries, 512);
        let c = cfg("l2-cache-size=1M,l2-cache-entry-size=4096", 1 << 40).unwrap();
        assert_eq!((c.l2_entries, c.l2_entry_size), (256, 4096));
        let c = cfg("cache-size=2M,l2-cache-size=1M", 1 << 40).unwrap();
        assert_eq!((c.l2_entries, c.refcount_entries), (16, 16));
        assert_eq!(
            cfg("cache-size=1M,l2-cache-size=1M,refcount-cache-size=1M", 1).unwrap_err(),
            "l2-cache-size, refcount-cache-size, and cache-size may not be set at the same time"
        );
        assert_eq!(
            cfg("cache-size=1M,l2-cache-size=2M", 1).unwrap_err(),
            "l2-cache-size may not exceed cache-size"
        );
        assert!(
            cfg("l2-cache-entry-size=1000", 1)
                .unwrap_err()
                .starts_with("L2 cache entry size must be a power of two")
        );
        assert_eq!(
            cfg("cache-clean-interval=0", 1).unwrap().clean_interval,
            None
        );
    }

    #[test]
    fn dirty_entries_are_never_evicted() {
        let mut c: Cache<u32> = Cache::new(2, None);
        c.insert(1, 1);
        c.mark_dirty(1);
        c.insert(2, 2);
        c.mark_dirty(2);
        c.insert(3, 3);
        assert!(c.contains(1) && c.contains(2) && c.contains(3));
        assert_eq!((c.len(), c.dirty_count()), (3, 2));
        c.mark_clean(1);
        c.insert(4, 4);
        assert!(!c.contains(1) && c.contains(2));
        assert_eq!(c.dirty_offsets(), vec![2]);
    }

    #[test]
    fn lru_eviction() {
        let mut c: Cache<u32> = Cache::new(2, None);
        c.insert(1, 1);
        c.insert(2, 2);
        assert!(c.get_mut(1).is_some());
        c.insert(3, 3);
        assert!(c.contains(1) && c.contains(3) && !c.contains(2));
    }
}
