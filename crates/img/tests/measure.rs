//! `blockd-img measure` against `qemu-img measure`: a matrix of virtual sizes, cluster sizes,
//! refcount widths, extended L2 and preallocation for `--size`, raw and qcow2 sources (with
//! backing chains, zero and compressed clusters), text and JSON, and the errors.

mod common;

use common::*;
use std::path::Path;

const M: u64 = 1 << 20;

fn prepare(d: &Path) {
    prepare_qcow2(d);
    image(
        d,
        "s.img",
        10 * M,
        &[
            (0, 1, M as usize),
            (3 * M + 100, 2, 5000),
            (10 * M - 512, 3, 512),
        ],
    );
    image(d, "odd.img", 1000, &[(0, 4, 1000)]);
}

#[test]
fn measure_size_matrix_matches_qemu_img() {
    if !have_qemu_img() {
        return;
    }
    let dir = scratch("measure-matrix");
    let mut n = 0;
    for size in ["0", "1", "1000", "64k", "1G", "1000M", "3T", "100T"] {
        for cs in ["512", "4k", "64k", "2M"] {
            for rb in ["1", "16", "64"] {
                for xl2 in ["off", "on"] {
                    if xl2 == "on" && cs == "512" {
                        continue;
                    }
                    let cmd = format!(
                        "measure -O qcow2 -o cluster_size={cs},refcount_bits={rb},extended_l2={xl2} --size {size}"
                    );
                    let args = split(&cmd);
                    let (q, b) = (run(QEMU_IMG, &args, &dir), run(BLOCKD_IMG, &args, &dir));
                    assert_eq!(
                        b, q,
                        "`{cmd}`: blockd-img (left) differs from qemu-img (right)"
                    );
                    n += 1;
                }
            }
        }
    }
    assert!(n > 100);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn measure_matches_qemu_img() {
    if !have_qemu_img() {
        return;
    }
    let cases = [
        "measure --size 1G",
        "measure --size 1G -O raw",
        "measure --size 1000 -O raw",
        "measure --output=json --size 1G -O raw",
        "measure --size 1G -O qcow2",
        "measure --output=json --size 1G -O qcow2",
        "measure --output json --size 5G -O qcow2 -o compat=0.10,lazy_refcounts=off",
        "measure -O qcow2 -o preallocation=full --size 1G",
        "measure -O qcow2 -o preallocation=falloc --size 1G",
        "measure -O qcow2 -o preallocation=metadata --size 1G",
        "measure -O qcow2 -o backing_file=s.img,backing_fmt=raw --size 1G",
        "measure -O qcow2 -o size=2G --size 1G",
        "measure -O qcow2 -o cluster_size=4k -o cluster_size=8k --size 1G",
        "measure -O qcow2 s.img",
        "measure -O qcow2 -o cluster_size=4k s.img",
        "measure -O qcow2 -o cluster_size=2M s.img",
        "measure -O qcow2 -o preallocation=full s.img",
        "measure --output=json -O qcow2 s.img",
        "measure -O raw s.img",
        "measure s.img",
        "measure -O qcow2 odd.img",
        "measure -O qcow2 base.raw",
        "measure -O qcow2 top.qcow2",
        "measure --output=json -O qcow2 top.qcow2",
        "measure -O qcow2 -o cluster_size=4k top.qcow2",
        "measure -O raw top.qcow2",
        "measure -O qcow2 mid.qcow2",
        "measure -O qcow2 plain.qcow2",
        "measure -f qcow2 -O qcow2 small.qcow2",
        "measure -O qcow2 xl2.qcow2",
        "measure -O qcow2 sub/t.qcow2",
        "measure -U -O qcow2 top.qcow2",
        "measure -O qcow2 --image-opts driver=raw,file.filename=s.img",
        // errors
        "measure",
        "measure --size x",
        "measure --size -1",
        "measure -O qcow2 --size 8E",
        "measure --size 1G s.img",
        "measure s.img odd.img",
        "measure -O bogus --size 1G",
        "measure -O vmdk --size 1G",
        "measure -O qcow2 -o bogus=1 --size 1G",
        "measure -O qcow2 -o cluster_size=3k --size 1G",
        "measure -O qcow2 -o cluster_size=4M --size 1G",
        "measure -O qcow2 -o refcount_bits=3 --size 1G",
        "measure -O qcow2 -o compat=2 --size 1G",
        "measure -O qcow2 -o preallocation=bogus --size 1G",
        "measure -O qcow2 -o compression_type=bogus --size 1G",
        "measure -O qcow2 -o lazy_refcounts=maybe --size 1G",
        "measure -O qcow2 -o refcount_bits=x --size 1G",
        "measure -O qcow2 -o cluster_size=x --size 1G",
        "measure -O qcow2 -o compat=0.10,lazy_refcounts=on --size 1G",
        "measure -O qcow2 -o compat=0.10,extended_l2=on --size 1G",
        "measure -O qcow2 -o data_file_raw=on --size 1G",
        "measure -O qcow2 -o cluster_size=8k,extended_l2=on --size 1G",
        "measure -O raw -o bogus=1 --size 1G",
        "measure -O qcow2 nonexist",
        "measure -O qcow2 -l snap s.img",
        "measure --output=bogus --size 1G",
        "measure -x --size 1G",
        "measure -f raw --image-opts s.img",
        "measure -h",
        "measure --help",
    ];
    for (i, cmd) in cases.iter().enumerate() {
        cleanup(both(&format!("measure{i}"), cmd, prepare));
    }
}
