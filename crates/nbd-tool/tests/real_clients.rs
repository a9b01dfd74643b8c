//! blockd-nbd with real clients: qemu-img (info, convert, compare, bench), qemu-io, nbdinfo
//! (--list, --map, --map=qemu:allocation-depth), nbdcopy both ways with multi-conn; bytes
//! compared with cmp. Plus qemu-nbd's command line: -L, --fork/--pid-file, socket activation,
//! exit after the last client, -r, -x/-D, -A.

use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
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

static N: AtomicU64 = AtomicU64::new(0);

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "blockd-nbd-tool-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run(cmd: &mut Command) -> Output {
    let o = cmd.output().unwrap();
    if !o.status.success() {
        panic!(
            "{cmd:?} failed: {}\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    o
}

fn sh(cmd: &str) -> Output {
    run(Command::new("sh").arg("-c").arg(cmd))
}

/// A raw image with data at 1 MiB (0xab) and 9 MiB (0xcd), holes elsewhere.
fn image(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    run(Command::new("qemu-img")
        .args(["create", "-f", "raw"])
        .arg(&p)
        .arg("32M"));
    run(Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 0xab 1M 1M",
            "-c",
            "write -P 0xcd 9M 512k",
        ])
        .arg(&p));
    p
}

struct Server {
    child: Child,
    sock: PathBuf,
}

impl Server {
    fn start(dir: &Path, args: &[&str], file: &Path) -> Server {
        let sock = dir.join("s.sock");
        let _ = std::fs::remove_file(&sock);
        let child = Command::new(BIN)
            .arg("-k")
            .arg(&sock)
            .args(args)
            .arg(file)
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let t = Instant::now();
        while !sock.exists() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "blockd-nbd did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Server { child, sock }
    }

    fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.sock.display())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tools() -> bool {
    ["qemu-img", "qemu-io"].iter().all(|t| have(t))
}

#[test]
fn qemu_img_and_qemu_io() {
    if !tools() {
        return;
    }
    let d = scratch("qemu");
    let img = image(&d, "a.raw");
    let s = Server::start(&d, &["-f", "raw", "-t", "-e", "8"], &img);
    let uri = s.uri("");
    let info = run(Command::new("qemu-img").args(["info", &uri]));
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(
        info.contains("virtual size: 32 MiB (33554432 bytes)"),
        "{info}"
    );
    // Reads and writes with patterns.
    let o = run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "read -P 0xab 1M 1M",
        "-c",
        "read -P 0 0 64k",
        "-c",
        "write -P 0x11 20M 64k",
        "-c",
        "read -P 0x11 20M 64k",
        "-c",
        "write -z 1M 4k",
        "-c",
        "read -P 0 1M 4k",
        "-c",
        "aio_write -P 0x22 21M 4k",
        "-c",
        "aio_write -P 0x23 22M 4k",
        "-c",
        "aio_flush",
        "-c",
        "read -P 0x23 22M 4k",
        &uri,
    ]));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(!out.contains("fail"), "{out}");
    // convert out, compare, cmp.
    let copy = d.join("copy.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &uri])
        .arg(&copy));
    run(Command::new("cmp").arg(&img).arg(&copy));
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&copy)
        .arg(&uri));
    // convert in (a different image over the export), then cmp the file itself.
    let other = d.join("other.raw");
    run(Command::new("qemu-img")
        .args(["create", "-f", "raw"])
        .arg(&other)
        .arg("32M"));
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x77 3M 5M"])
        .arg(&other));
    run(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&other)
        .arg(&uri));
    run(Command::new("cmp").arg(&img).arg(&other));
    // bench, depth 1 and 32, reads and writes.
    for args in [
        vec!["-c", "2000", "-d", "1"],
        vec!["-c", "5000", "-d", "32"],
        vec!["-w", "-c", "2000", "-d", "32"],
    ] {
        let o = run(Command::new("qemu-img")
            .arg("bench")
            .args(["-f", "raw"])
            .args(&args)
            .arg(&uri));
        assert!(String::from_utf8_lossy(&o.stdout).contains("Run completed"));
    }
}

