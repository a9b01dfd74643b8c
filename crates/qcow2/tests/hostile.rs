//! One test per hostile-image class (shared/reference/hostile-inputs.md and issue 4): each
//! gives a clear error (QEMU's wording where QEMU refuses too), never a panic, a hang, a huge
//! allocation or a read of a host file the image names.

mod common;
use common::*;

use blockd_aio::block_on;

fn patch(path: &str, at: u64, bytes: &[u8]) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(bytes).unwrap();
}

/// A fresh 64 MiB qcow2 image (64 KiB clusters) made by blockd, so the test needs no QEMU.
fn fresh(dir: &TempDir, name: &str, opts: &[(&str, &str)]) -> String {
    let path = dir.path(name);
    std::fs::File::create(&path).unwrap();
    let mut kv: Vec<(String, String)> = vec![("size".into(), "64M".into())];
    kv.extend(opts.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let o = blockd_qcow2::CreateOptions::from_qemu_opts(&kv).unwrap();
    let mut g = blockd_block::Graph::new();
    let file = g
        .open(blockd_block::options::parse(&format!("driver=file,filename={path}")).unwrap())
        .unwrap();
    block_on(blockd_qcow2::create(&file, &o)).unwrap().unwrap();
    path
}

fn open_err(path: &str, extra: &str) -> String {
    let mut g = graph();
    match open_qcow2(&mut g, path, extra) {
        Ok(_) => panic!("{path} opened"),
        Err(e) => e,
    }
}

/// QEMU refuses the same image with the same message, when qemu-img is here.
fn qemu_agrees(path: &str, msg: &str) {
    if which("qemu-img") {
        let o = run("qemu-img", &["info", "-U", "-f", "qcow2", path]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success());
        assert!(err.contains(msg), "qemu-img says {err:?}, we say {msg:?}");
    }
}

fn which(tool: &str) -> bool {
    std::process::Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn truncated_header() {
    let dir = TempDir::new("h-trunc");
    let p = fresh(&dir, "t.qcow2", &[]);
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..50]).unwrap();
    // (The file node rounds its length up to a sector, so this reads as a zero-padded header.)
    let e = open_err(&p, "read-only=on");
    assert!(e.contains("qcow2 header"), "{e}");
    // Header fine but the file ends inside cluster 0's tables.
    std::fs::write(&p, &bytes[..100]).unwrap();
    let e = open_err(&p, "read-only=on");
    assert!(!e.is_empty());
}

#[test]
fn huge_l1_size() {
    let dir = TempDir::new("h-l1");
    let p = fresh(&dir, "t.qcow2", &[]);
    patch(&p, 36, &0x7fff_ffffu32.to_be_bytes());
    let e = open_err(&p, "read-only=on");
    assert_eq!(e, "Active L1 table too large");
    qemu_agrees(&p, &e);
    // A petabyte virtual size with a tiny L1: refused before any allocation.
    let p = fresh(&dir, "t2.qcow2", &[]);
    patch(&p, 24, &(1u64 << 50).to_be_bytes());
    let e = open_err(&p, "read-only=on");
    assert!(
        e == "Image is too big" || e == "L1 table is too small",
        "{e}"
    );
}

#[test]
fn table_offsets_past_the_file_or_over_the_header() {
    let dir = TempDir::new("h-off");
    let p = fresh(&dir, "a.qcow2", &[]);
    patch(&p, 40, &(1u64 << 40).to_be_bytes());
    let e = open_err(&p, "read-only=on");
    assert!(e.starts_with("Active L1 table offset invalid"), "{e}");
    let p = fresh(&dir, "b.qcow2", &[]);
    patch(&p, 48, &0u64.to_be_bytes());
    let e = open_err(&p, "read-only=on");
    assert_eq!(e, "Reference count table offset invalid");
    let p = fresh(&dir, "c.qcow2", &[]);
    patch(&p, 40, &0x1234u64.to_be_bytes());
    let e = open_err(&p, "read-only=on");
    assert_eq!(e, "Active L1 table offset invalid");
    qemu_agrees(&p, &e);
    let p = fresh(&dir, "d.qcow2", &[]);
    patch(&p, 60, &100_000u32.to_be_bytes());
    let e = open_err(&p, "read-only=on");
    assert_eq!(e, "Snapshot table too large");
    qemu_agrees(&p, &e);
}

