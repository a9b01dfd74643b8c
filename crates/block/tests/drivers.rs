//! The file, raw and null drivers through BlockBackend, option handling with QEMU's wording,
//! and the permission model.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use blockd_aio::{IoBuf, block_on};
use blockd_block::options::parse;
use blockd_block::{BlockBackend, Graph, Node, Perm, ReqFlags};

fn temp_image(tag: &str, size: u64) -> std::path::PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let p = std::env::temp_dir().join(format!(
        "blockd-drv-{tag}-{}-{}.img",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::File::create(&p).unwrap().set_len(size).unwrap();
    p
}

fn open(g: &mut Graph, opts: &str) -> Result<Arc<Node>, String> {
    g.open(parse(opts)?)
}

fn rw() -> Perm {
    Perm::CONSISTENT_READ | Perm::WRITE | Perm::RESIZE
}

fn pattern(len: usize, b: u8) -> IoBuf {
    let mut buf = IoBuf::new(len, 4096);
    buf.fill(b);
    buf
}

async fn read(be: &BlockBackend, off: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let (r, b) = be.read(off, IoBuf::new(len, 4096)).await;
    r.map(|_| b.to_vec())
}

#[test]
fn raw_file_round_trip_with_every_aio_engine() {
    for aio in ["io_uring", "threads"] {
        let path = temp_image("rt", 1 << 20);
        let mut g = Graph::new();
        let node = open(
            &mut g,
            &format!(
                "driver=raw,file.driver=file,file.aio={aio},file.filename={}",
                path.display()
            ),
        )
        .unwrap();
        assert_eq!(node.length(), 1 << 20);
        let be = BlockBackend::new(&g, "", &node, rw(), Perm::ALL).unwrap();
        block_on(async {
            let (r, _) = be.write(4096, pattern(8192, 0x5a), ReqFlags::NONE).await;
            r.unwrap();
            let (r, _) = be.write(100, pattern(7, 0x11), ReqFlags::FUA).await;
            r.unwrap();
            be.flush().await.unwrap();
            assert!(
                read(&be, 4096, 8192)
                    .await
                    .unwrap()
                    .iter()
                    .all(|&b| b == 0x5a)
            );
            let head = read(&be, 96, 16).await.unwrap();
            assert_eq!(&head[..4], &[0; 4]);
            assert_eq!(&head[4..11], &[0x11; 7]);
            // Past the end: an error, not a short read.
            let e = read(&be, (1 << 20) - 512, 1024).await.unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EIO));
        })
        .unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert!(bytes[4096..12288].iter().all(|&b| b == 0x5a), "{aio}");
        be.detach(&g);
        let _ = std::fs::remove_file(path);
    }
}

