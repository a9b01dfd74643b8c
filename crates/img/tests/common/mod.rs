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
    let q = scratch(&format!("{name}-q"));
    let b = scratch(&format!("{name}-b"));
    prepare(&q);
    prepare(&b);
    let args = split(cmd);
    let oq = run(QEMU_IMG, &args, &q);
    let ob = run(BLOCKD_IMG, &args, &b);
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
