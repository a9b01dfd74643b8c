//! `raw`: the format that is no format. Passes I/O to its `file` child, optionally restricted
//! to a window (`offset`, `size`).

use std::io;
use std::sync::Arc;

use blockd_aio::IoBuf;

use crate::driver::{BlockDriver, BlockStatus, BufResult, IoFuture, ReqFlags};
use crate::drivers::{Opened, child_edge};
use crate::graph::{Graph, OpenFlags};
use crate::node::Node;
use crate::options::Opts;
use crate::perm::Perm;

pub struct RawDriver {
    offset: u64,
    /// Fixed size of the window, if given.
    size: Option<u64>,
}

pub(crate) fn open(graph: &mut Graph, o: &mut Opts, flags: OpenFlags) -> Result<Opened, String> {
    let offset = o.take_size("offset")?.unwrap_or(0);
    let size = o.take_size("size")?;
    let file = graph
        .open_child(o, "file", flags)?
        .ok_or_else(|| "A block device must be specified for \"file\"".to_string())?;
    let file_len = file.length();
    if offset > file_len {
        return Err("The sum of offset (".to_string()
            + &offset.to_string()
            + ") and size (0) has to be smaller or equal to the  actual size of the containing file ("
            + &file_len.to_string()
            + ")");
    }
    let length = match size {
        Some(s) => {
            if offset.checked_add(s).is_none_or(|end| end > file_len) {
                return Err(format!(
                    "The sum of offset ({offset}) and size ({s}) has to be smaller or equal to the  actual size of the containing file ({file_len})"
                ));
            }
            s
        }
        None => file_len - offset,
    };
    let mut perm = Perm::CONSISTENT_READ;
    if !flags.read_only {
        perm = perm | Perm::WRITE | Perm::RESIZE;
    }
    let shared = if flags.force_share {
        Perm::ALL
    } else {
        Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED
    };
    Ok(Opened {
        driver: Box::new(RawDriver { offset, size }),
        children: vec![child_edge("file", file, perm, shared)],
        length,
    })
}

impl RawDriver {
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
            crate::io::aligned_read(&f, self.offset + off, buf).await
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
            crate::io::aligned_write(&f, self.offset + off, buf, flags).await
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
            f.driver().discard(&f, self.offset + off, len).await
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
            crate::io::write_zeroes(&f, self.offset + off, len, flags).await
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
            let mut s = f.driver().block_status(&f, self.offset + off, len).await?;
            // Raw maps 1:1 onto its file, at our offset.
            s.offset = Some(self.offset + off);
            Ok(s)
        })
    }

    fn truncate<'a>(&'a self, node: &'a Node, len: u64) -> IoFuture<'a, io::Result<u64>> {
        Box::pin(async move {
            if self.offset != 0 || self.size.is_some() {
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
}
