//! `blockd-img amend` against `qemu-img amend` on identically prepared qcow2 images: messages,
//! progress output and exit codes are the same; afterwards blockd's image passes
//! `qemu-img check`, reads the same guest bytes as qemu's (active image and snapshots), and
//! `qemu-img info --output=json` agrees on everything but the file's own size and layout.

mod common;

use common::*;
use std::path::Path;

fn prepare(d: &Path) {
    qemu(QEMU_IMG, "create -q -f qcow2 v3.qcow2 2M", d);
    qemu_io(
        d,
        "v3.qcow2",
        &[
            "write -P 1 0 64k",
            "write -z 64k 64k",
            "write -P 2 128k 64k",
            "write -z 128k 64k",
            "write -c -P 3 256k 64k",
            "write -P 4 1M 4k",
        ],
    );
    qemu(QEMU_IMG, "create -q -f qcow2 -o compat=0.10 v2.qcow2 1M", d);
    qemu_io(d, "v2.qcow2", &["write -P 5 0 128k"]);
    qemu(QEMU_IMG, "snapshot -c s1 v2.qcow2", d);
    qemu_io(d, "v2.qcow2", &["write -P 6 64k 64k"]);
    // A snapshot, then more writes and zeroes over shared clusters.
    qemu(QEMU_IMG, "create -q -f qcow2 snap.qcow2 1M", d);
    qemu_io(d, "snap.qcow2", &["write -P 7 0 256k"]);
    qemu(QEMU_IMG, "snapshot -c s1 snap.qcow2", d);
    qemu_io(d, "snap.qcow2", &["write -z 0 64k", "write -P 8 128k 64k"]);
    // A snapshot of another size than the image.
    qemu(QEMU_IMG, "create -q -f qcow2 grown.qcow2 1M", d);
    qemu_io(d, "grown.qcow2", &["write -P 9 0 64k"]);
    qemu(QEMU_IMG, "snapshot -c s1 grown.qcow2", d);
    qemu(QEMU_IMG, "resize -q grown.qcow2 2M", d);
    qemu(
        QEMU_IMG,
        "create -q -f qcow2 -o extended_l2=on e.qcow2 1M",
        d,
    );
    qemu(
        QEMU_IMG,
        "create -q -f qcow2 -o compression_type=zstd z.qcow2 1M",
        d,
    );
    qemu_io(d, "z.qcow2", &["write -P 10 0 64k"]);
    qemu(
        QEMU_IMG,
        "create -q -f qcow2 -o compression_type=zstd zc.qcow2 1M",
        d,
    );
    qemu_io(d, "zc.qcow2", &["write -c -P 11 0 64k"]);
    qemu(
        QEMU_IMG,
        "create -q -f qcow2 -o refcount_bits=8 rc8.qcow2 1M",
        d,
    );
    qemu_io(d, "rc8.qcow2", &["write -P 12 0 192k"]);
    // Small clusters: many refcount blocks whatever the width.
    qemu(
        QEMU_IMG,
        "create -q -f qcow2 -o cluster_size=512 small.qcow2 4M",
        d,
    );
    qemu_io(d, "small.qcow2", &["write -P 13 0 3M", "write -z 1M 4k"]);
    // Zero clusters over a backing file must stay zero when downgraded.
    qemu(QEMU_IMG, "create -q -f raw base.raw 1M", d);
    qemu_io(d, "base.raw", &["write -P 14 0 1M"]);
    qemu(
        QEMU_IMG,
        "create -q -f qcow2 -b base.raw -F raw over.qcow2 1M",
        d,
    );
    qemu_io(
        d,
        "over.qcow2",
        &["write -z 0 128k", "write -P 15 512k 64k"],
    );
    qemu(QEMU_IMG, "snapshot -c s1 over.qcow2", d);
    qemu(
        QEMU_IMG,
        "create -q -f qcow2 -o lazy_refcounts=on lazy.qcow2 1M",
        d,
    );
    qemu(QEMU_IMG, "create -q -f raw r.raw 1M", d);
    // A persistent bitmap with bits set.
    qemu(QEMU_IMG, "create -q -f qcow2 bm.qcow2 1M", d);
    qemu(QEMU_IMG, "bitmap --add bm.qcow2 b0", d);
    qemu_io(d, "bm.qcow2", &["write -P 16 0 64k"]);
}

const IMAGES: &[&str] = &[
    "v3.qcow2",
    "v2.qcow2",
    "snap.qcow2",
    "grown.qcow2",
    "e.qcow2",
    "z.qcow2",
    "zc.qcow2",
    "rc8.qcow2",
    "small.qcow2",
    "over.qcow2",
    "lazy.qcow2",
];

/// `qemu-img info --output=json` without what depends on where clusters were put.
fn info(dir: &Path, img: &str) -> serde_json::Value {
    let o = run(QEMU_IMG, &["info", "-U", "--output=json", img], dir);
    assert_eq!(o.rc, 0, "info {img}: {o:?}");
    let mut v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    let m = v.as_object_mut().unwrap();
    for k in ["actual-size", "children", "filename"] {
        m.remove(k);
    }
    v
}

fn snapshot_names(dir: &Path, img: &str) -> Vec<String> {
    let o = run(QEMU_IMG, &["snapshot", "-U", "-l", img], dir);
    o.stdout
        .lines()
        .skip(2)
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
        .collect()
}

