//! The server fed from byte streams: 1,000 deterministic pseudo-random streams (valid
//! handshakes and requests, then mutated: flipped bytes, cut short, random lengths) through
//! a socket pair. Each stream must end with the connection closed and nothing leaked; the
//! server answers a well-formed client afterwards. The same harness is the cargo-fuzz target
//! in `crates/nbd/fuzz` (run there with a nightly toolchain).

mod common;

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use blockd_aio::block_on;
use blockd_block::{Graph, Perm};
use blockd_nbd::proto::{self, Put};
use blockd_nbd::server::serve_socket;
use blockd_nbd::{ExportConfig, NbdServer, ServerConfig};
use serde_json::json;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn option(v: &mut Vec<u8>, opt: u32, data: &[u8]) {
    v.put_u64(proto::IHAVEOPT);
    v.put_u32(opt);
    v.put_u32(data.len() as u32);
    v.extend_from_slice(data);
}

/// A plausible client stream: flags, options, GO, requests.
fn stream(r: &mut Rng) -> Vec<u8> {
    let mut v = Vec::new();
    v.put_u32(if r.below(10) == 0 { r.next() as u32 } else { 3 });
    let extended = r.below(3) == 0;
    let structured = extended || r.below(2) == 0;
    for _ in 0..r.below(4) {
        let opt = r.below(14) as u32;
        let mut data = vec![0u8; r.below(40) as usize];
        data.iter_mut().for_each(|b| *b = r.next() as u8);
        option(&mut v, opt, &data);
    }
    if extended {
        option(&mut v, proto::OPT_EXTENDED_HEADERS, &[]);
    } else if structured {
        option(&mut v, proto::OPT_STRUCTURED_REPLY, &[]);
    }
    if structured && r.below(2) == 0 {
        let mc = proto::MetaContextRequest {
            export: "x".into(),
            queries: vec!["base:allocation".into(), "qemu:allocation-depth".into()],
        };
        option(&mut v, proto::OPT_SET_META_CONTEXT, &mc.encode());
    }
    let go = proto::InfoRequest {
        name: "x".into(),
        requests: vec![proto::INFO_BLOCK_SIZE],
    };
    option(&mut v, proto::OPT_GO, &go.encode());
    for i in 0..r.below(12) {
        let typ = if r.below(8) == 0 {
            r.below(12) as u16
        } else {
            [0u16, 1, 3, 4, 5, 6, 7][r.below(7) as usize]
        };
        let flags = if r.below(4) == 0 { r.next() as u16 } else { 0 };
        let len = match r.below(5) {
            0 => 0,
            1 => r.next() & 0xffff_ffff,
            _ => r.below(65536),
        };
        let offset = if r.below(5) == 0 {
            r.next()
        } else {
            r.below(16 << 20)
        };
        let req = proto::Request {
            flags,
            typ,
            cookie: i,
            offset,
            len,
        };
        v.extend(req.encode(extended));
        if typ == proto::CMD_WRITE {
            let n = (len as usize).min(70000);
            v.extend(std::iter::repeat_n(0x5a, n));
        }
    }
    // Mutations.
    for _ in 0..r.below(4) {
        if v.is_empty() {
            break;
        }
        let i = r.below(v.len() as u64) as usize;
        v[i] = r.next() as u8;
    }
    if r.below(4) == 0 {
        let n = r.below(v.len() as u64) as usize;
        v.truncate(n);
    }
    v
}

/// Feed `input` to a new connection of `server` and wait until the server has closed it.
fn run_stream(server: &NbdServer, input: Vec<u8>) -> Vec<u8> {
    let (client, srv) = UnixStream::pair().unwrap();
    let mut w = client.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let _ = w.write_all(&input);
        let _ = w.shutdown(std::net::Shutdown::Write);
    });
    let mut rd = client;
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        while let Ok(n) = rd.read(&mut buf) {
            if n == 0 {
                break;
            }
            // Keep only the tail: replies to huge reads are not interesting.
            out.extend_from_slice(&buf[..n]);
            if out.len() > 1 << 20 {
                out.drain(..out.len() - 4096);
            }
        }
        out
    });
    serve_socket(server, OwnedFd::from(srv));
    block_on(async {
        let t = Instant::now();
        while server.active_connections() > 0 {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "connection never ended"
            );
            blockd_aio::sleep(Duration::from_millis(1)).await;
        }
    })
    .unwrap();
    writer.join().unwrap();
    reader.join().unwrap()
}

#[test]
fn random_streams() {
    let mut graph = Graph::new();
    let node = graph
        .open(
            json!({"driver": "null-co", "size": 16 << 20, "read-zeroes": true})
                .as_object()
                .unwrap()
                .clone(),
        )
        .unwrap();
    let backend = graph
        .new_backend("", &node, Perm::CONSISTENT_READ | Perm::WRITE, Perm::ALL)
        .unwrap();
    let server = NbdServer::new(ServerConfig {
        max_connections: 0,
        handshake_timeout: Duration::from_secs(2),
    })
    .unwrap();
    server
        .add_export(ExportConfig {
            id: "x".into(),
            name: "x".into(),
            description: None,
            backend,
            writable: true,
            writethrough: false,
            allocation_depth: true,
            bitmaps: Vec::new(),
            multi_conn: true,
            iothread: None,
            detect_zeroes: Default::default(),
        })
        .unwrap();
    let mut r = Rng(0x9e37_79b9_7f4a_7c15);
    for _ in 0..1000 {
        let s = stream(&mut r);
        let _ = run_stream(&server, s);
    }
    // Still serving a well-formed client.
    let mut v = Vec::new();
    v.put_u32(3);
    let go = proto::InfoRequest {
        name: "x".into(),
        requests: vec![],
    };
    option(&mut v, proto::OPT_GO, &go.encode());
    v.extend(
        proto::Request {
            flags: 0,
            typ: proto::CMD_READ,
            cookie: 1,
            offset: 0,
            len: 512,
        }
        .encode(false),
    );
    let out = run_stream(&server, v);
    assert_eq!(server.active_connections(), 0);
    let tail = &out[out.len() - 16 - 512..];
    assert_eq!(&tail[..16], &proto::simple_reply(0, 1));
    assert!(tail[16..].iter().all(|&b| b == 0));
}
