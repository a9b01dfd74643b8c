//! Allocation progress of guest writes, for callers that keep the host layout of writes made
//! in order while letting them overlap (qemu-img convert's in-order writes into a new image):
//! the next write may start once the previous one has taken its host clusters.

use blockd_block::Node;

use crate::backing_name::qcow2_of;

/// Whether the guest cluster holding byte `guest` of the qcow2 image open in `node` has just
/// been given a new host cluster whose data is still being written (its L2 entry follows when
/// the data lands). False for other nodes and for clusters not being allocated.
pub fn cluster_in_flight(node: &Node, guest: u64) -> bool {
    let Some(q) = qcow2_of(node) else {
        return false;
    };
    let img = &q.image;
    let c = guest >> img.geo.cluster_bits;
    img.meta().inflight.contains(&c)
}
