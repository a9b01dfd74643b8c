//! BLOCK_IMAGE_CORRUPTED from a qcow2 node, driven by Python's qemu.qmp
//! (`tests/py/test_qcow2_corrupt.py`): a write through a writable NBD export lands on an L2
//! entry that points into the L1 table; the event reaches every monitor once with `fatal: true`
//! and QEMU's data, the node refuses further writes and the corrupt bit is on disk; the event
//! data is compared with qemu-storage-daemon's. Skipped loudly without python3 + qemu.qmp +
//! qemu-img/qemu-io unless BLOCKD_REQUIRE_INTEROP is set.

mod common;

#[test]
fn qcow2_corruption_event_like_qemu() {
    common::run_script("test_qcow2_corrupt.py");
}
