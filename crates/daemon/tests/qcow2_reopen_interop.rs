//! blockdev-reopen of qcow2 nodes, driven by Python's qemu.qmp
//! (`tests/py/test_qcow2_reopen.py`): read-only toggles of an overlay and of its backing node
//! with monitor qemu-io writes in between, runtime options, options that cannot change, a
//! corrupt image refusing read-write; every reply compared with qemu-storage-daemon's; the
//! images pass qemu-img check and read back with qemu-io. Skipped loudly without python3 +
//! qemu.qmp + qemu-img/qemu-io unless BLOCKD_REQUIRE_INTEROP is set.

mod common;

#[test]
fn qcow2_reopen_like_qemu() {
    common::run_script("test_qcow2_reopen.py");
}
