//! blockd-img's qcow2 commands against the real qemu-img, in identically prepared
//! directories: `create -f qcow2` (output, errors, resulting bytes), `check` (text, JSON,
//! exit codes, repairs), `info` of qcow2 images (backing files, snapshots, --backing-chain).

use std::os::unix::fs::FileExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

const QEMU_IMG: &str = "/usr/bin/qemu-img";
const QEMU_IO: &str = "/usr/bin/qemu-io";
const BLOCKD_IMG: &str = env!("CARGO_BIN_EXE_blockd-img");

fn have_qemu() -> bool {
    if Path::new(QEMU_IMG).exists() && Path::new(QEMU_IO).exists() {
        return true;
    }
    if std::env::var_os("BLOCKD_REQUIRE_INTEROP").is_some() {
        panic!("qemu-img/qemu-io missing and BLOCKD_REQUIRE_INTEROP is set");
    }
    eprintln!("SKIP: qemu-img/qemu-io not installed; qcow2 command tests not run");
    false
}

struct Dirs {
    root: PathBuf,
}

impl Dirs {
    fn new(tag: &str) -> Dirs {
        let root =
            std::env::temp_dir().join(format!("blockd-img-qcow2-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("q")).unwrap();
        std::fs::create_dir_all(root.join("b")).unwrap();
        Dirs { root }
    }
    fn q(&self) -> PathBuf {
        self.root.join("q")
    }
    fn b(&self) -> PathBuf {
        self.root.join("b")
    }
    /// Run a setup command (real tools) in both directories.
    fn both(&self, tool: &str, args: &[&str]) {
        for d in [self.q(), self.b()] {
            let o = Command::new(tool)
                .args(args)
                .current_dir(&d)
                .output()
                .unwrap();
            assert!(
                o.status.success(),
                "{tool} {args:?}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
    }
}

impl Drop for Dirs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn run(bin: &str, args: &[&str], dir: &Path) -> (String, String, i32) {
    let o = Command::new(bin)
        .arg0("qemu-img")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
        o.status.code().unwrap_or(-1),
    )
}

/// The same command through both tools: same output and exit code.
fn same(d: &Dirs, cmd: &str) {
    let args: Vec<&str> = cmd.split(' ').filter(|s| !s.is_empty()).collect();
    let q = run(QEMU_IMG, &args, &d.q());
    let b = run(BLOCKD_IMG, &args, &d.b());
    assert_eq!(b, q, "qemu-img {cmd}");
}

#[test]
fn create_matches_qemu_img() {
    if !have_qemu() {
        return;
    }
    let d = Dirs::new("create");
    d.both(
        QEMU_IMG,
        &["create", "-q", "-f", "qcow2", "base.qcow2", "1G"],
    );
    for cmd in [
        "create -f qcow2 x.qcow2 1G",
        "create -f qcow2 -o cluster_size=4k,refcount_bits=8 x.qcow2 100M",
        "create -f qcow2 -o compat=0.10 x.qcow2 1M",
        "create -f qcow2 -o cluster_size=2M,extended_l2=on,compression_type=zstd x.qcow2 10G",
        "create -f qcow2 -b base.qcow2 -F qcow2 x.qcow2",
        "create -f qcow2 -o backing_file=base.qcow2,backing_fmt=qcow2,compat=0.10 x.qcow2",
        "create -f qcow2 -b base.qcow2 x.qcow2",
        "create -f qcow2 -b nonexist -F raw x.qcow2",
        "create -f qcow2 -u -b nonexist -F raw x.qcow2 1M",
        "create -f qcow2 -o lazy_refcounts=maybe x.qcow2 1M",
        "create -f qcow2 -o compat=0.10,lazy_refcounts=on x.qcow2 1M",
        "create -f qcow2 -o compression_type=foo x.qcow2 1M",
        "create -f qcow2 -o foo=bar x.qcow2 1M",
        "create -f qcow2 -o size=1M x.qcow2 1M",
        "create -f qcow2 x.qcow2",
        "create -f qcow2 -o extended_l2=on,cluster_size=4k x.qcow2 1M",
        "create -f qcow2 -o refcount_bits=3 x.qcow2 1M",
        "create -f qcow2 -o cluster_size=1000 x.qcow2 1M",
        "create -f qcow2 -o cluster_size=512 x.qcow2 100T",
        "create -f qcow2 -o refcount_bits=0x8,compat=v3,lazy_refcounts=yes x.qcow2 1M",
        "create -q -f qcow2 x.qcow2 1M",
    ] {
        same(&d, cmd);
        let (q, b) = (d.q().join("x.qcow2"), d.b().join("x.qcow2"));
        assert_eq!(q.exists(), b.exists(), "{cmd}");
        if q.exists() {
            assert!(
                std::fs::read(&q).unwrap() == std::fs::read(&b).unwrap(),
                "{cmd}: bytes differ"
            );
            std::fs::remove_file(q).unwrap();
            std::fs::remove_file(b).unwrap();
        }
    }
    // Preallocated images differ in layout from QEMU's but are consistent and read the same.
    for mode in ["metadata", "falloc", "full"] {
        let cmd = format!("create -f qcow2 -o preallocation={mode} x.qcow2 3M");
        same(&d, &cmd);
        let (_, _, rc) = run(QEMU_IMG, &["check", "x.qcow2"], &d.b());
        assert_eq!(rc, 0, "{cmd}");
        let (o, _, _) = run(QEMU_IMG, &["compare", "../q/x.qcow2", "x.qcow2"], &d.b());
        assert_eq!(o, "Images are identical.\n", "{cmd}");
    }
}

#[test]
fn check_matches_qemu_img() {
    if !have_qemu() {
        return;
    }
    let d = Dirs::new("check");
    d.both(
        QEMU_IMG,
        &["create", "-q", "-f", "qcow2", "clean.qcow2", "64M"],
    );
    d.both(
        QEMU_IMG,
        &["create", "-q", "-f", "qcow2", "empty.qcow2", "64M"],
    );
    d.both(
        QEMU_IO,
        &[
            "-c",
            "write -P 1 0 200k",
            "-c",
            "write -P 2 1M 64k",
            "-c",
            "write -c -P 4 2M 64k",
            "clean.qcow2",
        ],
    );
    d.both(
        QEMU_IMG,
        &["create", "-q", "-f", "qcow2", "leak.qcow2", "64M"],
    );
    d.both(QEMU_IO, &["-c", "write 0 128k", "leak.qcow2"]);
    d.both(
        QEMU_IMG,
        &["create", "-q", "-f", "qcow2", "bad.qcow2", "64M"],
    );
    d.both(QEMU_IO, &["-c", "write 0 128k", "bad.qcow2"]);
    d.both(QEMU_IMG, &["create", "-q", "-f", "raw", "plain.raw", "1M"]);
    // Many L2 tables (512-byte clusters), each placed between data runs: QEMU counts
    // fragmentation within each table.
    d.both(
        QEMU_IO,
        &["-f", "raw", "-c", "write -P 5 0 200k", "plain.raw"],
    );
    d.both(
        QEMU_IMG,
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=512",
            "plain.raw",
            "tables.qcow2",
        ],
    );
    for dir in [d.q(), d.b()] {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("leak.qcow2"))
            .unwrap();
        f.set_len(8 * 65536).unwrap();
        f.write_all_at(&[0, 1], 0x20000 + 14).unwrap();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("bad.qcow2"))
            .unwrap();
        f.write_all_at(&[0, 0], 0x20000 + 6).unwrap();
    }
    for cmd in [
        "check clean.qcow2",
        "check --output=json clean.qcow2",
        "check tables.qcow2",
        "check --output=json tables.qcow2",
        "check empty.qcow2",
        "check --output=json empty.qcow2",
        "check leak.qcow2",
        "check --output=json leak.qcow2",
        "check bad.qcow2",
        "check --output=json bad.qcow2",
        "check -q bad.qcow2",
        "check -f raw plain.raw",
        "check -r sometimes clean.qcow2",
        "check --output=xml clean.qcow2",
        "check nonexist.qcow2",
        "check -r leaks bad.qcow2",
        "check -r leaks leak.qcow2",
        "check leak.qcow2",
        // Referenced clusters counted free: the refcount structure is rebuilt.
        "check -r all bad.qcow2",
        "check bad.qcow2",
    ] {
        same(&d, cmd);
    }
    // The same over several refcount blocks (512-byte clusters) and with a snapshot sharing
    // the clusters whose refcounts are zeroed.
    d.both(
        QEMU_IMG,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512",
            "many.qcow2",
            "1M",
        ],
    );
    d.both(QEMU_IO, &["-c", "write -P 3 0 300k", "many.qcow2"]);
    d.both(
        QEMU_IMG,
        &["create", "-q", "-f", "qcow2", "snap.qcow2", "4M"],
    );
    d.both(QEMU_IO, &["-c", "write -P 4 0 256k", "snap.qcow2"]);
    d.both(QEMU_IMG, &["snapshot", "-c", "s1", "snap.qcow2"]);
    d.both(QEMU_IO, &["-c", "write -P 5 64k 64k", "snap.qcow2"]);
    for dir in [d.q(), d.b()] {
        for (img, clusters) in [("many.qcow2", &[300u64, 600][..]), ("snap.qcow2", &[6][..])] {
            let (h, f) = open_for_patching(&dir.join(img));
            let cs = h.cluster_size();
            let per_block = cs / 2;
            for &c in clusters {
                let mut e = [0u8; 8];
                f.read_exact_at(&mut e, h.refcount_table_offset + c / per_block * 8)
                    .unwrap();
                let rb = u64::from_be_bytes(e);
                f.write_all_at(&[0, 0], rb + c % per_block * 2).unwrap();
            }
        }
    }
    // Two L2 entries naming one cluster (refcount 1, two references) and a leaked cluster:
    // reported in QEMU's two passes; -r leaks repairs the leak only, -r all both.
    d.both(
        QEMU_IMG,
        &["create", "-q", "-f", "qcow2", "dup.qcow2", "1M"],
    );
    d.both(QEMU_IO, &["-c", "write -P 6 0 128k", "dup.qcow2"]);
    for dir in [d.q(), d.b()] {
        let path = dir.join("dup.qcow2");
        let (h, f) = open_for_patching(&path);
        let mut e = [0u8; 8];
        f.read_exact_at(&mut e, h.l1_table_offset).unwrap();
        let l2 = u64::from_be_bytes(e) & 0x00ff_ffff_ffff_fe00;
        f.read_exact_at(&mut e, l2).unwrap();
        f.write_all_at(&e, l2 + 8).unwrap();
        std::fs::copy(&path, dir.join("dup2.qcow2")).unwrap();
    }
    for cmd in [
        "check dup.qcow2",
        "check -r leaks dup.qcow2",
        "check dup.qcow2",
        "check -r all dup2.qcow2",
        "check dup2.qcow2",
        "check many.qcow2",
        "check -r all many.qcow2",
        "check many.qcow2",
        "check snap.qcow2",
        "check -r all snap.qcow2",
        "check snap.qcow2",
    ] {
        same(&d, cmd);
    }
    for img in ["many.qcow2", "snap.qcow2"] {
        let (o, _, _) = run(QEMU_IMG, &["compare", &format!("../q/{img}"), img], &d.b());
        assert_eq!(o, "Images are identical.\n", "{img} after the rebuild");
    }
}

