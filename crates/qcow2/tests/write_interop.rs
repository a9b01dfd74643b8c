//! Images blockd creates and writes: byte-identical to qemu-img's fresh images, and after
//! random writes, partial writes over a backing file, discards and write-zeroes (also from two
//! iothreads at once) they pass `qemu-img check` and read back through qemu-img identically.

mod common;
use common::*;

use std::sync::Arc;

use blockd_aio::{IoThread, PollParams, block_on};
use blockd_block::options::parse;
use blockd_block::{BlockBackend, Graph, Node, ReqFlags};
use blockd_qcow2::CreateOptions;

fn opts(list: &str) -> CreateOptions {
    let kv: Vec<(String, String)> = list
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| {
            let (k, v) = s.split_once('=').unwrap();
            (k.to_string(), v.to_string())
        })
        .collect();
    CreateOptions::from_qemu_opts(&kv).unwrap()
}

/// Format `path` with blockd.
fn blockd_create(path: &str, o: &CreateOptions) {
    std::fs::File::create(path).unwrap();
    let mut g = Graph::new();
    let file = g
        .open(parse(&format!("driver=file,filename={path}")).unwrap())
        .unwrap();
    block_on(blockd_qcow2::create(&file, o)).unwrap().unwrap();
    g.remove(file.name()).unwrap();
}

#[test]
fn fresh_images_match_qemu_img_byte_for_byte() {
    if !have("qemu-img") {
        return;
    }
    let dir = TempDir::new("layout");
    let base = dir.path("base.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", &base, "1G"]);
    for (i, list) in [
        "size=1073741824",
        "size=0",
        "size=67108864,compat=0.10",
        "size=67108864,cluster_size=512,refcount_bits=1",
        "size=1099511627776,cluster_size=4096,refcount_bits=64",
        "size=10737418240,cluster_size=2M,extended_l2=on,compression_type=zstd,lazy_refcounts=on",
        "size=1073741824,backing_file=base.qcow2,backing_fmt=qcow2",
        "size=1073741824,backing_file=base.qcow2,backing_fmt=qcow2,compat=0.10",
    ]
    .iter()
    .enumerate()
    {
        let ours = dir.path(&format!("ours{i}.qcow2"));
        let theirs = dir.path(&format!("theirs{i}.qcow2"));
        let o = opts(list);
        blockd_create(&ours, &o);
        let mut args = vec![
            "create".to_string(),
            "-q".into(),
            "-f".into(),
            "qcow2".into(),
        ];
        let qopts: Vec<&str> = list
            .split(',')
            .filter(|s| !s.starts_with("size="))
            .collect();
        if !qopts.is_empty() {
            args.push("-o".into());
            args.push(qopts.join(","));
        }
        args.push(theirs.clone());
        args.push(o.size.unwrap().to_string());
        let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        ok("qemu-img", &a);
        let (x, y) = (
            std::fs::read(&ours).unwrap(),
            std::fs::read(&theirs).unwrap(),
        );
        assert_eq!(
            first_diff(&x, &y),
            None,
            "{list}: ours {} bytes, qemu's {}",
            x.len(),
            y.len()
        );
    }
}

