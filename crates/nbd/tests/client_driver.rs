//! The `nbd` client driver against qemu-nbd, nbdkit (memory, sparse-random, error and delay
//! filters, `--no-sr`), blockd's own server, and a hostile server.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockd_aio::{IoBuf, IoThread, PollParams, block_on};
use blockd_block::{BlockBackend, Graph, Node, Perm, ReqFlags};
use blockd_nbd::ServerConfig;
use blockd_nbd::proto::{self, Put};
use common::{ExportSpec, TestServer, have, image, scratch};
use serde_json::json;

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for(path: &Path) {
    let t = Instant::now();
    while std::os::unix::net::UnixStream::connect(path).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn spawn(cmd: &mut Command, sock: &Path) -> Proc {
    let _ = std::fs::remove_file(sock);
    let p = Proc(cmd.stdout(Stdio::null()).spawn().unwrap());
    wait_for(sock);
    p
}

fn open(graph: &mut Graph, opts: serde_json::Value) -> Result<(Arc<Node>, BlockBackend), String> {
    let node = graph.open(opts.as_object().unwrap().clone())?;
    let perm = if node.is_read_only() {
        Perm::CONSISTENT_READ
    } else {
        Perm::CONSISTENT_READ | Perm::WRITE
    };
    let b = graph.new_backend("", &node, perm, Perm::ALL)?;
    Ok((node, b))
}

fn graph() -> Graph {
    let mut g = Graph::new();
    blockd_nbd::client::register(&mut g);
    g
}

fn unix_opts(sock: &Path, export: &str) -> serde_json::Value {
    json!({"driver": "nbd", "server": {"type": "unix", "path": sock.to_str().unwrap()}, "export": export})
}

fn read(b: &BlockBackend, off: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let (r, buf) = block_on(b.read(off, IoBuf::new(len, 4096))).unwrap();
    r.map(|_| buf.to_vec())
}

fn write(b: &BlockBackend, off: u64, data: &[u8], flags: ReqFlags) -> std::io::Result<()> {
    block_on(b.write(off, IoBuf::from_slice(data), flags))
        .unwrap()
        .0
}

/// The common exercise: patterned I/O, zeroes, discard, status, flush.
fn exercise(b: &BlockBackend, status: bool) {
    write(b, 0, &[0xaa; 65536], ReqFlags::NONE).unwrap();
    write(b, 65536, &[0xbb; 4096], ReqFlags::FUA).unwrap();
    assert!(read(b, 0, 65536).unwrap().iter().all(|&x| x == 0xaa));
    assert!(read(b, 65536, 4096).unwrap().iter().all(|&x| x == 0xbb));
    // Unaligned, crossing the boundary.
    let v = read(b, 65530, 12).unwrap();
    assert_eq!(&v[..6], &[0xaa; 6]);
    assert_eq!(&v[6..], &[0xbb; 6]);
    block_on(b.write_zeroes(4096, 8192, ReqFlags::MAY_UNMAP))
        .unwrap()
        .unwrap();
    assert!(read(b, 4096, 8192).unwrap().iter().all(|&x| x == 0));
    block_on(b.discard(1 << 20, 1 << 20)).unwrap().unwrap();
    block_on(b.flush()).unwrap().unwrap();
    // A 40 MiB read is split below the server's maximum payload.
    let big = read(b, 0, 40 << 20).unwrap();
    assert_eq!(big[0], 0xaa);
    if status {
        let s = block_on(b.block_status(0, 1 << 20)).unwrap().unwrap();
        assert!(s.data && s.len >= 4096);
        let s = block_on(b.block_status(32 << 20, 1 << 20))
            .unwrap()
            .unwrap();
        assert!(s.zero, "{s:?}");
    }
}

#[test]
fn against_qemu_nbd() {
    if !have("qemu-nbd") {
        return;
    }
    let d = scratch("qnbd");
    let img = image(&d, "a.raw", 64 << 20, 0);
    let sock = d.join("q.sock");
    let _q = spawn(
        Command::new("qemu-nbd")
            .args(["-f", "raw", "-t", "-k"])
            .arg(&sock)
            .arg(&img),
        &sock,
    );
    let mut g = graph();
    let (node, b) = open(&mut g, unix_opts(&sock, "")).unwrap();
    assert_eq!(node.length(), 64 << 20);
    exercise(&b, true);
    drop(b);
    drop(g);
    let mut f = std::fs::File::open(&img).unwrap();
    let mut first = vec![0u8; 4096];
    f.read_exact(&mut first).unwrap();
    assert!(first.iter().all(|&x| x == 0xaa), "bytes reached the image");
}

#[test]
fn against_nbdkit() {
    if !have("nbdkit") {
        return;
    }
    let d = scratch("kit");
    let sock = d.join("k.sock");
    let kit = |extra: &[&str]| {
        let mut c = Command::new("nbdkit");
        c.args(["-f", "-U"]).arg(&sock).args(extra);
        spawn(&mut c, &sock)
    };
    // memory
    {
        let _k = kit(&["memory", "64M"]);
        let mut g = graph();
        let (_n, b) = open(&mut g, unix_opts(&sock, "")).unwrap();
        exercise(&b, true);
    }
    // --no-sr: simple replies only; block status degrades to "all data".
    {
        let _k = kit(&["--no-sr", "memory", "64M"]);
        let mut g = graph();
        let (_n, b) = open(&mut g, unix_opts(&sock, "")).unwrap();
        exercise(&b, false);
        let s = block_on(b.block_status(0, 4096)).unwrap().unwrap();
        assert!(s.data);
    }
    // sparse-random: holes read as zero where status says so.
    {
        let _k = kit(&[
            "sparse-random",
            "64M",
            "seed=42",
            "percent=50",
            "runlength=262144",
        ]);
        let mut g = graph();
        let (n, b) = open(&mut g, unix_opts(&sock, "")).unwrap();
        let mut off = 0;
        let mut holes = 0;
        let mut datas = 0;
        while off < n.length() && holes + datas < 200 {
            let s = block_on(b.block_status(off, n.length() - off))
                .unwrap()
                .unwrap();
            let len = s.len.min(1 << 20) as usize;
            let v = read(&b, off, len).unwrap();
            if s.zero {
                assert!(v.iter().all(|&x| x == 0));
                holes += 1;
            } else {
                datas += 1;
            }
            off += s.len;
        }
        assert!(holes > 0 && datas > 0);
    }
    // error filter: reads fail with EIO, the connection survives for writes.
    {
        let _k = kit(&[
            "--filter=error",
            "memory",
            "16M",
            "error-pread-rate=1",
            "error=EIO",
        ]);
        let mut g = graph();
        let (_n, b) = open(&mut g, unix_opts(&sock, "")).unwrap();
        let e = read(&b, 0, 4096).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
        write(&b, 0, &[1; 4096], ReqFlags::NONE).unwrap();
        assert!(read(&b, 0, 512).is_err());
    }
    // delay filter: slow reads still complete, concurrently.
    {
        let _k = kit(&["--filter=delay", "memory", "16M", "rdelay=200ms"]);
        let mut g = graph();
        let (_n, b) = open(&mut g, unix_opts(&sock, "")).unwrap();
        let t = Instant::now();
        let results = block_on(async {
            let tasks: Vec<_> = (0..8)
                .map(|i| {
                    let b = b.clone();
                    blockd_aio::spawn(
                        async move { b.read(i * 4096, IoBuf::new(4096, 4096)).await.0 },
                    )
                })
                .collect();
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await);
            }
            out
        })
        .unwrap();
        assert!(results.iter().all(|r| r.is_ok()));
        assert!(
            t.elapsed() < Duration::from_millis(1500),
            "requests overlapped: {:?}",
            t.elapsed()
        );
    }
}

