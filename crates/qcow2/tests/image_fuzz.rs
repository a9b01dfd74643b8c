//! The fuzz target's harness on stable Rust: 400 deterministic mutations of real images
//! (bytes flipped in the header, L1, L2 and refcount structures, files truncated) go through
//! `exercise_image` (open, read everything, block status, check): each ends, none panics.

mod common;
use common::*;

#[test]
fn mutated_images_never_crash() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let dir = TempDir::new("fuzz");
    let mut seeds = Vec::new();
    for (i, o) in [
        "cluster_size=4096",
        "cluster_size=65536,extended_l2=on",
        "compat=0.10,cluster_size=512",
    ]
    .iter()
    .enumerate()
    {
        let p = dir.path(&format!("seed{i}.qcow2"));
        ok(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-o", o, &p, "8M"],
        );
        ok(
            "qemu-io",
            &[
                "-f",
                "qcow2",
                "-c",
                "write -P 1 0 300k",
                "-c",
                "write -c -P 2 4M 64k",
                "-c",
                "write -z 1M 64k",
                &p,
            ],
        );
        ok("qemu-img", &["snapshot", "-c", "s", &p]);
        seeds.push(std::fs::read(&p).unwrap());
    }
    let mut rng = Rng(0xfeed);
    let path = dir.path("m.qcow2");
    for i in 0..400 {
        let mut b = seeds[i % seeds.len()].clone();
        // Mostly the metadata at the front of the file, sometimes anywhere.
        for _ in 0..1 + rng.below(6) {
            let span = if rng.below(4) == 0 {
                b.len()
            } else {
                b.len().min(0x40000)
            };
            let at = rng.below(span as u64) as usize;
            b[at] = rng.next() as u8;
        }
        if rng.below(10) == 0 {
            b.truncate(rng.below(b.len() as u64) as usize);
        }
        std::fs::write(&path, &b).unwrap();
        blockd_qcow2::exercise_image(&path);
    }
}