#[test]
fn refcount_order_7_and_cluster_bits_30() {
    let dir = TempDir::new("h-bits");
    let p = fresh(&dir, "a.qcow2", &[]);
    patch(&p, 96, &7u32.to_be_bytes());
    let e = open_err(&p, "read-only=on");
    assert_eq!(
        e,
        "Reference count entry width too large; may not exceed 64 bits"
    );
    qemu_agrees(&p, &e);
    let p = fresh(&dir, "b.qcow2", &[]);
    patch(&p, 20, &30u32.to_be_bytes());
    let e = open_err(&p, "read-only=on");
    assert_eq!(e, "Unsupported cluster size: 2^30");
    qemu_agrees(&p, &e);
}

#[test]
fn unknown_incompatible_feature() {
    let dir = TempDir::new("h-feat");
    let p = fresh(&dir, "a.qcow2", &[]);
    patch(&p, 72, &(1u64 << 20).to_be_bytes());
    let e = open_err(&p, "read-only=on");
    assert_eq!(
        e,
        "Unsupported qcow2 feature(s): Unknown incompatible feature: 100000"
    );
    qemu_agrees(&p, &e);
}

#[test]
fn json_and_protocol_backing_names_are_refused() {
    let dir = TempDir::new("h-json");
    let secret = dir.path("secret.raw");
    std::fs::write(&secret, b"top secret").unwrap();
    for name in [
        format!(
            "json:{{\"driver\":\"raw\",\"file\":{{\"driver\":\"file\",\"filename\":\"{secret}\"}}}}"
        ),
        "nbd:localhost:10809".to_string(),
        "http://example.com/disk".to_string(),
        format!("file:{secret}"),
    ] {
        let p = fresh(
            &dir,
            "a.qcow2",
            &[("backing_file", &name), ("backing_fmt", "raw")],
        );
        let e = open_err(&p, "read-only=on");
        assert!(e.starts_with("Could not open backing file:"), "{name}: {e}");
        assert!(e.contains("refused"), "{name}: {e}");
    }
    // An explicit `backing` option overrides the stored name.
    let p = fresh(
        &dir,
        "b.qcow2",
        &[("backing_file", "nbd:x:1"), ("backing_fmt", "raw")],
    );
    let mut g = graph();
    assert!(open_qcow2(&mut g, &p, "read-only=on,backing=").is_ok());
}

#[test]
fn l2_entries_pointing_into_metadata() {
    let dir = TempDir::new("h-l2");
    let p = fresh(&dir, "a.qcow2", &[]);
    // Allocate cluster 0 of the guest, then point its L2 entry at the refcount table.
    let mut g = graph();
    let node = open_qcow2(&mut g, &p, "").unwrap();
    let be = backend(&g, &node);
    block_on(write(&be, 0, &[1u8; 512])).unwrap();
    be.detach(&g);
    drop(node);
    drop(g);
    let bytes = std::fs::read(&p).unwrap();
    let l1 = u64::from_be_bytes(bytes[40..48].try_into().unwrap()) as usize;
    let l2 = u64::from_be_bytes(bytes[l1..l1 + 8].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00;
    patch(&p, l2, &(0x1_0000u64 | 1 << 63).to_be_bytes());
    let mut g = graph();
    let node = open_qcow2(&mut g, &p, "").unwrap();
    let be = backend(&g, &node);
    let r = block_on(async {
        be.write(
            0,
            blockd_aio::IoBuf::from_slice(&[9u8; 512]),
            blockd_block::ReqFlags::NONE,
        )
        .await
        .0
    })
    .unwrap();
    assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EIO));
    // Marked corrupt: further writes refused, writable opens refused with QEMU's message.
    let r = block_on(async {
        be.write(
            1 << 20,
            blockd_aio::IoBuf::from_slice(&[9u8; 512]),
            blockd_block::ReqFlags::NONE,
        )
        .await
        .0
    })
    .unwrap();
    assert!(r.is_err());
    be.detach(&g);
    drop(node);
    drop(g);
    let after = std::fs::read(&p).unwrap();
    assert_eq!(
        after[65536..65536 + 16],
        bytes[65536..65536 + 16],
        "refcount table untouched"
    );
    let e = open_err(&p, "");
    assert_eq!(e, "qcow2: Image is corrupt; cannot be opened read/write");
    qemu_agrees_rw(&p, &e);
    // Read-only opens still work.
    let mut g = graph();
    assert!(open_qcow2(&mut g, &p, "read-only=on").is_ok());
}

