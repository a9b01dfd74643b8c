//! `raw`: the format that is no format. Passes I/O to its `file` child, optionally restricted
//! to a window (`offset`, `size`).

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use blockd_aio::IoBuf;

use crate::driver::{
    BlockDriver, BlockStatus, BufResult, IoFuture, ReopenPrepared, ReopenRequest, ReqFlags,
};
use crate::drivers::{Opened, child_edge};
use crate::graph::{Graph, OpenFlags};
use crate::node::Node;
use crate::options::Opts;
use crate::perm::Perm;

pub struct RawDriver {
    /// Changed only by a reopen, inside a drained section.
    offset: AtomicU64,
    /// Fixed size of the window, if given (`NO_SIZE` when not).
    size: AtomicU64,
}

const NO_SIZE: u64 = u64::MAX;

/// The window (`offset`, `size`) checked against the file's length; the node's length.
fn window(offset: u64, size: Option<u64>, file_len: u64) -> Result<u64, String> {
    if offset > file_len {
        return Err(format!(
            "Offset ({offset}) cannot be greater than size of the containing file ({file_len})"
        ));
    }
    match size {
        Some(s) => {
            if offset.checked_add(s).is_none_or(|end| end > file_len) {
                return Err(format!(
                    "The sum of offset ({offset}) and size ({s}) has to be smaller or equal to the  actual size of the containing file ({file_len})"
                ));
            }
            Ok(s)
        }
        None => Ok(file_len - offset),
    }
}

/// What raw needs of its file: read, and write and resize unless read-only.
fn file_perms(read_only: bool, force_share: bool) -> (Perm, Perm) {
    let mut perm = Perm::CONSISTENT_READ;
    if !read_only {
        perm = perm | Perm::WRITE | Perm::RESIZE;
    }
    let shared = if force_share {
        Perm::ALL
    } else {
        Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED
    };
    (perm, shared)
}

pub(crate) fn open(graph: &mut Graph, o: &mut Opts, flags: OpenFlags) -> Result<Opened, String> {
    let offset = o.take_size("offset")?.unwrap_or(0);
    let size = o.take_size("size")?;
    let file = graph
        .open_child(o, "file", flags)?
        .ok_or_else(|| "A block device must be specified for \"file\"".to_string())?;
    let length = window(offset, size, file.length())?;
    let (perm, shared) = file_perms(flags.read_only, flags.force_share);
    Ok(Opened {
        driver: Box::new(RawDriver {
            offset: AtomicU64::new(offset),
            size: AtomicU64::new(size.unwrap_or(NO_SIZE)),
        }),
        children: vec![child_edge("file", file, perm, shared)],
        length,
    })
}

impl RawDriver {
    fn offset(&self) -> u64 {
        self.offset.load(Ordering::Relaxed)
    }

    /// Where the node's byte 0 lies in its `file` child (the `offset` option). Stable while
    /// the caller holds a request in flight (a reopen changes it inside a drained section).
    pub fn window_offset(&self) -> u64 {
        self.offset()
    }

    fn file(node: &Node) -> io::Result<Arc<Node>> {
        node.child("file")
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEDIUM))
    }
}

impl BlockDriver for RawDriver {
    fn format_name(&self) -> &'static str {
        "raw"
    }

    fn is_format(&self) -> bool {
        true
    }

    fn read<'a>(&'a self, node: &'a Node, off: u64, buf: IoBuf) -> IoFuture<'a, BufResult> {
        Box::pin(async move {
            let f = match Self::file(node) {
                Ok(f) => f,
                Err(e) => return (Err(e), buf),
            };
            crate::io::aligned_read(&f, self.offset() + off, buf).await
        })
    }

    fn write<'a>(
        &'a self,
        node: &'a Node,
        off: u64,
        buf: IoBuf,
        flags: ReqFlags,
    ) -> IoFuture<'a, BufResult> {
        Box::pin(async move {
            let f = match Self::file(node) {
                Ok(f) => f,
                Err(e) => return (Err(e), buf),
            };
            crate::io::aligned_write(&f, self.offset() + off, buf, flags).await
        })
    }

    fn flush<'a>(&'a self, node: &'a Node) -> IoFuture<'a, io::Result<()>> {
        Box::pin(async move {
            let f = Self::file(node)?;
            f.driver().flush(&f).await
        })
    }

    fn discard<'a>(&'a self, node: &'a Node, off: u64, len: u64) -> IoFuture<'a, io::Result<()>> {
        Box::pin(async move {
            let f = Self::file(node)?;
            crate::io::discard(&f, self.offset() + off, len).await
        })
    }

    fn write_zeroes<'a>(
        &'a self,
        node: &'a Node,
        off: u64,
        len: u64,
        flags: ReqFlags,
    ) -> IoFuture<'a, io::Result<()>> {
        Box::pin(async move {
            let f = Self::file(node)?;
            crate::io::write_zeroes(&f, self.offset() + off, len, flags).await
        })
    }

    fn block_status<'a>(
        &'a self,
        node: &'a Node,
        off: u64,
        len: u64,
    ) -> IoFuture<'a, io::Result<BlockStatus>> {
        Box::pin(async move {
            let f = Self::file(node)?;
            let mut s = f
                .driver()
                .block_status(&f, self.offset() + off, len)
                .await?;
            // Raw maps 1:1 onto its file, at our offset.
            s.offset = Some(self.offset() + off);
            Ok(s)
        })
    }

    fn truncate<'a>(&'a self, node: &'a Node, len: u64) -> IoFuture<'a, io::Result<u64>> {
        Box::pin(async move {
            if self.offset() != 0 || self.size.load(Ordering::Relaxed) != NO_SIZE {
                return Err(crate::driver::not_supported());
            }
            let f = Self::file(node)?;
            let n = f.driver().truncate(&f, len).await?;
            f.set_length(n);
            Ok(n)
        })
    }

    fn info(&self) -> Vec<(String, String)> {
        Vec::new()
    }

    /// Options left out go back to their defaults (the whole file); the window is checked
    /// against the file the node has after the reopen.
    fn reopen_prepare(
        &self,
        node: &Node,
        req: &mut ReopenRequest<'_>,
    ) -> Result<ReopenPrepared, String> {
        let offset = req.opts.take_size("offset")?.unwrap_or(0);
        let size = req.opts.take_size("size")?;
        let file = req
            .children
            .iter()
            .find(|c| c.name == "file")
            .ok_or_else(|| format!("Node '{}' has no file", node.name()))?;
        let length = window(offset, size, file.node.length())?;
        let (perm, shared) = file_perms(
            req.read_only,
            req.flags.force_share || node.is_force_share(),
        );
        Ok(ReopenPrepared {
            state: Box::new((offset, size.unwrap_or(NO_SIZE))),
            child_perms: vec![("file".into(), perm, shared)],
            length: Some(length),
            limits: None,
        })
    }

    fn reopen_commit(&self, _node: &Node, state: Box<dyn std::any::Any + Send>) {
        if let Ok(w) = state.downcast::<(u64, u64)>() {
            self.offset.store(w.0, Ordering::Relaxed);
            self.size.store(w.1, Ordering::Relaxed);
        }
    }
}
