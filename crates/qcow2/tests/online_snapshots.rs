//! Internal snapshots taken and deleted on an open, written image through the block driver
//! trait (`BlockDriver::snapshot_create/snapshot_delete`, what blockdev-snapshot-internal-sync
//! uses): data written before, between and after snapshots; the result passes `qemu-img check`,
//! `qemu-img snapshot -l` lists the expected ids and names, and `qemu-img convert -l` reads
//! each remaining snapshot's contents as they were when it was taken.

mod common;
use common::*;

use blockd_aio::block_on;
use blockd_block::SnapshotInfo;

fn info(id: &str, name: &str) -> SnapshotInfo {
    SnapshotInfo {
        id: id.into(),
        name: name.into(),
        date_sec: 1_700_000_000,
        date_nsec: 5,
        icount: Some(0),
        ..Default::default()
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|j| (j as u8).wrapping_mul(31) ^ seed)
        .collect()
}

/// The ID and TAG columns of `qemu-img snapshot -l`.
fn qemu_list(path: &str) -> Vec<(String, String)> {
    ok("qemu-img", &["snapshot", "-U", "-l", path])
        .lines()
        .skip(2)
        .map(|l| {
            let mut w = l.split_whitespace();
            (w.next().unwrap().into(), w.next().unwrap().into())
        })
        .collect()
}

fn snapshot_raw(dir: &TempDir, image: &str, name: &str) -> Vec<u8> {
    let out = dir.path("snap-out.raw");
    ok(
        "qemu-img",
        &[
            "convert",
            "-U",
            "-O",
            "raw",
            "-l",
            &format!("snapshot.name={name}"),
            image,
            &out,
        ],
    );
    let v = std::fs::read(&out).unwrap();
    let _ = std::fs::remove_file(&out);
    v
}

fn case(dir: &TempDir, tag: &str, list: &str) {
    let path = dir.path(&format!("{tag}.qcow2"));
    let size = 4usize << 20;
    ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-o", list, &path, "4M"],
    );
    ok("qemu-io", &["-c", "write -P 0x11 0 256k", &path]);
    let mut model = vec![0u8; size];
    model[..256 << 10].fill(0x11);
    let mut at_s1 = Vec::new();
    let mut g = graph();
    let node = open_qcow2(&mut g, &path, "").unwrap_or_else(|e| panic!("{tag}: {e}"));
    let be = backend(&g, &node);
    let drv = node.driver();
    block_on(async {
        // Cached, unwritten metadata at the moment of the snapshot.
        let d = pattern(96 << 10, 1);
        write(&be, 200 << 10, &d).await;
        model[200 << 10..296 << 10].copy_from_slice(&d);
        drv.snapshot_create(&node, info("", "s1")).await.unwrap();
        at_s1 = model.clone();
        // Writes after it copy on write: partly over shared clusters, partly fresh.
        let d = pattern(130 << 10, 2);
        write(&be, 10 << 10, &d).await;
        model[10 << 10..140 << 10].copy_from_slice(&d);
        let d = pattern(64 << 10, 3);
        write(&be, 3 << 20, &d).await;
        model[3 << 20..(3 << 20) + (64 << 10)].copy_from_slice(&d);
        drv.snapshot_create(&node, info("", "s2")).await.unwrap();
        let at_s2 = model.clone();
        // A used id is refused, a given free id is kept.
        let e = drv
            .snapshot_create(&node, info("1", "dup"))
            .await
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EEXIST), "{tag}");
        drv.snapshot_create(&node, info("77", "s3")).await.unwrap();
        let d = pattern(8 << 10, 4);
        write(&be, 60 << 10, &d).await;
        model[60 << 10..68 << 10].copy_from_slice(&d);
        let names: Vec<_> = drv
            .snapshots()
            .into_iter()
            .map(|s| (s.id, s.name))
            .collect();
        assert_eq!(
            names,
            [("1", "s1"), ("2", "s2"), ("77", "s3")].map(|(a, b)| (a.to_string(), b.to_string())),
            "{tag}"
        );
        // Not found: the wrong name for an id, an unknown name.
        for (id, name) in [(Some("1"), Some("s2")), (None, Some("nope")), (None, None)] {
            let e = drv.snapshot_delete(&node, id, name).await.unwrap_err();
            assert_eq!(
                e.raw_os_error(),
                Some(libc::ENOENT),
                "{tag} {id:?} {name:?}"
            );
        }
        let gone = drv.snapshot_delete(&node, Some("2"), None).await.unwrap();
        assert_eq!(gone.name, "s2");
        assert_eq!(gone.date_sec, 1_700_000_000);
        assert_eq!(gone.date_nsec, 5);
        let gone = drv.snapshot_delete(&node, None, Some("s3")).await.unwrap();
        assert_eq!(gone.id, "77");
        let d = pattern(70 << 10, 5);
        write(&be, 100 << 10, &d).await;
        model[100 << 10..170 << 10].copy_from_slice(&d);
        be.flush().await.unwrap();
        assert_eq!(first_diff(&read_all(&be).await, &model), None, "{tag}");
        drop(at_s2);
    })
    .unwrap();
    be.detach(&g);
    drop(node);
    drop(g);
    qemu_check_clean(&path);
    assert_eq!(
        qemu_list(&path),
        [("1".to_string(), "s1".to_string())],
        "{tag}"
    );
    assert_eq!(
        first_diff(&qemu_raw(dir, &path), &model),
        None,
        "{tag}: active"
    );
    assert_eq!(
        first_diff(&snapshot_raw(dir, &path, "s1"), &at_s1),
        None,
        "{tag}: snapshot s1"
    );
    // Deleting the last one through qemu-img leaves a clean image too.
    ok("qemu-img", &["snapshot", "-d", "s1", &path]);
    qemu_check_clean(&path);
}

