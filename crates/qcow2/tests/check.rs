//! The check (and its repairs) against `qemu-img check` on the same images, and the repair of
//! dirty images (lazy refcounts, writer killed) at a writable open.

mod common;
use common::*;

use blockd_aio::block_on;
use blockd_block::Graph;
use blockd_block::options::parse;
use blockd_qcow2::Repair;

fn patch(path: &str, at: u64, bytes: &[u8]) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(bytes).unwrap();
}

fn ours(path: &str, repair: Repair) -> blockd_qcow2::CheckReport {
    let mut g = Graph::new();
    let ro = if repair == Repair::None { "on" } else { "off" };
    let file = g
        .open(parse(&format!("driver=file,filename={path},read-only={ro}")).unwrap())
        .unwrap();
    block_on(blockd_qcow2::check(&file, repair))
        .unwrap()
        .unwrap()
}

fn theirs_json(path: &str) -> (String, i32) {
    let o = run("qemu-img", &["check", "--output=json", path]);
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        o.status.code().unwrap(),
    )
}

#[test]
fn check_agrees_with_qemu_img() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let dir = TempDir::new("check");
    // Clean, compressed and fragmented.
    let c = dir.path("c.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", &c, "64M"]);
    ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 1 0 200k",
            "-c",
            "write -P 2 1M 64k",
            "-c",
            "write -P 3 512k 64k",
            "-c",
            "write -c -P 4 2M 64k",
            "-c",
            "write -z 3M 64k",
            &c,
        ],
    );
    // A leak: a refcount for a cluster nothing uses (cluster 7, the file made long enough).
    let l = dir.path("l.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", &l, "64M"]);
    ok("qemu-io", &["-f", "qcow2", "-c", "write 0 128k", &l]);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&l)
        .unwrap()
        .set_len(8 * 65536)
        .unwrap();
    patch(&l, 0x20000 + 14, &[0, 1]);
    // A corruption: the L1 table's refcount dropped to 0.
    let k = dir.path("k.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", &k, "64M"]);
    ok("qemu-io", &["-f", "qcow2", "-c", "write 0 128k", &k]);
    patch(&k, 0x20000 + 6, &[0, 0]);
    for (p, code) in [(&c, 0), (&l, 3), (&k, 2)] {
        let (json, qcode) = theirs_json(p);
        assert_eq!(qcode, code, "{p}");
        let r = ours(p, Repair::None);
        assert_eq!(r.to_json(p), json, "{p}");
        assert_eq!(r.exit_code(), code, "{p}");
    }
    // Repairs leave images qemu-img finds clean.
    let r = ours(&l, Repair::Leaks);
    assert_eq!((r.leaks, r.leaks_fixed), (1, 1));
    qemu_check_clean(&l);
    let r = ours(&k, Repair::All);
    assert_eq!((r.corruptions, r.corruptions_fixed), (1, 1));
    qemu_check_clean(&k);
}

#[test]
fn dirty_images_are_repaired_at_a_writable_open() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let dir = TempDir::new("dirty");
    let p = dir.path("d.qcow2");
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on",
            &p,
            "64M",
        ],
    );
    // qemu-io dies (SIGKILL) with the image dirty and refcounts never written.
    let o = run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x5a 0 1M",
            "-c",
            "write -P 0x5b 8M 100k",
            "-c",
            "sigraise 9",
            &p,
        ],
    );
    assert!(!o.status.success());
    let info = ok("qemu-img", &["info", "-U", "--output=json", &p]);
    assert!(info.contains("\"dirty-flag\": true"), "{info}");
    let want = qemu_raw(&dir, &p);
    // Read-only opens leave it as it is.
    let mut g = graph();
    let node = open_qcow2(&mut g, &p, "read-only=on").unwrap();
    assert!(node.driver().is_dirty());
    drop(node);
    drop(g);
    // A writable open repairs it and clears the bit.
    let mut g = graph();
    let node = open_qcow2(&mut g, &p, "").unwrap();
    assert!(!node.driver().is_dirty());
    drop(node);
    drop(g);
    qemu_check_clean(&p);
    let info = ok("qemu-img", &["info", "--output=json", &p]);
    assert!(info.contains("\"dirty-flag\": false"), "{info}");
    assert_eq!(first_diff(&qemu_raw(&dir, &p), &want), None);
}