#[test]
fn against_own_server_from_iothreads() {
    let d = scratch("own");
    let img = image(&d, "a.raw", 64 << 20, 0x33);
    let s = TestServer::start(
        &d,
        ServerConfig::default(),
        vec![ExportSpec {
            id: "e",
            name: "disk",
            path: img.clone(),
            writable: true,
            depth: true,
        }],
    );
    let mut g = graph();
    let (_n, b) = open(&mut g, unix_opts(&s.sock, "disk")).unwrap();
    assert!(read(&b, 0, 4096).unwrap().iter().all(|&x| x == 0x33));
    exercise(&b, true);
    // Requests from two iothreads reach the owner's connection and come back.
    let threads: Vec<IoThread> = (0..2)
        .map(|i| IoThread::spawn(&format!("t{i}"), PollParams::disabled()).unwrap())
        .collect();
    let mut pending = Vec::new();
    for (i, t) in threads.iter().enumerate() {
        let b = b.clone();
        pending.push(t.handle().spawn(move || async move {
            let off = (2 << 20) + i as u64 * 65536;
            for k in 0..20u8 {
                let (r, _) = b
                    .write(off, IoBuf::from_slice(&vec![k; 65536]), ReqFlags::NONE)
                    .await;
                r?;
                let (r, buf) = b.read(off, IoBuf::new(65536, 4096)).await;
                r?;
                assert!(buf.iter().all(|&x| x == k));
            }
            std::io::Result::Ok(())
        }));
    }
    block_on(async {
        for p in pending {
            p.await.unwrap().unwrap();
        }
    })
    .unwrap();
    // An unknown export is an open error with the server's message.
    let mut g2 = graph();
    let e = open(&mut g2, unix_opts(&s.sock, "nope")).err().unwrap();
    assert!(
        e.contains("not available") || e.contains("not present"),
        "{e}"
    );
}

