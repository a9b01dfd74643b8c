//! `blockd-img commit` against `qemu-img commit` on identical qcow2 chains written by QEMU:
//! messages and exit codes; every image with the same contents as qemu-img leaves it (the
//! order in which qemu-img's commit job allocates clusters in the base varies from run to run,
//! and it lays out an emptied image's tables its own way) and a clean `qemu-img check`; raw
//! files byte for byte.

mod common;

use common::*;
use std::path::Path;

fn prepare(d: &Path) {
    for c in [
        "create -q -f qcow2 base.qcow2 4M",
        "create -q -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2",
        "create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2",
        "create -q -f qcow2 -b base.qcow2 -F qcow2 big.qcow2 8M",
        "create -q -f qcow2 lone.qcow2 1M",
    ] {
        qemu(QEMU_IMG, c, d);
    }
    image(d, "base.raw", 4 << 20, &[(0, 9, 8192)]);
    qemu(
        QEMU_IMG,
        "create -q -f qcow2 -b base.raw -F raw onraw.qcow2",
        d,
    );
    qemu_io(d, "base.qcow2", &["write -P 1 0 1M", "write -P 2 2M 64k"]);
    qemu_io(d, "mid.qcow2", &["write -P 3 512k 64k", "write -z 2M 64k"]);
    qemu_io(d, "top.qcow2", &["write -P 5 1M 64k", "write -P 6 3M 4k"]);
    qemu_io(d, "big.qcow2", &["write -P 7 6M 128k"]);
    qemu_io(d, "onraw.qcow2", &["write -P 8 4k 4k"]);
}

#[test]
fn commit_matches_qemu_img() {
    if !have_qemu_img() {
        return;
    }
    let cases = [
        "commit top.qcow2",
        "commit -q top.qcow2",
        "commit -d top.qcow2",
        "commit -b base.qcow2 top.qcow2",
        "commit mid.qcow2",
        "commit big.qcow2",
        "commit -f qcow2 -t none onraw.qcow2",
        "commit -r 100M top.qcow2",
        // errors
        "commit",
        "commit nonexist",
        "commit lone.qcow2",
        "commit -f raw top.qcow2",
        "commit -b x top.qcow2",
        "commit -b top.qcow2 top.qcow2",
        "commit -t bogus top.qcow2",
        "commit -r x top.qcow2",
        "commit -x top.qcow2",
        "commit -h",
        "commit --help",
    ];
    for (i, cmd) in cases.iter().enumerate() {
        let (q, b) = both(&format!("commit{i}"), cmd, prepare);
        for f in [
            "base.qcow2",
            "mid.qcow2",
            "top.qcow2",
            "big.qcow2",
            "onraw.qcow2",
            "lone.qcow2",
        ] {
            let (qf, bf) = (q.join(f), b.join(f));
            for args in [
                vec!["compare", "-U", qf.to_str().unwrap(), bf.to_str().unwrap()],
                vec!["check", "-U", bf.to_str().unwrap()],
            ] {
                let o = run(QEMU_IMG, &args, &q);
                assert_eq!(o.rc, 0, "`{cmd}`: qemu-img {args:?}: {o:?}");
            }
        }
        for f in [
            "base.qcow2",
            "mid.qcow2",
            "top.qcow2",
            "big.qcow2",
            "onraw.qcow2",
            "lone.qcow2",
        ] {
            std::fs::remove_file(q.join(f)).unwrap();
            std::fs::remove_file(b.join(f)).unwrap();
        }
        same_files(&q, &b, cmd);
        cleanup((q, b));
    }
}
