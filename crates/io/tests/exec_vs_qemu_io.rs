//! Run the same qemu-io scripts through /usr/bin/qemu-io and the blockd-io binary on two copies
//! of one raw image; stdout, stderr (timing figures normalised), exit status and the final
//! image bytes must be identical.
//!
//! Skips (loudly) when qemu-io is missing, unless BLOCKD_REQUIRE_INTEROP is set.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const QEMU_IO: &str = "/usr/bin/qemu-io";
const BLOCKD_IO: &str = env!("CARGO_BIN_EXE_blockd-io");

fn available() -> bool {
    if Path::new(QEMU_IO).exists() {
        return true;
    }
    if std::env::var_os("BLOCKD_REQUIRE_INTEROP").is_some() {
        panic!("{QEMU_IO} not found and BLOCKD_REQUIRE_INTEROP is set");
    }
    eprintln!("SKIP: {QEMU_IO} not found; blockd-io interop test not run");
    false
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(test: &str) -> Self {
        let p = std::env::temp_dir().join(format!("blockd-io-exec-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Blank the timing figures: the `<time> (<rates>)` tail of summary lines and the time and
/// rates of `-C` lines.
fn normalise(s: &str) -> String {
    s.split_inclusive('\n')
        .map(|l| {
            if let Some(i) = l.find(" ops; ") {
                let nl = if l.ends_with('\n') { "\n" } else { "" };
                format!("{} ops; <timing>{nl}", &l[..i])
            } else if is_csv(l) {
                let f: Vec<&str> = l.trim_end().split(',').collect();
                format!("{},{},<timing>\n", f[0], f[1])
            } else {
                l.to_string()
            }
        })
        .collect()
}

fn is_csv(l: &str) -> bool {
    let f: Vec<&str> = l.trim_end().split(',').collect();
    f.len() == 5 && f[0].bytes().all(|b| b.is_ascii_digit()) && f[2].contains(':')
}

struct Run {
    stdout: String,
    stderr: String,
    code: Option<i32>,
    image: Vec<u8>,
}

/// Run `prog` with `args` (the image path substituted for `{img}`) in its own directory holding
/// a copy of `image`; `stdin` is fed when given.
fn run(prog: &str, dir: &Path, image: &[u8], args: &[&str], stdin: Option<&str>) -> Run {
    std::fs::create_dir_all(dir).unwrap();
    let img = dir.join("test.img");
    std::fs::write(&img, image).unwrap();
    let args: Vec<String> = args
        .iter()
        .map(|a| {
            a.replace("{img}", img.to_str().unwrap())
                .replace("{dir}", dir.to_str().unwrap())
        })
        .collect();
    let mut child = Command::new(prog)
        .arg0("qemu-io")
        .args(&args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        let mut i = child.stdin.take().unwrap();
        if let Some(s) = stdin {
            i.write_all(s.as_bytes()).unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    let dir_s = dir.to_str().unwrap();
    Run {
        stdout: normalise(&String::from_utf8_lossy(&out.stdout)).replace(dir_s, "<dir>"),
        stderr: normalise(&String::from_utf8_lossy(&out.stderr)).replace(dir_s, "<dir>"),
        code: out.status.code(),
        image: std::fs::read(&img).unwrap_or_default(),
    }
}

fn check_full(name: &str, image: &[u8], args: &[&str], stdin: Option<&str>) {
    let tmp = TempDir::new(name);
    // Same directory name length for both, so error messages naming paths compare equal.
    let q = run(QEMU_IO, &tmp.0.join("q"), image, args, stdin);
    let b = run(BLOCKD_IO, &tmp.0.join("b"), image, args, stdin);
    let ql: Vec<&str> = q.stdout.lines().collect();
    let bl: Vec<&str> = b.stdout.lines().collect();
    for (i, (x, y)) in bl.iter().zip(&ql).enumerate() {
        assert_eq!(
            x, y,
            "{name}: stdout line {i} differs\nblockd-io:\n{}\nqemu-io:\n{}",
            b.stdout, q.stdout
        );
    }
    assert_eq!(b.stdout, q.stdout, "{name}: stdout differs");
    assert_eq!(b.stderr, q.stderr, "{name}: stderr differs");
    assert_eq!(b.code, q.code, "{name}: exit status differs");
    assert!(b.image == q.image, "{name}: final image bytes differ");
}

/// `-f raw`, one `-c` per command.
fn check(name: &str, image: &[u8], cmds: &[&str]) {
    let mut args = vec!["-f", "raw"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push("{img}");
    check_full(name, image, &args, None);
}

fn zero_image(len: usize) -> Vec<u8> {
    vec![0; len]
}

/// 1 MiB with recognisable contents: byte i of each 4 KiB block is (block + i) & 0xff.
fn patterned_image() -> Vec<u8> {
    (0..1usize << 20)
        .map(|i| ((i >> 12) + (i & 0xfff)) as u8)
        .collect()
}

#[test]
fn writes_with_patterns() {
    if !available() {
        return;
    }
    check(
        "patterns",
        &zero_image(1 << 20),
        &[
            "write -P 0xab 0 512",
            "read -P 0xab 0 512",
            "write 512 1k",
            "write -P 077 1536 100",
            "write -P 5 3 5",
            "writev -P 0x33 4k 1k 512 2k",
            "readv -P 0x33 4k 1k 512 2k",
            "write -f -P 0x11 64k 64k",
            "read -P 0x11 64k 64k",
            "write -C 128k 4k",
            "write -q 132k 4k",
            "read -C -q 0 1",
            "read -P 0 1048575 1",
            "write -P 0xff 1048575 1",
            "writev 0 0 0",
            "read 1M 0",
        ],
    );
}

#[test]
fn reads_with_hexdump() {
    if !available() {
        return;
    }
    check(
        "hexdump",
        &patterned_image(),
        &[
            "read -v 0 256",
            "read -v 4099 21",
            "read -v 4096 5",
            "read -v 0 0",
            "readv -v 512 8 8",
            "read -q -v 0 16",
            "read -C -v 100 16",
            "write -P 0x41 8k 16",
            "read -v 8k 32",
        ],
    );
}

#[test]
fn pattern_mismatch() {
    if !available() {
        return;
    }
    let mut img = zero_image(1 << 20);
    img[..512].fill(0xab);
    img[512..1024].fill(0xcd);
    check(
        "mismatch",
        &img,
        &[
            "read -P 0xab 0 1024",
            "read -P 0xab -s 0 -l 512 0 1024",
            "read -P 0xcd -s 500 -l 100 0 1024",
            "read -P 0xcd -s 1000 -l 100 0 1024",
            "read -q -P 0x10 -s 16 -l 16 0 256",
            "readv -q -P 0x10 0 128 128",
            "read -v -P 0x99 0 16",
        ],
    );
}

#[test]
fn sparse_discard_zeroes_map_alloc() {
    if !available() {
        return;
    }
    check(
        "sparse",
        &patterned_image(),
        &[
            "map",
            "alloc 0",
            "alloc 0 1M",
            "discard 0 64k",
            "read -P 0 0 64k",
            "discard 1 1",
            "write -z 64k 4k",
            "write -z -u 128k 64k",
            "read -P 0 128k 64k",
            "write -z -f 256k 512",
            "write -z -n 300k 512",
            "discard -q 512k 4k",
            "discard -C 516k 4k",
            "map",
            "alloc 64k",
            "alloc 64k 128k",
            "alloc 256k 1",
            "alloc 1M",
            "alloc 1020k 8k",
            "alloc 0 0",
            "alloc 2M",
            "flush",
        ],
    );
}

#[test]
fn truncate_and_length() {
    if !available() {
        return;
    }
    check(
        "truncate",
        &patterned_image(),
        &[
            "length",
            "truncate 2M",
            "length",
            "read -P 0 1M 1M",
            "truncate 1536k",
            "length",
            "truncate 512k",
            "length",
            "read 512k 1",
            "truncate",
            "truncate x",
            "truncate -m metadata 3M",
            "truncate -m bogus 3M",
            "truncate 1M 2M",
            "length",
            "info",
        ],
    );
}

#[test]
fn errors() {
    if !available() {
        return;
    }
    check(
        "errors",
        &zero_image(1 << 20),
        &[
            "read 1M 512",
            "read 1020k 8k",
            "write 1M 512",
            "readv 1020k 4k 4k",
            "writev 1020k 4k 4k",
            "discard 1020k 8k",
            "read 2M 0",
            "write 2M 0",
            "read 9223372036854775807 1",
            "bogus",
            "READ 0 1",
            "read 0",
            "read -x 0 1",
            "read 0 -1",
            "read 0 512 512",
            "read 0 1e3",
            "read 0 2147483137",
            "write -u 0 512",
            "write -z -P 1 0 512",
            "write -P 0x1ff 0 1",
            "write -c 0 64k",
            "write -b 0 512",
            "read -b 0 512",
            "length x",
            "help bogus",
            "help quit",
            "alloc",
            "alloc x",
            "sleep x",
            "sleep 10",
            "break foo bar",
            "write -s nofile.bin 0 512",
            "open {img}",
        ],
    );
}

#[test]
fn aio_commands() {
    if !available() {
        return;
    }
    check(
        "aio",
        &zero_image(1 << 20),
        &[
            "aio_write -P 0x44 0 512",
            "length",
            "aio_flush",
            "aio_read -P 0x44 -v 0 16",
            "aio_flush",
            "aio_write -P 0x55 4k 1k 1k",
            "aio_flush",
            "aio_read -q -P 0x10 4k 128 128",
            "aio_flush",
            "aio_read 1M 512",
            "aio_flush",
            "aio_write 1M 512",
            "aio_flush",
            "aio_write -z 8k 4k",
            "aio_flush",
            "aio_write -u 0 512",
            "aio_write -i 0 1",
            "aio_read -i 0 1",
            "aio_flush x",
            "aio_read -C 0 512",
        ],
    );
}

#[test]
fn read_only_and_close() {
    if !available() {
        return;
    }
    check_full(
        "readonly",
        &zero_image(1 << 20),
        &[
            "-r",
            "-f",
            "raw",
            "-c",
            "read 0 512",
            "-c",
            "write 0 512",
            "-c",
            "discard 0 1",
            "-c",
            "truncate 1",
            "-c",
            "writev 0 1",
            "-c",
            "aio_write 0 1",
            "-c",
            "flush",
            "-c",
            "close",
            "-c",
            "length",
            "-c",
            "open -o driver=raw {img}",
            "-c",
            "write -P 9 0 1",
            "-c",
            "open {img}",
            "{img}",
        ],
        None,
    );
}

#[test]
fn interactive_and_probing() {
    if !available() {
        return;
    }
    let img = zero_image(1 << 20);
    check_full(
        "interactive",
        &img,
        &["-f", "raw", "{img}"],
        Some(
            "write -P 7 0 4k\n\nlength\nbogus\nread -P 7 0 4k\naio_read 0 512\naio_flush\nlength\nquit\nlength\n",
        ),
    );
    check_full(
        "interactive-eof",
        &img,
        &["-f", "raw", "{img}"],
        Some("length"),
    );
    check_full("interactive-nofile", &img, &[], Some("length\n"));
    check_full(
        "probe",
        &img,
        &["-c", "write -P 3 0 1k", "-c", "info", "{img}"],
        None,
    );
    check_full(
        "nonexistent",
        &img,
        &["-c", "length", "{dir}/nonexistent"],
        None,
    );
    check_full(
        "image-opts",
        &img,
        &[
            "--image-opts",
            "-c",
            "info",
            "-c",
            "write 0 1",
            "driver=raw,file.filename={img}",
        ],
        None,
    );
    check_full(
        "image-opts-file",
        &img,
        &[
            "--image-opts",
            "-c",
            "info",
            "-c",
            "length",
            "driver=file,filename={img}",
        ],
        None,
    );
    check_full(
        "force-share-rw",
        &img,
        &["-U", "-f", "raw", "-c", "length", "{img}"],
        None,
    );
    check_full(
        "cache-modes",
        &img,
        &[
            "-n",
            "-f",
            "raw",
            "-c",
            "write -P 0x11 3 5",
            "-c",
            "read -P 0x11 3 5",
            "-c",
            "read -v 0 16",
            "{img}",
        ],
        None,
    );
    for t in ["writeback", "writethrough", "directsync", "unsafe", "bogus"] {
        check_full(
            &format!("cache-{t}"),
            &img,
            &[
                "-t",
                t,
                "-f",
                "raw",
                "-c",
                "write 1 1",
                "-c",
                "flush",
                "{img}",
            ],
            None,
        );
    }
    for i in ["threads", "io_uring", "native", "bogus"] {
        check_full(
            &format!("aio-{i}"),
            &img,
            &[
                "-i",
                i,
                "-f",
                "raw",
                "-c",
                "write 1 1",
                "-c",
                "read -v 0 2",
                "{img}",
            ],
            None,
        );
    }
    check_full("help", &img, &["-h"], None);
    check_full("version", &img, &["-V"], None);
    check_full("bad-option", &img, &["--bogus"], None);
    check_full("two-files", &img, &["-c", "length", "{img}", "{img}"], None);
}
