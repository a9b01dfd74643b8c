//! `blockd-img rebase` against `qemu-img rebase` on identical qcow2 chains written by QEMU:
//! safe mode (onto another file of the chain, onto an unrelated image, onto nothing), `-u`,
//! `-p`, the errors; the resulting images byte for byte.

mod common;

use common::*;
use std::path::Path;

fn prepare(d: &Path) {
    for c in [
        "create -q -f qcow2 base.qcow2 4M",
        "create -q -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2",
        "create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2",
        "create -q -f qcow2 other.qcow2 4M",
        "create -q -f qcow2 short.qcow2 1M",
        "create -q -f qcow2 -b mid.qcow2 -F qcow2 big.qcow2 10M",
        "create -q -f qcow2 -o cluster_size=4k -b mid.qcow2 -F qcow2 small.qcow2",
    ] {
        qemu(QEMU_IMG, c, d);
    }
    qemu_io(d, "base.qcow2", &["write -P 1 0 1M", "write -P 2 2M 64k"]);
    qemu_io(
        d,
        "mid.qcow2",
        &["write -P 3 512k 64k", "write -P 4 3M 4k", "write -z 0 4k"],
    );
    qemu_io(d, "top.qcow2", &["write -P 5 1M 64k", "write -P 6 3M 4k"]);
    qemu_io(d, "other.qcow2", &["write -P 1 0 1M", "write -P 7 2M 4k"]);
    qemu_io(d, "short.qcow2", &["write -P 1 0 512k"]);
    qemu_io(d, "small.qcow2", &["write -P 8 6k 2k"]);
    image(d, "base.raw", 4 << 20, &[(0, 1, 1 << 20)]);
}

#[test]
fn rebase_matches_qemu_img() {
    if !have_qemu_img() {
        return;
    }
    let cases = [
        "rebase -b base.qcow2 -F qcow2 top.qcow2",
        "rebase -p -b base.qcow2 -F qcow2 top.qcow2",
        "rebase -b other.qcow2 -F qcow2 top.qcow2",
        "rebase -b short.qcow2 -F qcow2 top.qcow2",
        "rebase -b base.raw -F raw top.qcow2",
        "rebase -b  top.qcow2",
        "rebase -b base.qcow2 -F qcow2 mid.qcow2",
        "rebase -p -b base.qcow2 -F qcow2 big.qcow2",
        "rebase -p -b other.qcow2 -F qcow2 big.qcow2",
        "rebase -p -b  big.qcow2",
        "rebase -p -b mid.qcow2 -F qcow2 top.qcow2",
        "rebase -p -b other.qcow2 -F qcow2 top.qcow2",
        "rebase -b other.qcow2 -F qcow2 small.qcow2",
        "rebase -q -b other.qcow2 -F qcow2 -t none -T none top.qcow2",
        "rebase -u -b x.qcow2 -F qcow2 top.qcow2",
        "rebase -u -b base.raw -F raw top.qcow2",
        "rebase -u -b  top.qcow2",
        "rebase -f qcow2 -u -b base.qcow2 -F qcow2 top.qcow2",
        "rebase -b base.qcow2 -F qcow2 -U top.qcow2",
        "rebase -U -b other.qcow2 -F qcow2 top.qcow2",
        "rebase -c -b other.qcow2 -F qcow2 top.qcow2",
        "rebase -c -b  big.qcow2",
        // errors
        "rebase top.qcow2",
        "rebase",
        "rebase -b base.qcow2 top.qcow2",
        "rebase -u -b x.qcow2 top.qcow2",
        "rebase -b nonexist -F qcow2 top.qcow2",
        "rebase -b base.qcow2 -F qcow2 nonexist",
        "rebase -u -b base.qcow2 -F qcow2 -f raw base.qcow2",
        "rebase -b base.qcow2 -F qcow2 -t bogus top.qcow2",
        "rebase -x top.qcow2",
        "rebase -h",
        "rebase --help",
    ];
    for (i, cmd) in cases.iter().enumerate() {
        // `-b ''` is written as `-b` followed by an empty argument.
        let args: Vec<&str> = cmd.split(' ').collect();
        let (q, b) = both_args(&format!("rebase{i}"), &args, prepare);
        if cmd.contains(" -c ") {
            // Compressed clusters: the same contents and a clean image (deflate output varies).
            let f = args.last().copied().unwrap_or_default();
            let (qf, bf) = (q.join(f), b.join(f));
            for a in [
                vec!["compare", qf.to_str().unwrap(), bf.to_str().unwrap()],
                vec!["check", bf.to_str().unwrap()],
            ] {
                let o = run(QEMU_IMG, &a, &q);
                assert_eq!(o.rc, 0, "`{cmd}`: qemu-img {a:?}: {o:?}");
            }
            let o = run(
                QEMU_IMG,
                &["map", "--output=json", bf.to_str().unwrap()],
                &b,
            );
            assert!(
                o.stdout.contains("\"compressed\": true"),
                "`{cmd}`: {}",
                o.stdout
            );
            std::fs::remove_file(qf).unwrap();
            std::fs::remove_file(bf).unwrap();
        }
        same_files(&q, &b, cmd);
        cleanup((q, b));
    }
}
