//! Drives blockd-storage-daemon with Python's qemu.qmp (the library QEMU's own tests use) and
//! raw sockets; compares with qemu-storage-daemon where it has the same behaviour. The Python
//! scripts are in `tests/py/` (each exits non-zero with a list of failed checks).
//!
//! Without python3 + qemu.qmp the tests are skipped loudly, unless BLOCKD_REQUIRE_INTEROP is
//! set, which makes a missing tool a failure. qemu-storage-daemon is optional the same way
//! (without it the comparisons are skipped inside the scripts).

use std::path::Path;
use std::process::Command;

fn require() -> bool {
    std::env::var_os("BLOCKD_REQUIRE_INTEROP").is_some()
}

fn have_qemu_qmp() -> bool {
    Command::new("python3")
        .args(["-c", "import qemu.qmp"])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn qsd() -> Option<String> {
    let out = Command::new("sh")
        .args(["-c", "command -v qemu-storage-daemon"])
        .output()
        .ok()?;
    let p = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (!p.is_empty()).then_some(p)
}

fn run_script(name: &str) {
    if !have_qemu_qmp() {
        if require() {
            panic!("python3 with qemu.qmp is required (BLOCKD_REQUIRE_INTEROP is set)");
        }
        eprintln!("SKIPPED {name}: python3 or qemu.qmp missing (pip install qemu.qmp)");
        return;
    }
    let qsd = qsd();
    if qsd.is_none() {
        if require() {
            panic!("qemu-storage-daemon is required (BLOCKD_REQUIRE_INTEROP is set)");
        }
        eprintln!("NOTE {name}: qemu-storage-daemon missing, comparisons skipped");
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py");
    let mut cmd = Command::new("python3");
    cmd.arg(dir.join(name))
        .current_dir(&dir)
        .env("BLOCKD_DAEMON", env!("CARGO_BIN_EXE_blockd-storage-daemon"))
        .env("PYTHONDONTWRITEBYTECODE", "1");
    if let Some(q) = qsd {
        cmd.env("QSD", q);
    }
    let out = cmd.output().expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{name} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
}

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