#[test]
fn online_snapshots_match_qemu() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let dir = TempDir::new("online-snap");
    case(&dir, "default", "cluster_size=65536");
    case(&dir, "small-v2", "cluster_size=4096,compat=0.10");
    case(&dir, "extl2", "cluster_size=65536,extended_l2=on");
    case(&dir, "rc16", "cluster_size=8192,refcount_bits=16");
    case(&dir, "lazy", "cluster_size=65536,lazy_refcounts=on");
}

/// A refcount width too narrow for a second reference refuses the snapshot (QEMU: EINVAL)
/// and changes nothing.
#[test]
fn online_snapshot_refcount_overflow() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let dir = TempDir::new("online-snap-rc1");
    let path = dir.path("rc1.qcow2");
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "refcount_bits=1",
            &path,
            "1M",
        ],
    );
    ok("qemu-io", &["-c", "write -P 0x22 0 64k", &path]);
    let mut g = graph();
    let node = open_qcow2(&mut g, &path, "").unwrap();
    let drv = node.driver();
    block_on(async {
        let e = drv.snapshot_create(&node, info("", "s")).await.unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
    })
    .unwrap();
    assert!(drv.snapshots().is_empty());
    drop(node);
    drop(g);
    qemu_check_clean(&path);
    assert!(qemu_list(&path).is_empty());
}

/// A read-only image refuses both.
#[test]
fn online_snapshot_read_only() {
    if !have("qemu-img") {
        return;
    }
    let dir = TempDir::new("online-snap-ro");
    let path = dir.path("ro.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", &path, "1M"]);
    let mut g = graph();
    let node = open_qcow2(&mut g, &path, "read-only=on").unwrap();
    let drv = node.driver();
    block_on(async {
        let e = drv.snapshot_create(&node, info("", "s")).await.unwrap_err();
        assert!(e.raw_os_error().is_some());
        let e = drv
            .snapshot_delete(&node, None, Some("s"))
            .await
            .unwrap_err();
        assert!(e.raw_os_error().is_some());
    })
    .unwrap();
}
