//! The drivers, one module each, and opening one by name.

pub mod copy_on_read;
pub mod file;
pub mod null;
pub mod raw;

use std::sync::Arc;

use crate::driver::BlockDriver;
use crate::graph::{Graph, OpenFlags};
use crate::node::Child;
use crate::options::Opts;

/// What a driver's open produced.
pub struct Opened {
    pub driver: Box<dyn BlockDriver>,
    pub children: Vec<Child>,
    pub length: u64,
}

/// Names of the drivers built into this crate (others register with
/// [`Graph::register_driver`]).
pub const DRIVERS: &[&str] = &[
    "file",
    "host_device",
    "raw",
    "null-co",
    "null-aio",
    "copy-on-read",
];

/// A driver's open: the graph (to open or look up children), the driver name it was opened
/// under, its options (take what you use; the rest is an error) and the inherited flags.
pub type OpenFn = fn(&mut Graph, &str, &mut Opts, OpenFlags) -> Result<Opened, String>;

/// A format's probe: a score (0 = not this format, 100 = certain) for the first bytes of an
/// image (up to 2048) and its file name, as QEMU's `bdrv_probe`.
pub type ProbeFn = fn(header: &[u8], filename: &str) -> u32;

/// One entry of a graph's driver registry.
#[derive(Clone, Copy)]
pub struct DriverEntry {
    pub name: &'static str,
    pub open: OpenFn,
    pub probe: Option<ProbeFn>,
}

fn open_file(_g: &mut Graph, d: &str, o: &mut Opts, f: OpenFlags) -> Result<Opened, String> {
    file::open(d, o, f)
}

fn open_null(_g: &mut Graph, d: &str, o: &mut Opts, _f: OpenFlags) -> Result<Opened, String> {
    null::open(d, o)
}

fn open_raw(g: &mut Graph, _d: &str, o: &mut Opts, f: OpenFlags) -> Result<Opened, String> {
    raw::open(g, o, f)
}

fn open_cor(g: &mut Graph, _d: &str, o: &mut Opts, f: OpenFlags) -> Result<Opened, String> {
    copy_on_read::open(g, o, f)
}

/// The drivers every graph starts with.
pub(crate) fn builtin() -> Vec<DriverEntry> {
    let e = |name, open| DriverEntry {
        name,
        open,
        probe: None,
    };
    vec![
        e("file", open_file),
        e("host_device", open_file),
        e("raw", open_raw),
        e("null-co", open_null),
        e("null-aio", open_null),
        e("copy-on-read", open_cor),
    ]
}

/// Open a child and keep an edge to it.
pub fn child_edge(
    name: &str,
    node: Arc<crate::node::Node>,
    perm: crate::perm::Perm,
    shared: crate::perm::Perm,
) -> Child {
    Child {
        name: name.to_string(),
        node,
        perm,
        shared,
    }
}
