//! Block status down a backing chain (QEMU's `bdrv_block_status_above` with `want_zero`):
//! which layer holds an extent, whether it reads as zeroes, whether it is data, and where it
//! lives in that layer's file. `qemu-img map`-like tools and the NBD server's
//! `base:allocation` context both report through it.

use std::io;
use std::sync::Arc;

use crate::Node;

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
            // Data of a format in its file: when the driver says so, a hole there reads as
            // zeroes (QEMU asks the file too, and reports the shorter of the two extents).
            if s.data
                && !s.zero
                && let Some(host) = s.offset
                && let Some(file) = node.driver().data_child(&node)
                && node.driver().status_recurses(&node).await
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
        // A filter (copy-on-read, a job's filter) shows its child: go on there, same depth.
        if node.driver().is_filter()
            && let Some(child) = node.child("file")
        {
            node = child;
            len = n;
            continue;
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
