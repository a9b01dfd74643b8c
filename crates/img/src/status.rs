//! Block status down a backing chain (blockd-block's `status_above`, QEMU's
//! `bdrv_block_status_above`) and zero detection: `convert`, `map` and `compare` walk images
//! with them.

pub use blockd_block::status::{Extent, backing, status_above};

/// Whether every byte of `buf` is zero (word at a time: this runs over every byte convert and
/// compare read).
pub fn is_zero(buf: &[u8]) -> bool {
    // Data usually shows in its first bytes: look there before scanning.
    if let Some(head) = buf.get(..16)
        && head.iter().any(|&b| b != 0)
    {
        return false;
    }
    let mut chunks = buf.chunks_exact(64);
    for c in &mut chunks {
        let mut acc = 0u64;
        for w in c.chunks_exact(8) {
            acc |= u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
        }
        if acc != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::is_zero;

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0u8; 1000]));
        for i in [0, 63, 64, 511, 999] {
            let mut b = vec![0u8; 1000];
            b[i] = 1;
            assert!(!is_zero(&b), "{i}");
        }
    }
}
