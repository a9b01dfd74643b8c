//! Lazy refcounts (`lazy_refcounts=on`): the first unordered metadata write sets the dirty bit,
//! a clean close clears it; a writer killed with SIGKILL leaves a dirty image that
//! `qemu-img check -r all` repairs and that blockd repairs on a writable open (both then clean
//! under `qemu-img check`, with flushed data intact).

mod common;
use common::*;

use std::process::{Command, Stdio};
use std::time::Duration;

use blockd_aio::block_on;
use blockd_block::ReqFlags;

const CHILD_ENV: &str = "BLOCKD_QCOW2_LAZY_CHILD";

fn dirty(path: &str) -> bool {
    let h = blockd_qcow2::read_header_file(path).unwrap();
    h.incompatible & blockd_qcow2::header::INCOMPAT_DIRTY != 0
}

#[test]
fn lazy_child() {
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return;
    };
    let mut g = graph();
    let node = open_qcow2(&mut g, &path, "").unwrap();
    let be = backend(&g, &node);
    block_on(async {
        let mut rng = Rng(std::process::id() as u64);
        for round in 0u64.. {
            let data = vec![(round % 251) as u8 + 1; 4096];
            write(&be, (round % 4096) * 4096 * 7 % (64 << 20), &data).await;
            let off = rng.below(64 << 20) / 512 * 512;
            match rng.below(4) {
                0 => be.discard(off, 65536).await.unwrap(),
                1 => be
                    .write_zeroes(off, 8192, ReqFlags::MAY_UNMAP)
                    .await
                    .unwrap(),
                _ => write(&be, off, &[0xee; 1536]).await,
            }
            if round % 16 == 15 {
                be.flush().await.unwrap();
                println!("durable {round}");
            }
        }
    })
    .unwrap();
}

/// qemu-img check, retried while the killed writer's ring still holds the lock.
fn check(args: &[&str]) -> std::process::Output {
    let mut o = run("qemu-img", args);
    for _ in 0..100 {
        if !String::from_utf8_lossy(&o.stderr).contains("Failed to get") {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
        o = run("qemu-img", args);
    }
    o
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
    let exe = std::env::current_exe().unwrap();
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
        let mut child = Command::new(&exe)
            .args(["--exact", "lazy_child", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, &path)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(200 + rng.below(400)));
        child.kill().unwrap();
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let durable = text
            .lines()
            .filter_map(|l| l.strip_prefix("durable "))
            .filter_map(|n| n.parse::<u64>().ok())
            .max();
        if dirty(&path) {
            dirty_runs += 1;
        }
        // qemu-img repairs a copy ...
        let copy = dir.path(&format!("c{round}-copy.qcow2"));
        std::fs::copy(&path, &copy).unwrap();
        let o = check(&["check", "-r", "all", &copy]);
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
            let off = ((r % 4096) * 4096 * 7 % (64 << 20)) as usize;
            let blk = &raw[off..off + 4096];
            let want = (r % 251) as u8 + 1;
            assert!(
                blk.contains(&want) || blk.iter().all(|&b| b == 0xee || b == 0),
                "run {round}: flushed round {r} lost"
            );
            assert_eq!(
                qemu_raw(&dir, &copy),
                raw,
                "round {round}: both repairs agree"
            );
        }
    }
    assert!(dirty_runs >= 2, "only {dirty_runs} runs left a dirty image");
}