#[test]
fn libnbd_tools() {
    if !tools() || !have("nbdinfo") || !have("nbdcopy") {
        return;
    }
    let d = scratch("libnbd");
    let img = image(&d, "a.raw");
    let s = Server::start(
        &d,
        &[
            "-f", "raw", "-t", "-e", "8", "-A", "-x", "disk", "-D", "the disk",
        ],
        &img,
    );
    let uri = s.uri("disk");
    let list = sh(&format!("nbdinfo --list '{uri}'"));
    let list = String::from_utf8_lossy(&list.stdout);
    assert!(list.contains("export=\"disk\""), "{list}");
    assert!(list.contains("description: the disk"), "{list}");
    assert!(list.contains("qemu:allocation-depth"), "{list}");
    let map = sh(&format!("nbdinfo --map '{uri}'"));
    let map = String::from_utf8_lossy(&map.stdout);
    let lines: Vec<Vec<&str>> = map
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l[0] == "1048576" && l[1] == "1048576" && l[2] == "0"),
        "{map}"
    );
    assert!(lines.iter().any(|l| l.contains(&"hole,zero")), "{map}");
    let depth = sh(&format!("nbdinfo --map=qemu:allocation-depth '{uri}'"));
    let depth = String::from_utf8_lossy(&depth.stdout);
    assert!(depth.contains("local"), "{depth}");
    // nbdcopy out with 4 connections, and back in, byte for byte.
    let out = d.join("out.raw");
    sh(&format!("nbdcopy -C 4 '{uri}' {}", out.display()));
    run(Command::new("cmp").arg(&img).arg(&out));
    let src = d.join("src.raw");
    run(Command::new("qemu-img")
        .args(["create", "-f", "raw"])
        .arg(&src)
        .arg("32M"));
    run(Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 0x5e 7M 9M",
            "-c",
            "write -P 0x5f 30M 1M",
        ])
        .arg(&src));
    sh(&format!("nbdcopy -C 4 {} '{uri}'", src.display()));
    run(Command::new("cmp").arg(&img).arg(&src));
    // blockd-nbd -L against itself.
    let l = run(Command::new(BIN).arg("-L").arg("-k").arg(&s.sock));
    let l = String::from_utf8_lossy(&l.stdout);
    assert!(l.contains("exports available: 1"), "{l}");
    assert!(l.contains(" export: 'disk'"), "{l}");
    assert!(l.contains("  size:  33554432"), "{l}");
    assert!(l.contains("base:allocation"), "{l}");
}

#[test]
fn list_against_qemu_nbd() {
    if !have("qemu-nbd") || !tools() {
        return;
    }
    let d = scratch("list");
    let img = image(&d, "a.raw");
    let sock = d.join("q.sock");
    let mut q = Command::new("qemu-nbd")
        .args(["-f", "raw", "-t", "-x", "qq", "-D", "hello", "-k"])
        .arg(&sock)
        .arg(&img)
        .spawn()
        .unwrap();
    while !sock.exists() {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(100));
    let ours = run(Command::new(BIN).arg("-L").arg("-k").arg(&sock));
    let theirs = run(Command::new("qemu-nbd").arg("-L").arg("-k").arg(&sock));
    let _ = q.kill();
    let _ = q.wait();
    let ours = String::from_utf8_lossy(&ours.stdout).to_string();
    let theirs = String::from_utf8_lossy(&theirs.stdout).to_string();
    // The lines both print agree (qemu-nbd prints a few more facts).
    for line in ours.lines() {
        if line.contains("opt block") {
            continue;
        }
        assert!(
            theirs.contains(line),
            "line {line:?} not in qemu-nbd's\n{theirs}\nours:\n{ours}"
        );
    }
}

#[test]
fn lifecycle_options() {
    if !tools() {
        return;
    }
    let d = scratch("life");
    let img = image(&d, "a.raw");
    // Without -t: exits once the only client has gone.
    let mut s = Server::start(&d, &["-f", "raw"], &img);
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "read -P 0xab 1M 4k", &s.uri("")]));
    let t = Instant::now();
    loop {
        if let Some(st) = s.child.try_wait().unwrap() {
            assert!(st.success());
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "did not exit after the last client"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // -r: writes are refused.
    let s = Server::start(&d, &["-f", "raw", "-r", "-t"], &img);
    let o = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write 0 4k", &s.uri("")])
        .output()
        .unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        all.contains("Permission denied") || all.contains("read-only"),
        "{all}"
    );
    drop(s);
    // --fork and --pid-file: the parent returns once the server listens.
    let sock = d.join("f.sock");
    let pid_file = d.join("pid");
    let o = run(Command::new(BIN)
        .args(["-f", "raw", "-t", "--fork", "--pid-file"])
        .arg(&pid_file)
        .arg("-k")
        .arg(&sock)
        .arg(&img));
    assert!(o.status.success());
    assert!(sock.exists());
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "read -P 0xab 1M 4k",
        &format!("nbd+unix:///?socket={}", sock.display()),
    ]));
    // SAFETY: signalling the daemon we started.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let t = Instant::now();
    while pid_file.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "forked server did not stop"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Errors: no file, bitmaps, bad options.
    let o = Command::new(BIN).output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("Not enough arguments"));
    let o = Command::new(BIN)
        .args(["-B", "b0"])
        .arg(&img)
        .output()
        .unwrap();
    // (the image has no bitmap b0: refused as qemu-nbd refuses it; tests/bitmaps.rs covers -B)
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("Bitmap 'b0' is not found"));
    let o = Command::new(BIN).args(["--bogus"]).output().unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("unrecognized option"));
    let o = Command::new(BIN)
        .args(["-f", "raw", "-k"])
        .arg(d.join("x.sock"))
        .arg(d.join("missing.raw"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("Could not open"),
        "{o:?}"
    );
}

