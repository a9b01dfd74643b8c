//! `blockd-img convert` against `qemu-img convert` on identically prepared raw images: stdout
//! (including `-p` progress lines), stderr, exit codes, and the resulting files byte for byte
//! with the same allocation (sparseness).

mod common;

use common::*;
use std::path::Path;

const M: u64 = 1 << 20;

fn prepare(d: &Path) {
    // Data, holes, a run of written zeroes (must come out sparse), short zero gaps inside
    // data (must stay data), a tail that is not a multiple of the chunk size.
    image(
        d,
        "s.img",
        10 * M,
        &[
            (0, 0x11, M as usize),
            (3 * M, 0x22, 100 << 10),
            (6 * M, 0x33, 4096),
            (6 * M + 6144, 0x33, 8192),
            (8 * M, 0, 65536),
            (8 * M + 65536, 0x44, 512),
            (10 * M - 512, 0x55, 512),
        ],
    );
    image(d, "odd.img", 1000, &[(0, 0x66, 1000)]);
    image(d, "e.img", 10 * M, &[]);
    image(d, "big.img", 12 * M, &[(0, 0x77, 12 * M as usize)]);
    image(d, "t.img", 10 * M, &[]);
    image(d, "small.img", M, &[]);
    // 2 MiB chunks of data, one of zeroes, unaligned ends.
    image(
        d,
        "f.img",
        9 * M + 4096,
        &[
            (0, 0x12, 4 * M as usize),
            (6 * M, 0x13, 3 * M as usize + 4096),
        ],
    );
}

fn check(i: usize, cmd: &str) {
    let (q, b) = both(&format!("convert{i}"), cmd, prepare);
    same_files(&q, &b, cmd);
    for f in ["out.img", "big.img", "t.img"] {
        assert_eq!(
            file_facts(&b.join(f)),
            file_facts(&q.join(f)),
            "`{cmd}`: size/allocation of {f}"
        );
    }
    cleanup((q, b));
}

#[test]
fn convert_copies_like_qemu_img() {
    if !have_qemu_img() {
        return;
    }
    let cases = [
        "convert s.img out.img",
        "convert -O raw -f raw s.img out.img",
        "convert -p s.img out.img",
        "convert -p -S 0 s.img out.img",
        "convert -S 0 s.img out.img",
        "convert -S 512 s.img out.img",
        "convert -S 64k s.img out.img",
        "convert -p -S 1M f.img out.img",
        "convert -W -m 16 s.img out.img",
        "convert -m 1 -p f.img out.img",
        "convert -W -p f.img out.img",
        "convert -n s.img big.img",
        "convert -n -p s.img big.img",
        "convert -n -S 0 s.img big.img",
        "convert -n --target-is-zero s.img t.img",
        "convert -t writethrough -T writeback s.img out.img",
        "convert -t none -T none s.img out.img",
        "convert -t directsync s.img out.img",
        "convert s.img odd.img out.img",
        "convert -p odd.img s.img odd.img out.img",
        "convert odd.img out.img",
        "convert e.img out.img",
        "convert -p e.img out.img",
        "convert -q -p s.img out.img",
        "convert -o preallocation=full s.img out.img",
        "convert -o preallocation=falloc s.img out.img",
        "convert -o size=1M s.img out.img",
        "convert -o nocow=off s.img out.img",
        "convert --image-opts driver=raw,file.filename=s.img out.img",
        "convert --source-image-opts driver=file,filename=odd.img out.img",
        "convert -n --target-image-opts s.img driver=raw,file.filename=big.img",
        "convert -U s.img out.img",
        "convert -r 1G s.img out.img",
        "convert -C s.img out.img",
        "convert --salvage s.img out.img",
        "convert --parallel=2 --oob-writes --sparse-size=8k s.img out.img",
        "convert --output-format=raw --source-format=raw s.img out.img",
        "convert -f raw -O raw -n -W -m 3 s.img big.img",
        // errors
        "convert",
        "convert s.img",
        "convert -x s.img out.img",
        "convert --bogus s.img out.img",
        "convert --b s.img out.img",
        "convert --o s.img out.img",
        "convert --target s.img out.img",
        "convert -m 0 s.img out.img",
        "convert -m 17 s.img out.img",
        "convert -m x s.img out.img",
        "convert -m 1k s.img out.img",
        "convert -m 0x2 s.img out.img",
        "convert -S 100 s.img out.img",
        "convert -S x s.img out.img",
        "convert -S -1 s.img out.img",
        "convert -S 32M s.img out.img",
        "convert -r x s.img out.img",
        "convert -r -1 s.img out.img",
        "convert -t bogus s.img out.img",
        "convert -T bogus s.img out.img",
        "convert -c s.img out.img",
        "convert -W -c s.img out.img",
        "convert -n -c s.img big.img",
        "convert --target-is-zero s.img out.img",
        "convert -n -o size=1M s.img big.img",
        "convert -O bogus s.img out.img",
        "convert -f bogus s.img out.img",
        "convert -o bogus=1 s.img out.img",
        "convert -o size=x s.img out.img",
        "convert -o preallocation=bogus s.img out.img",
        "convert -o preallocation=metadata s.img out.img",
        "convert -o help",
        "convert -o help s.img out.img",
        "convert -n s.img small.img",
        "convert -n s.img nonexist.img",
        "convert nonexist.img out.img",
        "convert -B s.img s.img out.img",
        "convert -F raw s.img out.img",
        "convert -l snap s.img out.img",
        "convert --bitmaps s.img out.img",
        "convert --skip-broken-bitmaps s.img out.img",
        "convert --image-opts -f raw s.img out.img",
        "convert --image-opts s.img out.img",
        "convert --target-image-opts s.img out.img",
        "convert s.img /nonexist/dir/out.img",
        "convert s.img s.img",
        "convert -O raw odd.img s.img s.img",
        "convert -h",
        "convert --help",
    ];
    for (i, cmd) in cases.iter().enumerate() {
        check(i, cmd);
    }
}

