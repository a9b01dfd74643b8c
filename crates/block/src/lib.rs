//! blockd's block layer (DESIGN.md, `block`).
//!
//! The request path: [`BlockBackend`] (`backend.rs`: admission against drains, bounds,
//! in-flight count) → `io.rs` (alignment, read-modify-write, write-zeroes fallback) → the root
//! node's driver (`drivers/raw.rs`, ...) → its children (`drivers/file.rs`) → the calling
//! thread's ring. Topology: [`Node`] (`node.rs`), [`Graph`] (`graph.rs`, main context only,
//! every change drained), [`drained`] (`drain.rs`), permissions (`perm.rs`), options
//! (`options.rs`).

pub mod backend;
pub mod dirty_bitmap;
pub mod drain;
pub mod driver;
pub mod drivers;
pub mod events;
pub mod graph;
pub mod io;
pub mod node;
pub mod options;
pub mod perm;
pub mod reopen;
pub mod serialise;
pub mod status;

pub use backend::BlockBackend;
pub use dirty_bitmap::{DirtyBitmap, DirtyBitmapList};
pub use drain::{DrainGuard, drained, drained_all};
pub use driver::{
    BlockDriver, BlockStatus, BufResult, IoFuture, Limits, ReopenPrepared, ReopenRequest, ReqFlags,
    SnapshotInfo,
};
pub use graph::{Graph, OpenFlags};
pub use node::{Child, Node};
pub use perm::Perm;
pub use reopen::ReopenPlan;

/// `strerror` text of an I/O error, as QEMU prints it ("No such file or directory").
pub fn strerror(e: &std::io::Error) -> String {
    // std formats OS errors as "<text> (os error N)".
    let s = e.to_string();
    match (e.raw_os_error(), s.rfind(" (os error")) {
        (Some(_), Some(i)) => s[..i].to_string(),
        _ => s,
    }
}
