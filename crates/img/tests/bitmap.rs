//! `blockd-img bitmap` against `qemu-img bitmap` on identically prepared images (qcow2 images
//! whose bitmaps qemu-img added and qemu-io's writes marked): messages and exit codes of every
//! case, then the images: `qemu-img info` lists the same bitmaps (names, flags, granularity),
//! `qemu-img check` finds nothing wrong, and the dirty bits themselves, read through
//! `qemu-nbd -B` with `nbdinfo --map=qemu:dirty-bitmap:NAME`, are equal.

mod common;

use common::*;
use std::path::Path;
use std::process::Command;

fn prepare(d: &Path) {
    qemu(QEMU_IMG, "create -q -f qcow2 q.qcow2 10M", d);
    qemu(QEMU_IMG, "bitmap --add q.qcow2 b0", d);
    qemu(QEMU_IMG, "bitmap --add -g 4k q.qcow2 b1", d);
    qemu_io(d, "q.qcow2", &["write -P 1 100k 300k"]);
    qemu(QEMU_IMG, "bitmap --disable q.qcow2 b1", d);
    qemu_io(d, "q.qcow2", &["write -P 2 5M 64k", "write -z 8M 4k"]);
    qemu(QEMU_IMG, "create -q -f qcow2 s.qcow2 10M", d);
    qemu(QEMU_IMG, "bitmap --add -g 512 s.qcow2 sb", d);
    qemu_io(d, "s.qcow2", &["write -P 3 9M 1000"]);
    qemu(QEMU_IMG, "create -q -f qcow2 other.qcow2 20M", d);
    qemu(QEMU_IMG, "bitmap --add other.qcow2 ob", d);
    qemu(
        QEMU_IMG,
        "create -q -f qcow2 -o compat=0.10 v2.qcow2 10M",
        d,
    );
}

fn bitmaps_info(dir: &Path, img: &str) -> serde_json::Value {
    let o = run(QEMU_IMG, &["info", "--output=json", img], dir);
    assert_eq!(o.rc, 0, "qemu-img info {img}: {o:?}");
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    v["format-specific"]["data"]["bitmaps"].clone()
}

/// The dirty extents of bitmap `name` of `img`, as nbdinfo reads them from qemu-nbd -B.
fn dirty_map(dir: &Path, img: &str, name: &str) -> String {
    let out = Command::new("nbdinfo")
        .args([
            &format!("--map=qemu:dirty-bitmap:{name}"),
            "--",
            "[",
            "qemu-nbd",
            "-r",
            "-f",
            "qcow2",
            "-B",
            name,
            img,
            "]",
        ])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "nbdinfo {img} {name}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn have_nbd_tools() -> bool {
    let ok = Path::new("/usr/bin/nbdinfo").exists() && Path::new("/usr/bin/qemu-nbd").exists();
    if !ok {
        if std::env::var_os("BLOCKD_REQUIRE_INTEROP").is_some() {
            panic!("nbdinfo and qemu-nbd are required (BLOCKD_REQUIRE_INTEROP is set)");
        }
        eprintln!("SKIP: nbdinfo/qemu-nbd missing; bitmap contents not compared");
    }
    ok
}

