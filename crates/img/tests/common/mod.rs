//! Shared helpers of the interop tests: run blockd-img and the real qemu-img (both named
//! `qemu-img` in argv[0]) in identically prepared directories and compare what they print,
//! their exit codes and the files they leave.
#![allow(dead_code)]

use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

pub const QEMU_IMG: &str = "/usr/bin/qemu-img";
pub const QEMU_IO: &str = "/usr/bin/qemu-io";
pub const BLOCKD_IMG: &str = env!("CARGO_BIN_EXE_blockd-img");

pub fn have_qemu_img() -> bool {
    if Path::new(QEMU_IMG).exists() {
        return true;
    }
    if std::env::var_os("BLOCKD_REQUIRE_INTEROP").is_some() {
        panic!("{QEMU_IMG} is missing and BLOCKD_REQUIRE_INTEROP is set");
    }
    eprintln!("SKIP: {QEMU_IMG} not installed; blockd-img interop tests not run");
    false
}

pub fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("blockd-img-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[derive(Debug, PartialEq, Eq)]
pub struct Out {
    pub stdout: String,
    pub stderr: String,
    pub rc: i32,
}

pub fn run(bin: &str, args: &[&str], dir: &Path) -> Out {
    let o = Command::new(bin)
        .arg0("qemu-img")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    Out {
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        rc: o.status.code().unwrap_or(-1),
    }
}

/// Split a command line on spaces (no quoting; tests avoid spaces in arguments).
pub fn split(cmd: &str) -> Vec<&str> {
    cmd.split(' ').filter(|s| !s.is_empty()).collect()
}

/// Create `name` in `dir` with `len` bytes (sparse) and write each `(offset, byte, count)`.
pub fn image(dir: &Path, name: &str, len: u64, writes: &[(u64, u8, usize)]) {
    let f = std::fs::File::create(dir.join(name)).unwrap();
    f.set_len(len).unwrap();
    for &(off, byte, n) in writes {
        f.write_all_at(&vec![byte; n], off).unwrap();
    }
}

/// Run `cmd` with both tools in two fresh directories prepared by `prepare`, compare stdout,
/// stderr and exit code, and return the two directories (qemu's, blockd's).
pub fn both(name: &str, cmd: &str, prepare: fn(&Path)) -> (PathBuf, PathBuf) {
    both_args(name, &split(cmd), prepare)
}

/// [`both`] with the arguments given one by one (empty ones allowed).
pub fn both_args(name: &str, args: &[&str], prepare: fn(&Path)) -> (PathBuf, PathBuf) {
    let cmd = args.join(" ");
    let q = scratch(&format!("{name}-q"));
    let b = scratch(&format!("{name}-b"));
    let t = template(prepare);
    copy_tree(&t, &q);
    copy_tree(&t, &b);
    let oq = run(QEMU_IMG, args, &q);
    let ob = run(BLOCKD_IMG, args, &b);
    assert_eq!(
        ob, oq,
        "`{cmd}`: blockd-img (left) differs from qemu-img (right)"
    );
    (q, b)
}

pub fn cleanup(dirs: (PathBuf, PathBuf)) {
    let _ = std::fs::remove_dir_all(dirs.0);
    let _ = std::fs::remove_dir_all(dirs.1);
}

/// Every file of `q` exists in `b` with the same bytes (and vice versa).
pub fn same_files(q: &Path, b: &Path, what: &str) {
    let names = |d: &Path| {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(b), names(q), "{what}: file lists differ");
    for n in names(q) {
        if q.join(&n).is_dir() {
            same_files(&q.join(&n), &b.join(&n), what);
            continue;
        }
        let dq = std::fs::read(q.join(&n)).unwrap();
        let db = std::fs::read(b.join(&n)).unwrap();
        assert!(dq == db, "{what}: {n} contents differ");
    }
}

/// (size, allocated bytes) of a file.
pub fn file_facts(p: &Path) -> Option<(u64, u64)> {
    let m = std::fs::metadata(p).ok()?;
    Some((m.len(), m.blocks() * 512))
}

/// Run a qemu tool (qemu-img or qemu-io) in `dir` for preparation; it must succeed.
pub fn qemu(tool: &str, cmd: &str, dir: &Path) {
    let o = Command::new(tool)
        .args(split(cmd))
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "`{tool} {cmd}` failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// qcow2 images written by QEMU's tools: a backing chain (qcow2 on qcow2 on raw) with data,
/// zero clusters and a compressed cluster, one in a subdirectory, small clusters, extended L2.
pub fn prepare_qcow2(d: &Path) {
    const M: u64 = 1 << 20;
    image(
        d,
        "base.raw",
        8 * M,
        &[(0, 0x10, 3 * M as usize), (7 * M, 0x17, 4096)],
    );
    std::fs::create_dir_all(d.join("sub")).unwrap();
    for c in [
        "create -q -f qcow2 -b base.raw -F raw mid.qcow2 8M",
        "create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2",
        "create -q -f qcow2 plain.qcow2 8M",
        "create -q -f qcow2 -o cluster_size=4k,compat=0.10 small.qcow2 3M",
        "create -q -f qcow2 -o extended_l2=on,cluster_size=64k xl2.qcow2 4M",
        "create -q -f qcow2 sub/b.qcow2 4M",
        "create -q -f qcow2 -b b.qcow2 -F qcow2 sub/t.qcow2",
    ] {
        qemu(QEMU_IMG, c, d);
    }
    for (img, cmds) in [
        (
            "mid.qcow2",
            &[
                "write -P 0x21 1M 64k",
                "write -z 2M 128k",
                "write -P 0x22 5M 1M",
            ][..],
        ),
        (
            "top.qcow2",
            &[
                "write -P 0x31 0 4k",
                "write -z 5M 64k",
                "write -c -P 0x33 6M 64k",
            ][..],
        ),
        (
            "plain.qcow2",
            &[
                "write -P 1 0 1M",
                "write -z 2M 1M",
                "write -P 2 4M 4k",
                "write -c -P 3 7M 64k",
            ][..],
        ),
        (
            "small.qcow2",
            &["write -P 5 4k 8k", "write -P 6 1M 512"][..],
        ),
        (
            "xl2.qcow2",
            &["write -P 7 2k 2k", "write -z 64k 4k", "write -P 8 1M 100k"][..],
        ),
        ("sub/b.qcow2", &["write -P 9 0 1M"][..]),
        ("sub/t.qcow2", &["write -P 10 512k 4k"][..]),
    ] {
        qemu_io(d, img, cmds);
    }
}

/// A directory prepared once per test process by `prepare` (QEMU's tools are slow to start;
/// each case gets a copy).
fn template(prepare: fn(&Path)) -> PathBuf {
    use std::collections::HashMap;
    use std::sync::Mutex;
    static DIRS: Mutex<Option<HashMap<usize, PathBuf>>> = Mutex::new(None);
    let mut g = DIRS.lock().unwrap_or_else(|e| e.into_inner());
    let map = g.get_or_insert_with(HashMap::new);
    let key = prepare as usize;
    if let Some(d) = map.get(&key) {
        return d.clone();
    }
    if map.is_empty() {
        remove_stale_dirs();
    }
    let d = scratch(&format!("template{}", map.len()));
    prepare(&d);
    map.insert(key, d.clone());
    d
}

/// Copy a directory tree keeping every file's holes and data extents exactly (SEEK_DATA /
/// SEEK_HOLE), so block status and allocation match the original.
pub fn copy_tree(from: &Path, to: &Path) {
    use std::os::fd::AsRawFd;
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let (src, dst) = (e.path(), to.join(e.file_name()));
        if src.is_dir() {
            copy_tree(&src, &dst);
            continue;
        }
        let f = std::fs::File::open(&src).unwrap();
        let len = f.metadata().unwrap().len();
        let out = std::fs::File::create(&dst).unwrap();
        out.set_len(len).unwrap();
        let fd = f.as_raw_fd();
        let mut off = 0u64;
        while off < len {
            // SAFETY: lseek on a file descriptor we own.
            let data = unsafe { libc::lseek(fd, off as libc::off_t, libc::SEEK_DATA) };
            if data < 0 {
                break;
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
            let end = if hole < 0 { len } else { hole as u64 };
            let mut buf = vec![0u8; (end - data as u64) as usize];
            f.read_exact_at(&mut buf, data as u64).unwrap();
            out.write_all_at(&buf, data as u64).unwrap();
            off = end;
        }
    }
}

/// Run qemu-io commands on `img` in `dir`; they must succeed.
pub fn qemu_io(dir: &Path, img: &str, cmds: &[&str]) {
    let mut args: Vec<String> = Vec::new();
    for c in cmds {
        args.push("-c".into());
        args.push(c.to_string());
    }
    let o = Command::new(QEMU_IO)
        .args(&args)
        .arg(img)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "qemu-io on {img}: {cmds:?}");
}

/// Remove the scratch directories of earlier test processes that have exited (templates are
/// shared by a process's tests and outlive them; failed cases keep theirs for inspection until
/// the next run).
fn remove_stale_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("blockd-img-test-")
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}
