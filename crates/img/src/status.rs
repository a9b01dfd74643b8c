//! Block status down a backing chain (QEMU's `bdrv_block_status_above`): which layer holds an
//! extent, whether it reads as zeroes, whether it is data, and where it lives in that layer's
//! file. `convert`, `map` and `compare` all walk images with it.

use std::io;
use std::sync::Arc;

use blockd_block::Node;

/// The status of one extent of an image, looked up through its backing chain.
#[derive(Debug, Clone)]
pub struct Extent {
    pub len: u64,
    /// Some layer holds data here (as opposed to a hole or zero cluster).
    pub data: bool,
    /// The extent reads as zeroes.
    pub zero: bool,
    /// A layer of the chain allocates the extent (false: it reads from nowhere, as zeroes).
    pub present: bool,
    /// The layer the status comes from (0 = the image itself, 1 = its backing file, ...).
    pub depth: u32,
    /// Where the data lives in that layer's file, when the driver knows.
    pub offset: Option<u64>,
    /// That layer's node.
    pub layer: Arc<Node>,
}

/// The backing file of a format node, if it has one.
pub fn backing(node: &Node) -> Option<Arc<Node>> {
    node.child("backing")
}

/// The status of the extent at `off` (at most `len` bytes) of `top`, looking through at most
/// `max_depth` backing layers below it (`u32::MAX`: the whole chain).
pub async fn status_above(
    top: &Arc<Node>,
    off: u64,
    len: u64,
    max_depth: u32,
) -> io::Result<Extent> {
    let mut node = top.clone();
    let mut len = len;
    let mut depth = 0u32;
    loop {
        let node_len = node.length();
        if off >= node_len {
            // Past the end of a shorter backing file: reads as zeroes.
            return Ok(Extent {
                len,
                data: false,
                zero: true,
                present: false,
                depth,
                offset: None,
                layer: node,
            });
        }
        let s = node
            .driver()
            .block_status(&node, off, len.min(node_len - off))
            .await?;
        let mut n = s.len.clamp(1, len);
        if s.allocated {
            let mut zero = s.zero;
            // Data of a format in its file: a hole there reads as zeroes (QEMU asks the file
            // too, and reports the shorter of the two extents).
            if s.data
                && !s.zero
                && let Some(host) = s.offset
                && node.driver().format_name() != "raw"
                && let Some(file) = node.child("file")
            {
                if host >= file.length() {
                    zero = true;
                } else {
                    let fs = file
                        .driver()
                        .block_status(&file, host, n.min(file.length() - host))
                        .await?;
                    n = n.min(fs.len.max(1));
                    zero = fs.zero;
                }
            }
            return Ok(Extent {
                len: n,
                data: s.data,
                zero,
                present: true,
                depth,
                offset: s.offset,
                layer: node,
            });
        }
        match backing(&node) {
            Some(b) if depth < max_depth => {
                node = b;
                len = n;
                depth += 1;
            }
            _ => {
                return Ok(Extent {
                    len: n,
                    data: false,
                    zero: backing(&node).is_none(),
                    present: false,
                    depth,
                    // Unallocated subclusters of an allocated cluster still have a place.
                    offset: s.offset,
                    layer: node,
                });
            }
        }
    }
}

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
