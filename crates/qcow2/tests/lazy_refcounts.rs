//! Lazy refcounts (`lazy_refcounts=on`): the first unordered metadata write sets the dirty bit,
//! a clean close clears it; a writer killed with SIGKILL leaves a dirty image that
//! `qemu-img check -r all` repairs and that blockd repairs on a writable open (both then clean
//! under `qemu-img check`, with flushed data intact).

mod common;
use common::*;

use blockd_aio::block_on;
use common::crash::{assert_round_survived, kill_writer_after, qemu_img_after_kill, writer};

const CHILD_ENV: &str = "BLOCKD_QCOW2_LAZY_CHILD";

fn dirty(path: &str) -> bool {
    let h = blockd_qcow2::read_header_file(path).unwrap();
    h.incompatible & blockd_qcow2::header::INCOMPAT_DIRTY != 0
}

/// The writer (see `common/crash.rs`), when this binary runs as the child.
#[test]
fn lazy_child() {
    if let Ok(path) = std::env::var(CHILD_ENV) {
        writer(&path);
    }
}

#[test]
fn clean_close_clears_the_dirty_bit() {
    if !have("qemu-img") {
        return;
    }
    let dir = TempDir::new("lazy-close");
    let path = dir.path("l.qcow2");
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on",
            &path,
            "16M",
        ],
    );
    let mut g = graph();
    let node = open_qcow2(&mut g, &path, "").unwrap();
    let be = backend(&g, &node);
    block_on(async {
        write(&be, 0, &[1; 65536]).await;
        be.flush().await.unwrap();
    })
    .unwrap();
    assert!(
        dirty(&path),
        "an allocating write with lazy refcounts sets the bit"
    );
    block_on(async {
        write(&be, 8 << 20, &[2; 4096]).await;
    })
    .unwrap();
    be.detach(&g);
    drop(node);
    drop(g);
    assert!(!dirty(&path), "a clean close clears it");
    qemu_check_clean(&path);
    let raw = qemu_raw(&dir, &path);
    assert!(raw[..65536].iter().all(|&b| b == 1));
    assert!(raw[8 << 20..(8 << 20) + 4096].iter().all(|&b| b == 2));
    // The option turns them off for an open: no dirty bit then.
    let mut g = graph();
    let node = open_qcow2(&mut g, &path, "lazy-refcounts=off").unwrap();
    let be = backend(&g, &node);
    block_on(async {
        write(&be, 4 << 20, &[3; 65536]).await;
        be.flush().await.unwrap();
    })
    .unwrap();
    assert!(!dirty(&path));
    be.detach(&g);
}

#[test]
fn sigkill_with_lazy_refcounts_is_repaired() {
    if !have("qemu-img") {
        return;
    }
    let dir = TempDir::new("lazy-crash");
    let mut rng = Rng(99);
    let mut dirty_runs = 0;
    for round in 0..4 {
        let path = dir.path(&format!("c{round}.qcow2"));
        let list = if round % 2 == 0 {
            "cluster_size=4096,lazy_refcounts=on"
        } else {
            "cluster_size=65536,lazy_refcounts=on,extended_l2=on"
        };
        ok(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-o", list, &path, "64M"],
        );
        let durable = kill_writer_after("lazy_child", CHILD_ENV, &path, 200 + rng.below(400));
        if dirty(&path) {
            dirty_runs += 1;
        }
        // qemu-img repairs a copy ...
        let copy = dir.path(&format!("c{round}-copy.qcow2"));
        std::fs::copy(&path, &copy).unwrap();
        let o = qemu_img_after_kill(&["check", "-r", "all", &copy]);
        assert!(
            o.status.code() == Some(0),
            "round {round}: qemu-img check -r all: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        qemu_check_clean(&copy);
        // ... and blockd repairs the original on a writable open.
        {
            let mut g = graph();
            let node = open_qcow2(&mut g, &path, "").unwrap();
            drop(node);
            drop(g);
        }
        assert!(!dirty(&path), "round {round}: still dirty after the repair");
        qemu_check_clean(&path);
        if let Some(r) = durable {
            let raw = qemu_raw(&dir, &path);
            assert_round_survived(&raw, r, &format!("run {round}"));
            assert_eq!(
                qemu_raw(&dir, &copy),
                raw,
                "round {round}: both repairs agree"
            );
        }
    }
    assert!(dirty_runs >= 2, "only {dirty_runs} runs left a dirty image");
}
