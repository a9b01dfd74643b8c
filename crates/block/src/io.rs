//! The request path below a BlockBackend: alignment (read-modify-write for requests a node
//! cannot take as they are, e.g. O_DIRECT), splitting at the node's maximum transfer, the
//! write-zeroes fallback, request tracking (`serialise.rs`: every write is tracked on its node;
//! a read-modify-write serialises its aligned range) and copy-on-read.

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

/// Write through `node`; unaligned writes read the surrounding blocks first. The write is
/// tracked on `node` (it waits for overlapping serialising requests); a read-modify-write is
/// itself serialising over its aligned range.
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
    let a = (node.limits().request_alignment as u64).max(1);
    let start = offset / a * a;
    let end = (offset + len).div_ceil(a) * a;
    let _tracked = if start == offset && end == offset + len {
        node.requests().write(offset, len).await
    } else {
        node.requests().serialise(start, end - start).await
    };
    // Dropped first: the bitmaps are marked while the write is still tracked.
    let _dirty = node.dirty_bitmaps().mark_on_drop(offset, len);
    write_untracked(node, offset, buf, flags).await
}

/// [`aligned_write`] inside a request the caller already tracks (a serialising section).
async fn write_untracked(node: &Arc<Node>, offset: u64, buf: IoBuf, flags: ReqFlags) -> BufResult {
    let len = buf.len() as u64;
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
/// caller asked for no fallback). Tracked on `node` as a write.
pub async fn write_zeroes(
    node: &Arc<Node>,
    offset: u64,
    len: u64,
    flags: ReqFlags,
) -> io::Result<()> {
    let _tracked = node.requests().write(offset, len).await;
    let _dirty = node.dirty_bitmaps().mark_on_drop(offset, len);
    write_zeroes_untracked(node, offset, len, flags).await
}

/// Discard through `node`, tracked as a write.
pub async fn discard(node: &Arc<Node>, offset: u64, len: u64) -> io::Result<()> {
    let _tracked = node.requests().write(offset, len).await;
    // QEMU ignores discards of nodes without discard=unmap before marking bitmaps.
    let _dirty = node
        .discard_unmap()
        .then(|| node.dirty_bitmaps().mark_on_drop(offset, len));
    node.driver().discard(node, offset, len).await
}

async fn write_zeroes_untracked(
    node: &Arc<Node>,
    offset: u64,
    len: u64,
    flags: ReqFlags,
) -> io::Result<()> {
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
                    write_untracked(node, off, buf, flags.without(ReqFlags::MAY_UNMAP)).await;
                r?;
                off += n;
            }
            Ok(())
        }
        other => other,
    }
}

/// Largest piece a copy-on-read copies at once (QEMU bounces at most 1 MiB).
const COR_PIECE: u64 = 1 << 20;

/// Copy-on-read of `[offset, offset+len)` of `node` (QEMU's `BDRV_REQ_COPY_ON_READ`): inside
/// one serialising request over the node's clusters covering the range, the parts `node`
/// itself does not hold are read through its backing chain and written into it unchanged
/// (zeroes as write-zeroes). The serialisation makes concurrent writers safe: a write of the
/// range that started earlier lands first (and the range is then held, so not copied); one
/// that starts later waits until the copy is in. With `out`, the range's data is returned
/// there (`out.len() == len`); without, it is a prefetch.
pub async fn copy_on_read(
    node: &Arc<Node>,
    offset: u64,
    len: u64,
    mut out: Option<&mut [u8]>,
) -> io::Result<()> {
    let node_len = node.length();
    let end = match offset.checked_add(len) {
        Some(e) if e <= node_len => e,
        _ => return Err(io::Error::from_raw_os_error(libc::EIO)),
    };
    if len == 0 {
        return Ok(());
    }
    let cluster = node
        .driver()
        .cluster_size()
        .unwrap_or(0)
        .max(node.limits().request_alignment as u64)
        .max(1);
    let start = offset / cluster * cluster;
    let stop = end.div_ceil(cluster).saturating_mul(cluster).min(node_len);
    let _serialised = node.requests().serialise(start, stop - start).await;
    let mut pos = start;
    while pos < stop {
        let st = node
            .driver()
            .block_status(node, pos, (stop - pos).min(COR_PIECE))
            .await?;
        let n = st.len.clamp(1, (stop - pos).min(COR_PIECE));
        // The part of this piece the caller wants back.
        let (ws, we) = (pos.max(offset), (pos + n).min(end));
        if st.allocated {
            if let Some(out) = out.as_deref_mut().filter(|_| ws < we) {
                let (r, b) = aligned_read(node, ws, IoBuf::new((we - ws) as usize, 4096)).await;
                r?;
                out[(ws - offset) as usize..(we - offset) as usize].copy_from_slice(&b);
            }
        } else {
            let (r, data) = aligned_read(node, pos, IoBuf::new(n as usize, mem_align(node))).await;
            r?;
            let data = if data.iter().all(|&b| b == 0) {
                write_zeroes_untracked(node, pos, n, ReqFlags::NONE).await?;
                data
            } else {
                let (r, data) = write_untracked(node, pos, data, ReqFlags::NONE).await;
                r?;
                data
            };
            if let Some(out) = out.as_deref_mut().filter(|_| ws < we) {
                out[(ws - offset) as usize..(we - offset) as usize]
                    .copy_from_slice(&data[(ws - pos) as usize..(we - pos) as usize]);
            }
        }
        pos += n;
    }
    Ok(())
}
