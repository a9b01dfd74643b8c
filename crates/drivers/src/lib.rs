//! The graph the programs use: blockd-block's built-in drivers (file, raw, null) plus the
//! drivers that live in their own crates, each registered here with one line.
#![forbid(unsafe_code)]

use blockd_block::Graph;

/// Register every driver blockd has on `graph`.
pub fn register_all(graph: &mut Graph) {
    graph.register_driver(blockd_qcow2::driver_entry());
    blockd_nbd::client::register(graph);
}

/// A new graph that can open every driver blockd has.
pub fn graph() -> Graph {
    let mut g = Graph::new();
    register_all(&mut g);
    g
}