/// qcow2 targets (created by blockd-qcow2) and qcow2 sources (written by QEMU, with backing
/// chains, zero and compressed clusters): the same output, raw targets byte for byte, qcow2
/// targets with the same contents and clean `qemu-img check`.
#[test]
fn convert_qcow2_like_qemu_img() {
    if !have_qemu_img() {
        return;
    }
    fn prep(d: &Path) {
        prepare(d);
        prepare_qcow2(d);
    }
    let cases = [
        "convert -O qcow2 s.img out.img",
        "convert -O qcow2 -p s.img out.img",
        "convert -O qcow2 -o cluster_size=4k,compat=0.10 s.img out.img",
        "convert -O qcow2 -o cluster_size=2M s.img out.img",
        "convert -O qcow2 -o extended_l2=on s.img out.img",
        "convert -O qcow2 -o refcount_bits=1,lazy_refcounts=on s.img out.img",
        // (`-O qcow2 -S 0 f.img` is compared by contents below: blockd-qcow2 does not pad the
        // file to the end of the partial last cluster as QEMU does.)
        "convert -O qcow2 odd.img s.img out.img",
        "convert -O qcow2 e.img out.img",
        "convert top.qcow2 out.img",
        "convert -p top.qcow2 out.img",
        "convert -O qcow2 top.qcow2 out.img",
        "convert -f qcow2 -O raw plain.qcow2 out.img",
        "convert -O qcow2 plain.qcow2 out.img",
        "convert small.qcow2 out.img",
        "convert xl2.qcow2 out.img",
        "convert sub/t.qcow2 out.img",
        "convert -n top.qcow2 big.img",
        "convert -n -O qcow2 s.img plain.qcow2",
        "convert -O qcow2 -o bogus=1 s.img out.img",
        "convert -O qcow2 -o cluster_size=3k s.img out.img",
        "convert -O qcow2 -o compat=2 s.img out.img",
        "convert -f qcow2 s.img out.img",
        "convert -n -O qcow2 s.img big.img",
        "convert -O qcow2 -o help",
        "convert -O qcow2 -o help s.img out.img",
        "convert -O qcow2 -B mid.qcow2 -F qcow2 top.qcow2 out.img",
        "convert -O qcow2 -B base.raw -F raw -o cluster_size=4k mid.qcow2 out.img",
        "convert -O qcow2 -B mid.qcow2 top.qcow2 out.img",
        "convert -O qcow2 -B nonexist.qcow2 -F qcow2 top.qcow2 out.img",
        "convert -O raw -B mid.qcow2 -F qcow2 top.qcow2 out.img",
    ];
    for (i, cmd) in cases.iter().enumerate() {
        let (q, b) = both(&format!("convertq{i}"), cmd, prep);
        let (qo, bo) = (q.join("out.img"), b.join("out.img"));
        if cmd.contains("-O qcow2") && qo.exists() && !cmd.contains("nonexist") {
            // blockd-qcow2 leaves the untouched tail of a partly written new cluster as a hole
            // where QEMU writes zeroes: same contents, a consistent image, same layout
            // otherwise (checked byte for byte while both wrote the tails).
            for args in [
                vec![
                    "compare",
                    "-f",
                    "qcow2",
                    "-F",
                    "qcow2",
                    qo.to_str().unwrap(),
                    bo.to_str().unwrap(),
                ],
                vec!["check", bo.to_str().unwrap()],
            ] {
                let o = run(QEMU_IMG, &args, &b);
                assert_eq!(o.rc, 0, "`{cmd}`: qemu-img {args:?}: {o:?}");
            }
            std::fs::remove_file(&qo).unwrap();
            std::fs::remove_file(&bo).unwrap();
        }
        same_files(&q, &b, cmd);
        cleanup((q, b));
    }
}