#[test]
fn o_direct_with_unaligned_requests_and_native_aio() {
    let path = temp_image("direct", 1 << 20);
    let mut g = Graph::new();
    let node = match open(
        &mut g,
        &format!(
            "driver=raw,file.driver=file,file.filename={},file.aio=native,cache.direct=on",
            path.display()
        ),
    ) {
        Ok(n) => n,
        Err(e) if e.contains("Invalid argument") => {
            eprintln!("SKIP: O_DIRECT unsupported here: {e}");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let file = node.child("file").unwrap();
    assert!(file.limits().request_alignment >= 512);
    let be = BlockBackend::new(&g, "", &node, rw(), Perm::ALL).unwrap();
    block_on(async {
        // Unaligned offset and length: read-modify-write underneath.
        let (r, _) = be.write(1000, pattern(3000, 0x77), ReqFlags::NONE).await;
        r.unwrap();
        let d = read(&be, 999, 3002).await.unwrap();
        assert_eq!(d[0], 0);
        assert!(d[1..3001].iter().all(|&b| b == 0x77));
        assert_eq!(d[3001], 0);
    })
    .unwrap();
    be.detach(&g);
    let _ = std::fs::remove_file(path);
}

#[test]
fn discard_write_zeroes_block_status_and_truncate() {
    let path = temp_image("zero", 1 << 20);
    let mut g = Graph::new();
    let node = open(
        &mut g,
        &format!(
            "driver=raw,discard=unmap,file.driver=file,file.filename={}",
            path.display()
        ),
    )
    .unwrap();
    let be = BlockBackend::new(&g, "", &node, rw(), Perm::ALL).unwrap();
    block_on(async {
        let st = be.block_status(0, 1 << 20).await.unwrap();
        assert!(!st.data && st.zero, "fresh sparse file is a hole: {st:?}");
        let (r, _) = be.write(65536, pattern(65536, 9), ReqFlags::NONE).await;
        r.unwrap();
        let st = be.block_status(65536, 4096).await.unwrap();
        assert!(st.data);
        be.write_zeroes(65536, 4096, ReqFlags::NONE).await.unwrap();
        assert!(
            read(&be, 65536, 4096)
                .await
                .unwrap()
                .iter()
                .all(|&b| b == 0)
        );
        be.discard(69632, 61440).await.unwrap();
        assert!(
            read(&be, 69632, 61440)
                .await
                .unwrap()
                .iter()
                .all(|&b| b == 0)
        );
        be.write_zeroes(0, 4096, ReqFlags::MAY_UNMAP).await.unwrap();
        assert_eq!(be.truncate(2 << 20).await.unwrap(), 2 << 20);
        assert_eq!(be.length(), 2 << 20);
    })
    .unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 2 << 20);
    be.detach(&g);
    let _ = std::fs::remove_file(path);
}

#[test]
fn raw_offset_and_size_window() {
    let path = temp_image("win", 65536);
    std::fs::write(
        &path,
        (0..65536u32).map(|i| (i / 4096) as u8).collect::<Vec<u8>>(),
    )
    .unwrap();
    let mut g = Graph::new();
    let node = open(
        &mut g,
        &format!(
            "driver=raw,offset=8192,size=16384,file.driver=file,file.filename={}",
            path.display()
        ),
    )
    .unwrap();
    assert_eq!(node.length(), 16384);
    let be = BlockBackend::new(&g, "", &node, rw(), Perm::ALL).unwrap();
    block_on(async {
        let d = read(&be, 0, 16384).await.unwrap();
        assert!(d[..4096].iter().all(|&b| b == 2));
        assert!(d[12288..].iter().all(|&b| b == 5));
        assert!(read(&be, 16384, 1).await.is_err());
    })
    .unwrap();
    let e = open(
        &mut g,
        &format!(
            "driver=raw,offset=60000,size=16384,file.driver=file,file.filename={}",
            path.display()
        ),
    )
    .unwrap_err();
    assert!(e.starts_with("The sum of offset (60000) and size (16384) has to be smaller or equal to the  actual size of the containing file (65536)"), "{e}");
    be.detach(&g);
    let _ = std::fs::remove_file(path);
}

#[test]
fn null_co_sizes_and_read_zeroes() {
    let mut g = Graph::new();
    let n = open(&mut g, "driver=null-co").unwrap();
    assert_eq!(n.length(), 1 << 30);
    assert_eq!(n.driver().format_name(), "null-co");
    let z = open(
        &mut g,
        "driver=null-aio,size=1M,read-zeroes=on,latency-ns=1000",
    )
    .unwrap();
    assert_eq!(z.length(), 1 << 20);
    let be = BlockBackend::new(&g, "", &z, rw(), Perm::ALL).unwrap();
    block_on(async {
        let mut b = IoBuf::new(4096, 4096);
        b.fill(0xab);
        let (r, b) = be.read(0, b).await;
        r.unwrap();
        assert!(b.iter().all(|&x| x == 0));
        let (r, _) = be.write(0, b, ReqFlags::NONE).await;
        r.unwrap();
    })
    .unwrap();
}

#[test]
fn options_are_refused_with_qemus_words() {
    let mut g = Graph::new();
    let cases = [
        (
            "driver=file,filename=/nonexistent/x.img",
            "Could not open '/nonexistent/x.img': No such file or directory",
        ),
        (
            "driver=null-co,bar=2",
            "Block protocol 'null-co' doesn't support the option 'bar'",
        ),
        ("driver=bogus", "Unknown driver 'bogus'"),
        (
            "driver=null-co,size=abc",
            "Parameter 'size' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.",
        ),
        (
            "driver=null-co,cache.direct=maybe",
            "Parameter 'cache.direct' expects 'on' or 'off'",
        ),
        ("node-name=x", "Parameter 'driver' is missing"),
    ];
    for (opts, want) in cases {
        assert_eq!(open(&mut g, opts).unwrap_err(), want, "{opts}");
    }
    let path = temp_image("opts", 4096);
    let e = open(
        &mut g,
        &format!(
            "driver=raw,foo=3,file.driver=file,file.filename={}",
            path.display()
        ),
    )
    .unwrap_err();
    assert_eq!(e, "Block format 'raw' does not support the option 'foo'");
    let e = open(
        &mut g,
        &format!("driver=file,filename={},aio=native", path.display()),
    )
    .unwrap_err();
    assert_eq!(
        e,
        "aio=native was specified, but it requires cache.direct=on, which was not specified."
    );
    // A child given only a filename is a file.
    let n = open(
        &mut g,
        &format!(
            "driver=raw,read-only=on,force-share=on,file.filename={}",
            path.display()
        ),
    )
    .unwrap();
    assert_eq!(n.child("file").unwrap().driver().format_name(), "file");
    // The JSON spelling opens the same thing.
    let n = g
        .open(
            parse(&format!(
                r#"{{"driver":"raw","node-name":"j","file":{{"driver":"file","filename":"{}"}}}}"#,
                path.display()
            ))
            .unwrap(),
        )
        .unwrap();
    assert_eq!(n.name(), "j");
    assert!(n.child("file").unwrap().name().starts_with("#block"));
    assert_eq!(
        open(&mut g, "driver=null-co,node-name=j").unwrap_err(),
        "Duplicate nodes with node-name='j'"
    );
    let _ = std::fs::remove_file(path);
}

#[test]
fn permission_conflicts_are_refused_and_explained() {
    let mut g = Graph::new();
    let n = open(&mut g, "driver=null-co,node-name=disk").unwrap();
    let writer = BlockBackend::new(
        &g,
        "vm",
        &n,
        Perm::CONSISTENT_READ | Perm::WRITE,
        Perm::CONSISTENT_READ,
    )
    .unwrap();
    let e = BlockBackend::new(&g, "other", &n, Perm::WRITE, Perm::ALL)
        .err()
        .unwrap();
    assert_eq!(
        e,
        "Permission conflict on node 'disk': permissions 'write' are both required by block \
         device 'other' (uses node 'disk' as 'root' child) and unshared by block device 'vm' \
         (uses node 'disk' as 'root' child)."
    );
    // A reader that shares everything may join.
    let reader = BlockBackend::new(&g, "ro", &n, Perm::CONSISTENT_READ, Perm::ALL).unwrap();
    // A node in use cannot be deleted; after the users detach it can.
    assert!(g.remove("disk").unwrap_err().contains("is busy"));
    writer.detach(&g);
    reader.detach(&g);
    g.remove("disk").unwrap();
    // Read-only nodes refuse writers.
    let ro = open(&mut g, "driver=null-co,node-name=ro,read-only=on").unwrap();
    assert_eq!(
        BlockBackend::new(&g, "", &ro, Perm::WRITE, Perm::ALL)
            .err()
            .unwrap(),
        "Block node is read-only"
    );
}

#[test]
fn length_is_readable_from_another_thread_while_resizing() {
    let path = temp_image("len", 1 << 20);
    let mut g = Graph::new();
    let node = open(
        &mut g,
        &format!(
            "driver=raw,file.driver=file,file.filename={}",
            path.display()
        ),
    )
    .unwrap();
    let be = BlockBackend::new(&g, "", &node, rw(), Perm::ALL).unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let n2 = node.clone();
    let s2 = stop.clone();
    let reader = std::thread::spawn(move || {
        let mut seen = std::collections::BTreeSet::new();
        while !s2.load(Ordering::Relaxed) {
            seen.insert(n2.length());
        }
        seen
    });
    block_on(async {
        for i in 1..=50u64 {
            be.truncate((1 << 20) + i * 4096).await.unwrap();
        }
    })
    .unwrap();
    stop.store(true, Ordering::Relaxed);
    let seen = reader.join().unwrap();
    assert!(
        seen.iter()
            .all(|&l| l >= 1 << 20 && (l - (1 << 20)) % 4096 == 0 && l <= (1 << 20) + 50 * 4096)
    );
    be.detach(&g);
    let _ = std::fs::remove_file(path);
}

#[test]
fn replace_child_and_swap_backend_root() {
    let p1 = temp_image("swap1", 1 << 20);
    let p2 = temp_image("swap2", 1 << 20);
    let p3 = temp_image("swap3", 1 << 20);
    let mut g = Graph::new();
    let a = open(
        &mut g,
        &format!(
            "driver=raw,node-name=a,file.driver=file,file.node-name=fa,file.filename={}",
            p1.display()
        ),
    )
    .unwrap();
    let b = open(
        &mut g,
        &format!(
            "driver=raw,node-name=b,file.driver=file,file.filename={}",
            p2.display()
        ),
    )
    .unwrap();
    let f3 = open(
        &mut g,
        &format!("driver=file,node-name=f3,filename={}", p3.display()),
    )
    .unwrap();
    let be = BlockBackend::new(&g, "dev", &a, rw(), Perm::ALL).unwrap();
    block_on(async {
        let (r, _) = be.write(0, pattern(4096, 1), ReqFlags::NONE).await;
        r.unwrap();
        // The backend now sends its requests to b.
        g.set_backend_root(&be, &b).await.unwrap();
        assert_eq!(be.root().name(), "b");
        assert_eq!(a.parent_count(), 0);
        let (r, _) = be.write(0, pattern(4096, 2), ReqFlags::NONE).await;
        r.unwrap();
        // b's file child is replaced by f3: the next write lands in the third file.
        g.replace_child(&b, "file", &f3).await.unwrap();
        assert_eq!(b.child("file").unwrap().name(), "f3");
        let (r, _) = be.write(0, pattern(4096, 3), ReqFlags::NONE).await;
        r.unwrap();
        assert!(
            g.replace_child(&b, "backing", &f3)
                .await
                .unwrap_err()
                .contains("has no child 'backing'")
        );
    })
    .unwrap();
    assert_eq!(std::fs::read(&p1).unwrap()[0], 1);
    assert_eq!(std::fs::read(&p2).unwrap()[0], 2);
    assert_eq!(std::fs::read(&p3).unwrap()[0], 3);
    be.detach(&g);
    for p in [p1, p2, p3] {
        let _ = std::fs::remove_file(p);
    }
}
