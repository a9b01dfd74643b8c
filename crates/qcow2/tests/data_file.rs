//! External data files through the driver API, with QEMU's tools as the oracle: images
//! qemu-img makes with data files (plain and raw, several cluster sizes, extended L2, a
//! backing file) and qemu-io fills read back byte for byte; blockd's writes, write-zeroes
//! and discards on such images pass `qemu-img check`, read back identically through QEMU, and
//! a raw data file stays equal to the guest view; the data file child given as an option (a
//! node name or options); reopen read-only and back; and the refusals (compressed writes,
//! snapshots, broken data file settings, json:/protocol names).

mod common;

use blockd_aio::{IoBuf, block_on};
use blockd_block::options::parse;
use blockd_block::{Perm, ReqFlags, SnapshotInfo};
use common::*;

const QI: &str = "qemu-img";
const QIO: &str = "qemu-io";

fn tools() -> bool {
    have(QI) && have(QIO)
}

/// `qemu-img create` in `dir` (data file names are relative to the current directory, as
/// QEMU opens them).
fn create_in(dir: &TempDir, args: &[&str]) {
    let o = std::process::Command::new(QI)
        .arg("create")
        .arg("-q")
        .args(args)
        .current_dir(&dir.0)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn qemu_io(dir: &TempDir, img: &str, cmds: &[&str]) {
    let mut c = std::process::Command::new(QIO);
    for x in cmds {
        c.arg("-c").arg(x);
    }
    let o = c.arg(img).current_dir(&dir.0).output().unwrap();
    assert!(
        o.status.success() && !String::from_utf8_lossy(&o.stdout).contains("failed"),
        "qemu-io {cmds:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Open `img` with an absolute data file option (the tests do not change directory).
fn open(
    g: &mut blockd_block::Graph,
    dir: &TempDir,
    img: &str,
    data: &str,
    extra: &str,
) -> Result<std::sync::Arc<blockd_block::Node>, String> {
    let mut e = format!(
        "data-file.driver=file,data-file.filename={}",
        dir.path(data)
    );
    if !extra.is_empty() {
        e += ",";
        e += extra;
    }
    open_qcow2(g, &dir.path(img), &e)
}

/// The guest view through QEMU, run in `dir` so relative data file names resolve.
fn qemu_view(dir: &TempDir, img: &str) -> Vec<u8> {
    let o = std::process::Command::new(QI)
        .args(["convert", "-U", "-O", "raw", img, "view.raw"])
        .current_dir(&dir.0)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v = std::fs::read(dir.path("view.raw")).unwrap();
    let _ = std::fs::remove_file(dir.path("view.raw"));
    v
}

fn qemu_check(dir: &TempDir, img: &str) {
    let o = std::process::Command::new(QI)
        .args(["check", img])
        .current_dir(&dir.0)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "qemu-img check {img}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn qemu_images_read_back_byte_for_byte() {
    if !tools() {
        return;
    }
    let cases: &[(&str, &str)] = &[
        ("data_file=d.raw", "64k"),
        ("data_file=d.raw,data_file_raw=on", "64k"),
        ("data_file=d.raw", "4k"),
        ("data_file=d.raw,extended_l2=on", "16k"),
        ("data_file=d.raw,data_file_raw=on,extended_l2=on", "32k"),
        ("data_file=d.raw,refcount_bits=1", "512"),
    ];
    for (opts, cs) in cases {
        let dir = TempDir::new("df-read");
        create_in(
            &dir,
            &[
                "-f",
                "qcow2",
                "-o",
                &format!("{opts},cluster_size={cs}"),
                "a.qcow2",
                "3M",
            ],
        );
        qemu_io(
            &dir,
            "a.qcow2",
            &[
                "write -P 0x11 0 100k",
                "write -P 0x22 1000000 70000",
                "write -z 20k 8k",
                "write -z -u 1M 64k",
                "discard 64k 64k",
                "write -P 0x33 2900000 12345",
            ],
        );
        let want = qemu_view(&dir, "a.qcow2");
        let mut g = graph();
        let node = open(&mut g, &dir, "a.qcow2", "d.raw", "read-only=on").unwrap();
        let be = blockd_block::BlockBackend::new(&g, "", &node, Perm::CONSISTENT_READ, Perm::ALL)
            .unwrap();
        let got = block_on(read_all(&be)).unwrap();
        assert_eq!(first_diff(&got, &want), None, "{opts} cluster_size={cs}");
        if opts.contains("raw=on") {
            let raw = std::fs::read(dir.path("d.raw")).unwrap();
            assert_eq!(
                first_diff(&raw[..want.len()], &want),
                None,
                "{opts}: raw data file"
            );
        }
        be.detach(&g);
    }
}

#[test]
fn blockd_writes_pass_qemu_check_and_read_back() {
    if !tools() {
        return;
    }
    for (i, opts) in [
        "data_file=d.raw",
        "data_file=d.raw,data_file_raw=on",
        "data_file=d.raw,extended_l2=on,cluster_size=32k",
        "data_file=d.raw,cluster_size=4k",
    ]
    .iter()
    .enumerate()
    {
        let dir = TempDir::new("df-write");
        create_in(&dir, &["-f", "qcow2", "-o", opts, "a.qcow2", "4M"]);
        let size = 4u64 << 20;
        let mut want = vec![0u8; size as usize];
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 + i as u64);
        let mut g = graph();
        let node = open(&mut g, &dir, "a.qcow2", "d.raw", "").unwrap();
        let be = backend(&g, &node);
        block_on(async {
            for step in 0..120 {
                let off = rng.below(size - 1);
                let len = (1 + rng.below(200_000)).min(size - off);
                let (a, b) = (off as usize, (off + len) as usize);
                match step % 6 {
                    0..=2 => {
                        let byte = (step % 250 + 1) as u8;
                        write(&be, off, &vec![byte; len as usize]).await;
                        want[a..b].fill(byte);
                    }
                    3 => {
                        be.write_zeroes(off, len, ReqFlags::NONE).await.unwrap();
                        want[a..b].fill(0);
                    }
                    4 => {
                        be.write_zeroes(off, len, ReqFlags::MAY_UNMAP)
                            .await
                            .unwrap();
                        want[a..b].fill(0);
                    }
                    _ => {
                        // Only whole clusters are discarded; they then read as zeroes.
                        be.discard(off, len).await.unwrap();
                        let cs = node.driver().cluster_size().unwrap();
                        let s = off.div_ceil(cs) * cs;
                        let e = ((off + len) / cs * cs).max(s);
                        want[s as usize..e as usize].fill(0);
                    }
                }
            }
            be.flush().await.unwrap();
            assert_eq!(
                first_diff(&read_all(&be).await, &want),
                None,
                "{opts}: blockd view"
            );
        })
        .unwrap();
        be.detach(&g);
        drop(node);
        drop(g);
        qemu_check(&dir, "a.qcow2");
        assert_eq!(
            first_diff(&qemu_view(&dir, "a.qcow2"), &want),
            None,
            "{opts}: QEMU view"
        );
        if opts.contains("raw=on") {
            let raw = std::fs::read(dir.path("d.raw")).unwrap();
            assert_eq!(first_diff(&raw, &want), None, "{opts}: the raw data file");
        }
        // Metadata only in the image file: it stays small, data clusters never land there.
        let len = std::fs::metadata(dir.path("a.qcow2")).unwrap().len();
        assert!(len < 1 << 20, "{opts}: image file grew to {len}");
    }
}

#[test]
fn blockd_created_images_read_back_through_qemu() {
    if !tools() {
        return;
    }
    for raw in [false, true] {
        let dir = TempDir::new("df-create");
        let mut opts = blockd_qcow2::CreateOptions::from_qemu_opts(&[
            ("data_file".into(), "d.raw".into()),
            (
                "data_file_raw".into(),
                if raw { "on" } else { "off" }.into(),
            ),
        ])
        .unwrap();
        opts.set("size", "2M").unwrap();
        let mut g = graph();
        std::fs::File::create(dir.path("a.qcow2")).unwrap();
        std::fs::File::create(dir.path("d.raw")).unwrap();
        let file = g
            .open(parse(&format!("driver=file,filename={}", dir.path("a.qcow2"))).unwrap())
            .unwrap();
        let data = g
            .open(parse(&format!("driver=file,filename={}", dir.path("d.raw"))).unwrap())
            .unwrap();
        block_on(blockd_qcow2::create::create_with_data_file(
            &file,
            Some(&data),
            &opts,
        ))
        .unwrap()
        .unwrap();
        drop((file, data));
        let node = open(&mut g, &dir, "a.qcow2", "d.raw", "").unwrap();
        let be = backend(&g, &node);
        let mut want = vec![0u8; 2 << 20];
        block_on(async {
            write(&be, 12345, &[7u8; 300_000]).await;
            write(&be, 1 << 20, &[9u8; 65536]).await;
            be.flush().await.unwrap();
        })
        .unwrap();
        want[12345..312_345].fill(7);
        want[1 << 20..(1 << 20) + 65536].fill(9);
        be.detach(&g);
        drop(node);
        drop(g);
        qemu_check(&dir, "a.qcow2");
        assert_eq!(
            first_diff(&qemu_view(&dir, "a.qcow2"), &want),
            None,
            "raw={raw}"
        );
        let out = std::process::Command::new(QI)
            .args(["info", "a.qcow2"])
            .current_dir(&dir.0)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("    data file: d.raw\n"), "{text}");
        assert!(
            text.contains(&format!("    data file raw: {raw}\n")),
            "{text}"
        );
    }
}

#[test]
fn data_file_child_options_backing_and_reopen() {
    if !tools() {
        return;
    }
    let dir = TempDir::new("df-opts");
    create_in(&dir, &["-f", "raw", "base.raw", "1M"]);
    std::fs::write(dir.path("base.raw"), vec![0x5a; 1 << 20]).unwrap();
    create_in(
        &dir,
        &[
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "-o",
            "data_file=d.raw",
            "a.qcow2",
        ],
    );
    qemu_io(&dir, "a.qcow2", &["write -P 1 64k 4k"]);
    let mut want = vec![0x5a; 1 << 20];
    // The allocating write copied the rest of its cluster from the backing file.
    want[65536..65536 + 4096].fill(1);

    // The data file as a node reference.
    let mut g = graph();
    let d = g
        .open(
            parse(&format!(
                "driver=file,node-name=dnode,filename={}",
                dir.path("d.raw")
            ))
            .unwrap(),
        )
        .unwrap();
    let node = open_qcow2(
        &mut g,
        &dir.path("a.qcow2"),
        &format!(
            "data-file=dnode,backing.driver=raw,backing.file.driver=file,backing.file.filename={}",
            dir.path("base.raw")
        ),
    )
    .unwrap();
    assert!(std::sync::Arc::ptr_eq(
        &node.child("data-file").unwrap(),
        &d
    ));
    let be = backend(&g, &node);
    block_on(async {
        assert_eq!(first_diff(&read_all(&be).await, &want), None);
    })
    .unwrap();
    be.detach(&g);
    drop((node, d));
    drop(g);

    // The data file from nested options (a child opened with the image): a reopen to
    // read-only and back takes it along, and writes work again after.
    let mut g = graph();
    let node = open(
        &mut g,
        &dir,
        "a.qcow2",
        "d.raw",
        &format!(
            "backing.driver=raw,backing.file.driver=file,backing.file.filename={}",
            dir.path("base.raw")
        ),
    )
    .unwrap();
    let d = node.child("data-file").unwrap();
    assert!(d.is_auto_named());
    let name = node.name().to_string();
    for ro in [true, false] {
        let opts = serde_json::json!({"node-name": name, "driver": "qcow2", "read-only": ro,
            "file": node.child("file").unwrap().name(), "data-file": d.name(),
            "backing": node.child("backing").unwrap().name()});
        reopen(&mut g, opts).unwrap();
        assert_eq!(node.is_read_only(), ro);
        assert_eq!(d.is_read_only(), ro, "the data file follows");
    }
    let be = backend(&g, &node);
    block_on(async {
        write(&be, 500_000, &[3u8; 1000]).await;
        be.flush().await.unwrap();
    })
    .unwrap();
    want[500_000..501_000].fill(3);
    // Another data file in a reopen is refused.
    let other = g
        .open(
            parse(&format!(
                "driver=file,node-name=other,filename={}",
                dir.path("base.raw")
            ))
            .unwrap(),
        )
        .unwrap();
    let opts = serde_json::json!({"node-name": name, "driver": "qcow2", "data-file": other.name(),
        "file": node.child("file").unwrap().name(),
        "backing": node.child("backing").unwrap().name()});
    let e = reopen(&mut g, opts).unwrap_err();
    assert!(e.contains("data-file"), "{e}");
    be.detach(&g);
    drop((node, other, d));
    drop(g);
    qemu_check(&dir, "a.qcow2");
    assert_eq!(first_diff(&qemu_view(&dir, "a.qcow2"), &want), None);
}

/// blockdev-reopen of one node as the daemon runs it: plan, drain, flush, commit.
fn reopen(g: &mut blockd_block::Graph, opts: serde_json::Value) -> Result<(), String> {
    let serde_json::Value::Object(m) = opts else {
        unreachable!()
    };
    let plan = g.reopen_plan(vec![m])?;
    block_on(async {
        let drain = blockd_block::drained_all(&plan.drain_nodes()).await;
        plan.flush().await?;
        g.reopen_commit(plan, &drain)
    })
    .unwrap()
}

#[test]
fn refusals() {
    if !tools() {
        return;
    }
    let dir = TempDir::new("df-refuse");
    create_in(
        &dir,
        &["-f", "qcow2", "-o", "data_file=d.raw", "a.qcow2", "1M"],
    );
    create_in(&dir, &["-f", "qcow2", "p.qcow2", "1M"]);
    let mut g = graph();
    let node = open(&mut g, &dir, "a.qcow2", "d.raw", "").unwrap();
    let be = backend(&g, &node);
    block_on(async {
        // No compressed clusters in data files (QEMU: ENOTSUP).
        let (r, _) = be
            .write(0, IoBuf::zeroed(65536, 4096), ReqFlags::WRITE_COMPRESSED)
            .await;
        assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::ENOTSUP));
        // Internal snapshots would not cover the data file.
        let sn = SnapshotInfo {
            id: String::new(),
            name: "s".into(),
            vm_state_size: 0,
            date_sec: 0,
            date_nsec: 0,
            vm_clock_nsec: 0,
            icount: None,
        };
        let e = node.driver().snapshot_create(&node, sn).await.unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOTSUP));
    })
    .unwrap();
    be.detach(&g);
    drop(node);
    drop(g);
    let mut g = graph();

    // The image names its data file relative to the current directory, which is not the
    // test's: without the option the open fails on that name.
    let e = open_qcow2(&mut g, &dir.path("a.qcow2"), "").unwrap_err();
    assert!(e.contains("Could not open 'd.raw'"), "{e}");
    // A data file option on an image without one.
    let e = open(&mut g, &dir, "p.qcow2", "d.raw", "").unwrap_err();
    assert_eq!(
        e,
        "'data-file' can only be set for images with an external data file"
    );

    // Header surgery: the bit without a name, the raw bit alone, refused names.
    let img = std::fs::read(dir.path("a.qcow2")).unwrap();
    let ext_at = {
        let mut off = u32::from_be_bytes(img[100..104].try_into().unwrap()) as usize;
        while u32::from_be_bytes(img[off..off + 4].try_into().unwrap()) != 0x4441_5441 {
            let len = u32::from_be_bytes(img[off + 4..off + 8].try_into().unwrap()) as usize;
            off += 8 + len.div_ceil(8) * 8;
        }
        off
    };
    let with_name = |name: &[u8]| {
        // The name is "d.raw" (5 bytes, one 8-byte slot): same-length names fit in place.
        let mut b = img.clone();
        assert!(name.len() <= 8);
        b[ext_at + 4..ext_at + 8].copy_from_slice(&(name.len() as u32).to_be_bytes());
        b[ext_at + 8..ext_at + 16].fill(0);
        b[ext_at + 8..ext_at + 8 + name.len()].copy_from_slice(name);
        b
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("json", with_name(b"json:{}"), "is a json: specification"),
        ("proto", with_name(b"nbd:x:1"), "has a protocol prefix"),
        (
            "empty",
            with_name(b""),
            "'data-file' is required for this image",
        ),
        {
            // Extension type changed to an unknown one: the bit stays, the name is gone.
            let mut b = img.clone();
            b[ext_at..ext_at + 4].copy_from_slice(&0x1234_5678u32.to_be_bytes());
            ("noname", b, "'data-file' is required for this image")
        },
        {
            let mut b = std::fs::read(dir.path("p.qcow2")).unwrap();
            b[88..96].copy_from_slice(&2u64.to_be_bytes());
            ("rawbit", b, "data-file-raw requires a data file")
        },
    ];
    for (tag, bytes, want) in cases {
        let p = dir.path(&format!("{tag}.qcow2"));
        std::fs::write(&p, &bytes).unwrap();
        let e = open_qcow2(&mut g, &p, "read-only=on").unwrap_err();
        assert!(e.contains(want), "{tag}: {e}");
    }
}