fn same_guest_data(q: &Path, b: &Path, img: &str, cmd: &str) {
    let (qi, bi) = (q.join(img), b.join(img));
    let (qs, bs) = (qi.to_str().unwrap(), bi.to_str().unwrap());
    let o = run(QEMU_IMG, &["compare", "-U", qs, bs], b);
    assert_eq!(o.rc, 0, "`{cmd}`: {img} contents: {o:?}");
    for s in snapshot_names(q, img) {
        let mut raws = Vec::new();
        for (d, p) in [(q, qs), (b, bs)] {
            let out = d.join(format!("{img}.{s}.raw"));
            let o = run(
                QEMU_IMG,
                &[
                    "convert",
                    "-U",
                    "-O",
                    "raw",
                    "-l",
                    &format!("snapshot.name={s}"),
                    p,
                    out.to_str().unwrap(),
                ],
                d,
            );
            assert_eq!(o.rc, 0, "`{cmd}`: {img} snapshot {s}: {o:?}");
            raws.push(std::fs::read(&out).unwrap());
            let _ = std::fs::remove_file(out);
        }
        assert!(raws[0] == raws[1], "`{cmd}`: {img} snapshot {s} differs");
    }
}

#[test]
fn amend_matches_qemu_img() {
    if !have_qemu_img() {
        return;
    }
    let mut cases: Vec<String> = Vec::new();
    for img in IMAGES {
        for o in [
            "compat=0.10",
            "compat=v3",
            "compat=1.1,refcount_bits=8",
            "refcount_bits=64",
            "refcount_bits=1",
            "refcount_bits=2",
            "lazy_refcounts=on",
            "lazy_refcounts=off",
            "compat=0.10,refcount_bits=16",
            "compat=0.10,lazy_refcounts=on",
            "size=3M",
        ] {
            cases.push(format!("amend -o {o} {img}"));
        }
    }
    for c in [
        "amend -p -o compat=0.10 v3.qcow2",
        "amend -q -p -o compat=0.10 v3.qcow2",
        "amend -f qcow2 -o lazy_refcounts=on -o compat=1.1 v2.qcow2",
        "amend --image-opts -o lazy_refcounts=on driver=qcow2,file.filename=v3.qcow2",
        "amend -t none -o refcount_bits=4 v3.qcow2",
        "amend --force -o compat=0.10 v3.qcow2",
        "amend -o lazy_refcounts v3.qcow2",
        "amend -o size=512k v3.qcow2",
        "amend -o size=512k snap.qcow2",
        "amend -o size=512k v2.qcow2",
        "amend -o size=1000 v3.qcow2",
        // errors
        "amend -o compat=2.0 v3.qcow2",
        "amend -o refcount_bits=3 v3.qcow2",
        "amend -o refcount_bits=128 v3.qcow2",
        "amend -o refcount_bits=x v3.qcow2",
        "amend -o refcount_bits=8 v2.qcow2",
        "amend -o lazy_refcounts=maybe v3.qcow2",
        "amend -o size=abc v3.qcow2",
        "amend -o backing_file=base.raw v3.qcow2",
        "amend -o backing_fmt=raw over.qcow2",
        "amend -o data_file=x.raw v3.qcow2",
        "amend -o data_file_raw=on v3.qcow2",
        "amend -o data_file_raw=off v3.qcow2",
        "amend -o encrypt.new-secret=x v3.qcow2",
        "amend -o cluster_size=4k v3.qcow2",
        "amend -o preallocation=metadata v3.qcow2",
        "amend -o foo=1 v3.qcow2",
        "amend v3.qcow2",
        "amend -o compat=0.10",
        "amend -o compat=0.10 v3.qcow2 extra",
        "amend -o compat=0.10 nonexist.qcow2",
        "amend -t foo -o compat=0.10 v3.qcow2",
        "amend --image-opts -f qcow2 -o compat=0.10 driver=qcow2,file.filename=v3.qcow2",
        "amend -o size=2M r.raw",
        "amend -f raw -o size=2M r.raw",
        // help
        "amend -o help v3.qcow2",
        "amend -f qcow2 -o help",
        "amend -f qcow2 -o ?",
        "amend -o compat=0.10,help v3.qcow2",
        "amend -o help",
        "amend -h",
    ] {
        cases.push(c.to_string());
    }
    for (i, cmd) in cases.iter().enumerate() {
        let (q, b) = both(&format!("amend{i}"), cmd, prepare);
        // Only the image the command names can have changed.
        for img in IMAGES.iter().filter(|i| cmd.contains(**i)) {
            let bi = b.join(img);
            let o = run(QEMU_IMG, &["check", bi.to_str().unwrap()], &b);
            assert_eq!(o.rc, 0, "`{cmd}`: qemu-img check {img}: {o:?}");
            assert_eq!(info(&b, img), info(&q, img), "`{cmd}`: info of {img}");
            same_guest_data(&q, &b, img, cmd);
        }
        cleanup((q, b));
    }
}

/// Downgrading an image with persistent bitmaps: QEMU goes ahead and leaves the bitmaps
/// behind, unvouched for (the autoclear bit goes), with their clusters leaked; so does
/// blockd-img, with the same messages, the same `check` verdict and the same data.
#[test]
fn amend_downgrade_with_bitmaps_matches_qemu_img() {
    if !have_qemu_img() {
        return;
    }
    let cmd = "amend -o compat=0.10 bm.qcow2";
    let (q, b) = both("amend-bm", cmd, prepare);
    let check = |d: &Path| {
        let o = run(QEMU_IMG, &["check", "--output=json", "bm.qcow2"], d);
        let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
        (o.rc, v["corruptions"].clone(), v["check-errors"].clone())
    };
    assert_eq!(check(&b), check(&q), "qemu-img check after the downgrade");
    assert_eq!(
        info(&b, "bm.qcow2"),
        info(&q, "bm.qcow2"),
        "info after the downgrade"
    );
    same_guest_data(&q, &b, "bm.qcow2", cmd);
    cleanup((q, b));
}
