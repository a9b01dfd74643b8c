//! `blockd-img resize` against `qemu-img resize` on identically prepared raw and qcow2 images:
//! messages (including the probing warning and the shrink refusal), exit codes, and the
//! resulting files (size, allocation and bytes).

mod common;

use common::*;
use std::path::Path;

const M: u64 = 1 << 20;

fn prepare(d: &Path) {
    image(d, "r.img", 10 * M, &[(0, 1, 4096), (9 * M, 2, 4096)]);
    image(d, "odd.img", 1000, &[(0, 3, 1000)]);
    qemu(QEMU_IMG, "create -q -f qcow2 q.qcow2 10M", d);
    qemu_io(d, "q.qcow2", &["write -P 4 0 64k"]);
}

#[test]
fn resize_matches_qemu_img() {
    if !have_qemu_img() {
        return;
    }
    let cases = [
        "resize r.img 20M",
        "resize -f raw r.img 20M",
        "resize -q -f raw r.img 20M",
        "resize r.img +1M",
        "resize -f raw r.img +0",
        "resize r.img -1M",
        "resize -f raw --shrink r.img -1M",
        "resize -f raw --shrink r.img 1M",
        "resize -f raw --shrink r.img 1000",
        "resize -f raw r.img 12345",
        "resize -f raw r.img 1.5M",
        "resize -f raw r.img 10M",
        "resize -f raw --preallocation=full r.img 12M",
        "resize -f raw --preallocation=falloc r.img 12M",
        "resize -f raw --preallocation=off r.img 12M",
        "resize -f raw odd.img +24",
        "resize --image-opts driver=raw,file.filename=r.img 11M",
        "resize --image-opts driver=file,filename=r.img 11M",
        "resize q.qcow2 20M",
        "resize -f qcow2 q.qcow2 +1G",
        // errors
        "resize",
        "resize r.img",
        "resize r.img x",
        "resize r.img +x",
        "resize r.img -- -1M",
        "resize -f raw --shrink r.img -100M",
        "resize -f raw r.img -10M",
        "resize -f raw r.img 8E",
        "resize -f raw r.img 0",
        "resize -f raw --preallocation=metadata r.img 60M",
        "resize -f raw --preallocation=bogus r.img 60M",
        "resize -f raw --preallocation=full --shrink r.img 1M",
        "resize -f raw --preallocation=full r.img 1M",
        "resize nonexist 1M",
        "resize -U r.img 1M",
        "resize -f bogus r.img 1M",
        "resize -f raw --image-opts r.img 1M",
        "resize a b 1M",
        "resize -q 1M",
        "resize -h",
        "resize --help",
    ];
    for (i, cmd) in cases.iter().enumerate() {
        let (q, b) = both(&format!("resize{i}"), cmd, prepare);
        if cmd.contains("qcow2") {
            // The qcow2 driver grows the L1 table its own way: same contents, image consistent.
            let (qq, bq) = (q.join("q.qcow2"), b.join("q.qcow2"));
            for args in [
                vec!["compare", "-s", qq.to_str().unwrap(), bq.to_str().unwrap()],
                vec!["check", bq.to_str().unwrap()],
            ] {
                let o = run(QEMU_IMG, &args, &b);
                assert_eq!(o.rc, 0, "`{cmd}`: qemu-img {args:?}: {o:?}");
            }
        } else {
            same_files(&q, &b, cmd);
        }
        for f in ["r.img", "odd.img"] {
            assert_eq!(
                file_facts(&b.join(f)),
                file_facts(&q.join(f)),
                "`{cmd}`: size/allocation of {f}"
            );
        }
        cleanup((q, b));
    }
}
