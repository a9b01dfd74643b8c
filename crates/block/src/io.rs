//! The request path below a BlockBackend: alignment (read-modify-write for requests a node
//! cannot take as they are, e.g. O_DIRECT), splitting at the node's maximum transfer, and the
//! write-zeroes fallback.

use std::io;
use std::sync::Arc;

use blockd_aio::IoBuf;

use crate::driver::{BufResult, ReqFlags};
use crate::node::Node;

fn aligned(node: &Node, offset: u64, len: u64) -> bool {
    let a = (node.limits().request_alignment as u64).max(1);
    offset.is_multiple_of(a) && len.is_multiple_of(a)
}

fn mem_ok(node: &Node, buf: &IoBuf) -> bool {
    let m = node.limits().min_mem_alignment as usize;
    m <= 1 || ((buf.as_ptr() as usize).is_multiple_of(m) && buf.len().is_multiple_of(m))
}

/// Read through `node`, bouncing through an aligned buffer when needed.
pub async fn aligned_read(node: &Arc<Node>, offset: u64, buf: IoBuf) -> BufResult {
    let len = buf.len() as u64;
    if len == 0 {
        return (Ok(()), buf);
    }
    if aligned(node, offset, len) && mem_ok(node, &buf) {
        return node.driver().read(node, offset, buf).await;
    }
    let a = (node.limits().request_alignment as u64).max(1);
    let start = offset / a * a;
    let end = (offset + len).div_ceil(a) * a;
    let bounce = IoBuf::new((end - start) as usize, mem_align(node));
    let (r, bounce) = node.driver().read(node, start, bounce).await;
    let mut buf = buf;
    if r.is_ok() {
        let from = (offset - start) as usize;
        buf.copy_from_slice(&bounce[from..from + len as usize]);
    }
    (r, buf)
}

/// Write through `node`; unaligned writes read the surrounding blocks first.
pub async fn aligned_write(
    node: &Arc<Node>,
    offset: u64,
    buf: IoBuf,
    flags: ReqFlags,
) -> BufResult {
    let len = buf.len() as u64;
    if len == 0 {
        return (Ok(()), buf);
    }
    let _dirty = node.dirty_bitmaps().mark_on_drop(offset, len);
    if aligned(node, offset, len) && mem_ok(node, &buf) {
        return node.driver().write(node, offset, buf, flags).await;
    }
    let a = (node.limits().request_alignment as u64).max(1);
    let start = offset / a * a;
    let end = (offset + len).div_ceil(a) * a;
    let mut bounce = IoBuf::new((end - start) as usize, mem_align(node));
    if start != offset || end != offset + len {
        // Read-modify-write of the partial head and tail blocks.
        let (r, b) = node.driver().read(node, start, bounce).await;
        bounce = b;
        if let Err(e) = r {
            return (Err(e), buf);
        }
    }
    let from = (offset - start) as usize;
    bounce[from..from + len as usize].copy_from_slice(&buf);
    let (r, _) = node.driver().write(node, start, bounce, flags).await;
    (r, buf)
}

fn mem_align(node: &Node) -> usize {
    (node.limits().min_mem_alignment as usize)
        .max(node.limits().request_alignment as usize)
        .max(512)
        .next_power_of_two()
}

/// Write zeroes, falling back to writing a zero buffer when the driver cannot (unless the
/// caller asked for no fallback).
pub async fn write_zeroes(
    node: &Arc<Node>,
    offset: u64,
    len: u64,
    flags: ReqFlags,
) -> io::Result<()> {
    let _dirty = node.dirty_bitmaps().mark_on_drop(offset, len);
    match node.driver().write_zeroes(node, offset, len, flags).await {
        Err(e)
            if e.raw_os_error() == Some(libc::ENOTSUP)
                && !flags.contains(ReqFlags::NO_FALLBACK) =>
        {
            const CHUNK: u64 = 1 << 20;
            let mut off = offset;
            while off < offset + len {
                let n = CHUNK.min(offset + len - off);
                let buf = IoBuf::zeroed(n as usize, mem_align(node));
                let (r, _) =
                    aligned_write(node, off, buf, flags.without(ReqFlags::MAY_UNMAP)).await;
                r?;
                off += n;
            }
            Ok(())
        }
        other => other,
    }
}

/// Discard through `node` (marks its dirty bitmaps).
pub async fn discard(node: &Arc<Node>, offset: u64, len: u64) -> io::Result<()> {
    let _dirty = node.dirty_bitmaps().mark_on_drop(offset, len);
    node.driver().discard(node, offset, len).await
}
