//! BLOCK_IMAGE_CORRUPTED from a qcow2 node, driven by Python's qemu.qmp
//! (`tests/py/test_qcow2_corrupt.py`): a write through a writable NBD export lands on an L2
//! entry that points into the L1 table; the event reaches every monitor once with `fatal: true`
//! and QEMU's data, the node refuses further writes and the corrupt bit is on disk; the event
//! data is compared with qemu-storage-daemon's. Skipped loudly without python3 + qemu.qmp +
//! qemu-img/qemu-io unless BLOCKD_REQUIRE_INTEROP is set.

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
fn qcow2_corruption_event_like_qemu() {
    let require = std::env::var_os("BLOCKD_REQUIRE_INTEROP").is_some();
    if !have_qemu_qmp() || !have("qemu-img") || !have("qemu-io") {
        assert!(
            !require,
            "python3 + qemu.qmp, qemu-img and qemu-io are required"
        );
        eprintln!("SKIPPED test_qcow2_corrupt.py: python3/qemu.qmp/qemu-img/qemu-io missing");
        return;
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py");
    let mut cmd = Command::new("python3");
    cmd.arg(dir.join("test_qcow2_corrupt.py"))
        .current_dir(&dir)
        .env("BLOCKD_DAEMON", env!("CARGO_BIN_EXE_blockd-storage-daemon"))
        .env("PYTHONDONTWRITEBYTECODE", "1");
    if have("qemu-storage-daemon") {
        cmd.env("QSD", "qemu-storage-daemon");
    } else {
        assert!(!require, "qemu-storage-daemon is required");
        eprintln!("NOTE test_qcow2_corrupt.py: qemu-storage-daemon missing, comparison skipped");
    }
    let out = cmd.output().expect("run python3");
    assert!(
        out.status.success(),
        "test_qcow2_corrupt.py failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