/// Random writes, partial writes, discards, write-zeroes through blockd; a model of the guest
/// bytes is kept alongside.
async fn scribble(
    be: &BlockBackend,
    model: &mut [u8],
    seed: u64,
    cs: u64,
    shows_through: Option<&[u8]>,
) {
    let size = model.len() as u64;
    let mut rng = Rng(seed);
    for round in 0..120 {
        let op = rng.below(10);
        let off = rng.below(size);
        let max = (size - off).min(cs * 3);
        let len = 1 + rng.below(max);
        match op {
            0..=5 => {
                let b = (round as u8).wrapping_mul(7).wrapping_add(1);
                let data = vec![b; len as usize];
                write(be, off, &data).await;
                model[off as usize..(off + len) as usize].fill(b);
            }
            6 | 7 => {
                let flags = if op == 6 {
                    ReqFlags::MAY_UNMAP
                } else {
                    ReqFlags::NONE
                };
                be.write_zeroes(off, len, flags).await.unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            _ => {
                // Discard changes only whole clusters; with a backing file they read as zero,
                // without one as zero too (no backing).
                be.discard(off, len).await.unwrap();
                let a = off.div_ceil(cs) * cs;
                let b = if off + len == size {
                    size
                } else {
                    (off + len) / cs * cs
                };
                if a < b {
                    // A v2 image cannot say "zero": the backing file shows through again.
                    match shows_through {
                        Some(base) => model[a as usize..b as usize]
                            .copy_from_slice(&base[a as usize..b as usize]),
                        None => model[a as usize..b as usize].fill(0),
                    }
                }
            }
        }
    }
}

fn write_case(dir: &TempDir, tag: &str, list: &str, backing: Option<&str>) {
    write_case_opts(dir, tag, list, backing, "");
}

fn write_case_opts(dir: &TempDir, tag: &str, list: &str, backing: Option<&str>, runtime: &str) {
    let path = dir.path(&format!("{tag}.qcow2"));
    let mut o = opts(list);
    let cs = o.cluster_size;
    let size = o.size.unwrap();
    let mut model = vec![0u8; size as usize];
    let mut base = None;
    if let Some(b) = backing {
        o.set("backing_file", b).unwrap();
        o.set("backing_fmt", "raw").unwrap();
        model.copy_from_slice(&std::fs::read(dir.path(b)).unwrap()[..size as usize]);
        if o.version < 3 {
            base = Some(model.clone());
        }
    }
    blockd_create(&path, &o);
    let mut g = graph();
    let node = open_qcow2(&mut g, &path, runtime).unwrap_or_else(|e| panic!("{tag}: {e}"));
    let be = backend(&g, &node);
    block_on(async {
        scribble(&be, &mut model, 0x9e37_79b9 ^ cs, cs, base.as_deref()).await;
        be.flush().await.unwrap();
        let got = read_all(&be).await;
        assert_eq!(
            first_diff(&got, &model),
            None,
            "{tag}: blockd reads back what it wrote"
        );
    })
    .unwrap();
    be.detach(&g);
    drop(node);
    drop(g);
    qemu_check_clean(&path);
    let theirs = qemu_raw(dir, &path);
    assert_eq!(
        first_diff(&theirs, &model),
        None,
        "{tag} ({list}): qemu-img reads what blockd wrote"
    );
}

#[test]
fn blockd_written_images_pass_qemu_check() {
    if !have("qemu-img") {
        return;
    }
    let dir = TempDir::new("write");
    let mut cases = Vec::new();
    for cs in ["512", "4096", "65536"] {
        for rb in ["1", "16", "64"] {
            cases.push(format!("size=3M,cluster_size={cs},refcount_bits={rb}"));
        }
        cases.push(format!("size=3M,cluster_size={cs},compat=0.10"));
    }
    cases.push("size=3M,cluster_size=65536,extended_l2=on".into());
    cases.push("size=8M,cluster_size=2M".into());
    cases.push("size=3M,cluster_size=65536,preallocation=metadata".into());
    for (i, c) in cases.iter().enumerate() {
        write_case(&dir, &format!("w{i}"), c, None);
    }
}

#[test]
fn partial_writes_over_a_backing_file() {
    if !have("qemu-img") {
        return;
    }
    let dir = TempDir::new("cow");
    let mut rng = Rng(42);
    let base: Vec<u8> = (0..(4 << 20)).map(|_| rng.next() as u8).collect();
    std::fs::write(dir.path("base.raw"), &base).unwrap();
    for (i, c) in [
        "size=4M,cluster_size=65536",
        "size=4M,cluster_size=4096,refcount_bits=8",
        "size=4M,cluster_size=65536,extended_l2=on",
        "size=4M,cluster_size=32768,extended_l2=on,compat=1.1",
        "size=4M,cluster_size=65536,compat=0.10",
    ]
    .iter()
    .enumerate()
    {
        write_case(&dir, &format!("cow{i}"), c, Some("base.raw"));
    }
}

#[test]
fn concurrent_writers_from_two_iothreads() {
    if !have("qemu-img") {
        return;
    }
    let dir = TempDir::new("mq");
    let path = dir.path("mq.qcow2");
    blockd_create(&path, &opts("size=16M,cluster_size=4096"));
    let mut g = graph();
    let node: Arc<Node> = open_qcow2(&mut g, &path, "").unwrap();
    let threads: Vec<IoThread> = (0..2)
        .map(|i| IoThread::spawn(&format!("io{i}"), PollParams::default()).unwrap())
        .collect();
    // Each writer owns interleaved 1 KiB stripes, so both allocate the same clusters at once.
    let mut tasks = Vec::new();
    for (w, t) in threads.iter().enumerate() {
        let be = Arc::new(backend(&g, &node));
        tasks.push((
            t.handle().spawn(move || async move {
                // Four tasks per iothread, each owning every fourth of this writer's stripes,
                // so allocations of the same clusters overlap within a thread too.
                let mut tasks = Vec::new();
                for part in 0..4u64 {
                    let be = be.clone();
                    tasks.push(blockd_aio::spawn(async move {
                        for round in 0..2u64 {
                            for s in (part..(16u64 << 10) / 2).step_by(4) {
                                let stripe = s * 2 + w as u64;
                                if (stripe + round).is_multiple_of(3) {
                                    continue;
                                }
                                let data = vec![(w as u8 + 1) * 0x10 + round as u8; 1024];
                                let (r, _) = be
                                    .write(
                                        stripe * 1024,
                                        blockd_aio::IoBuf::from_slice(&data),
                                        ReqFlags::NONE,
                                    )
                                    .await;
                                r.unwrap();
                            }
                        }
                    }));
                }
                for t in tasks {
                    t.await;
                }
                be.flush().await.unwrap();
            }),
            (),
        ));
    }
    block_on(async {
        for (t, _) in tasks {
            t.await.unwrap();
        }
    })
    .unwrap();
    for t in threads {
        t.stop();
    }
    drop(node);
    drop(g);
    qemu_check_clean(&path);
    let got = qemu_raw(&dir, &path);
    for stripe in 0..(16u64 << 10) {
        let w = stripe % 2;
        let s = &got[(stripe * 1024) as usize..(stripe * 1024 + 1024) as usize];
        let r1 = !(stripe + 1).is_multiple_of(3);
        let r0 = !stripe.is_multiple_of(3);
        let want = if r1 {
            (w as u8 + 1) * 0x10 + 1
        } else if r0 {
            (w as u8 + 1) * 0x10
        } else {
            0
        };
        assert!(
            s.iter().all(|&b| b == want),
            "stripe {stripe}: {:#x} want {want:#x}",
            s[0]
        );
    }
}

#[test]
fn compressed_writes_read_back_through_qemu() {
    if !have("qemu-img") {
        return;
    }
    let dir = TempDir::new("cw");
    for (i, list) in [
        "size=1000k,cluster_size=65536",
        "size=1000k,cluster_size=65536,compression_type=zstd",
        "size=1000k,cluster_size=4096",
        "size=1000k,cluster_size=65536,extended_l2=on",
    ]
    .iter()
    .enumerate()
    {
        let path = dir.path(&format!("cw{i}.qcow2"));
        let o = opts(list);
        let cs = o.cluster_size as usize;
        blockd_create(&path, &o);
        let size = o.size.unwrap() as usize;
        // Compressible text, incompressible noise, and a partial last cluster.
        let mut rng = Rng(5 + i as u64);
        let mut model = vec![0u8; size];
        for (c, chunk) in model.chunks_mut(cs).enumerate() {
            if c % 3 == 1 {
                chunk.iter_mut().for_each(|b| *b = rng.next() as u8);
            } else {
                for (j, b) in chunk.iter_mut().enumerate() {
                    *b = b"qcow2 compressed cluster "[(j + c) % 25];
                }
            }
        }
        let mut g = graph();
        let node = open_qcow2(&mut g, &path, "").unwrap();
        let be = backend(&g, &node);
        block_on(async {
            let mut off = 0;
            while off < size {
                let n = (size - off).min(cs * 3);
                let (r, _) = be
                    .write(
                        off as u64,
                        blockd_aio::IoBuf::from_slice(&model[off..off + n]),
                        ReqFlags::WRITE_COMPRESSED,
                    )
                    .await;
                r.unwrap_or_else(|e| panic!("{list}: compressed write at {off}: {e}"));
                off += n;
            }
            // Compressed clusters are not overwritten by further compressed writes.
            let (r, _) = be
                .write(
                    0,
                    blockd_aio::IoBuf::from_slice(&model[..cs]),
                    ReqFlags::WRITE_COMPRESSED,
                )
                .await;
            assert!(r.is_err(), "{list}");
            // A plain write over a compressed cluster copies it out first.
            write(&be, 100, b"plain").await;
            model[100..105].copy_from_slice(b"plain");
            assert_eq!(first_diff(&read_all(&be).await, &model), None, "{list}");
        })
        .unwrap();
        be.detach(&g);
        drop(node);
        drop(g);
        qemu_check_clean(&path);
        let check = ok("qemu-img", &["check", &path]);
        assert!(!check.contains(" 0.00% compressed"), "{list}: {check}");
        assert_eq!(first_diff(&qemu_raw(&dir, &path), &model), None, "{list}");
    }
}

#[test]
fn writes_over_internal_snapshots_keep_them_intact() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let dir = TempDir::new("snap");
    for (i, o) in [
        "cluster_size=65536",
        "cluster_size=4096,refcount_bits=64",
        "cluster_size=65536,extended_l2=on",
    ]
    .iter()
    .enumerate()
    {
        let path = dir.path(&format!("s{i}.qcow2"));
        ok(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-o", o, &path, "4M"],
        );
        ok(
            "qemu-io",
            &[
                "-f",
                "qcow2",
                "-c",
                "write -P 0x11 0 3M",
                "-c",
                "write -c -P 0x12 3M 64k",
                &path,
            ],
        );
        ok("qemu-img", &["snapshot", "-c", "before", &path]);
        let before = qemu_raw(&dir, &path);
        // blockd writes into clusters (and L2 tables) shared with the snapshot.
        let mut model = before.clone();
        let mut g = graph();
        let node = open_qcow2(&mut g, &path, "").unwrap();
        let be = backend(&g, &node);
        block_on(async {
            let mut rng = Rng(77 + i as u64);
            for r in 0..40u8 {
                let off = rng.below(4 << 20) as usize;
                let len = (1 + rng.below(100_000) as usize).min((4 << 20) - off);
                write(&be, off as u64, &vec![r + 0x40; len]).await;
                model[off..off + len].fill(r + 0x40);
            }
            be.discard(1 << 20, 128 << 10).await.unwrap();
            model[1 << 20..(1 << 20) + (128 << 10)].fill(0);
            be.write_zeroes(2 << 20, 64 << 10, ReqFlags::MAY_UNMAP)
                .await
                .unwrap();
            model[2 << 20..(2 << 20) + (64 << 10)].fill(0);
            be.flush().await.unwrap();
            assert_eq!(first_diff(&read_all(&be).await, &model), None, "{o}");
        })
        .unwrap();
        be.detach(&g);
        drop(node);
        drop(g);
        qemu_check_clean(&path);
        assert_eq!(
            first_diff(&qemu_raw(&dir, &path), &model),
            None,
            "{o}: active layer"
        );
        // The snapshot still holds what it held.
        ok("qemu-img", &["snapshot", "-a", "before", &path]);
        qemu_check_clean(&path);
        assert_eq!(
            first_diff(&qemu_raw(&dir, &path), &before),
            None,
            "{o}: snapshot"
        );
    }
}

#[test]
fn tiny_metadata_caches_evict_and_write_back_in_order() {
    if !have("qemu-img") {
        return;
    }
    let dir = TempDir::new("tiny");
    std::fs::write(dir.path("base.raw"), vec![0x5au8; 3 << 20]).unwrap();
    // 512-byte L2 slices, two of them, four refcount blocks: constant eviction and
    // write-back while allocating.
    for (i, (list, rt)) in [
        (
            "size=3M,cluster_size=512,refcount_bits=16",
            "l2-cache-entry-size=512,l2-cache-size=1024,refcount-cache-size=2048",
        ),
        (
            "size=3M,cluster_size=4096,refcount_bits=1",
            "l2-cache-entry-size=1024,cache-size=16k,cache-clean-interval=1",
        ),
        (
            "size=3M,cluster_size=65536,extended_l2=on",
            "l2-cache-entry-size=4096,l2-cache-size=8192",
        ),
    ]
    .iter()
    .enumerate()
    {
        write_case_opts(&dir, &format!("tiny{i}"), list, None, rt);
        write_case_opts(&dir, &format!("tinyb{i}"), list, Some("base.raw"), rt);
    }
}
