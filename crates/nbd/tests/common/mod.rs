//! Test helpers: an in-process server on its own thread, a raw blocking NBD client for
//! protocol-level tests, and the interop skip rule.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use blockd_aio::{AioContext, ContextHandle};
use blockd_block::{Graph, Perm};
use blockd_nbd::proto::{self, Put};
use blockd_nbd::server::ListenAddr;
use blockd_nbd::{ExportConfig, NbdServer, ServerConfig};
use serde_json::{Map, Value};

/// Is `tool` on PATH? Missing: skip loudly, or panic under BLOCKD_REQUIRE_INTEROP.
pub fn have(tool: &str) -> bool {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    if !found {
        if std::env::var_os("BLOCKD_REQUIRE_INTEROP").is_some() {
            panic!("{tool} is required (BLOCKD_REQUIRE_INTEROP is set) but missing");
        }
        eprintln!("SKIP: {tool} not installed");
    }
    found
}

static N: AtomicU64 = AtomicU64::new(0);

/// A fresh scratch directory.
pub fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "blockd-nbd-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A raw image of `size` bytes filled with `pattern` in its first MiB.
pub fn image(dir: &Path, name: &str, size: u64, pattern: u8) -> PathBuf {
    let p = dir.join(name);
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(size).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .write_all(&vec![pattern; 1 << 20])
        .unwrap();
    p
}

/// A server running on its own thread and context.
pub struct TestServer {
    pub server: NbdServer,
    pub ctx: ContextHandle,
    pub sock: PathBuf,
    thread: Option<std::thread::JoinHandle<()>>,
}

pub struct ExportSpec {
    pub id: &'static str,
    pub name: &'static str,
    pub path: PathBuf,
    pub writable: bool,
    pub depth: bool,
}

impl TestServer {
    pub fn start(dir: &Path, cfg: ServerConfig, exports: Vec<ExportSpec>) -> TestServer {
        let sock = dir.join("srv.sock");
        let s2 = sock.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let ctx = AioContext::new("test-server").unwrap();
            let mut graph = Graph::new();
            let server = NbdServer::new(cfg).unwrap();
            for e in exports {
                let mut file = Map::new();
                file.insert("driver".into(), "file".into());
                file.insert("filename".into(), e.path.to_str().unwrap().into());
                let mut o = Map::new();
                o.insert("driver".into(), "raw".into());
                o.insert("file".into(), Value::Object(file));
                let node = graph.open(o).unwrap();
                let perm = if e.writable {
                    Perm::CONSISTENT_READ | Perm::WRITE
                } else {
                    Perm::CONSISTENT_READ
                };
                let backend = graph.new_backend("", &node, perm, Perm::ALL).unwrap();
                server
                    .add_export(ExportConfig {
                        id: e.id.into(),
                        name: e.name.into(),
                        description: Some(format!("export {}", e.id)),
                        backend,
                        writable: e.writable,
                        writethrough: false,
                        allocation_depth: e.depth,
                        bitmaps: Vec::new(),
                        multi_conn: true,
                        iothread: None,
                        detect_zeroes: Default::default(),
                    })
                    .unwrap();
            }
            server.listen(ListenAddr::Unix(s2)).unwrap();
            tx.send((server.clone(), ctx.handle())).unwrap();
            ctx.run_until_stopped().unwrap();
            server.stop_listening();
            let _ = server.reap_deleted(&graph);
            drop(graph);
        });
        let (server, ctx) = rx.recv().unwrap();
        TestServer {
            server,
            ctx,
            sock,
            thread: Some(thread),
        }
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.sock.display())
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.ctx.request_stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A reply: cookie, error, and the chunks (type, payload) of a structured reply.
pub type Response = (u64, u32, Vec<(u16, Vec<u8>)>);

/// A raw protocol client on a blocking unix socket.
pub struct Raw {
    pub s: UnixStream,
    pub extended: bool,
    pub structured: bool,
}

impl Raw {
    /// Connect and read the greeting; send client flags.
    pub fn connect(sock: &Path, cflags: u32) -> Raw {
        let mut s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut g = [0u8; 18];
        s.read_exact(&mut g).unwrap();
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        s.write_all(&cflags.to_be_bytes()).unwrap();
        Raw {
            s,
            extended: false,
            structured: false,
        }
    }

    pub fn fixed(sock: &Path) -> Raw {
        Raw::connect(sock, proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES)
    }

