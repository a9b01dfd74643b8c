//! The `snapshot-access` driver (fleecing): its `file` is a copy-before-write node, and it
//! reads the point-in-time view that filter keeps: clusters already copied out come from the
//! filter's target, the others from its source (see `cbw.rs`). Read-only; `discard` tells the
//! filter that the reader is done with a range, so guest writes there are no longer copied.

use std::io;
use std::sync::Arc;

use blockd_aio::IoBuf;
use blockd_block::driver::{BlockStatus, BufResult, IoFuture, ReqFlags};
use blockd_block::drivers::{DriverEntry, Opened, child_edge};
use blockd_block::options::Opts;
use blockd_block::{BlockDriver, Graph, Node, OpenFlags, Perm};

use crate::cbw::{BlockCopy, block_copy_of};

pub struct SnapshotAccess;

/// The copy-before-write node below, its copy state, source and target.
fn parts(node: &Node) -> io::Result<(Arc<BlockCopy>, Arc<Node>, Arc<Node>)> {
    let gone = || io::Error::from_raw_os_error(libc::ENOMEDIUM);
    let cbw = node.child("file").ok_or_else(gone)?;
    // (as QEMU, any node opens as `file`; only a copy-before-write one can be read)
    let bcs = block_copy_of(&cbw).ok_or_else(|| io::Error::from_raw_os_error(libc::ENOTSUP))?;
    let source = cbw.child("file").ok_or_else(gone)?;
    let target = cbw.child("target").ok_or_else(gone)?;
    Ok((bcs, source, target))
}

fn read_only() -> io::Error {
    io::Error::from_raw_os_error(libc::EPERM)
}

impl BlockDriver for SnapshotAccess {
    fn format_name(&self) -> &'static str {
        "snapshot-access"
    }
    fn read<'a>(&'a self, node: &'a Node, off: u64, buf: IoBuf) -> IoFuture<'a, BufResult> {
        Box::pin(async move {
            match parts(node) {
                Ok((bcs, source, target)) => bcs.snapshot_read(&source, &target, off, buf).await,
                Err(e) => (Err(e), buf),
            }
        })
    }
    fn write<'a>(
        &'a self,
        _node: &'a Node,
        _off: u64,
        buf: IoBuf,
        _flags: ReqFlags,
    ) -> IoFuture<'a, BufResult> {
        Box::pin(async move { (Err(read_only()), buf) })
    }
    fn flush<'a>(&'a self, _node: &'a Node) -> IoFuture<'a, io::Result<()>> {
        Box::pin(async { Ok(()) })
    }
    fn discard<'a>(&'a self, node: &'a Node, off: u64, len: u64) -> IoFuture<'a, io::Result<()>> {
        Box::pin(async move {
            let (bcs, _, _) = parts(node)?;
            bcs.snapshot_discard(off, len);
            Ok(())
        })
    }
    fn write_zeroes<'a>(
        &'a self,
        _node: &'a Node,
        _off: u64,
        _len: u64,
        _flags: ReqFlags,
    ) -> IoFuture<'a, io::Result<()>> {
        Box::pin(async { Err(read_only()) })
    }
    fn block_status<'a>(
        &'a self,
        node: &'a Node,
        off: u64,
        len: u64,
    ) -> IoFuture<'a, io::Result<BlockStatus>> {
        Box::pin(async move {
            let (bcs, source, _) = parts(node)?;
            bcs.snapshot_block_status(&source, off, len).await
        })
    }
    fn truncate<'a>(&'a self, _node: &'a Node, _len: u64) -> IoFuture<'a, io::Result<u64>> {
        Box::pin(async { Err(blockd_block::driver::not_supported()) })
    }
}

fn open(g: &mut Graph, _d: &str, o: &mut Opts, flags: OpenFlags) -> Result<Opened, String> {
    let file = g
        .open_child(o, "file", flags)?
        .ok_or_else(|| "Parameter 'file' is missing".to_string())?;
    let len = file.length();
    Ok(Opened {
        driver: Box::new(SnapshotAccess),
        // reads the view; the guest keeps writing through the filter
        children: vec![child_edge("file", file, Perm::CONSISTENT_READ, Perm::ALL)],
        length: len,
    })
}

pub fn driver_entry() -> DriverEntry {
    DriverEntry {
        name: "snapshot-access",
        open,
        probe: None,
    }
}
