//! Running one of the Python scripts in `tests/py/` against blockd-storage-daemon (shared by
//! every test binary here). Without python3 + qemu.qmp, qemu-img or qemu-io the script is
//! skipped loudly, unless BLOCKD_REQUIRE_INTEROP is set, which makes a missing tool a failure.
//! qemu-storage-daemon is required the same way; without it the scripts skip their comparisons.

use std::path::Path;
use std::process::Command;

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

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

/// Run `tests/py/<name>`; it exits non-zero with a list of its failed checks.
pub fn run_script(name: &str) {
    if !have_qemu_qmp() || !have("qemu-img") || !have("qemu-io") {
        if require() {
            panic!(
                "python3 with qemu.qmp, qemu-img and qemu-io are required (BLOCKD_REQUIRE_INTEROP is set)"
            );
        }
        eprintln!(
            "SKIPPED {name}: python3/qemu.qmp (pip install qemu.qmp), qemu-img or qemu-io missing"
        );
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