#[test]
fn reconnects_after_server_restart() {
    if !have("qemu-nbd") {
        return;
    }
    let d = scratch("reco");
    let img = image(&d, "a.raw", 8 << 20, 0x44);
    let sock = d.join("q.sock");
    let start = move || {
        spawn(
            Command::new("qemu-nbd")
                .args(["-f", "raw", "-t", "-e", "0", "-k"])
                .arg(&sock)
                .arg(&img),
            &sock,
        )
    };
    let q = start();
    let mut g = graph();
    let mut opts = unix_opts(&d.join("q.sock"), "");
    opts["reconnect-delay"] = json!(10);
    let (_n, b) = open(&mut g, opts).unwrap();
    assert!(read(&b, 0, 4096).unwrap().iter().all(|&x| x == 0x44));
    drop(q);
    let _ = std::fs::remove_file(d.join("q.sock"));
    let restarter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(700));
        start()
    });
    // Issued while the server is down: waits for the reconnect, then succeeds.
    write(&b, 4096, &[0x55; 4096], ReqFlags::NONE).unwrap();
    assert!(read(&b, 4096, 4096).unwrap().iter().all(|&x| x == 0x55));
    let _q2 = restarter.join().unwrap();
}

fn qemu_nbd_on(sock: &Path, img: &Path) -> Proc {
    spawn(
        Command::new("qemu-nbd")
            .args(["-f", "raw", "-t", "-e", "0", "-k"])
            .arg(sock)
            .arg(img),
        sock,
    )
}

fn nbdkit_on(sock: &Path, img: &Path) -> Proc {
    spawn(
        Command::new("nbdkit")
            .args(["-f", "-U"])
            .arg(sock)
            .arg("file")
            .arg(img),
        sock,
    )
}

/// QEMU's reconnect semantics against a server restarted on the same socket: requests wait up
/// to reconnect-delay, fail with EIO at once after it (while the background reconnect keeps
/// trying), and succeed again once a background attempt reconnects, with no request needed to
/// drive it.
fn reconnect_semantics(server: fn(&Path, &Path) -> Proc) {
    let d = scratch("reco-bg");
    let img = image(&d, "a.raw", 8 << 20, 0x44);
    let sock = d.join("s.sock");
    let srv = server(&sock, &img);
    let mut g = graph();
    let mut opts = unix_opts(&sock, "");
    opts["reconnect-delay"] = json!(1);
    let (_n, b) = open(&mut g, opts).unwrap();
    write(&b, 0, &[0x11; 4096], ReqFlags::NONE).unwrap();
    drop(srv);
    let _ = std::fs::remove_file(&sock);

    // Waits for the delay, then EIO.
    let t = Instant::now();
    let e = read(&b, 0, 4096).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    // After the delay: EIO at once.
    let t = Instant::now();
    let e = write(&b, 0, &[0x22; 4096], ReqFlags::NONE).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );

    // The server comes back; the background loop reconnects without any request (the owner's
    // loop runs meanwhile, as a daemon's main loop does).
    let _srv = server(&sock, &img);
    block_on(blockd_aio::sleep(Duration::from_millis(4500))).unwrap();
    let t = Instant::now();
    assert!(read(&b, 0, 4096).unwrap().iter().all(|&x| x == 0x11));
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    write(&b, 4096, &[0x33; 4096], ReqFlags::FUA).unwrap();
    assert!(read(&b, 4096, 4096).unwrap().iter().all(|&x| x == 0x33));
}

