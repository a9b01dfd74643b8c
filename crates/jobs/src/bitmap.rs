//! A dirty bitmap shared by a mirror's filter (which marks what guests write, on whatever
//! thread the write completes) and its worker (which takes runs to copy). The mutex is held for
//! a scan of the words, never across an await.

use std::sync::Mutex;

pub struct DirtyBitmap {
    granularity: u64,
    len: u64,
    bits: Mutex<Vec<u64>>,
}

impl DirtyBitmap {
    pub fn new(len: u64, granularity: u64) -> DirtyBitmap {
        let n = len.div_ceil(granularity).div_ceil(64) as usize;
        DirtyBitmap {
            granularity,
            len,
            bits: Mutex::new(vec![0; n]),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u64>> {
        self.bits.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Mark `[off, off+len)` dirty (whole granules).
    pub fn mark(&self, off: u64, len: u64) {
        if len == 0 || off >= self.len {
            return;
        }
        let end = (off + len).min(self.len);
        let (first, last) = (off / self.granularity, (end - 1) / self.granularity);
        let mut w = self.lock();
        for bit in first..=last {
            w[(bit / 64) as usize] |= 1 << (bit % 64);
        }
    }

    /// Take (clear and return) the first dirty run, at most `max` bytes long.
    pub fn take(&self, max: u64) -> Option<(u64, u64)> {
        let max_bits = (max / self.granularity).max(1);
        let nbits = self.len.div_ceil(self.granularity);
        let mut w = self.lock();
        let wi = w.iter().position(|&x| x != 0)?;
        let first = wi as u64 * 64 + w[wi].trailing_zeros() as u64;
        let mut bit = first;
        while bit < nbits
            && bit - first < max_bits
            && w[(bit / 64) as usize] & (1 << (bit % 64)) != 0
        {
            w[(bit / 64) as usize] &= !(1 << (bit % 64));
            bit += 1;
        }
        let off = first * self.granularity;
        let end = (bit * self.granularity).min(self.len);
        Some((off, end - off))
    }

    /// Clear the granules wholly inside `[off, off+len)` (the last one also when the range
    /// reaches the end): they were just written to the source and the target alike.
    pub fn clear_covered(&self, off: u64, len: u64) {
        let end = (off + len).min(self.len);
        let first = off.div_ceil(self.granularity);
        let last = if end == self.len {
            end.div_ceil(self.granularity)
        } else {
            end / self.granularity
        };
        let mut w = self.lock();
        for bit in first..last {
            w[(bit / 64) as usize] &= !(1 << (bit % 64));
        }
    }

    /// Dirty bytes (whole granules).
    pub fn dirty_bytes(&self) -> u64 {
        let ones: u64 = self.lock().iter().map(|w| w.count_ones() as u64).sum();
        (ones * self.granularity).min(self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mark_take() {
        let b = DirtyBitmap::new(1 << 20, 65536);
        assert_eq!(b.take(1 << 20), None);
        b.mark(70_000, 10);
        b.mark(200_000, 200_000);
        assert_eq!(b.dirty_bytes(), 65536 * 5);
        assert_eq!(b.take(1 << 20), Some((65536, 65536)));
        assert_eq!(b.take(2 * 65536), Some((196608, 131072)));
        assert_eq!(b.take(1 << 20), Some((327680, 131072)));
        assert_eq!(b.take(1 << 20), None);
        b.mark(0, 1 << 20);
        assert_eq!(b.take(1 << 30), Some((0, 1 << 20)));
    }

    #[test]
    fn clear_covered_only_whole_granules() {
        let b = DirtyBitmap::new(200_000, 65536);
        b.mark(0, 200_000);
        b.clear_covered(1, 65536 * 2);
        assert_eq!(b.take(1 << 20), Some((0, 65536)));
        assert_eq!(b.take(1 << 20), Some((131072, 200_000 - 131072)));
        b.mark(0, 200_000);
        b.clear_covered(131072, 200_000 - 131072);
        assert_eq!(b.take(1 << 20), Some((0, 131072)));
        assert_eq!(b.take(1 << 20), None);
    }

    #[test]
    fn tail_granule() {
        let b = DirtyBitmap::new(100_000, 65536);
        b.mark(99_999, 1);
        assert_eq!(b.take(1 << 20), Some((65536, 100_000 - 65536)));
    }
}
