//! Large reads of a raw file export go through pipes (splice) instead of a buffer: the bytes on
//! the wire must be exactly the file's, in every reply form (simple, structured, extended, DF),
//! for reads spanning several pipes, reads larger than a connection's pipes (copied instead),
//! many reads in flight at once (more than the connection has pipes), mixed with small reads
//! and writes, and reads across data and holes.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::sync::Mutex;

use blockd_nbd::proto;
use blockd_nbd::server::ServerConfig;
use common::{ExportSpec, Raw, TestServer, scratch};

const SIZE: u64 = 48 << 20;
/// Data in the first 40 MiB, a hole after.
const DATA: u64 = 40 << 20;

fn pattern(off: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| {
            let x = off + i;
            (x ^ (x >> 8) ^ (x >> 17) ^ 0x5a) as u8
        })
        .collect()
}

/// One test at a time: the pipe count below is the whole process's.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn server(tag: &str) -> (TestServer, std::path::PathBuf) {
    let d = scratch(tag);
    let img = d.join("disk.raw");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(SIZE).unwrap();
    for off in (0..DATA).step_by(4 << 20) {
        f.write_all_at(&pattern(off, 4 << 20), off).unwrap();
    }
    let s = TestServer::start(
        &d,
        ServerConfig::default(),
        vec![ExportSpec {
            id: "e0",
            name: "disk",
            path: img.clone(),
            writable: true,
            depth: false,
        }],
    );
    (s, img)
}

/// Pipes this process holds open.
fn pipes_open() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|l| l.to_string_lossy().starts_with("pipe:"))
        .count()
}

/// The data of a structured read reply: OFFSET_DATA chunks in place, holes as zeroes.
fn assemble(off: u64, len: u64, chunks: &[(u16, Vec<u8>)]) -> Vec<u8> {
    let mut out = vec![0xeeu8; len as usize];
    let mut covered = 0u64;
    for (typ, p) in chunks {
        let at = u64::from_be_bytes(p[..8].try_into().unwrap()) - off;
        match *typ {
            proto::REPLY_TYPE_OFFSET_DATA => {
                out[at as usize..at as usize + p.len() - 8].copy_from_slice(&p[8..]);
                covered += p.len() as u64 - 8;
            }
            proto::REPLY_TYPE_OFFSET_HOLE => {
                let n = u32::from_be_bytes(p[8..12].try_into().unwrap()) as usize;
                out[at as usize..at as usize + n].fill(0);
                covered += n as u64;
            }
            t => panic!("unexpected chunk type {t}"),
        }
    }
    assert_eq!(covered, len, "chunks cover the read");
    out
}

fn expected(off: u64, len: u64) -> Vec<u8> {
    let mut v = vec![0u8; len as usize];
    if off < DATA {
        let n = (DATA - off).min(len) as usize;
        v[..n].copy_from_slice(&pattern(off, n));
    }
    v
}

#[test]
fn structured_and_extended_reads_match_the_file() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (s, _img) = server("splice-structured");
    let before = pipes_open();
    for extended in [false, true] {
        let mut c = Raw::fixed(&s.sock);
        c.go("disk", true, extended, &[]);
        // One pipe, several pipes, more than a connection's pipes (copied), unaligned, across
        // the end of the data, and one DF read that must come as a single chunk.
        let reads: &[(u64, u64, u16)] = &[
            (0, 256 << 10, 0),
            (4096, 3 << 20, 0),
            (1 << 20, 20 << 20, 0),
            (12345, (1 << 20) + 777, 0),
            (DATA - (2 << 20), 4 << 20, 0),
            (8 << 20, 5 << 20, proto::CMD_FLAG_DF),
        ];
        for (i, &(off, len, flags)) in reads.iter().enumerate() {
            c.request(proto::CMD_READ, flags, i as u64, off, len, &[]);
            let (cookie, e, chunks) = c.response().unwrap();
            assert_eq!((cookie, e), (i as u64, 0));
            if flags & proto::CMD_FLAG_DF != 0 {
                assert_eq!(chunks.len(), 1, "DF: one chunk");
            }
            assert!(
                assemble(off, len, &chunks) == expected(off, len),
                "read {off}+{len} (extended {extended}) differs"
            );
        }
        assert!(
            pipes_open() > before,
            "large reads of a raw file went through the connection's pipes"
        );
    }
}

#[test]
fn simple_replies_carry_spliced_data() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (s, _img) = server("splice-simple");
    let mut c = Raw::fixed(&s.sock);
    c.go("disk", false, false, &[]);
    for (i, (off, len)) in [(0u64, 1u64 << 20), (512, 3 << 20), (DATA - 4096, 1 << 20)]
        .into_iter()
        .enumerate()
    {
        c.request(proto::CMD_READ, 0, i as u64, off, len, &[]);
        let (cookie, e, _) = c.response().unwrap();
        assert_eq!((cookie, e), (i as u64, 0));
        let mut data = vec![0u8; len as usize];
        c.s.read_exact(&mut data).unwrap();
        assert!(data == expected(off, len), "read {off}+{len} differs");
    }
}

/// More large reads in flight than a connection has pipes, small reads and writes between
/// them: every reply is whole and right, and data written before a read is what it returns.
#[test]
fn many_reads_in_flight_with_writes_between() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (s, img) = server("splice-busy");
    let mut c = Raw::fixed(&s.sock);
    c.go("disk", true, false, &[]);
    let mut w = c.s.try_clone().unwrap();
    let n = 48u64;
    let reqs: Vec<(u64, u64)> = (0..n)
        .map(|i| {
            let len = if i % 5 == 4 {
                4096
            } else {
                (1 << 20) + (i % 3) * (128 << 10)
            };
            ((i * 7919 * 4096) % (DATA - (2 << 20)), len)
        })
        .collect();
    let sender = {
        let reqs = reqs.clone();
        std::thread::spawn(move || {
            let mut v = Vec::new();
            for (i, (off, len)) in reqs.iter().enumerate() {
                let r = proto::Request {
                    flags: 0,
                    typ: proto::CMD_READ,
                    cookie: i as u64,
                    offset: *off,
                    len: *len,
                };
                v.extend(r.encode(false));
            }
            w.write_all(&v).unwrap();
        })
    };
    let mut seen = vec![false; n as usize];
    for _ in 0..n {
        let (cookie, e, chunks) = c.response().unwrap();
        assert_eq!(e, 0);
        let (off, len) = reqs[cookie as usize];
        assert!(!seen[cookie as usize]);
        seen[cookie as usize] = true;
        assert!(
            assemble(off, len, &chunks) == expected(off, len),
            "read {off}+{len} differs"
        );
    }
    sender.join().unwrap();
    // A write, then a large read over it: the read returns the new bytes.
    let new = vec![0xc3u8; 64 << 10];
    c.request(proto::CMD_WRITE, 0, 100, 2 << 20, new.len() as u64, &new);
    assert_eq!(c.response().unwrap().1, 0);
    c.request(proto::CMD_READ, 0, 101, (2 << 20) - 4096, 1 << 20, &[]);
    let (_, e, chunks) = c.response().unwrap();
    assert_eq!(e, 0);
    let mut want = expected((2 << 20) - 4096, 1 << 20);
    want[4096..4096 + new.len()].copy_from_slice(&new);
    assert!(assemble((2 << 20) - 4096, 1 << 20, &chunks) == want);
    let mut on_disk = vec![0u8; new.len()];
    std::fs::File::open(&img)
        .unwrap()
        .read_exact_at(&mut on_disk, 2 << 20)
        .unwrap();
    assert_eq!(on_disk, new);
}
