//! `blockd-img compare` against `qemu-img compare` on identically prepared raw images: the
//! messages, `-p` progress, `-q`, strict mode, size mismatches, and the exit codes (0 identical,
//! 1 different or usage error, 2 error).

mod common;

use common::*;
use std::path::Path;

const M: u64 = 1 << 20;

fn prepare(d: &Path) {
    image(d, "a.img", 4 * M, &[(M, 1, 4096)]);
    image(d, "a2.img", 4 * M, &[(M, 1, 4096)]);
    image(d, "b.img", 4 * M, &[(M, 1, 4096), (3 * M + 1000, 2, 1)]);
    image(d, "c.img", 6 * M, &[(M, 1, 4096)]);
    image(d, "d.img", 6 * M, &[(M, 1, 4096), (5 * M + 700, 3, 10)]);
    image(d, "z.img", 4 * M, &[(M, 1, 4096), (2 * M, 0, 8192)]);
    image(d, "h1.img", 4 * M, &[]);
    image(d, "h2.img", 4 * M, &[(3 * M, 0, 4096)]);
    image(d, "h3.img", 4 * M, &[(0, 1, 4096)]);
    image(d, "h4.img", 4 * M, &[(0, 1, 4096), (2 * M, 0, 4096)]);
    image(d, "p1.img", 10 * M, &[(0, 1, 10 * M as usize)]);
    image(d, "p2.img", 10 * M, &[(0, 1, 10 * M as usize)]);
    image(
        d,
        "p3.img",
        10 * M,
        &[(0, 1, 10 * M as usize), (9 * M + 4097, 7, 1)],
    );
    image(d, "odd.img", 1000, &[(0, 5, 1000)]);
    image(d, "odd2.img", 1000, &[(0, 5, 999)]);
}

#[test]
fn compare_matches_qemu_img() {
    if !have_qemu_img() {
        return;
    }
    let cases = [
        "compare a.img a2.img",
        "compare a.img b.img",
        "compare b.img a.img",
        "compare a.img c.img",
        "compare c.img a.img",
        "compare a.img d.img",
        "compare d.img a.img",
        "compare a.img z.img",
        "compare -s a.img a2.img",
        "compare -s a.img c.img",
        "compare -s a.img z.img",
        "compare -s a.img b.img",
        "compare -s h1.img h2.img",
        "compare -s h3.img h4.img",
        "compare -s -q a.img c.img",
        "compare -q a.img b.img",
        "compare -q a.img a2.img",
        "compare -p a.img b.img",
        "compare -p a.img a2.img",
        "compare -p a.img c.img",
        "compare -p d.img a.img",
        "compare -p p1.img p2.img",
        "compare -p p1.img p3.img",
        "compare -p -q p1.img p3.img",
        "compare odd.img odd2.img",
        "compare odd.img odd.img",
        "compare -f raw -F raw a.img b.img",
        "compare -U a.img b.img",
        "compare -T none a.img a2.img",
        "compare --strict --progress --a-format=raw --b-format=raw a.img c.img",
        "compare --image-opts driver=raw,file.filename=a.img driver=file,filename=b.img",
        // errors
        "compare",
        "compare a.img",
        "compare a.img b.img c.img",
        "compare a.img nonexist",
        "compare -p a.img nonexist",
        "compare -q nonexist a.img",
        "compare -T bogus a.img b.img",
        "compare -f bogus a.img b.img",
        "compare -F bogus a.img b.img",
        "compare -f raw --image-opts a.img b.img",
        "compare --a a.img b.img",
        "compare -x a.img b.img",
        "compare --bogus a.img b.img",
        "compare -h",
        "compare --help",
    ];
    for (i, cmd) in cases.iter().enumerate() {
        cleanup(both(&format!("compare{i}"), cmd, prepare));
    }
}

#[test]
fn compare_qcow2_matches_qemu_img() {
    if !have_qemu_img() {
        return;
    }
    fn prep(d: &Path) {
        prepare_qcow2(d);
        qemu(QEMU_IMG, "convert -O raw top.qcow2 top.raw", d);
        qemu(QEMU_IMG, "convert -O qcow2 top.qcow2 flat.qcow2", d);
        qemu_io(d, "plain.qcow2", &[]);
    }
    let cases = [
        "compare top.qcow2 top.raw",
        "compare top.raw top.qcow2",
        "compare -f qcow2 -F raw top.qcow2 top.raw",
        "compare top.qcow2 flat.qcow2",
        "compare -s top.qcow2 flat.qcow2",
        "compare -s top.qcow2 top.qcow2",
        "compare -p top.qcow2 mid.qcow2",
        "compare top.qcow2 mid.qcow2",
        "compare plain.qcow2 top.qcow2",
        "compare small.qcow2 xl2.qcow2",
        "compare -s plain.qcow2 plain.qcow2",
        "compare sub/t.qcow2 sub/b.qcow2",
        "compare -f raw top.qcow2 top.raw",
    ];
    for (i, cmd) in cases.iter().enumerate() {
        cleanup(both(&format!("compareq{i}"), cmd, prep));
    }
}
