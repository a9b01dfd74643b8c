//! Hostile persistent-bitmap metadata (the bitmaps extension of an image qemu-img wrote, then
//! patched): every bad directory or table field makes the open fail with an error, never a
//! panic or a huge allocation, read-only and read-write, and a refused read-write open leaves
//! the file untouched. A bitmap flagged in use loads as inconsistent.

mod common;
use common::*;

fn patch(path: &str, at: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

fn be32(d: &[u8], o: usize) -> u32 {
    u32::from_be_bytes(d[o..o + 4].try_into().unwrap())
}

fn be64(d: &[u8], o: usize) -> u64 {
    u64::from_be_bytes(d[o..o + 8].try_into().unwrap())
}

/// (offset of the extension's data, directory offset, table offset of the first bitmap).
fn layout(path: &str) -> (u64, u64, u64) {
    let d = std::fs::read(path).unwrap();
    let mut off = be32(&d, 100) as usize;
    loop {
        let (t, l) = (be32(&d, off), be32(&d, off + 4) as usize);
        assert_ne!(t, 0, "no bitmaps extension");
        if t == 0x2385_2875 {
            let dir = be64(&d, off + 24);
            return (off as u64 + 8, dir, be64(&d, dir as usize));
        }
        off += 8 + l.div_ceil(8) * 8;
    }
}

fn image(dir: &TempDir, name: &str) -> String {
    let p = dir.path(name);
    ok("qemu-img", &["create", "-q", "-f", "qcow2", &p, "1M"]);
    ok("qemu-img", &["bitmap", "--add", &p, "bm"]);
    ok("qemu-io", &["-c", "write 0 4k", &p]);
    p
}

#[test]
fn bad_bitmap_metadata_is_refused() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let dir = TempDir::new("bm-hostile");
    type Patch = fn(&str, u64, u64, u64);
    let cases: &[(&str, Patch)] = &[
        ("directory past the end", |p, ext, _, _| {
            patch(p, ext + 16, &(1u64 << 40).to_be_bytes())
        }),
        ("directory size too small", |p, ext, _, _| {
            patch(p, ext + 8, &8u64.to_be_bytes())
        }),
        ("more bitmaps than entries", |p, ext, _, _| {
            patch(p, ext, &2u32.to_be_bytes())
        }),
        ("unaligned table", |p, _, dir, t| {
            patch(p, dir, &(t + 8).to_be_bytes())
        }),
        ("table past the end", |p, _, dir, _| {
            patch(p, dir, &(1u64 << 40).to_be_bytes())
        }),
        ("table size", |p, _, dir, _| {
            patch(p, dir + 8, &1000u32.to_be_bytes())
        }),
        ("reserved flag", |p, _, dir, _| {
            patch(p, dir + 12, &0x12u32.to_be_bytes())
        }),
        ("type", |p, _, dir, _| patch(p, dir + 16, &[7])),
        ("granularity", |p, _, dir, _| patch(p, dir + 17, &[40])),
        ("granularity too small", |p, _, dir, _| {
            patch(p, dir + 17, &[8])
        }),
        ("name size", |p, _, dir, _| {
            patch(p, dir + 18, &0xffffu16.to_be_bytes())
        }),
        ("empty name", |p, _, dir, _| {
            patch(p, dir + 18, &0u16.to_be_bytes())
        }),
        ("extra data", |p, _, dir, _| {
            patch(p, dir + 20, &u32::MAX.to_be_bytes())
        }),
        ("table entry reserved bits", |p, _, _, t| {
            patch(p, t, &0x8000_0000_0000_0002u64.to_be_bytes())
        }),
        ("data cluster past the end", |p, _, _, t| {
            patch(p, t, &(1u64 << 40).to_be_bytes())
        }),
        ("unaligned data cluster", |p, _, _, t| {
            patch(p, t, &0x1_0200u64.to_be_bytes())
        }),
    ];
    for (i, (what, f)) in cases.iter().enumerate() {
        let p = image(&dir, &format!("h{i}.qcow2"));
        let (ext, d, t) = layout(&p);
        f(&p, ext, d, t);
        let before = std::fs::read(&p).unwrap();
        for extra in ["read-only=on", ""] {
            let mut g = graph();
            match open_qcow2(&mut g, &p, extra) {
                Ok(_) => panic!("{what}: the image opened ({extra})"),
                Err(e) => assert!(!e.is_empty(), "{what}"),
            }
        }
        assert!(
            std::fs::read(&p).unwrap() == before,
            "{what}: a refused open wrote"
        );
    }
}

#[test]
fn in_use_bitmap_is_inconsistent() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let dir = TempDir::new("bm-inuse");
    let p = image(&dir, "u.qcow2");
    let (_, d, _) = layout(&p);
    patch(&p, d + 12, &3u32.to_be_bytes()); // in_use | auto
    let mut g = graph();
    let node = open_qcow2(&mut g, &p, "read-only=on").unwrap();
    let b = node.dirty_bitmaps().find("bm").expect("loaded");
    assert!(b.is_inconsistent() && b.is_persistent() && b.is_readonly());
    assert_eq!(b.count(), 0);
    assert!(
        b.check(blockd_block::dirty_bitmap::CheckFlags::ALLOW_RO)
            .is_err()
    );
}
