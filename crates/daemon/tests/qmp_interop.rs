//! Drives blockd-storage-daemon with Python's qemu.qmp (the library QEMU's own tests use) and
//! raw sockets; compares with qemu-storage-daemon where it has the same behaviour. The Python
//! scripts are in `tests/py/` (each exits non-zero with a list of failed checks).
//!
//! Without python3 + qemu.qmp the tests are skipped loudly, unless BLOCKD_REQUIRE_INTEROP is
//! set, which makes a missing tool a failure. qemu-storage-daemon is optional the same way
//! (without it the comparisons are skipped inside the scripts).

mod common;

use common::run_script;

#[test]
fn commands_negotiation_errors_events() {
    run_script("test_commands.py");
}

#[test]
fn libvirt_style_raw_client_and_parse_errors() {
    run_script("test_libvirt.py");
}

#[test]
fn hostile_input_on_one_monitor() {
    run_script("test_bad_input.py");
}

#[test]
fn command_line_pidfile_daemonize_signals() {
    run_script("test_process.py");
}

#[test]
fn iothread_io_seed_scenario_and_200_moves() {
    run_script("test_iothread_io.py");
}

#[test]
fn nbd_exports_through_the_monitor() {
    run_script("test_nbd_exports.py");
}

#[test]
fn blockdev_reopen_of_nodes_in_use() {
    run_script("test_reopen.py");
}

#[test]
fn block_io_error_and_set_iothread_of_exports() {
    run_script("test_io_error.py");
}
