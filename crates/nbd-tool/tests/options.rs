//! blockd-nbd's -s, --image-opts, --detect-zeroes, --object, -c and -l, each run side by side
//! with qemu-nbd: same arguments, same image contents, the same client (qemu-io, qemu-img map),
//! and the same error text for what is refused.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_blockd-nbd");

fn have(tool: &str) -> bool {
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

fn tools() -> bool {
    have("qemu-nbd") && have("qemu-img") && have("qemu-io")
}

static N: AtomicU64 = AtomicU64::new(0);

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "blockd-nbd-opts-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run(cmd: &mut Command) -> Output {
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

struct Server(Child);
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start `prog args... -k sock` with TMPDIR set; wait for the socket.
fn serve(prog: &str, args: &[&str], sock: &Path, tmpdir: &Path) -> Server {
    let _ = std::fs::remove_file(sock);
    let child = Command::new(prog)
        .args(["-t", "-k"])
        .arg(sock)
        .args(args)
        .env("TMPDIR", tmpdir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{prog} never listened"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Server(child)
}

fn uri(sock: &Path) -> String {
    format!("nbd+unix:///?socket={}", sock.display())
}

fn qemu_io(sock: &Path, cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for x in cmds {
        c.args(["-c", x]);
    }
    let o = run(c.arg(uri(sock)));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert!(!out.contains("failed"), "{out}");
    out
}

fn map(img: &Path, fmt: &str) -> String {
    let o = run(Command::new("qemu-img")
        .args(["map", "--output=json", "-f", fmt])
        .arg(img));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn raw_image(dir: &Path, name: &str, pattern: u8) -> PathBuf {
    let p = dir.join(name);
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "raw"])
        .arg(&p)
        .arg("4M"));
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", &format!("write -P {pattern} 0 4M")])
        .arg(&p));
    p
}

/// The error line each program prints, without the program name.
fn error_of(prog: &str, args: &[&str]) -> String {
    let o = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!o.status.success(), "{prog} {args:?} succeeded");
    let err = String::from_utf8_lossy(&o.stderr);
    let line = err
        .lines()
        .find(|l| {
            l.starts_with(&format!(
                "{}: ",
                Path::new(prog).file_name().unwrap().to_str().unwrap()
            ))
        })
        .unwrap_or_else(|| panic!("{prog} {args:?}: no error line in {err}"));
    line.split_once(": ").unwrap().1.to_string()
}

#[test]
fn refusals_match_qemu_nbd() {
    if !tools() {
        return;
    }
    let d = scratch("refuse");
    let img = raw_image(&d, "a.raw", 0x11);
    let img = img.to_str().unwrap();
    let cases: Vec<Vec<&str>> = vec![
        vec!["--detect-zeroes=bogus", "-f", "raw", img],
        vec!["--detect-zeroes=unmap", "-f", "raw", img],
        vec!["--object", "bogus-type,id=x", "-f", "raw", img],
        vec!["-c", "/dev/blockd-no-such-nbd", "-f", "raw", img],
        vec!["--image-opts", "-f", "raw", img],
        vec!["-l", "sn1", "-f", "raw", img],
    ];
    for args in cases {
        assert_eq!(
            error_of(BIN, &args),
            error_of("qemu-nbd", &args),
            "{args:?}"
        );
    }
    // Object types QEMU has but blockd-nbd does not implement: a clear refusal.
    let e = error_of(BIN, &["--object", "secret,id=s0,data=x", "-f", "raw", img]);
    assert!(e.contains("'secret' is not supported"), "{e}");
}

/// -s: writes go to a temporary overlay; the image is untouched, unwritten ranges read from
/// it, and no temporary file stays behind.
#[test]
fn snapshot_mode_like_qemu_nbd() {
    if !tools() {
        return;
    }
    for prog in [BIN, "qemu-nbd"] {
        let d = scratch("snap");
        let img = raw_image(&d, "a.raw", 0x11);
        let before = std::fs::read(&img).unwrap();
        let tmp = d.join("tmp");
        std::fs::create_dir_all(&tmp).unwrap();
        let sock = d.join("s.sock");
        {
            let _s = serve(
                prog,
                &["-s", "-f", "raw", img.to_str().unwrap()],
                &sock,
                &tmp,
            );
            qemu_io(
                &sock,
                &[
                    "write -P 0x22 64k 128k",
                    "read -P 0x22 64k 128k",
                    "read -P 0x11 0 64k",
                    "read -P 0x11 192k 1M",
                ],
            );
        }
        assert!(
            std::fs::read(&img).unwrap() == before,
            "{prog} wrote the image"
        );
        let left: Vec<_> = std::fs::read_dir(&tmp).unwrap().collect();
        assert!(left.is_empty(), "{prog} left {left:?}");
    }
}

/// --image-opts: FILE is an option string.
#[test]
fn image_opts_like_qemu_nbd() {
    if !tools() {
        return;
    }
    for prog in [BIN, "qemu-nbd"] {
        let d = scratch("iopts");
        let img = raw_image(&d, "a.raw", 0x33);
        let sock = d.join("s.sock");
        let spec = format!("driver=raw,offset=1048576,file.filename={}", img.display());
        let _s = serve(prog, &["--image-opts", &spec], &sock, &d);
        qemu_io(&sock, &["read -P 0x33 0 3M", "write -P 0x44 0 4k"]);
        drop(_s);
        let o = run(Command::new("qemu-io").args([
            "-f",
            "raw",
            "-c",
            "read -P 0x44 1M 4k",
            "-c",
            "read -P 0x33 0 1M",
            img.to_str().unwrap(),
        ]));
        assert!(
            !String::from_utf8_lossy(&o.stdout).contains("failed"),
            "{prog}"
        );
    }
}

/// --detect-zeroes: zero writes over data become zero clusters in a qcow2 image (on) and holes
/// in a raw file with --discard=unmap (unmap); off keeps them as data. The resulting maps are
/// compared with qemu-nbd's.
#[test]
fn detect_zeroes_like_qemu_nbd() {
    if !tools() {
        return;
    }
    let cases: &[(&str, &str, &[&str])] = &[
        ("qcow2", "off", &[]),
        ("qcow2", "on", &[]),
        ("qcow2", "unmap", &["--discard=unmap"]),
        ("raw", "unmap", &["--discard=unmap"]),
    ];
    for (fmt, mode, extra) in cases {
        let mut maps = Vec::new();
        for prog in [BIN, "qemu-nbd"] {
            let d = scratch("dz");
            let img = d.join(format!("a.{fmt}"));
            run(Command::new("qemu-img")
                .args(["create", "-q", "-f", fmt])
                .arg(&img)
                .arg("4M"));
            run(Command::new("qemu-io")
                .args(["-f", fmt, "-c", "write -P 0x55 0 4M"])
                .arg(&img));
            let sock = d.join("s.sock");
            let dz = format!("--detect-zeroes={mode}");
            // qemu-nbd checks --detect-zeroes=unmap against the --discard given before it.
            let mut args = extra.to_vec();
            args.extend([dz.as_str(), "-f", fmt, img.to_str().unwrap()]);
            let s = serve(prog, &args, &sock, &d);
            qemu_io(
                &sock,
                &["write -P 0 1M 1M", "read -P 0 1M 1M", "read -P 0x55 0 1M"],
            );
            drop(s);
            maps.push(map(&img, fmt));
        }
        assert_eq!(maps[0], maps[1], "{fmt} detect-zeroes={mode} {extra:?}");
        if *mode != "off" {
            assert!(
                maps[0].contains("\"data\": false"),
                "{fmt} {mode}: {}",
                maps[0]
            );
        }
    }
}
