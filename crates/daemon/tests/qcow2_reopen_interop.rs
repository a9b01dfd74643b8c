//! blockdev-reopen of qcow2 nodes, driven by Python's qemu.qmp
//! (`tests/py/test_qcow2_reopen.py`): read-only toggles of an overlay and of its backing node
//! with monitor qemu-io writes in between, runtime options, options that cannot change, a
//! corrupt image refusing read-write; every reply compared with qemu-storage-daemon's; the
//! images pass qemu-img check and read back with qemu-io. Skipped loudly without python3 +
//! qemu.qmp + qemu-img/qemu-io unless BLOCKD_REQUIRE_INTEROP is set.

use std::path::Path;
use std::process::Command;

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn have_qemu_qmp() -> bool {
    Command::new("python3")
        .args(["-c", "import qemu.qmp"])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn qcow2_reopen_like_qemu() {
    let require = std::env::var_os("BLOCKD_REQUIRE_INTEROP").is_some();
    if !have_qemu_qmp() || !have("qemu-img") || !have("qemu-io") {
        assert!(
            !require,
            "python3 + qemu.qmp, qemu-img and qemu-io are required"
        );
        eprintln!("SKIPPED test_qcow2_reopen.py: python3/qemu.qmp/qemu-img/qemu-io missing");
        return;
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py");
    let mut cmd = Command::new("python3");
    cmd.arg(dir.join("test_qcow2_reopen.py"))
        .current_dir(&dir)
        .env("BLOCKD_DAEMON", env!("CARGO_BIN_EXE_blockd-storage-daemon"))
        .env("PYTHONDONTWRITEBYTECODE", "1");
    if have("qemu-storage-daemon") {
        cmd.env("QSD", "qemu-storage-daemon");
    } else {
        assert!(!require, "qemu-storage-daemon is required");
        eprintln!("NOTE test_qcow2_reopen.py: qemu-storage-daemon missing, comparison skipped");
    }
    let out = cmd.output().expect("run python3");
    assert!(
        out.status.success(),
        "test_qcow2_reopen.py failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
