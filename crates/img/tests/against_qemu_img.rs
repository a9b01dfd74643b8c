//! Interop: blockd-img against the real /usr/bin/qemu-img on the same inputs. Outputs are
//! compared byte for byte; the only normalisation is the elapsed time in bench's
//! `Run completed in X seconds.` line. Without qemu-img the tests print SKIP and pass, unless
//! BLOCKD_REQUIRE_INTEROP is set.

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

const QEMU_IMG: &str = "/usr/bin/qemu-img";
const BLOCKD_IMG: &str = env!("CARGO_BIN_EXE_blockd-img");

fn have_qemu_img() -> bool {
    if Path::new(QEMU_IMG).exists() {
        return true;
    }
    if std::env::var_os("BLOCKD_REQUIRE_INTEROP").is_some() {
        panic!("{QEMU_IMG} is missing and BLOCKD_REQUIRE_INTEROP is set");
    }
    eprintln!("SKIP: {QEMU_IMG} not installed; blockd-img interop tests not run");
    false
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("blockd-img-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[derive(Debug, PartialEq, Eq)]
struct Out {
    stdout: String,
    stderr: String,
    rc: i32,
}

/// Replace the elapsed time of bench's last line (the one thing that must differ).
fn normalise(s: &str) -> String {
    s.lines()
        .map(|l| {
            match l
                .strip_prefix("Run completed in ")
                .and_then(|r| r.strip_suffix(" seconds."))
            {
                Some(t) => {
                    let (a, b) = t.split_once('.').expect("seconds with a fraction");
                    assert!(
                        a.chars().all(|c| c.is_ascii_digit()) && !a.is_empty(),
                        "{l}"
                    );
                    assert!(b.len() == 3 && b.chars().all(|c| c.is_ascii_digit()), "{l}");
                    "Run completed in T seconds.\n".to_string()
                }
                None => format!("{l}\n"),
            }
        })
        .collect()
}

fn run(bin: &str, args: &[&str], dir: &Path) -> Out {
    let o = Command::new(bin)
        .arg0("qemu-img")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    Out {
        stdout: normalise(&String::from_utf8_lossy(&o.stdout)),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        rc: o.status.code().unwrap_or(-1),
    }
}

fn split(cmd: &str) -> Vec<&str> {
    cmd.split(' ').filter(|s| !s.is_empty()).collect()
}

/// Prepare the same files in `dir` with qemu-img: a 64 MiB raw image, one with data, a
/// 1000-byte file, a preallocated one.
fn prepare(dir: &Path) {
    for c in [
        "create -q -f raw bench.img 64M",
        "create -q -f raw r2.img 123456789",
        "create -q -f raw -o preallocation=full g.img 1M",
        "create -q -f raw c.img 0",
    ] {
        assert_eq!(run(QEMU_IMG, &split(c), dir).rc, 0, "{c}");
    }
    std::fs::write(dir.join("odd.img"), vec![0u8; 0]).unwrap();
    std::fs::File::options()
        .write(true)
        .open(dir.join("odd.img"))
        .unwrap()
        .set_len(1000)
        .unwrap();
    let r2 = std::fs::File::options()
        .write(true)
        .open(dir.join("r2.img"))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&r2, &vec![0x11u8; 100 << 10], 1 << 20).unwrap();
}

/// Run `cmd` with both tools in two fresh, identically prepared directories and compare
/// stdout, stderr, exit code; return the two directories for further checks.
fn both(name: &str, cmd: &str) -> (PathBuf, PathBuf) {
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

fn cleanup(dirs: (PathBuf, PathBuf)) {
    let _ = std::fs::remove_dir_all(dirs.0);
    let _ = std::fs::remove_dir_all(dirs.1);
}

/// Size, allocated bytes and the data/hole layout (SEEK_DATA-visible through qemu-img map is
/// overkill; compare contents and the allocated size instead).
fn file_facts(p: &Path) -> Option<(u64, u64)> {
    let m = std::fs::metadata(p).ok()?;
    Some((m.len(), m.blocks() * 512))
}

#[test]
fn create_matches() {
    if !have_qemu_img() {
        return;
    }
    let cases = [
        ("a.img", "create -f raw a.img 1G"),
        ("a2.img", "create a2.img 1G"),
        ("b.img", "create -f raw b.img 1000"),
        ("c2.img", "create -f raw c2.img 0"),
        ("d.img", "create -f raw d.img 1.5M"),
        ("e.img", "create -f raw e.img 1T"),
        ("f.img", "create -q -f raw f.img 1M"),
        ("f2.img", "create -f raw f2.img 1M -q"),
        ("g2.img", "create -f raw -o preallocation=full g2.img 1M"),
        (
            "y.img",
            "create -f raw -o preallocation=falloc,size=1M y.img",
        ),
        (
            "y2.img",
            "create -f raw -o preallocation=falloc y2.img 1000",
        ),
        ("k.img", "create -f raw -o size=2M k.img"),
        ("k2.img", "create -f raw -o size=1k,size=2k k2.img"),
        (
            "n.img",
            "create -f raw -o nocow=on,extent_size_hint=1M,preallocation=off n.img 1M",
        ),
        ("j.img", "create -f raw -o preallocation=metadata j.img 1M"),
        ("j2.img", "create -f raw -o preallocation=bogus j2.img 1M"),
        ("l.img", "create -f raw l.img"),
        ("m.img", "create -f raw m.img x"),
        ("n2.img", "create -f raw n2.img -1"),
        ("s3.img", "create -f raw s3.img 8E"),
        ("s.img", "create -f raw s.img 1E"),
        ("s2.img", "create -f raw s2.img 9223372036854775807"),
        ("q.img", "create -f raw -o bogus=1 q.img 1M"),
        ("y3.img", "create -f raw -o size=1M y3.img 2M"),
        ("z.img", "create -f raw -o size=x z.img"),
        ("z2.img", "create -o ,size=1k z2.img"),
        ("z3.img", "create -f raw z3.img 1M extra"),
        ("z4.img", "create -f qcow3 z4.img 1M"),
        ("z5.img", "create -f raw -x z5.img 1M"),
        ("x", "create"),
        ("x", "create --help"),
        ("x", "create -f raw -o help"),
        ("x", "create -f raw -o help z.img"),
        ("x", "create -f raw /nonexist/dir/x.img 1M"),
        ("bench.img", "create -f raw bench.img 2M"),
    ];
    for (i, (file, cmd)) in cases.iter().enumerate() {
        let dirs = both(&format!("create{i}"), cmd);
        assert_eq!(
            file_facts(&dirs.1.join(file)),
            file_facts(&dirs.0.join(file)),
            "`{cmd}`: size/allocation of {file}"
        );
        cleanup(dirs);
    }
}

#[test]
fn info_matches() {
    if !have_qemu_img() {
        return;
    }
    let cases = [
        "info bench.img",
        "info -f raw bench.img",
        "info -U -f raw bench.img",
        "info r2.img",
        "info g.img",
        "info c.img",
        "info odd.img",
        "info --output=json r2.img",
        "info --output json -f raw g.img",
        "info --output=json c.img",
        "info --output=json odd.img",
        "info --output=human bench.img",
        "info --image-opts driver=raw,file.filename=r2.img",
        "info --image-opts --output=json driver=raw,file.driver=file,file.filename=r2.img",
        "info --image-opts driver=file,filename=r2.img",
        "info --image-opts --output=json driver=file,filename=r2.img",
        "info --image-opts driver=null-co,size=1M",
        "info --image-opts --output=json driver=null-co,size=1M",
        "info --image-opts driver=null-co",
        "info --help",
        "info",
        "info a b",
        "info /nonexist",
        "info -f raw /nonexist",
        "info --output=bogus bench.img",
        "info -x bench.img",
        "info --bogus bench.img",
        "info -f bogus bench.img",
        "info -f qcow2 bench.img",
        "info --image-opts bench.img",
        "info --image-opts -f raw bench.img",
        "info --image-opts driver=null-co,size=1M,bogus=1",
    ];
    for (i, cmd) in cases.iter().enumerate() {
        cleanup(both(&format!("info{i}"), cmd));
    }
}

#[test]
fn bench_matches() {
    if !have_qemu_img() {
        return;
    }
    let cases = [
        "bench -c 1000 bench.img",
        "bench -f raw -c 1000 -d 4 -s 4k bench.img",
        "bench -q -f raw -c 100 bench.img",
        "bench -f raw -c 10 -o 1M -S 64k bench.img",
        "bench -f raw -c 10 -S 0 bench.img",
        "bench -f raw -c 10 -s 1M -S 512 bench.img",
        "bench -f raw -c 1 -s 1.5k bench.img",
        "bench -f raw -c 1 -o 1.5k bench.img",
        "bench -f raw -c 3 -o 0x10 bench.img",
        "bench -f raw -c 0x10 -d 010 bench.img",
        "bench -f raw -c 1000 -o 60M -S 3M bench.img",
        "bench -f raw -c 100 -o 61M -S 1M -s 2M bench.img",
        "bench -f raw -c 1000 -o 1G bench.img",
        "bench -f raw -c 3 -o 64M bench.img",
        "bench -f raw -c 10 -s 2147483647 -d 1 bench.img",
        "bench -U -f raw -c 10 bench.img",
        "bench -t none -n -c 10 -f raw bench.img",
        "bench -f raw -c 10 -t none -i native bench.img",
        "bench -f raw -c 10 -i io_uring bench.img",
        "bench -f raw -c 10 -i threads bench.img",
        "bench -f raw -c 10 -t writethrough bench.img",
        "bench -f raw -c 10 -t unsafe bench.img",
        "bench -f raw -c 10 -t directsync bench.img",
        "bench -c 10 --image-opts driver=raw,file.filename=bench.img",
        "bench -c 1000 --image-opts driver=null-co,size=1G",
        "bench -c 10 --image-opts driver=null-co",
        "bench -c 10 -w -d 2 --flush-interval 2 --image-opts driver=null-co,size=1M",
        "bench -c 10 -w -o 1M --image-opts driver=null-co,size=1M",
        "bench -c 10 odd.img",
        // errors
        "bench",
        "bench a b",
        "bench --bogus bench.img",
        "bench -x bench.img",
        "bench --quiet bench.img",
        "bench --c 5 bench.img",
        "bench --write=1 bench.img",
        "bench -f raw -c",
        "bench /nonexist",
        "bench -f raw /nonexist",
        "bench -f bogus -c 1 bench.img",
        "bench -f raw -f qcow2 -c 1 bench.img",
        "bench -f raw --image-opts -f raw -c 1 bench.img",
        "bench --image-opts -c 1 bench.img",
        "bench --image-opts -f raw",
        "bench -c 1 --image-opts driver=null-co,size=1M,bogus=1",
        "bench -f raw -c 10 -n bench.img",
        "bench -f raw -c 10 -i native bench.img",
        "bench -f raw -c 10 -i bogus bench.img",
        "bench -f raw -c 10 -t bogus bench.img",
        "bench -t bogus -i bogus -c 1 bench.img",
        "bench -U -w -f raw -c 10 bench.img",
        "bench -c 0 bench.img",
        "bench -c -1 bench.img",
        "bench -c 2147483648 bench.img",
        "bench -c 4294967296 bench.img",
        "bench -c x bench.img",
        "bench -c 1k bench.img",
        "bench -d 0 bench.img",
        "bench -d 4294967296 bench.img",
        "bench -d x bench.img",
        "bench -s 0 bench.img",
        "bench -s 2G bench.img",
        "bench -s x bench.img",
        "bench -s 1.5 bench.img",
        "bench -o x bench.img",
        "bench -o -1 bench.img",
        "bench -o 8E bench.img",
        "bench -S x bench.img",
        "bench -S -1 bench.img",
        "bench -w --pattern 256 bench.img",
        "bench -w --pattern 0x100 bench.img",
        "bench -w --pattern x bench.img",
        "bench -w --pattern 10k bench.img",
        "bench -w --flush-interval x bench.img",
        "bench -w --flush-interval -1 bench.img",
        "bench -w --flush-interval 10 bench.img",
        "bench --flush-interval 100 bench.img",
        "bench -w --flush-interval 10 -f raw --image-opts bench.img",
        "bench -h",
        "bench --help",
    ];
    for (i, cmd) in cases.iter().enumerate() {
        cleanup(both(&format!("bench{i}"), cmd));
    }
}

/// Images after write benchmarks hold exactly what qemu-img bench leaves.
#[test]
fn bench_writes_leave_the_same_image() {
    if !have_qemu_img() {
        return;
    }
    let cases = [
        "bench -f raw -w -c 1000 -d 4 -s 4k --pattern 0x5a bench.img",
        "bench -f raw -w -c 10 --pattern 010 bench.img",
        "bench -w -c 1 --pattern 1 bench.img",
        "bench -f raw -w -c 1000 -o 60M -S 3M --pattern 0xa5 bench.img",
        "bench -f raw -w -c 200 -o 1.5k -s 1536 -S 5000 --pattern 77 -t none bench.img",
        "bench -f raw -w -c 200 -s 64k -d 8 --flush-interval 16 --pattern 3 bench.img",
        "bench -f raw -w -c 200 -s 64k -d 8 --flush-interval 8 --no-drain --pattern 4 bench.img",
        "bench -f raw -w -c 50 -d 1 -t writethrough --pattern 5 -i threads bench.img",
        "bench -f raw -w -c 50 -t none -i native --pattern 6 bench.img",
        // (A run that fails part-way is not compared: what qemu-img's already issued requests
        // leave behind depends on whether its worker threads ran before it exited.)
        "bench -f raw -w -c 20 -s 300 --pattern 0xee r2.img",
    ];
    for (i, cmd) in cases.iter().enumerate() {
        let (q, b) = both(&format!("benchw{i}"), cmd);
        for f in ["bench.img", "r2.img"] {
            let dq = std::fs::read(q.join(f)).unwrap();
            let db = std::fs::read(b.join(f)).unwrap();
            assert!(dq == db, "`{cmd}`: {f} contents differ");
        }
        cleanup((q, b));
    }
}