fn qemu_agrees_rw(path: &str, msg: &str) {
    if which("qemu-io") {
        let o = run("qemu-io", &["-f", "qcow2", "-c", "read 0 512", path]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(msg), "qemu-io says {err:?}");
    }
}

#[test]
fn garbage_tables_never_crash_reads() {
    // Random L1 and L2 contents: reads either succeed or fail with EIO, never panic or hang.
    let dir = TempDir::new("h-garbage");
    let p = fresh(&dir, "a.qcow2", &[]);
    let mut g = graph();
    let node = open_qcow2(&mut g, &p, "").unwrap();
    let be = backend(&g, &node);
    block_on(async {
        for i in 0..8u64 {
            write(&be, i * (8 << 20), &[i as u8; 4096]).await;
        }
    })
    .unwrap();
    be.detach(&g);
    drop(node);
    drop(g);
    let bytes = std::fs::read(&p).unwrap();
    let l1 = u64::from_be_bytes(bytes[40..48].try_into().unwrap());
    let mut rng = Rng(99);
    for round in 0..30 {
        let mut b = bytes.clone();
        // Scribble over the L1 and the first L2 table.
        let l2 = (u64::from_be_bytes(b[l1 as usize..l1 as usize + 8].try_into().unwrap())
            & 0x00ff_ffff_ffff_fe00) as usize;
        for _ in 0..8 {
            let at = if rng.below(2) == 0 {
                l1 as usize + rng.below(8) as usize * 8
            } else {
                l2 + rng.below(16) as usize * 8
            };
            b[at..at + 8].copy_from_slice(&rng.next().to_be_bytes());
        }
        let q = dir.path(&format!("g{round}.qcow2"));
        std::fs::write(&q, &b).unwrap();
        let mut g = graph();
        if let Ok(node) = open_qcow2(&mut g, &q, "read-only=on") {
            let be = blockd_block::BlockBackend::new(
                &g,
                "",
                &node,
                blockd_block::Perm::CONSISTENT_READ,
                blockd_block::Perm::ALL,
            )
            .unwrap();
            block_on(async {
                for i in 0..8u64 {
                    let (_r, _) = be
                        .read(i * (8 << 20), blockd_aio::IoBuf::new(65536, 4096))
                        .await;
                    let _ = be.block_status(i * (8 << 20), 1 << 20).await;
                }
            })
            .unwrap();
        }
    }
}

/// A refcount table entry near 2^64 (found by the fuzzer: the check's bounds test overflowed):
/// the check reports the block outside the image, opening and reading end cleanly.
#[test]
fn refcount_block_offset_near_the_top_of_u64() {
    if !have("qemu-img") {
        return;
    }
    let dir = TempDir::new("hostile-rt");
    let path = dir.path("rt.qcow2");
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512",
            &path,
            "64k",
        ],
    );
    let h = blockd_qcow2::read_header_file(&path).unwrap();
    patch(
        &path,
        h.refcount_table_offset,
        &0xffff_ffff_ffff_fe00u64.to_be_bytes(),
    );
    blockd_qcow2::exercise_image(&path);
    let mut g = graph();
    let file = g
        .open(blockd_block::options::parse(&format!("driver=file,filename={path}")).unwrap())
        .unwrap();
    // The stored refcounts cannot be read: a clean error, as qemu-img's check fails too.
    let r = blockd_aio::block_on(blockd_qcow2::check(&file, blockd_qcow2::Repair::None)).unwrap();
    assert!(r.is_err(), "{r:?}");
    assert_ne!(run("qemu-img", &["check", &path]).status.code(), Some(0));
}
