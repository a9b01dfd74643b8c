//! Guest I/O on an open image: reads (straight into the caller's buffer when the range maps
//! to one host run), allocating writes with copy-on-write, write-zeroes, discard,
//! decompression.

use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use blockd_aio::IoBuf;
use blockd_block::io::{aligned_read, aligned_write};
use blockd_block::{BlockStatus, Node, ReqFlags};

use crate::image::{Image, eio, pread, pwrite};
use crate::layout::*;

fn file_of(node: &Node) -> io::Result<Arc<Node>> {
    node.child("file")
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEDIUM))
}

/// Compress one cluster; None when the result would not be smaller than a cluster.
/// Deflate output is made decodable with QEMU's 4 KiB window (a full flush every 4 KiB, so
/// no match reaches further back).
pub fn compress(kind: u8, src: &[u8]) -> Option<Vec<u8>> {
    let limit = src.len() - 1;
    let out = match kind {
        0 => {
            let mut c = flate2::Compress::new(flate2::Compression::default(), false);
            // Room for the worst case, so each call finishes its chunk.
            let mut out = Vec::with_capacity(src.len() * 2 + 1024);
            let n = src.chunks(4096).count();
            for (i, chunk) in src.chunks(4096).enumerate() {
                let last = i + 1 == n;
                let flush = if last {
                    flate2::FlushCompress::Finish
                } else {
                    flate2::FlushCompress::Full
                };
                let before = c.total_in();
                let st = c.compress_vec(chunk, &mut out, flush).ok()?;
                if (c.total_in() - before) as usize != chunk.len()
                    || (last && st != flate2::Status::StreamEnd)
                {
                    return None;
                }
            }
            out
        }
        1 => zstd::bulk::compress(src, 0).ok()?,
        _ => return None,
    };
    (out.len() <= limit).then_some(out)
}

/// Decompress one cluster from `src` (deflate without header, or zstd), exactly
/// `cluster_size` bytes of output.
pub fn decompress(kind: u8, src: &[u8], cluster_size: usize) -> io::Result<Vec<u8>> {
    let mut out = vec![0u8; cluster_size];
    match kind {
        0 => {
            let mut d = flate2::Decompress::new(false);
            match d.decompress(src, &mut out, flate2::FlushDecompress::Finish) {
                Ok(_) if d.total_out() as usize == cluster_size => Ok(out),
                _ => Err(eio()),
            }
        }
        1 => {
            use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
            let mut dec = Decoder::new().map_err(|_| eio())?;
            let mut input = InBuffer::around(src);
            let mut output = OutBuffer::around(&mut out[..]);
            // Frames may follow each other; stop once the cluster is full.
            while output.pos() < cluster_size {
                let before = (input.pos(), output.pos());
                dec.run(&mut input, &mut output).map_err(|_| eio())?;
                if (input.pos(), output.pos()) == before {
                    break;
                }
            }
            if output.pos() == cluster_size {
                Ok(out)
            } else {
                Err(eio())
            }
        }
        _ => Err(eio()),
    }
}