#[test]
fn background_reconnect_qemu_nbd() {
    if !have("qemu-nbd") {
        return;
    }
    reconnect_semantics(qemu_nbd_on);
}

#[test]
fn background_reconnect_nbdkit() {
    if !have("nbdkit") {
        return;
    }
    reconnect_semantics(nbdkit_on);
}

/// reconnect-delay=0: a request on a lost connection fails at once, and the background
/// reconnect still brings the node back.
#[test]
fn zero_delay_fails_fast_and_recovers() {
    if !have("qemu-nbd") {
        return;
    }
    let d = scratch("reco-zero");
    let img = image(&d, "a.raw", 8 << 20, 0x44);
    let sock = d.join("s.sock");
    let srv = qemu_nbd_on(&sock, &img);
    let mut g = graph();
    let (_n, b) = open(&mut g, unix_opts(&sock, "")).unwrap();
    assert!(read(&b, 0, 4096).is_ok());
    drop(srv);
    let _ = std::fs::remove_file(&sock);
    let t = Instant::now();
    assert_eq!(
        read(&b, 0, 4096).unwrap_err().raw_os_error(),
        Some(libc::EIO)
    );
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    let _srv = qemu_nbd_on(&sock, &img);
    let t = Instant::now();
    loop {
        match read(&b, 0, 4096) {
            Ok(v) => {
                assert!(v.iter().all(|&x| x == 0x44));
                break;
            }
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
                assert!(t.elapsed() < Duration::from_secs(10), "never reconnected");
                block_on(blockd_aio::sleep(Duration::from_millis(100))).unwrap();
            }
        }
    }
}

/// A reconnect to a server that accepts but never speaks does not stall the node's event
/// loop: other tasks on the owner context keep running while the request waits.
#[test]
fn reconnect_does_not_block_the_loop() {
    if !have("qemu-nbd") {
        return;
    }
    let d = scratch("reco-loop");
    let img = image(&d, "a.raw", 8 << 20, 0x44);
    let sock = d.join("s.sock");
    let srv = qemu_nbd_on(&sock, &img);
    let mut g = graph();
    let mut opts = unix_opts(&sock, "");
    opts["reconnect-delay"] = json!(2);
    let (_n, b) = open(&mut g, opts).unwrap();
    assert!(read(&b, 0, 4096).is_ok());
    drop(srv);
    let _ = std::fs::remove_file(&sock);
    // Accepts connections (the kernel does, from the backlog) but never sends a byte.
    let _mute = UnixListener::bind(&sock).unwrap();
    let ticks = std::rc::Rc::new(std::cell::Cell::new(0u32));
    let t2 = ticks.clone();
    let r = block_on(async move {
        let ticker = blockd_aio::spawn(async move {
            loop {
                blockd_aio::sleep(Duration::from_millis(10)).await;
                t2.set(t2.get() + 1);
            }
        });
        let r = b.read(0, IoBuf::new(4096, 4096)).await.0;
        drop(ticker);
        r
    })
    .unwrap();
    assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EIO));
    assert!(ticks.get() >= 50, "the loop stalled: {} ticks", ticks.get());
}

/// open-timeout: the first connection is retried until the server appears.
#[test]
fn open_timeout_waits_for_the_server() {
    if !have("qemu-nbd") {
        return;
    }
    let d = scratch("open-timeout");
    let img = image(&d, "a.raw", 8 << 20, 0x44);
    let sock = d.join("s.sock");
    let mut g = graph();
    let Err(e) = open(&mut g, unix_opts(&sock, "")) else {
        panic!("opened with no server");
    };
    assert!(e.contains("Failed to connect"), "{e}");
    let (s2, i2) = (sock.clone(), img.clone());
    let later = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(800));
        qemu_nbd_on(&s2, &i2)
    });
    let mut opts = unix_opts(&sock, "");
    opts["open-timeout"] = json!(10);
    let t = Instant::now();
    let (_n, b) = open(&mut g, opts).unwrap();
    assert!(t.elapsed() >= Duration::from_millis(500));
    assert!(read(&b, 0, 4096).unwrap().iter().all(|&x| x == 0x44));
    let _srv = later.join().unwrap();
}

