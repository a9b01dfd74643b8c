//! The drivers, one module each, and opening one by name.

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

/// Names of the drivers blockd has.
pub const DRIVERS: &[&str] = &["file", "host_device", "raw", "null-co", "null-aio"];

pub(crate) fn open(
    graph: &mut Graph,
    driver: &str,
    o: &mut Opts,
    flags: OpenFlags,
) -> Result<Opened, String> {
    match driver {
        "file" | "host_device" => file::open(driver, o, flags),
        "null-co" | "null-aio" => null::open(driver, o),
        "raw" => raw::open(graph, o, flags),
        other => Err(format!("Unknown driver '{other}'")),
    }
}

/// Open a child and keep an edge to it.
pub(crate) fn child_edge(
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
