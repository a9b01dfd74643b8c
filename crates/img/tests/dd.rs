//! `blockd-img dd` against `qemu-img dd` on identically prepared images: operands, qemu-img's
//! count/skip semantics, errors, and the output files byte for byte (with allocation).

mod common;

use common::*;
use std::path::Path;

const M: u64 = 1 << 20;

fn prepare(d: &Path) {
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
    qemu(QEMU_IMG, "create -q -f qcow2 q.qcow2 3M", d);
    qemu_io(d, "q.qcow2", &["write -P 5 64k 64k"]);
}

#[test]
fn dd_matches_qemu_img() {
    if !have_qemu_img() {
        return;
    }
    let cases = [
        "dd if=s.img of=out.img",
        "dd if=s.img of=out.img bs=1M count=2",
        "dd if=s.img of=out.img bs=1M skip=9",
        "dd if=s.img of=out.img bs=1M skip=11",
        "dd if=s.img of=out.img bs=1M count=20",
        "dd if=s.img of=out.img bs=1M count=3 skip=1",
        "dd if=s.img of=out.img bs=512 count=1 skip=0x10",
        "dd if=s.img of=out.img bs=1000 count=3",
        "dd if=s.img of=out.img bs=1.5k count=2",
        "dd if=s.img of=out.img bs=3M",
        "dd if=s.img of=out.img bs=4096 skip=700 count=2000",
        "dd if=s.img of=out.img count=0",
        "dd if=s.img if=odd.img of=out.img",
        "dd -f raw -O raw if=s.img of=out.img",
        "dd -O qcow2 if=s.img of=out.img bs=1M count=4",
        "dd if=q.qcow2 of=out.img bs=64k",
        "dd -f qcow2 if=q.qcow2 of=out.img bs=64k skip=1 count=2",
        "dd -U if=odd.img of=out.img",
        "dd --image-opts if=driver=raw,file.filename=s.img of=out.img bs=1M count=1",
        // errors
        "dd",
        "dd if=s.img",
        "dd of=out.img",
        "dd bs=1M",
        "dd if=s.img of=out.img bs=x",
        "dd if=s.img of=out.img bs=0",
        "dd if=s.img of=out.img bs=3G",
        "dd if=s.img of=out.img count=x",
        "dd if=s.img of=out.img count=1k",
        "dd if=s.img of=out.img count=-1",
        "dd if=s.img of=out.img count=99999999999999999999",
        "dd if=s.img of=out.img skip=-1",
        "dd if=s.img of=out.img skip=x",
        "dd if=s.img of=out.img bogus=1",
        "dd if=s.img of=out.img foo",
        "dd if=s.img of=out.img =5",
        "dd if=s.img of=out.img conv=notrunc",
        "dd if=nonexist of=out.img",
        "dd -O bogus if=s.img of=out.img",
        "dd -f bogus if=s.img of=out.img",
        "dd -o x if=s.img of=out.img",
        "dd if=s.img of=/nonexist/out.img",
        "dd -h",
        "dd --help",
    ];
    for (i, cmd) in cases.iter().enumerate() {
        let (q, b) = both(&format!("dd{i}"), cmd, prepare);
        same_files(&q, &b, cmd);
        assert_eq!(
            file_facts(&b.join("out.img")),
            file_facts(&q.join("out.img")),
            "`{cmd}`: size/allocation of out.img"
        );
        cleanup((q, b));
    }
}
