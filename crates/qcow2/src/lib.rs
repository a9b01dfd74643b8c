//! blockd's qcow2 driver: QEMU's qcow2 format, bit-compatible (docs/interop/qcow2.rst).
//!
//! Modules: `header` (cluster 0 and its validation), `layout` (geometry and L1/L2 entry
//! meaning), `cache` (metadata caches and their options), `image` (the open image's tables
//! and metadata updates), `io` (guest reads and writes), `driver` (the BlockDriver, open,
//! probe, info), `create` (formatting a new image), `check` (consistency check and repair).
#![forbid(unsafe_code)]

pub mod alloc_order;
pub mod amend;
pub mod backing_name;
pub mod bitmaps;
pub mod cache;
pub mod check;
pub mod create;
pub mod driver;
pub mod header;
pub mod image;
pub mod io;
pub mod layout;
pub mod prealloc;
pub mod reopen;
pub mod snapshot;

pub use check::{CheckReport, Repair, check};
pub use create::{CreateOptions, create};
pub use driver::{Qcow2, probe};

/// The registry entry for this driver.
pub fn driver_entry() -> blockd_block::drivers::DriverEntry {
    blockd_block::drivers::DriverEntry {
        name: "qcow2",
        open: driver::open,
        probe: Some(probe),
    }
}

/// The header of the qcow2 image in `path`, read and validated with plain file I/O (for
/// tools that describe an image they already opened).
pub fn read_header_file(path: &str) -> Result<header::Header, String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let len = f.metadata().map_err(|e| e.to_string())?.len();
    let mut first = vec![0u8; len.min(512) as usize];
    f.read_exact(&mut first).map_err(|e| e.to_string())?;
    let cs = header::Header::needed_len(&first)?;
    let mut buf = vec![0u8; cs.min(len) as usize];
    let mut f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    f.read_exact(&mut buf).map_err(|e| e.to_string())?;
    header::Header::parse(&buf, len)
}

/// The internal snapshots of the qcow2 image in `path` (plain file I/O, like
/// [`read_header_file`]).
pub fn read_snapshots_file(path: &str) -> Result<Vec<image::Snapshot>, String> {
    use std::os::unix::fs::FileExt;
    let h = read_header_file(path)?;
    let f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let read = |off: u64, len: usize| -> Result<Vec<u8>, String> {
        let mut b = vec![0u8; len];
        f.read_exact_at(&mut b, off)
            .map_err(|e| format!("Could not read snapshots: {e}"))?;
        Ok(b)
    };
    let mut out = Vec::new();
    let mut off = h.snapshots_offset;
    for _ in 0..h.nb_snapshots {
        let fixed = read(off, 40)?;
        let rest = image::snapshot_rest_len(&fixed)?;
        let var = read(off + 40, rest as usize)?;
        out.push(image::parse_snapshot(&fixed, &var, &h)?);
        off += (40 + rest).div_ceil(8) * 8;
    }
    Ok(out)
}

/// Open the image at `path` read-only, read it all and check it, ignoring every error: what
/// the fuzz target and the mutation test run on hostile images (they must end, never panic).
pub fn exercise_image(path: &str) {
    use blockd_block::{Graph, Perm};
    let mut g = Graph::new();
    g.register_driver(driver_entry());
    let map = |s: String| blockd_block::options::parse(&s).ok();
    let Some(opts) = map(format!(
        "driver=qcow2,read-only=on,backing=,file.driver=file,file.filename={path}"
    )) else {
        return;
    };
    if let Ok(node) = g.open(opts) {
        let Ok(be) = g.new_backend("", &node, Perm::CONSISTENT_READ, Perm::ALL) else {
            return;
        };
        let len = node.length();
        let _ = blockd_aio::block_on(async {
            let mut off = 0u64;
            // At most 64 MiB of guest data: hostile sizes must not make this slow.
            while off < len.min(64 << 20) {
                let n = (len - off).min(1 << 20);
                let _ = be.read(off, blockd_aio::IoBuf::new(n as usize, 4096)).await;
                let _ = be.block_status(off, n).await;
                off += n;
            }
        });
        be.detach(&g);
    }
    if let Some(file) =
        map(format!("driver=file,read-only=on,filename={path}")).and_then(|o| g.open(o).ok())
    {
        let _ = blockd_aio::block_on(check(&file, Repair::None));
    }
}
