//! Images made by qemu-img and qemu-io read back through blockd byte for byte (compared with
//! `qemu-img convert -O raw`), across cluster sizes, refcount widths, versions, extended L2,
//! compression (zlib, zstd), zero clusters and backing chains with relative names.

mod common;
use common::*;

use blockd_aio::block_on;

/// qemu-io commands that leave data, zero clusters (plain and preallocated), discarded
/// clusters and unaligned pieces.
fn fill(image: &str, cs: u64, size: u64) {
    let c = |s: String| s;
    let cmds = [
        c(format!("write -P 0x11 0 {}", cs * 3)),
        c(format!("write -P 0x22 {} 777", cs * 5 + 100)),
        c(format!("write -P 0x33 {} {}", 2 << 20, cs * 2 + 4096)),
        c(format!("write -z {} {}", cs, cs)),
        c(format!("write -z -u {} {}", 2 << 20, cs)),
        c(format!("discard {} {}", cs * 2, cs)),
        c(format!("write -P 0x44 {} 4096", size - 4096)),
        c("write -P 0x55 1000 10".to_string()),
    ];
    let mut args = vec!["-f", "qcow2"];
    for x in &cmds {
        args.push("-c");
        args.push(x);
    }
    args.push(image);
    ok("qemu-io", &args);
}

fn compare(dir: &TempDir, image: &str, what: &str) {
    let want = qemu_raw(dir, image);
    let mut g = graph();
    let node = open_qcow2(&mut g, image, "read-only=on").unwrap_or_else(|e| panic!("{what}: {e}"));
    let be = backend_ro(&g, &node);
    let got = block_on(read_all(&be)).unwrap();
    assert_eq!(got.len(), want.len(), "{what}: length");
    assert!(
        first_diff(&got, &want).is_none(),
        "{what}: first difference at {:?}",
        first_diff(&got, &want)
    );
}

fn backend_ro(
    g: &blockd_block::Graph,
    node: &std::sync::Arc<blockd_block::Node>,
) -> blockd_block::BlockBackend {
    blockd_block::BlockBackend::new(
        g,
        "",
        node,
        blockd_block::Perm::CONSISTENT_READ,
        blockd_block::Perm::ALL,
    )
    .unwrap()
}

#[test]
fn qemu_images_read_back_identically() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let dir = TempDir::new("matrix");
    let mut cases: Vec<String> = Vec::new();
    for cs in [512u64, 4096, 65536, 2 << 20] {
        for rb in [1, 16, 64] {
            cases.push(format!("cluster_size={cs},refcount_bits={rb}"));
        }
        cases.push(format!("cluster_size={cs},compat=0.10"));
        if cs >= 16384 {
            cases.push(format!("cluster_size={cs},extended_l2=on"));
        }
    }
    for (i, o) in cases.iter().enumerate() {
        let img = dir.path(&format!("m{i}.qcow2"));
        let cs: u64 = o.split(',').next().unwrap()[13..].parse().unwrap();
        let size = (6u64 << 20).max(cs * 8);
        ok(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                o,
                &img,
                &size.to_string(),
            ],
        );
        fill(&img, cs, size);
        compare(&dir, &img, o);
    }
}

#[test]
fn compressed_images_read_back_identically() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let dir = TempDir::new("compressed");
    let src = dir.path("src.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", &src, "5M"]);
    // Compressible and incompressible data.
    ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x61 0 1M",
            "-c",
            "write -P 0x62 3M 100k",
            &src,
        ],
    );
    let rnd = dir.path("rnd.raw");
    let mut rng = Rng(7);
    let bytes: Vec<u8> = (0..(1 << 20)).map(|_| rng.next() as u8).collect();
    std::fs::write(&rnd, &bytes).unwrap();
    ok("qemu-io", &["-f", "qcow2", "-c", "write -P 0 1M 1M", &src]);
    let raw = dir.path("full.raw");
    ok("qemu-img", &["convert", "-O", "raw", &src, &raw]);
    // Random bytes in the middle.
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new().write(true).open(&raw).unwrap();
        f.seek(SeekFrom::Start(1 << 20)).unwrap();
        f.write_all(&bytes).unwrap();
    }
    for ty in ["zlib", "zstd"] {
        for cs in ["4096", "65536", "2M"] {
            let img = dir.path(&format!("c-{ty}-{cs}.qcow2"));
            ok(
                "qemu-img",
                &[
                    "convert",
                    "-c",
                    "-O",
                    "qcow2",
                    "-o",
                    &format!("compression_type={ty},cluster_size={cs}"),
                    &raw,
                    &img,
                ],
            );
            compare(&dir, &img, &format!("compressed {ty} {cs}"));
        }
    }
}

#[test]
fn backing_chain_with_relative_names() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let dir = TempDir::new("chain");
    std::fs::create_dir_all(dir.0.join("sub")).unwrap();
    let base = dir.path("sub/base.raw");
    let mid = dir.path("sub/mid.qcow2");
    let top = dir.path("top.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "raw", &base, "4M"]);
    ok("qemu-io", &["-f", "raw", "-c", "write -P 0xaa 0 4M", &base]);
    // mid names base relative to its own directory; no format extension: probed.
    ok(
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", &mid, "6M",
        ],
    );
    ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0xbb 64k 100k",
            "-c",
            "write -z 1M 64k",
            "-c",
            "discard 2M 64k",
            &mid,
        ],
    );
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "sub/mid.qcow2",
            "-F",
            "qcow2",
            &top,
        ],
    );
    ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0xcc 100k 5000",
            "-c",
            "write -P 0xdd 5M 64k",
            &top,
        ],
    );
    compare(&dir, &top, "chain");
    compare(&dir, &mid, "mid");
    // Without the backing-format extension, the backing format is probed.
    let probed = dir.path("probed.qcow2");
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "top.qcow2",
            "-F",
            "qcow2",
            &probed,
        ],
    );
    // Turn the backing-format extension (right after the 112-byte header) into an unknown one.
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&probed)
            .unwrap();
        f.seek(SeekFrom::Start(112)).unwrap();
        f.write_all(&0x1234_5678u32.to_be_bytes()).unwrap();
    }
    let info = ok("qemu-img", &["info", "-U", &probed]);
    assert!(!info.contains("backing file format"), "{info}");
    compare(&dir, &probed, "probed");
    // backing: null hides the chain.
    let mut g = graph();
    let node = open_qcow2(&mut g, &top, "read-only=on,backing=").unwrap();
    assert!(node.child("backing").is_none());
}