/// Compressed and out-of-order qcow2 targets: the same output as qemu-img, and images that read
/// the same and pass `qemu-img check` (compressed cluster bytes and the allocation order of
/// out-of-order writes may differ).
#[test]
fn convert_compressed_and_unordered_like_qemu_img() {
    if !have_qemu_img() {
        return;
    }
    fn prep(d: &Path) {
        prepare(d);
        prepare_qcow2(d);
    }
    let cases = [
        "convert -c -O qcow2 s.img out.img",
        "convert -c -p -O qcow2 s.img out.img",
        "convert -c -O qcow2 -o cluster_size=4k s.img out.img",
        "convert -c -O qcow2 -o compression_type=zstd f.img out.img",
        "convert -c -O qcow2 top.qcow2 out.img",
        "convert -c -p -O qcow2 odd.img s.img out.img",
        "convert -W -O qcow2 f.img out.img",
        "convert -O qcow2 -S 0 f.img out.img",
        "convert -W -m 16 -p -O qcow2 s.img out.img",
        "convert -c -O qcow2 -B mid.qcow2 -F qcow2 top.qcow2 out.img",
    ];
    for (i, cmd) in cases.iter().enumerate() {
        let (q, b) = both(&format!("convertc{i}"), cmd, prep);
        let (qo, bo) = (q.join("out.img"), b.join("out.img"));
        for args in [
            vec![
                "compare",
                "-f",
                "qcow2",
                "-F",
                "qcow2",
                qo.to_str().unwrap(),
                bo.to_str().unwrap(),
            ],
            vec!["check", bo.to_str().unwrap()],
        ] {
            let o = run(QEMU_IMG, &args, &b);
            assert_eq!(o.rc, 0, "`{cmd}`: qemu-img {args:?}: {o:?}");
        }
        cleanup((q, b));
    }
}

/// Where `out.img` of `dir` keeps its guest data: (guest start, host offset, length) from
/// `qemu-img map --output=json`, runs contiguous in both merged. The zero flag is left out:
/// blockd-qcow2 leaves the unwritten tail of a new cluster as a file hole where QEMU writes
/// zeroes, which map reports as zero; the host offsets are the layout.
fn host_layout(dir: &Path) -> Vec<(u64, u64, u64)> {
    let o = run(QEMU_IMG, &["map", "--output=json", "out.img"], dir);
    assert_eq!(o.rc, 0, "{o:?}");
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    let mut runs: Vec<(u64, u64, u64)> = Vec::new();
    for e in v.as_array().unwrap() {
        let Some(off) = e["offset"].as_u64() else {
            continue;
        };
        let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        match runs.last_mut() {
            Some((s, h, l)) if *s + *l == start && *h + *l == off => *l += len,
            _ => runs.push((start, off, len)),
        }
    }
    runs
}

/// In-order writes into a new qcow2 image overlap (each starts once the previous one has its
/// host clusters): the host layout must still be qemu-img's, cluster for cluster. Many chunks
/// of data with zero gaps of every size (some inside a cluster, some across chunk ends), for
/// several cluster sizes and numbers of parallel requests: the host offset of every guest
/// byte ([`host_layout`]) and the contents are the same, the image is clean.
#[test]
fn convert_qcow2_in_order_layout_like_qemu_img() {
    if !have_qemu_img() {
        return;
    }
    fn prep(d: &Path) {
        let mut writes = Vec::new();
        let mut at = 0u64;
        let mut k = 0u64;
        while at < 40 * M {
            let n = [512u64, 3072, 4096, 65536, 70000, M, 3 * M][(k * 7 % 11 % 7) as usize];
            match k % 3 {
                0 | 1 => writes.push((at, 1 + (k % 250) as u8, n.min(40 * M - at) as usize)),
                _ => writes.push((at, 0, n.min(40 * M - at) as usize)),
            }
            at += n + [0u64, 512, 8192, 200_000][(k % 4) as usize];
            k += 1;
        }
        image(d, "mix.img", 40 * M, &writes);
    }
    for (i, cmd) in [
        "convert -O qcow2 mix.img out.img",
        "convert -m 16 -O qcow2 mix.img out.img",
        "convert -m 1 -O qcow2 mix.img out.img",
        "convert -O qcow2 -o cluster_size=4k mix.img out.img",
        "convert -O qcow2 -o cluster_size=1M mix.img out.img",
        "convert -O qcow2 -o extended_l2=on mix.img out.img",
        "convert -O qcow2 -S 64k mix.img out.img",
        "convert -O qcow2 -S 0 mix.img out.img",
    ]
    .iter()
    .enumerate()
    {
        let (q, b) = both(&format!("convertl{i}"), cmd, prep);
        let (lq, lb) = (host_layout(&q), host_layout(&b));
        assert!(!lq.is_empty());
        assert_eq!(lb, lq, "`{cmd}`: host layout differs from qemu-img's");
        let (qo, bo) = (q.join("out.img"), b.join("out.img"));
        let (qo, bo) = (qo.to_str().unwrap(), bo.to_str().unwrap());
        for args in [
            vec!["compare", "-f", "qcow2", "-F", "qcow2", qo, bo],
            vec!["check", bo],
        ] {
            let o = run(QEMU_IMG, &args, &b);
            assert_eq!(o.rc, 0, "`{cmd}`: qemu-img {args:?}: {o:?}");
        }
        cleanup((q, b));
    }
}