    pub fn option(&mut self, opt: u32, data: &[u8]) {
        let mut v = proto::OptionHeader {
            option: opt,
            len: data.len() as u32,
        }
        .encode();
        v.extend_from_slice(data);
        self.s.write_all(&v).unwrap();
    }

    /// One option reply: (type, payload), or None if the server closed.
    pub fn reply(&mut self) -> Option<(u32, Vec<u8>)> {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).ok()?;
        let h = proto::OptionReplyHeader::parse(&h).unwrap();
        let mut d = vec![0u8; h.len as usize];
        self.s.read_exact(&mut d).ok()?;
        Some((h.reply, d))
    }

    /// Replies until ACK or an error; returns them all.
    pub fn replies(&mut self) -> Vec<(u32, Vec<u8>)> {
        let mut out = Vec::new();
        while let Some((t, d)) = self.reply() {
            let end = t == proto::REP_ACK || t & 0x8000_0000 != 0;
            out.push((t, d));
            if end {
                break;
            }
        }
        out
    }

    /// Is the connection closed by the server (EOF)?
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }

    /// Negotiate options and GO to `export`.
    pub fn go(&mut self, export: &str, structured: bool, extended: bool, contexts: &[&str]) {
        if extended {
            self.option(proto::OPT_EXTENDED_HEADERS, &[]);
            assert_eq!(self.reply().unwrap().0, proto::REP_ACK);
            self.extended = true;
            self.structured = true;
        } else if structured {
            self.option(proto::OPT_STRUCTURED_REPLY, &[]);
            assert_eq!(self.reply().unwrap().0, proto::REP_ACK);
            self.structured = true;
        }
        if !contexts.is_empty() {
            let req = proto::MetaContextRequest {
                export: export.into(),
                queries: contexts.iter().map(|s| s.to_string()).collect(),
            };
            self.option(proto::OPT_SET_META_CONTEXT, &req.encode());
            let r = self.replies();
            assert_eq!(r.last().unwrap().0, proto::REP_ACK);
        }
        let req = proto::InfoRequest {
            name: export.into(),
            requests: vec![],
        };
        self.option(proto::OPT_GO, &req.encode());
        let r = self.replies();
        assert_eq!(r.last().unwrap().0, proto::REP_ACK, "GO failed: {r:?}");
    }

    pub fn request(
        &mut self,
        typ: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        len: u64,
        payload: &[u8],
    ) {
        let r = proto::Request {
            flags,
            typ,
            cookie,
            offset,
            len,
        };
        let mut v = r.encode(self.extended);
        v.extend_from_slice(payload);
        self.s.write_all(&v).unwrap();
    }

    /// Read one reply (simple, or all chunks up to DONE): (cookie, error, data/payloads).
    pub fn response(&mut self) -> Option<Response> {
        let mut m = [0u8; 4];
        self.s.read_exact(&mut m).ok()?;
        let magic = u32::from_be_bytes(m);
        let hlen = proto::ReplyHeader::len_for_magic(magic).ok()?;
        let mut rest = vec![0u8; hlen - 4];
        self.s.read_exact(&mut rest).ok()?;
        let mut hb = m.to_vec();
        hb.extend_from_slice(&rest);
        match proto::ReplyHeader::parse(&hb).ok()? {
            proto::ReplyHeader::Simple { error, cookie } => Some((cookie, error, vec![])),
            proto::ReplyHeader::Chunk {
                flags,
                typ,
                cookie,
                len,
                ..
            } => {
                let mut chunks = Vec::new();
                let mut error = 0;
                let (mut flags, mut typ, mut len) = (flags, typ, len);
                loop {
                    let mut p = vec![0u8; len as usize];
                    self.s.read_exact(&mut p).ok()?;
                    if typ & 0x8000 != 0 {
                        error = u32::from_be_bytes(p[..4].try_into().unwrap());
                    }
                    chunks.push((typ, p));
                    if flags & proto::REPLY_FLAG_DONE != 0 {
                        break;
                    }
                    let mut hb = vec![0u8; hlen];
                    self.s.read_exact(&mut hb).ok()?;
                    match proto::ReplyHeader::parse(&hb).ok()? {
                        proto::ReplyHeader::Chunk {
                            flags: f,
                            typ: t,
                            len: l,
                            ..
                        } => {
                            flags = f;
                            typ = t;
                            len = l;
                        }
                        _ => return None,
                    }
                }
                Some((cookie, error, chunks))
            }
        }
    }
}

/// Encode a u32-length-prefixed string.
pub fn lstr(v: &mut Vec<u8>, s: &[u8]) {
    v.put_u32(s.len() as u32);
    v.extend_from_slice(s);
}
