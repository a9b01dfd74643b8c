//! Helpers shared by the qcow2 tests: temp files, QEMU tools as the oracle, opening images.
#![allow(dead_code)]

pub mod crash;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use blockd_aio::IoBuf;
use blockd_block::options::parse;
use blockd_block::{BlockBackend, Graph, Node, Perm, ReqFlags};

pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "blockd-qcow2-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self, name: &str) -> String {
        self.0.join(name).display().to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Whether the QEMU tool is there; without it the test skips loudly, unless
/// BLOCKD_REQUIRE_INTEROP is set, where it fails.
pub fn have(tool: &str) -> bool {
    let ok = Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        if std::env::var_os("BLOCKD_REQUIRE_INTEROP").is_some() {
            panic!("{tool} is required (BLOCKD_REQUIRE_INTEROP is set) but missing");
        }
        eprintln!("SKIP: {tool} not found; interop test skipped");
    }
    ok
}

pub fn run(tool: &str, args: &[&str]) -> Output {
    Command::new(tool).args(args).output().unwrap()
}

/// Run and require success.
pub fn ok(tool: &str, args: &[&str]) -> String {
    let o = run(tool, args);
    assert!(
        o.status.success(),
        "{tool} {args:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn graph() -> Graph {
    let mut g = Graph::new();
    g.register_driver(blockd_qcow2::driver_entry());
    g
}

pub fn open_qcow2(g: &mut Graph, path: &str, extra: &str) -> Result<Arc<Node>, String> {
    let mut s = format!("driver=qcow2,file.driver=file,file.filename={path}");
    if !extra.is_empty() {
        s += ",";
        s += extra;
    }
    g.open(parse(&s)?)
}

pub fn rw() -> Perm {
    Perm::CONSISTENT_READ | Perm::WRITE | Perm::RESIZE
}

pub fn backend(g: &Graph, node: &Arc<Node>) -> BlockBackend {
    BlockBackend::new(g, "", node, rw(), Perm::ALL).unwrap()
}

/// Every byte of the image as blockd reads it.
pub async fn read_all(be: &BlockBackend) -> Vec<u8> {
    let len = be.length();
    let mut out = Vec::with_capacity(len as usize);
    let chunk = 3 << 20 | 512; // odd size: requests straddle clusters
    let mut off = 0;
    while off < len {
        let n = (len - off).min(chunk) as usize;
        let (r, b) = be.read(off, IoBuf::new(n, 4096)).await;
        r.unwrap_or_else(|e| panic!("read at {off}: {e}"));
        out.extend_from_slice(&b);
        off += n as u64;
    }
    out
}

pub async fn write(be: &BlockBackend, off: u64, data: &[u8]) {
    let (r, _) = be.write(off, IoBuf::from_slice(data), ReqFlags::NONE).await;
    r.unwrap_or_else(|e| panic!("write at {off}+{}: {e}", data.len()));
}

/// The image's guest bytes according to qemu-img.
pub fn qemu_raw(dir: &TempDir, image: &str) -> Vec<u8> {
    let out = dir.path("qemu-out.raw");
    ok("qemu-img", &["convert", "-U", "-O", "raw", image, &out]);
    let v = std::fs::read(&out).unwrap();
    let _ = std::fs::remove_file(&out);
    v
}

/// `qemu-img check` must find nothing.
pub fn qemu_check_clean(image: &str) {
    let o = run("qemu-img", &["check", image]);
    assert!(
        o.status.success(),
        "qemu-img check {image}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

pub fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

pub fn exists(p: &str) -> bool {
    Path::new(p).exists()
}

/// A deterministic pseudo-random generator (xorshift).
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}
