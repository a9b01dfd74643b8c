//! Compare blockd-io's parsing and formatting with the real qemu-io on a
//! temporary raw image, for outputs that do not depend on the I/O itself.
//! Skips (loudly) when /usr/bin/qemu-io is missing, unless
//! BLOCKD_REQUIRE_INTEROP is set.

use std::path::{Path, PathBuf};
use std::process::Command as Proc;
use std::time::Duration;

use blockd_io::format::{self, Stats, Verb};
use blockd_io::help;
use blockd_io::numbers::parse_size;
use blockd_io::parse_command;

const QEMU_IO: &str = "/usr/bin/qemu-io";
const QEMU_IMG: &str = "/usr/bin/qemu-img";

struct TempDir(PathBuf);

impl TempDir {
    fn new(test: &str) -> Self {
        let p =
            std::env::temp_dir().join(format!("blockd-io-interop-{}-{test}", std::process::id()));
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

fn available() -> bool {
    if Path::new(QEMU_IO).exists() && Path::new(QEMU_IMG).exists() {
        return true;
    }
    if std::env::var_os("BLOCKD_REQUIRE_INTEROP").is_some() {
        panic!("qemu-io/qemu-img not found and BLOCKD_REQUIRE_INTEROP is set");
    }
    eprintln!("SKIP: qemu-io not found ({QEMU_IO}); interop test not run");
    false
}

fn make_image(dir: &Path) -> PathBuf {
    let img = dir.join("raw.img");
    let st = Proc::new(QEMU_IMG)
        .args(["create", "-q", "-f", "raw"])
        .arg(&img)
        .arg("1M")
        .status()
        .unwrap();
    assert!(st.success());
    img
}

/// Run qemu-io with the given -c commands; (stdout, stderr, success).
fn qemu_io(img: &Path, cmds: &[&str]) -> (String, String, bool) {
    let mut c = Proc::new(QEMU_IO);
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    let out = c.arg(img).output().unwrap();
    (
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
        out.status.success(),
    )
}

fn assert_lines_eq(what: &str, ours: &str, theirs: &str) {
    let a: Vec<&str> = ours.lines().collect();
    let b: Vec<&str> = theirs.lines().collect();
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert_eq!(x, y, "{what}: line {i} differs");
    }
    assert_eq!(
        a.len(),
        b.len(),
        "{what}: line count differs\nours:\n{ours}\ntheirs:\n{theirs}"
    );
    assert_eq!(ours, theirs, "{what}: trailing newlines differ");
}

/// The second summary line with its timing figures blanked out.
fn untimed(line: &str) -> String {
    match line.find(" ops; ") {
        Some(i) => format!("{} ops; <timing>", &line[..i]),
        None => line.to_string(),
    }
}

fn untimed_text(s: &str) -> String {
    s.lines().map(untimed).collect::<Vec<_>>().join("\n")
}

#[test]
fn parse_errors_match() {
    if !available() {
        return;
    }
    let dir = TempDir::new("parse_errors_match");
    let img = make_image(&dir.0);
    let cases = [
        "bogus",
        "READ 0 1",
        "# x",
        "read 0",
        "read 0\t5",
        "read 0 '5'",
        "read 0 1e3",
        "read 0 -1",
        "read -x -y 0 1",
        "read --x 0 1",
        "r -x 0 1",
        "read 0 512 512",
        "read -s 0 0 1024",
        "read 0 2147483137",
        "read 9223372036854775808 1",
        "read -- -1 1",
        "read -P 0x1ff 0 1",
        "read -P 0xcd -s 1000 -l 100 0 1024",
        "read -b 1 512",
        "read -P 0 -s -- 0 1",
        "write 0 2G",
        "write -z -P 1 0 512",
        "write -u 0 512",
        "write -n 0 512",
        "write -z -b 0 1",
        "write -c 1 512",
        "w -P 1 -s f -n 0 1",
        "readv 0 3G",
        "readv 0 1G 1G",
        "writev -z 0 1",
        "aio_write -z 0 1 1",
        "aio_write -u 0 1",
        "aio_write -n 0 1",
        "aio_flush x",
        "discard 0 1 2",
        "discard -v 0 1",
        "alloc",
        "alloc 0 1 2",
        "alloc -- 1",
        "alloc 8E",
        "length x",
        "sleep",
        "sleep x",
        "sleep 1k",
        "sleep -1",
        "truncate",
        "truncate -x",
        "truncate -m",
        "truncate -m bogus 3M",
        "truncate -m full",
        "truncate x -m full",
        "truncate -- 8E",
        "reopen x",
        "reopen -r -w",
        "reopen -c bogus",
        "open",
        "help read x",
        "break a",
        "sigraise x",
        "zrp",
    ];
    for cmd in cases {
        let (out, err, ok) = qemu_io(&img, &[cmd]);
        assert!(!ok, "{cmd}: qemu-io accepted it");
        let e = parse_command(cmd, true).expect_err(cmd);
        assert_lines_eq(&format!("stdout of {cmd:?}"), &e.stdout_text(), &out);
        assert_lines_eq(&format!("stderr of {cmd:?}"), &e.stderr_text(), &err);
    }
}

#[test]
fn help_texts_match() {
    if !available() {
        return;
    }
    let dir = TempDir::new("help_texts_match");
    let img = make_image(&dir.0);
    let mut topics: Vec<Option<&str>> = vec![None, Some("bogus")];
    for c in help::COMMANDS {
        topics.push(Some(c.name));
        topics.extend(c.aliases.iter().map(|a| Some(*a)));
    }
    for topic in topics {
        let cmd = match topic {
            None => "help".to_string(),
            Some(t) => format!("help {t}"),
        };
        let (out, err, ok) = qemu_io(&img, &[&cmd]);
        assert_eq!(err, "", "{cmd}");
        let ours = help::help(topic);
        assert_eq!(ours.is_ok(), ok, "{cmd}");
        let ours = ours.unwrap_or_else(|e| e);
        assert_lines_eq(&cmd, &ours, &out);
    }
}

#[test]
fn numbers_match() {
    if !available() {
        return;
    }
    let dir = TempDir::new("numbers_match");
    let img = make_image(&dir.0);
    // Zero-length reads at offsets inside the 1 MiB image echo the parsed
    // offset exactly; larger values give EIO (accepted) or a parse error.
    let samples = [
        "0",
        "512",
        "010",
        "08",
        "+5",
        "0x200",
        "0X1B",
        "0x10b",
        "1k",
        "1K",
        "512b",
        "5B",
        "1.5k",
        ".5k",
        "0.5k",
        "1.2345k",
        "1.7k",
        "0.001k",
        "1.00048828125k",
        "1.",
        "1.0",
        "1.0b",
        ".0",
        "1m",
        "1e3",
        "1.5",
        "0.5b",
        "1kk",
        "1KiB",
        "0x10k",
        "0x",
        "abc",
        "-0",
        "-1k",
        "-.5",
        "8E",
        "9223372036854775808",
        "99999999999999999999",
        "99999999999999999999k",
        "7.99999999999999999999e",
        "1e",
        "0x7fffffffffffffff",
    ];
    for n in samples {
        let cmd = format!("read -- {n} 0");
        let (out, _err, _ok) = qemu_io(&img, &[&cmd]);
        let first = out.lines().next().unwrap_or("");
        match parse_size(n) {
            Ok(v) if v <= 1 << 20 => {
                assert_eq!(first, format!("read 0/0 bytes at offset {v}"), "{n}")
            }
            Ok(_) => assert_eq!(first, "read failed: Input/output error", "{n}"),
            Err(e) => assert_eq!(first, e.message(n), "{n}"),
        }
    }
}

#[test]
fn io_output_formatting_matches() {
    if !available() {
        return;
    }
    let dir = TempDir::new("io_output_formatting_matches");
    let img = make_image(&dir.0);
    let src: Vec<u8> = (0..=255).collect();
    let src_path = dir.0.join("src.bin");
    std::fs::write(&src_path, &src).unwrap();
    let write_src = format!("write -s {} 4096 256", src_path.display());
    let (out, err, ok) = qemu_io(
        &img,
        &[
            &write_src,
            "read -v 4096 256",
            "read -v 4099 21",
            "write -P 0xab 8192 512",
            "read -P 0xab 8192 1024",
            "read -q -P 0x10 -s 16 -l 16 4096 256",
            "readv -v 4096 8 8",
            "discard 65536 64k",
            "length",
            "info",
            "map",
            "alloc 65535 2",
        ],
    );
    assert_eq!(err, "");
    assert!(!ok, "the pattern mismatches make qemu-io fail");
    let st = |verb, n, off| Stats {
        verb,
        done: n,
        requested: n,
        offset: off,
        ops: 1,
        elapsed: Duration::from_millis(1),
    };
    let mut ours = String::new();
    ours += &st(Verb::Wrote, 256, 4096).summary();
    ours += &format::hexdump(4096, &src);
    ours += &st(Verb::Read, 256, 4096).summary();
    ours += &format::hexdump(4099, &src[3..24]);
    ours += &st(Verb::Read, 21, 4099).summary();
    ours += &st(Verb::Wrote, 512, 8192).summary();
    let mut buf = vec![0xab; 512];
    buf.extend([0; 512]);
    ours += &format::verify_pattern(8192, &buf, 0xab, 0, 1024).unwrap();
    ours += &st(Verb::Read, 1024, 8192).summary();
    ours += &format::verify_pattern(4096, &src, 0x10, 16, 16).unwrap();
    ours += &format::hexdump(4096, &src[..16]);
    ours += &st(Verb::Read, 16, 4096).summary();
    ours += &st(Verb::Discard, 65536, 65536).summary();
    ours += &format::length_line(1 << 20);
    ours += &format::info_lines("raw", 0, 0);
    ours += &format::map_line(0, 1 << 20, true);
    ours += &format::alloc_line(65535, 2, 2);
    assert_lines_eq("I/O outputs", &untimed_text(&ours), &untimed_text(&out));

    // -C: same field layout.
    let (out, _, ok) = qemu_io(&img, &["read -C 0 512"]);
    assert!(ok);
    let theirs: Vec<&str> = out.trim_end().split(',').collect();
    let csv = st(Verb::Read, 512, 0).csv();
    let mine: Vec<&str> = csv.trim_end().split(',').collect();
    assert_eq!(theirs.len(), 5);
    assert_eq!(theirs[..2], mine[..2]);
    assert!(theirs[2].starts_with("0:00:0"), "{out}");
}