#[test]
fn info_of_qcow2_images_matches_qemu_img() {
    if !have_qemu() {
        return;
    }
    let d = Dirs::new("info");
    d.both(
        QEMU_IMG,
        &["create", "-q", "-f", "qcow2", "base.qcow2", "1G"],
    );
    d.both(
        QEMU_IMG,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "mid.qcow2",
        ],
    );
    d.both(
        QEMU_IMG,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    );
    d.both(
        QEMU_IMG,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=2M,extended_l2=on,compression_type=zstd,lazy_refcounts=on",
            "ext.qcow2",
            "3G",
        ],
    );
    d.both(QEMU_IO, &["-c", "write 0 1M", "base.qcow2"]);
    for cmd in [
        "info base.qcow2",
        "info --output=json base.qcow2",
        "info top.qcow2",
        "info --output=json top.qcow2",
        "info --backing-chain top.qcow2",
        "info --backing-chain --output=json top.qcow2",
        "info ext.qcow2",
        "info --output=json ext.qcow2",
        "info -f qcow2 mid.qcow2",
    ] {
        same(&d, cmd);
    }
}

/// Dates differ between the two runs: mask them.
fn masked(o: (String, String, i32)) -> (String, String, i32) {
    let mask = |s: &str| {
        s.lines()
            .map(|l| match l.find("20") {
                Some(i) if l.len() > i + 19 && l.as_bytes()[i + 4] == b'-' => {
                    format!("{}DATE{}", &l[..i], &l[i + 19..])
                }
                _ => l.to_string(),
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    (mask(&o.0), mask(&o.1), o.2)
}

#[test]
fn snapshot_matches_qemu_img() {
    if !have_qemu() {
        return;
    }
    let d = Dirs::new("snapshot");
    d.both(QEMU_IMG, &["create", "-q", "-f", "qcow2", "s.qcow2", "16M"]);
    d.both(QEMU_IMG, &["create", "-q", "-f", "raw", "r.raw", "1M"]);
    d.both(
        QEMU_IO,
        &[
            "-c",
            "write -P 1 0 1M",
            "-c",
            "write -c -P 3 2M 64k",
            "s.qcow2",
        ],
    );
    let steps: &[(&str, Option<&str>)] = &[
        ("snapshot -l s.qcow2", None),
        ("snapshot -c one s.qcow2", Some("write -P 9 0 64k")),
        ("snapshot -c two s.qcow2", Some("write -P 8 100k 300k")),
        ("snapshot -c one s.qcow2", None),
        ("snapshot -l s.qcow2", None),
        ("snapshot -a two s.qcow2", None),
        ("snapshot -d one s.qcow2", None),
        ("snapshot -d 2 s.qcow2", None),
        ("snapshot -d nope s.qcow2", None),
        ("snapshot -a nope s.qcow2", None),
        ("snapshot -a 3 s.qcow2", Some("write -P 7 1M 64k")),
        ("snapshot s.qcow2", None),
        ("snapshot -l -c x s.qcow2", None),
        ("snapshot -l r.raw", None),
        ("snapshot -c x r.raw", None),
    ];
    let check_steps = |steps: &[(&str, Option<&str>)]| {
        for (cmd, then) in steps {
            let args: Vec<&str> = cmd.split(' ').collect();
            let q = masked(run(QEMU_IMG, &args, &d.q()));
            let b = masked(run(BLOCKD_IMG, &args, &d.b()));
            assert_eq!(b, q, "qemu-img {cmd}");
            let (_, _, rc) = run(QEMU_IMG, &["check", "s.qcow2"], &d.b());
            assert_eq!(rc, 0, "check after {cmd}");
            let (o, _, _) = run(
                QEMU_IMG,
                &[
                    "compare",
                    "-f",
                    "qcow2",
                    "-F",
                    "qcow2",
                    "../q/s.qcow2",
                    "s.qcow2",
                ],
                &d.b(),
            );
            assert_eq!(o, "Images are identical.\n", "after {cmd}");
            if let Some(w) = then {
                d.both(QEMU_IO, &["-f", "qcow2", "-c", w, "s.qcow2"]);
            }
        }
    };
    check_steps(steps);
    // Snapshots of other sizes: applying one gives the image its size (and L1 table).
    d.both(QEMU_IMG, &["snapshot", "-c", "small", "s.qcow2"]);
    d.both(QEMU_IMG, &["resize", "-q", "s.qcow2", "600M"]);
    d.both(
        QEMU_IO,
        &["-f", "qcow2", "-c", "write -P 5 590M 64k", "s.qcow2"],
    );
    d.both(QEMU_IMG, &["snapshot", "-c", "big", "s.qcow2"]);
    let vsize = |dir: &std::path::Path| {
        let (o, _, _) = run(QEMU_IMG, &["info", "--output=json", "s.qcow2"], dir);
        o.lines()
            .rfind(|l| l.starts_with("    \"virtual-size\""))
            .unwrap_or_default()
            .to_string()
    };
    check_steps(&[("snapshot -a small s.qcow2", Some("write -P 6 15M 64k"))]);
    assert_eq!(vsize(&d.b()), vsize(&d.q()));
    assert!(vsize(&d.b()).contains("16777216"));
    check_steps(&[
        ("snapshot -a big s.qcow2", None),
        ("snapshot -l s.qcow2", None),
    ]);
    assert_eq!(vsize(&d.b()), vsize(&d.q()));
    assert!(vsize(&d.b()).contains("629145600"));
}

/// An image's header and its file opened for writing, to corrupt it by hand.
fn open_for_patching(path: &Path) -> (blockd_qcow2::header::Header, std::fs::File) {
    let h = blockd_qcow2::read_header_file(path.to_str().unwrap()).unwrap();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    (h, f)
}
