//! `blockd-nbd -B NAME` against `qemu-nbd -B NAME` on the same qcow2 image (persistent bitmaps
//! added by qemu-img, marked by qemu-io's writes): `nbdinfo --map=qemu:dirty-bitmap:NAME`
//! prints the same extents (whole and with `--totals`), read-only and writable, and
//! `nbdinfo --list` the same meta contexts; the refusals (an unknown bitmap, a recording
//! bitmap on a read-only export of a writable node) match qemu-nbd's exit status.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_blockd-nbd");

fn have(tool: &str) -> bool {
    let ok = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        if std::env::var_os("BLOCKD_REQUIRE_INTEROP").is_some() {
            panic!("{tool} is required (BLOCKD_REQUIRE_INTEROP is set)");
        }
        eprintln!("SKIP: {tool} missing; blockd-nbd -B not compared");
    }
    ok
}

fn sh(dir: &Path, args: &[&str]) -> Output {
    let o = Command::new(args[0])
        .args(&args[1..])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{args:?}: {o:?}");
    o
}

fn scratch() -> PathBuf {
    let d = std::env::temp_dir().join(format!("blockd-nbd-bitmaps-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// nbdinfo's output (and exit status) for a server started by socket activation.
fn nbdinfo(dir: &Path, info_args: &[&str], server: &str, server_args: &[&str]) -> (bool, String) {
    let mut args: Vec<&str> = info_args.to_vec();
    args.extend(["--", "[", server]);
    args.extend(server_args);
    args.push("]");
    let o = Command::new("nbdinfo")
        .args(&args)
        .current_dir(dir)
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
    )
}

#[test]
fn dirty_bitmap_contexts_match_qemu_nbd() {
    if !have("nbdinfo") || !have("qemu-nbd") || !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let d = scratch();
    sh(
        &d,
        &["qemu-img", "create", "-q", "-f", "qcow2", "n.qcow2", "10M"],
    );
    sh(&d, &["qemu-img", "bitmap", "--add", "n.qcow2", "b0"]);
    sh(
        &d,
        &["qemu-img", "bitmap", "--add", "-g", "512", "n.qcow2", "b1"],
    );
    sh(&d, &["qemu-img", "bitmap", "--add", "n.qcow2", "empty"]);
    sh(
        &d,
        &[
            "qemu-io",
            "-c",
            "write -P 1 100k 300k",
            "-c",
            "write -z 5M 4k",
            "-c",
            "write 9M 1000",
            "-c",
            "write 10239k 1k",
            "n.qcow2",
        ],
    );
    sh(&d, &["qemu-img", "bitmap", "--disable", "n.qcow2", "b1"]);
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["--map=qemu:dirty-bitmap:b0"],
            &["-f", "qcow2", "-B", "b0", "n.qcow2"],
        ),
        (
            &["--map=qemu:dirty-bitmap:b0"],
            &["-r", "-f", "qcow2", "-B", "b0", "n.qcow2"],
        ),
        (
            &["--map=qemu:dirty-bitmap:b1"],
            &["-r", "-f", "qcow2", "-B", "b1", "n.qcow2"],
        ),
        (
            &["--map=qemu:dirty-bitmap:b1", "--totals"],
            &["-f", "qcow2", "-B", "b1", "n.qcow2"],
        ),
        (
            &["--map=qemu:dirty-bitmap:empty"],
            &["-f", "qcow2", "-B", "empty", "n.qcow2"],
        ),
        (
            &["--map=qemu:dirty-bitmap:b1"],
            &["-f", "qcow2", "-B", "b0", "-B", "b1", "n.qcow2"],
        ),
        (
            &["--list"],
            &[
                "-f", "qcow2", "-B", "b0", "-B", "b1", "-B", "empty", "n.qcow2",
            ],
        ),
        // refusals: the server does not start
        (
            &["--map=qemu:dirty-bitmap:b0"],
            &["-f", "qcow2", "-B", "nope", "n.qcow2"],
        ),
        (&["--size"], &["-f", "qcow2", "-B", "nope", "n.qcow2"]),
    ];
    for (info, server) in cases {
        let theirs = nbdinfo(&d, info, "qemu-nbd", server);
        let mine = nbdinfo(&d, info, BIN, server);
        // --list names the server's export; the rest must match exactly.
        let strip = |s: &str| {
            s.lines()
                .filter(|l| !l.contains("export=") && !l.contains("uri:"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!(
            (mine.0, strip(&mine.1)),
            (theirs.0, strip(&theirs.1)),
            "nbdinfo {info:?} -- [ server {server:?} ]: blockd-nbd (left) vs qemu-nbd"
        );
    }
    // The image is still clean after the writable runs.
    sh(&d, &["qemu-img", "check", "n.qcow2"]);
    let _ = std::fs::remove_dir_all(&d);
}