/// A server that negotiates properly and then misbehaves as `mode` says.
fn evil_server(sock: &Path, size: u64, mode: &'static str) -> std::thread::JoinHandle<()> {
    let _ = std::fs::remove_file(sock);
    let l = UnixListener::bind(sock).unwrap();
    std::thread::spawn(move || {
        let Ok((mut s, _)) = l.accept() else { return };
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut hello = Vec::new();
        hello.put_u64(proto::NBDMAGIC);
        hello.put_u64(proto::IHAVEOPT);
        hello.put_u16(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES);
        s.write_all(&hello).unwrap();
        let mut f = [0u8; 4];
        if s.read_exact(&mut f).is_err() {
            return;
        }
        loop {
            let mut h = [0u8; 16];
            if s.read_exact(&mut h).is_err() {
                return;
            }
            let h = proto::OptionHeader::parse(&h).unwrap();
            let mut data = vec![0u8; h.len as usize];
            s.read_exact(&mut data).unwrap();
            let rep = |s: &mut std::os::unix::net::UnixStream, t: u32, d: &[u8]| {
                s.write_all(&proto::option_reply(h.option, t, d)).unwrap()
            };
            match h.option {
                proto::OPT_STRUCTURED_REPLY => rep(&mut s, proto::REP_ACK, &[]),
                proto::OPT_SET_META_CONTEXT => {
                    let mut v = Vec::new();
                    v.put_u32(7);
                    v.extend_from_slice(b"base:allocation");
                    rep(&mut s, proto::REP_META_CONTEXT, &v);
                    rep(&mut s, proto::REP_ACK, &[]);
                }
                proto::OPT_GO => {
                    let mut v = Vec::new();
                    v.put_u16(proto::INFO_EXPORT);
                    v.put_u64(size);
                    v.put_u16(proto::TF_HAS_FLAGS | proto::TF_SEND_FLUSH);
                    rep(&mut s, proto::REP_INFO, &v);
                    rep(&mut s, proto::REP_ACK, &[]);
                    break;
                }
                _ => rep(&mut s, proto::REP_ERR_UNSUP, &[]),
            }
        }
        loop {
            let mut h = [0u8; 28];
            if s.read_exact(&mut h).is_err() {
                return;
            }
            let r = proto::Request::parse(&h, false).unwrap();
            let mut out = Vec::new();
            let chunk = |out: &mut Vec<u8>, flags: u16, typ: u16, payload: &[u8]| {
                out.extend(proto::chunk_header(
                    false,
                    flags,
                    typ,
                    r.cookie,
                    0,
                    payload.len() as u64,
                ));
                out.extend_from_slice(payload);
            };
            match (mode, r.typ) {
                ("data-past-request", proto::CMD_READ) => {
                    let mut p = Vec::new();
                    p.put_u64(r.offset + r.len);
                    p.extend(vec![9u8; r.len as usize]);
                    chunk(
                        &mut out,
                        proto::REPLY_FLAG_DONE,
                        proto::REPLY_TYPE_OFFSET_DATA,
                        &p,
                    );
                }
                ("data-too-long", proto::CMD_READ) => {
                    let mut p = Vec::new();
                    p.put_u64(r.offset);
                    p.extend(vec![9u8; r.len as usize + 100]);
                    chunk(
                        &mut out,
                        proto::REPLY_FLAG_DONE,
                        proto::REPLY_TYPE_OFFSET_DATA,
                        &p,
                    );
                }
                ("short-read", proto::CMD_READ) => {
                    let mut p = Vec::new();
                    p.put_u64(r.offset);
                    p.extend(vec![9u8; r.len as usize / 2]);
                    chunk(
                        &mut out,
                        proto::REPLY_FLAG_DONE,
                        proto::REPLY_TYPE_OFFSET_DATA,
                        &p,
                    );
                }
                ("zero-extent", proto::CMD_BLOCK_STATUS) => {
                    let mut p = Vec::new();
                    p.put_u32(7);
                    p.put_u32(0);
                    p.put_u32(0);
                    chunk(
                        &mut out,
                        proto::REPLY_FLAG_DONE,
                        proto::REPLY_TYPE_BLOCK_STATUS,
                        &p,
                    );
                }
                ("huge-chunk", _) => {
                    out.extend(proto::chunk_header(
                        false,
                        proto::REPLY_FLAG_DONE,
                        proto::REPLY_TYPE_BLOCK_STATUS,
                        r.cookie,
                        0,
                        0xffff_fff0,
                    ));
                }
                ("unknown-chunk", _) => chunk(&mut out, proto::REPLY_FLAG_DONE, 77, &[1, 2, 3]),
                ("bad-cookie", _) => out.extend(proto::simple_reply(0, r.cookie ^ 0xdead)),
                _ => {
                    if r.typ == proto::CMD_READ {
                        let mut p = Vec::new();
                        p.put_u64(r.offset);
                        p.extend(vec![1u8; r.len as usize]);
                        chunk(
                            &mut out,
                            proto::REPLY_FLAG_DONE,
                            proto::REPLY_TYPE_OFFSET_DATA,
                            &p,
                        );
                    } else {
                        chunk(
                            &mut out,
                            proto::REPLY_FLAG_DONE,
                            proto::REPLY_TYPE_NONE,
                            &[],
                        );
                    }
                }
            }
            if s.write_all(&out).is_err() {
                return;
            }
        }
    })
}

