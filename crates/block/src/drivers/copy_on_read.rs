//! `copy-on-read`: a filter whose reads copy what its `file` child does not hold itself from the
//! child's backing chain into the child (QEMU's copy-on-read driver, by its documented
//! behaviour). With `bottom`, only data held by the backing layers down to and including
//! `bottom` is copied; data below `bottom` is read through without copying (block-stream's
//! filter). Writes, write-zeroes, discards and flushes pass through.
//!
//! The copying itself is `io::copy_on_read`: a serialising request on the child, so a
//! concurrent write of the same range is never overwritten by the older backing data.

use std::io;
use std::sync::Arc;

use blockd_aio::IoBuf;

use crate::driver::{BlockDriver, BlockStatus, BufResult, IoFuture, ReqFlags};
use crate::drivers::{Opened, child_edge};
use crate::graph::{Graph, OpenFlags};
use crate::node::Node;
use crate::options::Opts;
use crate::perm::Perm;

pub struct CopyOnRead {
    /// The lowest layer whose data is copied (`None`: everything the child lacks is copied).
    bottom: Option<Arc<Node>>,
}

impl CopyOnRead {
    /// A filter copying what the backing layers down to `bottom` hold (all of the chain when
    /// `None`), for a job that inserts one (block-stream's `filter-node-name`). Its child edge
    /// is `file` with [`CopyOnRead::child_perm`].
    pub fn new(bottom: Option<Arc<Node>>) -> CopyOnRead {
        CopyOnRead { bottom }
    }

    /// What the filter needs of its `file` child (it shares everything). Not `resize`: an
    /// NBD export above the filter keeps the size fixed, and the filter itself never resizes.
    pub fn child_perm(read_only: bool) -> Perm {
        let perm = Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED;
        if read_only { perm } else { perm | Perm::WRITE }
    }
}

pub(crate) fn open(graph: &mut Graph, o: &mut Opts, flags: OpenFlags) -> Result<Opened, String> {
    let bottom_name = o.take_str("bottom")?;
    let file = graph
        .open_child(o, "file", flags)?
        .ok_or_else(|| "A block device must be specified for \"file\"".to_string())?;
    let bottom = match bottom_name {
        None => None,
        Some(name) => {
            let b = graph
                .node(&name)
                .ok_or_else(|| format!("Bottom node '{name}' not found"))?;
            // (QEMU accepts a node outside the chain and then never finishes a read.)
            if !chain_contains(&file, &b) {
                return Err(format!(
                    "Bottom node '{name}' is not in the backing chain of '{}'",
                    file.name()
                ));
            }
            Some(b)
        }
    };
    // Writes pass through; copied data is written unchanged.
    let perm = CopyOnRead::child_perm(flags.read_only);
    let length = file.length();
    Ok(Opened {
        driver: Box::new(CopyOnRead { bottom }),
        children: vec![child_edge("file", file, perm, Perm::ALL)],
        length,
    })
}

/// Is `needle` `node` or one of its backing layers (through filters' children)?
fn chain_contains(node: &Arc<Node>, needle: &Arc<Node>) -> bool {
    let mut cur = Some(node.clone());
    while let Some(n) = cur {
        if Arc::ptr_eq(&n, needle) {
            return true;
        }
        cur = n.child("backing").or_else(|| {
            if n.driver().is_filter() {
                n.child("file")
            } else {
                None
            }
        });
    }
    false
}

fn file(node: &Node) -> io::Result<Arc<Node>> {
    node.child("file")
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEDIUM))
}

impl CopyOnRead {
    /// Do the layers below `file` down to `bottom` hold `[off, off+n)`? The answer and the
    /// length of the prefix it holds for (QEMU's `is_allocated_above`, base included).
    async fn allocated_above_bottom(
        &self,
        file: &Arc<Node>,
        bottom: &Arc<Node>,
        off: u64,
        mut n: u64,
    ) -> io::Result<(bool, u64)> {
        if Arc::ptr_eq(file, bottom) {
            return Ok((false, n));
        }
        let mut cur = file.child("backing");
        while let Some(layer) = cur {
            if off >= layer.length() {
                // A shorter layer holds nothing here.
            } else {
                let st = layer.driver().block_status(&layer, off, n).await?;
                if st.allocated {
                    return Ok((true, st.len.clamp(1, n)));
                }
                n = st.len.clamp(1, n);
            }
            if Arc::ptr_eq(&layer, bottom) {
                break;
            }
            cur = layer.child("backing");
        }
        Ok((false, n))
    }
}

impl BlockDriver for CopyOnRead {
    fn format_name(&self) -> &'static str {
        "copy-on-read"
    }

    fn is_filter(&self) -> bool {
        true
    }

    fn read<'a>(&'a self, node: &'a Node, off: u64, mut buf: IoBuf) -> IoFuture<'a, BufResult> {
        Box::pin(async move {
            let f = match file(node) {
                Ok(f) => f,
                Err(e) => return (Err(e), buf),
            };
            let len = buf.len() as u64;
            let Some(bottom) = &self.bottom else {
                let r = crate::io::copy_on_read(&f, off, len, Some(&mut buf[..])).await;
                return (r, buf);
            };
            let mut pos = off;
            while pos < off + len {
                let (copy, n) = match self
                    .allocated_above_bottom(&f, bottom, pos, off + len - pos)
                    .await
                {
                    Ok(v) => v,
                    // As QEMU: when in doubt, copy.
                    Err(_) => (true, off + len - pos),
                };
                let part = &mut buf[(pos - off) as usize..(pos - off + n) as usize];
                if copy {
                    if let Err(e) = crate::io::copy_on_read(&f, pos, n, Some(part)).await {
                        return (Err(e), buf);
                    }
                } else {
                    let (r, b) =
                        crate::io::aligned_read(&f, pos, IoBuf::new(n as usize, 4096)).await;
                    if let Err(e) = r {
                        return (Err(e), buf);
                    }
                    part.copy_from_slice(&b);
                }
                pos += n;
            }
            (Ok(()), buf)
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
            match file(node) {
                Ok(f) => crate::io::aligned_write(&f, off, buf, flags).await,
                Err(e) => (Err(e), buf),
            }
        })
    }

    fn flush<'a>(&'a self, node: &'a Node) -> IoFuture<'a, io::Result<()>> {
        Box::pin(async move {
            let f = file(node)?;
            f.driver().flush(&f).await
        })
    }

    fn discard<'a>(&'a self, node: &'a Node, off: u64, len: u64) -> IoFuture<'a, io::Result<()>> {
        Box::pin(async move { crate::io::discard(&file(node)?, off, len).await })
    }

    fn write_zeroes<'a>(
        &'a self,
        node: &'a Node,
        off: u64,
        len: u64,
        flags: ReqFlags,
    ) -> IoFuture<'a, io::Result<()>> {
        Box::pin(async move { crate::io::write_zeroes(&file(node)?, off, len, flags).await })
    }

    fn block_status<'a>(
        &'a self,
        node: &'a Node,
        off: u64,
        len: u64,
    ) -> IoFuture<'a, io::Result<BlockStatus>> {
        Box::pin(async move {
            let f = file(node)?;
            f.driver().block_status(&f, off, len).await
        })
    }

    fn truncate<'a>(&'a self, _node: &'a Node, _len: u64) -> IoFuture<'a, io::Result<u64>> {
        Box::pin(async { Err(crate::driver::not_supported()) })
    }
}
