//! A writer killed with SIGKILL at random points while allocating (this test binary run again
//! as the writer): afterwards `qemu-img check` finds no corruption (leaks are acceptable), and
//! every write that was flushed before the kill reads back.

mod common;
use common::*;

use common::crash::{assert_round_survived, kill_writer_after, qemu_img_after_kill, writer};

const CHILD_ENV: &str = "BLOCKD_QCOW2_CRASH_CHILD";

/// The writer (see `common/crash.rs`), when this binary runs as the child.
#[test]
fn crash_child() {
    if let Ok(path) = std::env::var(CHILD_ENV) {
        writer(&path);
    }
}

#[test]
fn sigkill_while_allocating_leaves_no_corruption() {
    if !have("qemu-img") {
        return;
    }
    let dir = TempDir::new("crash");
    let mut rng = Rng(1234);
    let mut flushed_runs = 0;
    for round in 0..6 {
        let path = dir.path(&format!("c{round}.qcow2"));
        let list = if round % 2 == 0 {
            "cluster_size=4096"
        } else {
            "cluster_size=65536,extended_l2=on"
        };
        ok(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-o", list, &path, "64M"],
        );
        let durable = kill_writer_after("crash_child", CHILD_ENV, &path, 150 + rng.below(400));
        let o = qemu_img_after_kill(&["check", &path]);
        let code = o.status.code().unwrap();
        assert!(
            code == 0 || code == 3,
            "round {round}: qemu-img check exit {code}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        // -r leaks makes it clean.
        let fixed = run("qemu-img", &["check", "-r", "leaks", &path]);
        assert!(fixed.status.success());
        if let Some(r) = durable {
            flushed_runs += 1;
            assert_round_survived(&qemu_raw(&dir, &path), r, &format!("run {round}"));
        }
    }
    // The writer got far enough to flush in most runs (else the test proves little).
    assert!(
        flushed_runs >= 3,
        "only {flushed_runs} runs flushed before the kill"
    );
}
