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
    // Data across the image, a snapshot sharing it (v3 resizes, v2 refuses).
    qemu(
        QEMU_IMG,
        "create -q -f qcow2 -o cluster_size=4k s.qcow2 10M",
        d,
    );
    qemu_io(d, "s.qcow2", &["write -P 5 0 9M"]);
    qemu(QEMU_IMG, "snapshot -c s1 s.qcow2", d);
    qemu_io(d, "s.qcow2", &["write -P 6 8M 1M"]);
    qemu(
        QEMU_IMG,
        "create -q -f qcow2 -o compat=0.10 s2.qcow2 10M",
        d,
    );
    qemu(QEMU_IMG, "snapshot -c s1 s2.qcow2", d);
    // Small clusters: many refcount blocks, most of them unused after a shrink.
    qemu(
        QEMU_IMG,
        "create -q -f qcow2 -o cluster_size=512 rb.qcow2 8M",
        d,
    );
    qemu_io(d, "rb.qcow2", &["write -P 7 0 6M"]);
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
        "resize q.qcow2 1M",
        "resize --shrink q.qcow2 1M",
        "resize --shrink q.qcow2 32k",
        "resize --shrink q.qcow2 1000",
        "resize --shrink s.qcow2 1M",
        "resize --shrink s.qcow2 8200k",
        "resize s.qcow2 20M",
        "resize s2.qcow2 20M",
        "resize --shrink s2.qcow2 1M",
        "resize --shrink rb.qcow2 1M",
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
        if let Some(img) = ["q.qcow2", "s.qcow2", "s2.qcow2", "rb.qcow2"]
            .into_iter()
            .find(|i| cmd.contains(i))
        {
            // A shrink gives the file's unused tail back, refcount blocks included.
            if cmd.contains("--shrink") {
                let len = |p: &Path| std::fs::metadata(p.join(img)).unwrap().len();
                assert_eq!(len(&b), len(&q), "`{cmd}`: file length of {img}");
            }
            // The qcow2 driver grows the L1 table its own way: same contents, image consistent.
            let (qq, bq) = (q.join(img), b.join(img));
            for args in [
                vec!["compare", "-s", qq.to_str().unwrap(), bq.to_str().unwrap()],
                vec!["check", bq.to_str().unwrap()],
            ] {
                let o = run(QEMU_IMG, &args, &b);
                assert_eq!(o.rc, 0, "`{cmd}`: qemu-img {args:?}: {o:?}");
            }
            if img == "s.qcow2" {
                // The snapshot keeps its size and contents.
                let raws: Vec<Vec<u8>> = [(&q, &qq), (&b, &bq)]
                    .iter()
                    .map(|(d, p)| {
                        let out = d.join("snap.raw");
                        let o = run(
                            QEMU_IMG,
                            &[
                                "convert",
                                "-l",
                                "snapshot.name=s1",
                                "-O",
                                "raw",
                                p.to_str().unwrap(),
                                out.to_str().unwrap(),
                            ],
                            d,
                        );
                        assert_eq!(o.rc, 0, "`{cmd}`: snapshot: {o:?}");
                        std::fs::read(out).unwrap()
                    })
                    .collect();
                assert!(raws[0] == raws[1], "`{cmd}`: snapshot contents differ");
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