impl Image {
    /// Where guest data clusters live: the external data file when the image has one (its
    /// `data-file` child; an image opened without it, as `info` does, reaches no data),
    /// else the image's own file.
    pub(crate) fn data_node(&self, node: &Node, file: &Arc<Node>) -> io::Result<Arc<Node>> {
        // Most images have no data file: no child lookup on their I/O paths.
        if !self.geo.data_file {
            return Ok(file.clone());
        }
        node.child("data-file")
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEDIUM))
    }

    /// Fill `dst` with guest bytes from `off` (every mapping kind, piece by piece).
    pub(crate) async fn read_into(&self, node: &Node, off: u64, dst: &mut [u8]) -> io::Result<()> {
        let file = file_of(node)?;
        let data = self.data_node(node, &file)?;
        let mut pos = 0usize;
        while pos < dst.len() {
            let g = off + pos as u64;
            let run = self.map(&file, g, (dst.len() - pos) as u64).await?;
            let n = run.len as usize;
            let out = &mut dst[pos..pos + n];
            match run.kind {
                Kind::Normal(h) => {
                    // Data clusters may end past the end of the file: zeroes, as QEMU reads.
                    let avail = data.length().saturating_sub(h).min(n as u64) as usize;
                    if avail > 0 {
                        let b = pread(&data, h, avail).await?;
                        out[..avail].copy_from_slice(&b);
                    }
                    out[avail..].fill(0);
                }
                Kind::ZeroPlain | Kind::ZeroAlloc(_) => out.fill(0),
                Kind::Unallocated | Kind::UnallocatedAlloc(_) => {
                    self.read_backing(node, g, out).await?
                }
                Kind::Compressed { offset, len } => {
                    let data = self.read_compressed(&file, offset, len).await?;
                    let in_cl = self.geo.offset_in_cluster(g) as usize;
                    out.copy_from_slice(&data[in_cl..in_cl + n]);
                }
            }
            pos += n;
        }
        Ok(())
    }

    async fn read_compressed(
        &self,
        file: &Arc<Node>,
        offset: u64,
        len: u64,
    ) -> io::Result<Vec<u8>> {
        // The last compressed cluster may claim sectors past the end of the file.
        let avail = file.length().saturating_sub(offset).min(len);
        if avail == 0 {
            return Err(eio());
        }
        let src = pread(file, offset, avail as usize).await?;
        decompress(
            self.geo.compression_type,
            &src,
            self.geo.cluster_size as usize,
        )
    }

    /// Guest bytes not allocated here: the backing file's, zeroes past its end or without one.
    async fn read_backing(&self, node: &Node, off: u64, out: &mut [u8]) -> io::Result<()> {
        let Some(b) = node.child("backing") else {
            out.fill(0);
            return Ok(());
        };
        let blen = b.length();
        let n = if off >= blen {
            0
        } else {
            (blen - off).min(out.len() as u64) as usize
        };
        if n > 0 {
            let (r, buf) = aligned_read(&b, off, IoBuf::new(n, 4096)).await;
            r?;
            out[..n].copy_from_slice(&buf);
        }
        out[n..].fill(0);
        Ok(())
    }

    pub(crate) async fn read(&self, node: &Node, off: u64, buf: IoBuf) -> (io::Result<()>, IoBuf) {
        let file = match file_of(node) {
            Ok(f) => f,
            Err(e) => return (Err(e), buf),
        };
        let len = buf.len() as u64;
        match self.map(&file, off, len).await {
            Err(e) => return (Err(e), buf),
            Ok(run) if run.len == len => {
                let data = match self.data_node(node, &file) {
                    Ok(d) => d,
                    Err(e) => return (Err(e), buf),
                };
                if let Kind::Normal(h) = run.kind
                    && h + len <= data.length()
                {
                    return aligned_read(&data, h, buf).await;
                }
            }
            Ok(_) => {}
        }
        let mut buf = buf;
        let r = self.read_into(node, off, &mut buf).await;
        (r, buf)
    }

    pub(crate) async fn block_status(
        &self,
        node: &Node,
        off: u64,
        len: u64,
    ) -> io::Result<BlockStatus> {
        let file = file_of(node)?;
        let run = self.map(&file, off, len).await?;
        let (data, zero, allocated, offset) = match run.kind {
            Kind::Normal(h) => (true, false, true, Some(h)),
            Kind::ZeroPlain => (false, true, true, None),
            Kind::ZeroAlloc(h) => (false, true, true, Some(h)),
            Kind::Compressed { .. } => (true, false, true, None),
            Kind::Unallocated => (false, false, false, None),
            // QEMU reports where an unallocated subcluster of an allocated cluster lives.
            Kind::UnallocatedAlloc(h) => (false, false, false, Some(h)),
        };
        Ok(BlockStatus {
            len: run.len,
            data,
            zero,
            allocated,
            offset,
        })
    }

    pub(crate) fn check_writable(&self) -> io::Result<()> {
        if self.corrupt.load(Ordering::SeqCst) {
            return Err(eio());
        }
        if self.is_read_only() {
            return Err(io::Error::from_raw_os_error(libc::EACCES));
        }
        Ok(())
    }

    pub(crate) async fn write(
        &self,
        node: &Node,
        off: u64,
        buf: IoBuf,
        flags: ReqFlags,
    ) -> (io::Result<()>, IoBuf) {
        if let Err(e) = self.check_writable() {
            return (Err(e), buf);
        }
        if flags.contains(ReqFlags::WRITE_COMPRESSED) {
            let r = self.write_compressed(node, off, &buf).await;
            return (r, buf);
        }
        let file = match file_of(node) {
            Ok(f) => f,
            Err(e) => return (Err(e), buf),
        };
        let len = buf.len() as u64;
        // Fast path: the whole request lands in clusters this image alone owns.
        {
            let _io = self.data_io.read().await;
            match self.map(&file, off, len).await {
                Err(e) => return (Err(e), buf),
                Ok(run) if run.len == len && run.copied => {
                    if let Kind::Normal(h) = run.kind {
                        if let Err(e) = self.check_overlap(&file, h, len).await {
                            return (Err(e), buf);
                        }
                        return match self.data_node(node, &file) {
                            Ok(d) => aligned_write(&d, h, buf, flags).await,
                            Err(e) => (Err(e), buf),
                        };
                    }
                }
                Ok(_) => {}
            }
        }
        // The allocating path may hand the caller's buffer itself to the file (whole
        // clusters of a fresh image): it comes back through `slot`.
        let mut slot = Some(buf);
        let r = self.write_slow(node, &file, off, &mut slot, flags).await;
        match slot {
            Some(buf) => (r, buf),
            // Only a cancelled inner write could lose it, and then this future is gone too.
            None => (Err(eio()), IoBuf::new(0, 1)),
        }
    }

    /// `WRITE_COMPRESSED`: whole, aligned clusters (the image's last one may be partial) each
    /// stored compressed when that saves space, else as a plain cluster. Like QEMU, it never
    /// overwrites an allocated cluster (EIO).
    async fn write_compressed(&self, node: &Node, off: u64, data: &[u8]) -> io::Result<()> {
        let cs = self.geo.cluster_size;
        let size = self.size.load(Ordering::Acquire);
        let end = off + data.len() as u64;
        if !off.is_multiple_of(cs) || (!end.is_multiple_of(cs) && end != size) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // Compressed clusters cannot live in an external data file (QEMU: ENOTSUP).
        if self.geo.data_file {
            return Err(blockd_block::driver::not_supported());
        }
        let file = file_of(node)?;
        let mut pos = 0usize;
        while pos < data.len() {
            let n = (data.len() - pos).min(cs as usize);
            let mut cluster = vec![0u8; cs as usize];
            cluster[..n].copy_from_slice(&data[pos..pos + n]);
            let g = off + pos as u64;
            match compress(self.geo.compression_type, &cluster) {
                None => {
                    let mut slot = Some(IoBuf::from_slice(&data[pos..pos + n]));
                    self.write_slow(node, &file, g, &mut slot, ReqFlags::NONE)
                        .await?;
                }
                Some(z) => {
                    let c = g / cs;
                    let _a = self.lock_clear_of(c, c + 1).await;
                    let (l1i, l2i) = self.geo.indices(g);
                    let l2_off = self.writable_l2(&file, l1i).await?;
                    let (e, bm) = self.l2_entry(&file, l2_off, l2i).await?;
                    if e & !OFLAG_ZERO != 0 || bm & BITMAP_ALL_ALLOC != 0 {
                        return Err(eio());
                    }
                    let host = self.alloc_bytes(&file, z.len() as u64).await?;
                    self.check_overlap(&file, host, z.len() as u64).await?;
                    pwrite(&file, host, &z).await?;
                    let x = 62 - (self.geo.cluster_bits - 8);
                    let sectors = (host + z.len() as u64 - 1) / 512 - host / 512;
                    let desc = OFLAG_COMPRESSED | (sectors << x) | host;
                    self.set_l2(&file, l2_off, l2i, &[(desc, 0)]).await?;
                    self.maybe_writeback(&file).await?;
                }
            }
            pos += n;
        }
        Ok(())
    }

    /// Allocating write of `data` at guest `off`, cluster run by cluster run (each step takes
    /// `alloc` itself).
    async fn write_slow(
        &self,
        node: &Node,
        file: &Arc<Node>,
        off: u64,
        slot: &mut Option<IoBuf>,
        flags: ReqFlags,
    ) -> io::Result<()> {
        let mut pos = 0u64;
        let len = slot.as_ref().ok_or_else(eio)?.len() as u64;
        while pos < len {
            let data = slot.as_deref().ok_or_else(eio)?;
            // Parts already owned go straight to their clusters (no allocation lock), e.g.
            // the rest of a cluster another request has just allocated.
            {
                let _io = self.data_io.read().await;
                let run = self.map(file, off + pos, len - pos).await?;
                if let (Kind::Normal(h), true) = (run.kind, run.copied) {
                    self.check_overlap(file, h, run.len).await?;
                    let part = IoBuf::from_slice(&data[pos as usize..(pos + run.len) as usize]);
                    let (r, _) = aligned_write(&self.data_node(node, file)?, h, part, flags).await;
                    r?;
                    pos += run.len;
                    continue;
                }
            }
            // A cluster another request is allocating: wait for it without the allocation
            // lock, then write into it directly.
            let c = (off + pos) >> self.geo.cluster_bits;
            let listener = self.inflight_done.listen();
            if self.meta().inflight.contains(&c) {
                listener.await;
                continue;
            }
            drop(listener);
            let n = self
                .write_step(node, file, off + pos, slot, pos as usize, flags)
                .await?;
            pos += n;
        }
        Ok(())
    }

    /// One step of an allocating write: handles the clusters from `g` on that share one
    /// treatment, returns the bytes consumed.
    async fn write_step(
        &self,
        node: &Node,
        file: &Arc<Node>,
        g: u64,
        slot: &mut Option<IoBuf>,
        pos: usize,
        flags: ReqFlags,
    ) -> io::Result<u64> {
        let data_len = slot.as_ref().ok_or_else(eio)?.len() - pos;
        let geo = self.geo;
        let cs = geo.cluster_size;
        let (l1i, l2i) = geo.indices(g);
        let in_cl = geo.offset_in_cluster(g);
        let cstart = g - in_cl;
        let c = g >> geo.cluster_bits;
        let guard = self.lock_clear_of(c, c + 1).await;
        let l2_off = self.writable_l2(file, l1i).await?;
        let (e, bm) = self.l2_entry(file, l2_off, l2i).await?;
        let first_len = (cs - in_cl).min(data_len as u64);
        let owned = geo.owns(e);

        if owned {
            let plain = if geo.extended {
                let (a, b) = (in_cl / geo.unit, (in_cl + first_len).div_ceil(geo.unit));
                (a..b).all(|sc| bm >> sc & 1 != 0)
            } else {
                e & OFLAG_ZERO == 0
            };
            if plain {
                // Allocated meanwhile: the caller writes it directly, without the lock.
                return Ok(0);
            }
            // Write in place; only subclusters or the zero flag change.
            let data = &slot.as_deref().ok_or_else(eio)?[pos..];
            return self
                .write_in_place(
                    node,
                    file,
                    l2_off,
                    l2i,
                    (e, bm),
                    g,
                    &data[..first_len as usize],
                    flags,
                )
                .await
                .map(|_| first_len);
        }

        // New clusters: this one and the following ones of the same L2 table that the write
        // covers and that need a new cluster too.
        let end_guest = g + data_len as u64;
        let mut want = 1u64;
        let mut olds = vec![(e, bm)];
        while l2i + want < geo.l2_entries && cstart + want * cs < end_guest {
            if self.meta().inflight.contains(&(c + want)) {
                break;
            }
            let (e2, b2) = self.l2_entry(file, l2_off, l2i + want).await?;
            if geo.owns(e2) {
                break;
            }
            olds.push((e2, b2));
            want += 1;
        }
        // With a data file, guest clusters sit at their guest offset there and take no
        // refcounts (QEMU's rule); else new clusters come from the image's refcounts.
        let (host_start, got) = if geo.data_file {
            (cstart, want)
        } else {
            self.alloc_clusters(file, want).await?
        };
        olds.truncate(got as usize);
        // The data goes to the new clusters without `alloc`: other allocating writes proceed
        // meanwhile; writes and zeroing of these guest clusters wait for `inflight`.
        let inflight = crate::image::Inflight::new(self, c, got);
        let past_eof = host_start >= self.data_node(node, file)?.length();
        drop(guard);
        let r = self
            .fill_new_clusters(
                node, file, g, slot, pos, flags, host_start, got, &olds, past_eof,
            )
            .await;
        let _guard = self.alloc.lock().await;
        let r = match r {
            Ok(span) => {
                self.link_new_clusters(file, g, host_start, &olds, span)
                    .await
            }
            Err(e) => {
                // Never referenced: give the clusters back at once.
                if !geo.data_file {
                    let _ = self.update_refcounts(file, host_start / cs, got, -1).await;
                }
                Err(e)
            }
        };
        drop(inflight);
        r
    }

    /// Copy-on-write and data of a new run of `olds.len()` host clusters at `host_start` for
    /// the write of `data` at guest `g`. Returns the guest span written (start, end) and the
    /// end of the data.
    #[allow(clippy::too_many_arguments)]
    async fn fill_new_clusters(
        &self,
        node: &Node,
        file: &Arc<Node>,
        g: u64,
        slot: &mut Option<IoBuf>,
        pos: usize,
        flags: ReqFlags,
        host_start: u64,
        got: u64,
        olds: &[(u64, u64)],
        past_eof: bool,
    ) -> io::Result<(u64, u64, u64)> {
        let geo = self.geo;
        let cs = geo.cluster_size;
        let cstart = g - geo.offset_in_cluster(g);
        let dfile = self.data_node(node, file)?;
        let data = &slot.as_deref().ok_or_else(eio)?[pos..];
        let end_guest = g + data.len() as u64;
        let run_end = cstart + got * cs;
        let wend = end_guest.min(run_end);

        // Whole clusters are written except, with extended L2, the untouched subclusters of
        // the first and last cluster when their old state can stay (no host cluster before).
        let whole = |e: u64| e & OFLAG_COMPRESSED != 0 || geo.has_host(e);
        let unit = geo.unit;
        let (buf_start, buf_end) = if geo.extended {
            let s = if whole(olds[0].0) {
                cstart
            } else {
                g / unit * unit
            };
            let last = olds[olds.len() - 1].0;
            let e_ = if whole(last) {
                run_end
            } else {
                wend.div_ceil(unit) * unit
            };
            (s, e_.min(run_end))
        } else {
            (cstart, run_end)
        };
        let head = (g - buf_start) as usize;
        let body = (wend - g) as usize;
        // Common case: fresh clusters past the end of the file replacing ones that read as
        // zeroes (no host cluster, no backing file). Only the data is written, padded to the
        // file's alignment; the rest of the clusters are holes that read as zeroes.
        let known_zero = node.child("backing").is_none()
            && olds
                .iter()
                .all(|&(e, _)| e & (L2E_OFFSET_MASK | OFLAG_COMPRESSED) == 0);
        if past_eof && known_zero {
            let al = (dfile.limits().request_alignment as u64).max(512);
            let a = (g - buf_start) / al * al;
            let b = ((wend - buf_start).div_ceil(al) * al).min(buf_end - buf_start);
            let at = head - a as usize;
            let host = host_start + (buf_start - cstart) + a;
            let flags = flags.without(ReqFlags::MAY_UNMAP);
            self.check_overlap(file, host, b - a).await?;
            if b - a < buf_end - buf_start && !geo.data_file {
                // Data that fills only part of its fresh clusters would grow the file a
                // write at a time, and io_uring hands every direct write that grows a file
                // to a kernel worker. Zeroing the clusters first (QEMU does the same) puts
                // this write and the later ones into the rest of them inside the file.
                // Best effort: without it the holes read as zeroes all the same.
                let run = host_start + (buf_start - cstart);
                let _ = dfile
                    .driver()
                    .write_zeroes(&dfile, run, buf_end - buf_start, ReqFlags::NO_FALLBACK)
                    .await;
            }
            if pos == 0 && at == 0 && body as u64 == b - a && body == data.len() {
                // The caller's buffer is exactly what goes to the file: no copy.
                let whole = slot.take().ok_or_else(eio)?;
                let (r, whole) = aligned_write(&dfile, host, whole, flags).await;
                *slot = Some(whole);
                r?;
                return Ok((buf_start, buf_end, wend));
            }
            // Only the padding around the data needs zeroes.
            let mut part = IoBuf::new((b - a) as usize, 4096);
            part[..at].fill(0);
            part[at..at + body].copy_from_slice(&data[..body]);
            part[at + body..].fill(0);
            let (r, _) = aligned_write(&dfile, host, part, flags).await;
            r?;
            return Ok((buf_start, buf_end, wend));
        }
        let mut buf = IoBuf::new((buf_end - buf_start) as usize, 4096);
        if head > 0 {
            self.read_into(node, buf_start, &mut buf[..head]).await?;
        }
        buf[head..head + body].copy_from_slice(&data[..body]);
        if head + body < buf.len() {
            let tail_at = wend;
            self.read_into(node, tail_at, &mut buf[head + body..])
                .await?;
        }
        let mut host_buf = host_start + (buf_start - cstart);
        self.check_overlap(file, host_buf, buf.len() as u64).await?;
        // Clusters past the end of the file were never written: zeroes around the data need
        // not be written (they read as zero there), which saves most of a cluster per write.
        let zero_cow = past_eof
            && buf[..head].iter().all(|&b| b == 0)
            && buf[head + body..].iter().all(|&b| b == 0);
        if zero_cow && (head > 0 || head + body < buf.len()) {
            let al = (dfile.limits().request_alignment as usize).max(512);
            let a = head / al * al;
            let b = ((head + body).div_ceil(al) * al).min(buf.len());
            let mut part = IoBuf::new(b - a, 4096);
            part.copy_from_slice(&buf[a..b]);
            host_buf += a as u64;
            buf = part;
        }
        let (r, _) = aligned_write(&dfile, host_buf, buf, flags.without(ReqFlags::MAY_UNMAP)).await;
        r?;
        // The file may now end inside the run's last cluster: the rest reads as zeroes, and
        // QEMU accepts clusters that end less than a cluster past the end of the file.
        Ok((buf_start, buf_end, wend))
    }

    /// Point the L2 entries at a filled run of new clusters and release what they replace.
    async fn link_new_clusters(
        &self,
        file: &Arc<Node>,
        g: u64,
        host_start: u64,
        olds: &[(u64, u64)],
        (buf_start, buf_end, wend): (u64, u64, u64),
    ) -> io::Result<u64> {
        let geo = self.geo;
        let cs = geo.cluster_size;
        let unit = geo.unit;
        let cstart = g - geo.offset_in_cluster(g);
        let whole = |e: u64| e & OFLAG_COMPRESSED != 0 || geo.has_host(e);
        let (l1i, l2i) = geo.indices(g);
        // The table may have been copied meanwhile (snapshots): look it up again.
        let l2_off = self.writable_l2(file, l1i).await?;
        let mut entries = Vec::with_capacity(olds.len());
        for (j, &(oe, ob)) in olds.iter().enumerate() {
            let h = host_start + j as u64 * cs;
            let bitmap = if !geo.extended {
                0
            } else if whole(oe) {
                BITMAP_ALL_ALLOC
            } else {
                let c0 = cstart + j as u64 * cs;
                let a = buf_start.max(c0);
                let b = buf_end.min(c0 + cs);
                let mut nb = ob;
                let (sa, sb) = ((a - c0) / unit, (b - c0).div_ceil(unit));
                for s in sa..sb {
                    nb |= 1 << s;
                    nb &= !(1 << (32 + s));
                }
                nb
            };
            entries.push((h | OFLAG_COPIED, bitmap));
        }
        self.set_l2(file, l2_off, l2i, &entries).await?;
        for &(oe, _) in olds {
            self.free_entry(oe);
        }
        self.apply_frees(file).await?;
        Ok(wend - g)
    }

    /// A write into a cluster the image owns (COPIED): data goes to its host cluster; a
    /// preallocated zero cluster or unallocated subclusters get their neighbourhood filled.
    #[allow(clippy::too_many_arguments)]
    async fn write_in_place(
        &self,
        node: &Node,
        file: &Arc<Node>,
        l2_off: u64,
        l2i: u64,
        (e, bm): (u64, u64),
        g: u64,
        data: &[u8],
        flags: ReqFlags,
    ) -> io::Result<()> {
        let geo = self.geo;
        let cs = geo.cluster_size;
        let host = e & L2E_OFFSET_MASK;
        let cstart = g - geo.offset_in_cluster(g);
        let wend = g + data.len() as u64;
        let (new_e, new_bm, a, b) = if !geo.extended {
            if e & OFLAG_ZERO != 0 {
                (e & !OFLAG_ZERO, 0, cstart, cstart + cs)
            } else {
                (e, 0, g, wend)
            }
        } else {
            let unit = geo.unit;
            let (sa, sb) = ((g - cstart) / unit, (wend - cstart).div_ceil(unit));
            let mut nb = bm;
            let mut a = g;
            let mut b = wend;
            for s in sa..sb {
                let allocated = bm >> s & 1 != 0;
                if !allocated {
                    // The subcluster's untouched bytes must be filled from its old state.
                    a = a.min(cstart + s * unit);
                    b = b.max(cstart + (s + 1) * unit);
                }
                nb |= 1 << s;
                nb &= !(1 << (32 + s));
            }
            (e, nb, a, b)
        };
        let mut buf = IoBuf::new((b - a) as usize, 4096);
        let head = (g - a) as usize;
        if head > 0 {
            self.read_into(node, a, &mut buf[..head]).await?;
        }
        buf[head..head + data.len()].copy_from_slice(data);
        if wend < b {
            self.read_into(node, wend, &mut buf[head + data.len()..])
                .await?;
        }
        let h = host + (a - cstart);
        self.check_overlap(file, h, b - a).await?;
        let (r, _) = aligned_write(
            &self.data_node(node, file)?,
            h,
            buf,
            flags.without(ReqFlags::MAY_UNMAP),
        )
        .await;
        r?;
        if (new_e, new_bm) != (e, bm) {
            self.set_l2(file, l2_off, l2i, &[(new_e, new_bm)]).await?;
            self.maybe_writeback(file).await?;
        }
        Ok(())
    }

    /// Discard whole clusters of [off, off+len): they become unallocated, or zero when a
    /// backing file would otherwise show through (v3), and their host clusters are freed.
    pub(crate) async fn discard(&self, node: &Node, off: u64, len: u64) -> io::Result<()> {
        self.check_writable()?;
        let cs = self.geo.cluster_size;
        let start = off.div_ceil(cs) * cs;
        let end = if off + len >= self.size.load(Ordering::Acquire) {
            (off + len).div_ceil(cs) * cs
        } else {
            (off + len) / cs * cs
        };
        if start >= end {
            return Ok(());
        }
        // QEMU's rule: with a backing file, or where the cluster had a host cluster (or was
        // compressed), it now reads as zeroes (v3); other clusters stay as they are.
        let backing = node.child("backing").is_some();
        let geo = self.geo;
        let new = if geo.version < 3 {
            (0, 0)
        } else if geo.extended {
            (0, BITMAP_ALL_ZERO)
        } else {
            (OFLAG_ZERO, 0)
        };
        let dropped = self
            .replace_clusters(node, start, end, move |e, _| {
                (backing || geo.has_host(e) || e & OFLAG_COMPRESSED != 0).then_some(new)
            })
            .await?;
        self.release_data(node, &dropped, true).await
    }

    /// QEMU's emptying of an image that keeps its tables (one with a data file, after a
    /// commit): every cluster becomes unallocated (a full discard, nothing left reading as
    /// zeroes), and the data file loses the clusters.
    pub async fn make_empty(&self, node: &Node) -> io::Result<()> {
        self.check_writable()?;
        let cs = self.geo.cluster_size;
        let end = self.size.load(Ordering::Acquire).div_ceil(cs) * cs;
        let dropped = self
            .replace_clusters(node, 0, end, |_, _| Some((0, 0)))
            .await?;
        self.release_data(node, &dropped, true).await
    }

    /// Data file clusters the L2 entries no longer name (`dropped`, guest == host ranges):
    /// a raw data file gets zeroes there, as the guest now reads (`zero_raw`); otherwise
    /// they are discarded when discards are passed down (best effort, as QEMU).
    async fn release_data(
        &self,
        node: &Node,
        dropped: &[(u64, u64)],
        zero_raw: bool,
    ) -> io::Result<()> {
        if dropped.is_empty() {
            return Ok(());
        }
        let file = file_of(node)?;
        let data = self.data_node(node, &file)?;
        for &(off, len) in dropped {
            // Never past the data file's end (a shrink truncates that part anyway).
            let len = len.min(data.length().saturating_sub(off));
            if len == 0 {
                continue;
            }
            if self.geo.data_file_raw {
                if zero_raw {
                    data.driver()
                        .write_zeroes(&data, off, len, ReqFlags::MAY_UNMAP)
                        .await?;
                }
            } else if self.pass_discard.load(Ordering::Relaxed) {
                let _ = data.driver().discard(&data, off, len).await;
            }
        }
        Ok(())
    }

    /// Set the L2 entries of the clusters in [start, end) (cluster aligned) to what `f`
    /// returns for the old entry (None: keep), freeing host clusters no longer referenced.
    /// With a data file, returns the data file ranges no longer referenced (merged runs) for
    /// [`Image::release_data`]; they take no refcounts.
    async fn replace_clusters(
        &self,
        node: &Node,
        start: u64,
        end: u64,
        f: impl Fn(u64, u64) -> Option<(u64, u64)>,
    ) -> io::Result<Vec<(u64, u64)>> {
        let mut dropped: Vec<(u64, u64)> = Vec::new();
        let file = file_of(node)?;
        let cs = self.geo.cluster_size;
        let _a = self.lock_clear_of(start / cs, end.div_ceil(cs)).await;
        let _io = self.data_io.write().await;
        let mut g = start;
        while g < end {
            let (l1i, l2i) = self.geo.indices(g);
            let n = (self.geo.l2_entries - l2i).min((end - g) / cs);
            let run = self.map(&file, g, n * cs).await?;
            if !run.kind.allocated()
                && run.kind.host().is_none()
                && matches!(f(0, 0), None | Some((0, 0)))
            {
                // Already unallocated and staying so.
                g += run.len.div_ceil(cs) * cs;
                continue;
            }
            let l2_off = self.writable_l2(&file, l1i).await?;
            let mut olds = Vec::with_capacity(n as usize);
            let mut news = Vec::with_capacity(n as usize);
            for j in 0..n {
                let old = self.l2_entry(&file, l2_off, l2i + j).await?;
                news.push(f(old.0, old.1).unwrap_or(old));
                olds.push(old);
            }
            self.set_l2(&file, l2_off, l2i, &news).await?;
            for (j, (o, nw)) in olds.iter().zip(&news).enumerate() {
                let keeps_host = o.0 & OFLAG_COMPRESSED == 0
                    && nw.0 & L2E_OFFSET_MASK == o.0 & L2E_OFFSET_MASK
                    && (self.geo.has_host(nw.0) || !self.geo.has_host(o.0));
                if !keeps_host {
                    self.free_entry(o.0);
                    if self.geo.data_file && self.geo.has_host(o.0) {
                        let at = g + j as u64 * cs;
                        match dropped.last_mut() {
                            Some((s0, l0)) if *s0 + *l0 == at => *l0 += cs,
                            _ => dropped.push((at, cs)),
                        }
                    }
                }
            }
            g += n * cs;
        }
        self.apply_frees(&file).await?;
        Ok(dropped)
    }

    /// Write zeroes: aligned clusters (or subclusters) get the zero flag; unaligned edges are
    /// written as data. v2 images cannot say "zero": ENOTSUP lets the caller write zeroes.
    pub(crate) async fn write_zeroes(
        &self,
        node: &Node,
        off: u64,
        len: u64,
        flags: ReqFlags,
    ) -> io::Result<()> {
        self.check_writable()?;
        if self.geo.version < 3 {
            return Err(blockd_block::driver::not_supported());
        }
        let unit = self.geo.unit;
        let cs = self.geo.cluster_size;
        let size = self.size.load(Ordering::Acquire);
        let end = off + len;
        let mut a = off.div_ceil(unit) * unit;
        let mut b = end / unit * unit;
        if end >= size {
            b = end.div_ceil(unit) * unit;
        }
        // The unaligned head and tail (QEMU splits them off): a whole unit that reads as
        // zeroes around the piece is zeroed through the metadata, else zero bytes are written.
        let head = (off < a).then(|| (off, a.min(end)));
        let tail = (end > b && b >= a).then_some((b, end));
        let mut bytes = Vec::new();
        if let Some((p, q)) = head {
            let u = p / unit * unit;
            if self.unit_zero_around(node, u, p, q).await? {
                a = u;
                b = b.max(u + unit);
            } else {
                bytes.push((p, q));
            }
        }
        if let Some((p, q)) = tail {
            let u = p / unit * unit;
            if u + unit > b && self.unit_zero_around(node, u, p, q).await? {
                b = u + unit;
                a = a.min(u);
            } else if u + unit > b {
                bytes.push((p, q));
            }
        }
        if !bytes.is_empty() && flags.contains(ReqFlags::NO_FALLBACK) {
            return Err(blockd_block::driver::not_supported());
        }
        for &(p, q) in &bytes {
            self.write_zero_bytes(node, p, q - p).await?;
        }
        if a >= b {
            return Ok(());
        }
        let unmap = flags.contains(ReqFlags::MAY_UNMAP);
        if self.geo.data_file_raw {
            // The raw data file shows what the guest reads: zeroes go there too.
            let file = file_of(node)?;
            let data = self.data_node(node, &file)?;
            let len = (b - a).min(data.length().saturating_sub(a));
            if len > 0 {
                let f = if unmap {
                    ReqFlags::MAY_UNMAP
                } else {
                    ReqFlags::NONE
                };
                data.driver().write_zeroes(&data, a, len, f).await?;
            }
        }
        let mut dropped = Vec::new();
        if self.geo.extended {
            // Per cluster: whole clusters lose their host cluster when unmapping, partial
            // ones get zero bits for the covered subclusters.
            let mut g = a;
            while g < b {
                let cstart = g / cs * cs;
                let cend = (cstart + cs).min(b);
                let (s0, s1) = ((g - cstart) / unit, (cend - cstart).div_ceil(unit));
                let whole = s0 == 0 && s1 == 32;
                let mut mask = 0u64;
                for s in s0..s1 {
                    mask |= 1 << s;
                }
                let geo = self.geo;
                let d = self
                    .replace_clusters(node, cstart, cstart + cs, move |e, bm| {
                        if e & OFLAG_COMPRESSED != 0 {
                            return if whole {
                                Some((0, BITMAP_ALL_ZERO))
                            } else {
                                None
                            };
                        }
                        if whole && (unmap || !geo.owns(e)) {
                            return Some((0, BITMAP_ALL_ZERO));
                        }
                        Some((e, (bm & !mask) | (mask << 32)))
                    })
                    .await?;
                dropped.extend(d);
                // A compressed cluster partly zeroed is rewritten as data.
                let file = file_of(node)?;
                let run = self.map(&file, g, cend - g).await?;
                if matches!(run.kind, Kind::Compressed { .. }) {
                    self.write_zero_bytes(node, g, cend - g).await?;
                }
                g = cend;
            }
        } else {
            let geo = self.geo;
            dropped = self
                .replace_clusters(node, a, b, move |e, _| {
                    if !unmap && geo.owns(e) {
                        Some((e | OFLAG_ZERO, 0))
                    } else {
                        Some((OFLAG_ZERO, 0))
                    }
                })
                .await?;
        }
        self.release_data(node, &dropped, false).await
    }

    /// Whether the unit [u, u+unit) may be zeroed whole for a write of zeroes to [p, q) in
    /// it (QEMU's rule): it has no data of its own (unallocated or zero) and the bytes
    /// around the piece read as zeroes (no backing file shows data there).
    async fn unit_zero_around(&self, node: &Node, u: u64, p: u64, q: u64) -> io::Result<bool> {
        let file = file_of(node)?;
        let run = self.map(&file, u, self.geo.unit).await?;
        match run.kind {
            Kind::ZeroPlain | Kind::ZeroAlloc(_) => Ok(true),
            Kind::Unallocated | Kind::UnallocatedAlloc(_) => {
                // The bytes around the piece come from the backing file: zero only past its
                // end (a backing file's own zeroes are not looked up).
                let Some(bk) = node.child("backing") else {
                    return Ok(true);
                };
                let blen = bk.length();
                let around_zero = |x: u64, y: u64| x >= y || x >= blen;
                Ok(around_zero(u, p) && around_zero(q, u + self.geo.unit))
            }
            _ => Ok(false),
        }
    }

    async fn write_zero_bytes(&self, node: &Node, off: u64, len: u64) -> io::Result<()> {
        let buf = IoBuf::zeroed(len as usize, 4096);
        let (r, _) = self.write(node, off, buf, ReqFlags::NONE).await;
        r
    }

    /// Grow the image (shrinking is not supported yet).
    pub(crate) async fn truncate(&self, node: &Node, len: u64) -> io::Result<u64> {
        self.check_writable()?;
        let file = file_of(node)?;
        let cur = self.size.load(Ordering::Acquire);
        let msg = |m: &str| io::Error::new(io::ErrorKind::InvalidInput, m.to_string());
        if !len.is_multiple_of(512) {
            return Err(msg("The new size must be a multiple of 512"));
        }
        if !self.meta().snapshots.is_empty() && self.geo.version < 3 {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "Can't resize a v2 image which has snapshots",
            ));
        }
        if len == cur {
            return Ok(len);
        }
        let data = node.child("data-file");
        if len < cur {
            self.shrink(node, &file, cur, len).await?;
            // The data file follows the guest size (QEMU resizes it too).
            if let Some(d) = &data {
                d.driver().truncate(d, len).await?;
            }
            return Ok(len);
        }
        let _a = self.alloc.lock().await;
        let need = len.div_ceil(self.geo.l2_coverage());
        self.grow_l1(&file, need).await?;
        if let Some(d) = &data {
            d.driver().truncate(d, len).await?;
            if self.geo.data_file_raw {
                // A raw data file maps every guest cluster (QEMU's metadata preallocation).
                let cs = self.geo.cluster_size;
                self.map_identity(&file, cur.div_ceil(cs), len.div_ceil(cs))
                    .await?;
                self.writeback(&file).await?;
                file.driver().flush(&file).await?;
            }
        }
        self.set_size(&file, len).await?;
        Ok(len)
    }

    /// Point guest clusters [first, end) at their own offset in the data file (what a raw
    /// data file needs), every subcluster allocated. Call with `alloc` held.
    async fn map_identity(&self, file: &Arc<Node>, first: u64, end: u64) -> io::Result<()> {
        let geo = self.geo;
        let cs = geo.cluster_size;
        let bitmap = if geo.extended { BITMAP_ALL_ALLOC } else { 0 };
        let mut c = first;
        while c < end {
            let (l1i, l2i) = geo.indices(c * cs);
            let n = (geo.l2_entries - l2i).min(end - c);
            let l2_off = self.writable_l2(file, l1i).await?;
            let entries: Vec<(u64, u64)> = (0..n)
                .map(|j| (((c + j) * cs) | OFLAG_COPIED, bitmap))
                .collect();
            self.set_l2(file, l2_off, l2i, &entries).await?;
            self.maybe_writeback(file).await?;
            c += n;
        }
        Ok(())
    }

    /// The guest size in the header, durable, then in memory.
    async fn set_size(&self, file: &Arc<Node>, len: u64) -> io::Result<()> {
        pwrite(file, 24, &len.to_be_bytes()).await?;
        file.driver().flush(file).await?;
        self.header.lock().unwrap_or_else(|e| e.into_inner()).size = len;
        self.size.store(len, Ordering::Release);
        Ok(())
    }

    /// Shrink as QEMU: the clusters past the new end are dropped (unallocated, their host
    /// clusters freed), then the L2 tables no longer needed (their L1 entries zeroed first),
    /// then the header's size, and the file loses its unused tail.
    async fn shrink(&self, node: &Node, file: &Arc<Node>, cur: u64, len: u64) -> io::Result<()> {
        let cs = self.geo.cluster_size;
        let start = len.div_ceil(cs) * cs;
        let end = cur.div_ceil(cs) * cs;
        let ctx = |what: &'static str| {
            move |e: io::Error| {
                io::Error::new(e.kind(), format!("{what}: {}", blockd_block::strerror(&e)))
            }
        };
        if start < end {
            let dropped = self
                .replace_clusters(node, start, end, |_, _| Some((0, 0)))
                .await
                .map_err(ctx("Failed to discard cropped clusters"))?;
            self.release_data(node, &dropped, false)
                .await
                .map_err(ctx("Failed to discard cropped clusters"))?;
        }
        let _a = self.alloc.lock().await;
        let keep = len.div_ceil(self.geo.l2_coverage()) as usize;
        let (l1, l1_off) = {
            let m = self.meta();
            (m.l1.clone(), m.l1_offset)
        };
        if keep < l1.len() && l1[keep..].iter().any(|&e| e != 0) {
            let fail = ctx("Failed to reduce the number of L2 tables");
            self.writeback(file).await.map_err(&fail)?;
            let zeroes = vec![0u8; (l1.len() - keep) * 8];
            pwrite(file, l1_off + keep as u64 * 8, &zeroes)
                .await
                .map_err(&fail)?;
            file.driver().flush(file).await.map_err(&fail)?;
            {
                let mut m = self.meta();
                for e in &mut m.l1[keep..] {
                    *e = 0;
                }
                for &e in &l1[keep..] {
                    m.l2_tables.remove(&(e & L1E_OFFSET_MASK));
                }
                m.epoch += 1;
                m.l2.clear_clean();
            }
            for &e in &l1[keep..] {
                let t = e & L1E_OFFSET_MASK;
                if t != 0 {
                    self.update_refcounts(file, t / cs, 1, -1)
                        .await
                        .map_err(&fail)?;
                }
            }
            self.writeback(file).await.map_err(&fail)?;
        }
        self.drop_unused_refblocks(file)
            .await
            .map_err(ctx("Failed to shrink the refcount table"))?;
        self.set_size(file, len).await?;
        // The file's tail past the last cluster in use goes (a failure only warns in QEMU).
        let flen = file.length();
        let mut last = flen.div_ceil(cs);
        while last > 0 && self.refcount(file, last - 1).await? == 0 {
            last -= 1;
        }
        if last * cs < flen
            && let Err(e) = file.driver().truncate(file, last * cs).await
        {
            eprintln!(
                "qemu-img: warning: Failed to truncate the tail of the image: {}",
                blockd_block::strerror(&e)
            );
        }
        Ok(())
    }

    /// After a shrink, refcount blocks that count nothing (or only themselves) leave the
    /// refcount table, which is written first, and are then freed: the file's tail can go.
    /// Call with `alloc` held.
    async fn drop_unused_refblocks(&self, file: &Arc<Node>) -> io::Result<()> {
        let cs = self.geo.cluster_size;
        let e = self.geo.rc_entries;
        self.writeback(file).await?;
        let (table, rt_off) = {
            let m = self.meta();
            (m.reftable.clone(), m.reftable_offset)
        };
        let mut unused = Vec::new();
        for (t, &entry) in table.iter().enumerate() {
            let rb = entry & REFT_OFFSET_MASK;
            let Some(values) = self.refcount_block_values(file, t as u64).await? else {
                continue;
            };
            let own = (rb / cs / e == t as u64).then_some((rb / cs % e) as usize);
            if values
                .iter()
                .enumerate()
                .all(|(i, &v)| v == 0 || Some(i) == own)
            {
                unused.push((t, rb));
            }
        }
        if unused.is_empty() {
            return Ok(());
        }
        let mut new_table = table;
        for &(t, _) in &unused {
            new_table[t] = 0;
        }
        let bytes: Vec<u8> = new_table.iter().flat_map(|x| x.to_be_bytes()).collect();
        pwrite(file, rt_off, &bytes).await?;
        file.driver().flush(file).await?;
        {
            let mut m = self.meta();
            m.reftable = new_table;
            for &(_, rb) in &unused {
                m.refblocks.remove(&rb);
                m.rc.remove(rb);
            }
        }
        // A block counted in another block gives that count back; a self-counting block's
        // count went with it.
        for (t, rb) in unused {
            if rb / cs / e != t as u64 {
                self.update_refcounts(file, rb / cs, 1, -1).await?;
            }
        }
        self.writeback(file).await
    }
}