#[test]
fn socket_activation() {
    if !tools() {
        return;
    }
    let d = scratch("sd");
    let img = image(&d, "a.raw");
    let sock = d.join("act.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let lfd = listener.as_raw_fd();
    // LISTEN_PID must be the server's pid: a shell sets it to its own and execs the server.
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("LISTEN_PID=$$ exec \"$0\" \"$@\"")
        .arg(BIN)
        .args(["-f", "raw", "-t"])
        .arg(&img)
        .env("LISTEN_FDS", "1");
    // SAFETY: only dup2/fcntl (async-signal-safe) run between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if lfd == 3 {
                // dup2 onto itself keeps close-on-exec: clear it instead.
                libc::fcntl(3, libc::F_SETFD, 0);
            } else if libc::dup2(lfd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    drop(listener);
    let o = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "read -P 0xab 1M 4k",
            &format!("nbd+unix:///?socket={}", sock.display()),
        ])
        .output()
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(o.status.success(), "{o:?}");
}

/// A qcow2 backing chain exported with -A: nbdinfo's maps (base:allocation and
/// qemu:allocation-depth) and nbdcopy's bytes are the same as through qemu-nbd.
#[test]
fn qcow2_chain_matches_qemu_nbd() {
    if !tools() || !have("qemu-nbd") || !have("nbdinfo") || !have("nbdcopy") {
        return;
    }
    let d = scratch("chain");
    let base = d.join("base.qcow2");
    let top = d.join("top.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&base)
        .arg("16M"));
    run(Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 1 0 2M",
            "-c",
            "write -P 2 8M 1M",
        ])
        .arg(&base));
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(&base)
        .arg(&top));
    run(Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 3 1M 2M",
            "-c",
            "write -z 8M 64k",
        ])
        .arg(&top));
    // Holes in the host file under allocated data clusters (as a writer that leaves the rest
    // of fresh clusters unwritten makes), big enough that the file's disk usage falls well
    // below what its refcounts count: both servers then look into the file (QEMU's
    // metadata-preallocation guess) and report the holes as zero (`base:allocation` state 2).
    let m = run(Command::new("qemu-img")
        .args(["map", "--output=json", "-f", "qcow2"])
        .arg(&top));
    let map_json = String::from_utf8_lossy(&m.stdout).into_owned();
    let host = map_json
        .lines()
        .find(|l| l.contains("\"start\": 1048576,") && l.contains("\"depth\": 0"))
        .and_then(|l| l.split("\"offset\": ").nth(1))
        .and_then(|o| o.trim_end_matches([',', '}', ']', ' ']).parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no host offset for 1M in {map_json}"));
    run(Command::new("fallocate")
        .args(["-p", "-o", &(host + 8192).to_string(), "-l", "1572864"])
        .arg(&top));
    let mut results = Vec::new();
    for server in [BIN, "qemu-nbd"] {
        let sock = d.join("c.sock");
        let _ = std::fs::remove_file(&sock);
        let mut child = Command::new(server)
            .args(["-t", "-A", "-r", "-k"])
            .arg(&sock)
            .arg(&top)
            .spawn()
            .unwrap();
        let t = Instant::now();
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            assert!(t.elapsed() < Duration::from_secs(10));
            std::thread::sleep(Duration::from_millis(20));
        }
        let uri = format!("nbd+unix:///?socket={}", sock.display());
        let depth = sh(&format!("nbdinfo --map=qemu:allocation-depth '{uri}'")).stdout;
        let map = sh(&format!("nbdinfo --map '{uri}'")).stdout;
        let out = d.join("out.raw");
        let _ = std::fs::remove_file(&out);
        sh(&format!("nbdcopy '{uri}' {}", out.display()));
        let bytes = std::fs::read(&out).unwrap();
        let _ = child.kill();
        let _ = child.wait();
        results.push((depth, map, bytes));
    }
    assert_eq!(
        String::from_utf8_lossy(&results[0].0),
        String::from_utf8_lossy(&results[1].0)
    );
    assert_eq!(
        String::from_utf8_lossy(&results[0].1),
        String::from_utf8_lossy(&results[1].1)
    );
    assert!(
        String::from_utf8_lossy(&results[0].1)
            .lines()
            .any(|l| l.trim_start().starts_with("1056768 ") && l.ends_with("2  zero")),
        "the punched part of the cluster reads as zero: {}",
        String::from_utf8_lossy(&results[0].1)
    );
    assert!(results[0].2 == results[1].2, "nbdcopy bytes differ");
}