#[test]
fn hostile_server() {
    let d = scratch("evil");
    let sock = d.join("evil.sock");
    // Size over 2^63: refused at open.
    let t = evil_server(&sock, (1u64 << 63) + 4096, "normal");
    let mut g = graph();
    let e = open(&mut g, unix_opts(&sock, "")).err().unwrap();
    assert!(e.contains("too large"), "{e}");
    t.join().unwrap();
    // Each misbehaviour fails the request (and the connection), never crashes.
    for mode in [
        "data-past-request",
        "data-too-long",
        "short-read",
        "huge-chunk",
        "unknown-chunk",
        "bad-cookie",
    ] {
        let t = evil_server(&sock, 1 << 20, mode);
        let mut g = graph();
        let (n, b) = open(&mut g, unix_opts(&sock, "")).unwrap();
        let r = read(&b, 4096, 4096);
        assert!(r.is_err(), "{mode}: read succeeded");
        drop((n, b, g)); // the driver says goodbye: the server thread ends
        t.join().unwrap();
    }
    let t = evil_server(&sock, 1 << 20, "zero-extent");
    let mut g = graph();
    let (n, b) = open(&mut g, unix_opts(&sock, "")).unwrap();
    assert!(block_on(b.block_status(0, 4096)).unwrap().is_err());
    // The stream stays usable after a bad block status? No: the connection is dropped and
    // later requests fail cleanly too.
    assert!(read(&b, 0, 512).is_err());
    drop((n, b, g));
    t.join().unwrap();
}

#[test]
fn inet_and_uri_options() {
    if !have("qemu-nbd") {
        return;
    }
    let d = scratch("inet");
    let img = image(&d, "a.raw", 4 << 20, 0x66);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut q = Proc(
        Command::new("qemu-nbd")
            .args([
                "-f",
                "raw",
                "-t",
                "-e",
                "0",
                "-x",
                "disk",
                "-b",
                "127.0.0.1",
                "-p",
            ])
            .arg(port.to_string())
            .arg(&img)
            .spawn()
            .unwrap(),
    );
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(t.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut g = graph();
    let (_n, b) = open(
        &mut g,
        json!({"driver": "nbd", "export": "disk",
               "server": {"type": "inet", "host": "127.0.0.1", "port": port.to_string()}}),
    )
    .unwrap();
    assert!(read(&b, 0, 4096).unwrap().iter().all(|&x| x == 0x66));
    let (_n2, b2) = open(
        &mut g,
        json!({"driver": "nbd", "filename": format!("nbd://127.0.0.1:{port}/disk")}),
    )
    .unwrap();
    assert!(read(&b2, 4096, 4096).unwrap().iter().all(|&x| x == 0x66));
    // Option errors with QEMU's wording.
    let e = open(
        &mut g,
        json!({"driver": "nbd", "server": {"type": "inet", "host": "x"}}),
    )
    .err()
    .unwrap();
    assert_eq!(e, "Parameter 'server.port' is missing");
    let e = open(
        &mut g,
        json!({"driver": "nbd", "server": {"type": "vsock"}}),
    )
    .err()
    .unwrap();
    assert_eq!(e, "Parameter 'server.type' does not accept value 'vsock'");
    let e = open(
        &mut g,
        json!({"driver": "nbd", "filename": format!("nbd://127.0.0.1:{port}/disk"), "bogus": 1}),
    )
    .err()
    .unwrap();
    assert_eq!(e, "Block protocol 'nbd' doesn't support the option 'bogus'");
    let _ = q.0.kill();
}
