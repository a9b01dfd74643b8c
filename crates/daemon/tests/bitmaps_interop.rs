//! Dirty bitmaps over QMP (`tests/py/test_bitmaps.py`), compared reply by reply with
//! qemu-storage-daemon: the six bitmap commands, x-debug-block-dirty-bitmap-sha256 after guest
//! writes through NBD, and the `dirty-bitmaps` of query-named-block-nodes. Skipped loudly
//! without python3 + qemu.qmp + qemu-img/qemu-io unless BLOCKD_REQUIRE_INTEROP is set.

mod common;

#[test]
fn bitmap_commands_match_qemu() {
    common::run_script("test_bitmaps.py");
}