#[test]
fn bitmap_matches_qemu_img() {
    if !have_qemu_img() {
        return;
    }
    let nbd = have_nbd_tools();
    let cases: &[&[&str]] = &[
        &["bitmap", "--add", "q.qcow2", "n"],
        &["bitmap", "--add", "-g", "64k", "--disable", "q.qcow2", "n"],
        &["bitmap", "--add", "-g", "0", "q.qcow2", "n"],
        &[
            "bitmap",
            "--add",
            "--merge",
            "b0",
            "--disable",
            "q.qcow2",
            "n",
        ],
        &["bitmap", "--remove", "q.qcow2", "b0"],
        &["bitmap", "--clear", "q.qcow2", "b0"],
        &["bitmap", "--enable", "q.qcow2", "b1"],
        &["bitmap", "--disable", "--enable", "q.qcow2", "b0"],
        &["bitmap", "--merge", "b0", "q.qcow2", "b1"],
        &[
            "bitmap", "--merge", "b1", "--clear", "--merge", "b1", "q.qcow2", "b0",
        ],
        &["bitmap", "--merge", "sb", "-b", "s.qcow2", "q.qcow2", "b1"],
        &[
            "bitmap", "--merge", "sb", "-b", "s.qcow2", "-F", "qcow2", "q.qcow2", "b0",
        ],
        &[
            "bitmap", "--add", "--merge", "sb", "-b", "s.qcow2", "q.qcow2", "x",
        ],
        &["bitmap", "--add", "--add", "q.qcow2", "b6"],
        &["bitmap", "--add", "-g", "512", "--remove", "q.qcow2", "b8"],
        // errors
        &["bitmap"],
        &["bitmap", "q.qcow2", "b0"],
        &["bitmap", "--add", "q.qcow2"],
        &["bitmap", "--add", "q.qcow2", "a", "b"],
        &["bitmap", "-g", "1024", "q.qcow2", "b"],
        &["bitmap", "-g", "1024", "--remove", "q.qcow2", "b0"],
        &["bitmap", "--add", "-g", "1000", "q.qcow2", "b"],
        &["bitmap", "--add", "-g", "4G", "q.qcow2", "b"],
        &["bitmap", "--add", "-g", "abc", "q.qcow2", "b"],
        &["bitmap", "--add", "q.qcow2", "b0"],
        &["bitmap", "--add", "q.qcow2", ""],
        &["bitmap", "--remove", "q.qcow2", "nope"],
        &["bitmap", "--clear", "q.qcow2", "nope"],
        &["bitmap", "--enable", "q.qcow2", "nope"],
        &["bitmap", "--merge", "nope", "q.qcow2", "b0"],
        &["bitmap", "--merge", "b0", "q.qcow2", "nope"],
        &[
            "bitmap",
            "--merge",
            "ob",
            "-b",
            "other.qcow2",
            "q.qcow2",
            "b0",
        ],
        &["bitmap", "--merge", "b0", "-b", "s.qcow2", "q.qcow2", "b1"],
        &["bitmap", "-b", "s.qcow2", "--add", "q.qcow2", "b"],
        &["bitmap", "-F", "qcow2", "--add", "q.qcow2", "b"],
        &[
            "bitmap",
            "--image-opts",
            "-f",
            "qcow2",
            "--add",
            "q.qcow2",
            "b",
        ],
        &["bitmap", "--add", "nonexist.qcow2", "b"],
        &["bitmap", "--bogus", "q.qcow2", "b"],
        &["bitmap", "--help"],
    ];
    for (i, args) in cases.iter().enumerate() {
        let (q, b) = both_args(&format!("bitmap{i}"), args, prepare);
        for img in ["q.qcow2", "s.qcow2"] {
            assert_eq!(
                bitmaps_info(&b, img),
                bitmaps_info(&q, img),
                "{args:?}: bitmaps of {img} (blockd-img left)"
            );
            let o = run(QEMU_IMG, &["check", img], &b);
            assert_eq!(o.rc, 0, "{args:?}: qemu-img check {img}: {o:?}");
            if nbd {
                let info = bitmaps_info(&b, img);
                for bm in info.as_array().into_iter().flatten() {
                    let name = bm["name"].as_str().unwrap();
                    assert_eq!(
                        dirty_map(&b, img, name),
                        dirty_map(&q, img, name),
                        "{args:?}: dirty bits of {img} bitmap {name} (blockd-img left)"
                    );
                }
            }
        }
        cleanup((q, b));
    }
    // The node name in this message is QEMU's internal counter ("#block152"): compared apart.
    let (q, b) = (scratch("bitmap-v2-q"), scratch("bitmap-v2-b"));
    prepare(&q);
    prepare(&b);
    let args = ["bitmap", "--add", "v2.qcow2", "b"];
    let (oq, ob) = (run(QEMU_IMG, &args, &q), run(BLOCKD_IMG, &args, &b));
    let unnumbered = |s: &str| {
        let i = s.find("'#block").map(|i| i + 7).unwrap_or(0);
        let j = s[i..].find('\'').map_or(i, |j| i + j);
        format!("{}{}", &s[..i], &s[j..])
    };
    assert_eq!(
        (ob.rc, unnumbered(&ob.stderr)),
        (oq.rc, unnumbered(&oq.stderr))
    );
    assert!(
        ob.stderr
            .contains("Cannot store dirty bitmaps in qcow2 v2 files")
    );
    cleanup((q, b));
}

/// `info` of images with bitmaps (enabled, disabled, several granularities) prints the
/// `bitmaps` list exactly as qemu-img does, in text and in JSON.
#[test]
fn info_lists_bitmaps_as_qemu_img() {
    if !have_qemu_img() {
        return;
    }
    let d = scratch("bitmap-info");
    prepare(&d);
    for img in ["q.qcow2", "s.qcow2", "other.qcow2", "v2.qcow2"] {
        let q = run(QEMU_IMG, &["info", img], &d);
        let b = run(BLOCKD_IMG, &["info", img], &d);
        assert_eq!((b.rc, &b.stdout), (q.rc, &q.stdout), "info {img}");
        let spec = |o: &str| -> serde_json::Value {
            serde_json::from_str::<serde_json::Value>(o).unwrap()["format-specific"].clone()
        };
        let q = run(QEMU_IMG, &["info", "--output=json", img], &d);
        let b = run(BLOCKD_IMG, &["info", "--output=json", img], &d);
        assert_eq!(spec(&b.stdout), spec(&q.stdout), "info --output=json {img}");
    }
    let _ = std::fs::remove_dir_all(&d);
}
