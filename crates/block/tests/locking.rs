//! Image locking: blockd takes QEMU's OFD byte locks, so blockd and QEMU's tools refuse each
//! other's conflicting opens (and two blockd users in one process do too).

use std::process::Command;

use blockd_block::Graph;
use blockd_block::options::parse;

fn temp_image(tag: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("blockd-lock-{tag}-{}.img", std::process::id()));
    std::fs::File::create(&p).unwrap().set_len(1 << 20).unwrap();
    p
}

fn raw(path: &std::path::Path, extra: &str) -> serde_json::Map<String, serde_json::Value> {
    parse(&format!(
        "driver=raw,{extra}file.driver=file,file.filename={}",
        path.display()
    ))
    .unwrap()
}

fn have(tool: &str) -> bool {
    let found = Command::new(tool).arg("--version").output().is_ok();
    if !found {
        if std::env::var_os("BLOCKD_REQUIRE_INTEROP").is_some() {
            panic!("{tool} not found and BLOCKD_REQUIRE_INTEROP is set");
        }
        eprintln!("SKIP: {tool} not found: interop locking test not run");
    }
    found
}

#[test]
fn two_writers_in_one_process_conflict() {
    let path = temp_image("local");
    let mut a = Graph::new();
    let _first = a.open(raw(&path, "")).unwrap();
    let mut b = Graph::new();
    let e = b.open(raw(&path, "")).unwrap_err();
    assert_eq!(
        e,
        format!(
            "Failed to get \"write\" lock\nIs another process using the image [{}]?",
            path.display()
        )
    );
    // Read-only with force-share may look.
    b.open(raw(&path, "read-only=on,force-share=on,")).unwrap();
    // locking=off opts out.
    let mut c = Graph::new();
    c.open(
        parse(&format!(
            "driver=raw,file.driver=file,file.locking=off,file.filename={}",
            path.display()
        ))
        .unwrap(),
    )
    .unwrap();
    drop(a);
    let _ = std::fs::remove_file(path);
}

#[test]
fn qemu_io_refuses_an_image_blockd_writes() {
    if !have("qemu-io") {
        return;
    }
    let path = temp_image("qemu");
    let mut g = Graph::new();
    let node = g.open(raw(&path, "")).unwrap();
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "length"])
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("Failed to get \"write\" lock"), "{err}");
    // With -U (force-share, read-only) qemu-io may read it.
    let out = Command::new("qemu-io")
        .args(["-r", "-U", "-f", "raw", "-c", "length"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(node);
    drop(g);
    // Once blockd closed the image, qemu-io opens it.
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "length"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_file(path);
}

#[test]
fn blockd_refuses_an_image_qemu_io_writes() {
    if !have("qemu-io") {
        return;
    }
    let path = temp_image("held");
    let mut child = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "sleep 3000"])
        .arg(&path)
        .spawn()
        .unwrap();
    // Wait until qemu-io holds its write lock (byte 101).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut g = Graph::new();
    let mut refused = None;
    while std::time::Instant::now() < deadline {
        match g.open(raw(&path, "")) {
            Err(e) => {
                refused = Some(e);
                break;
            }
            Ok(n) => {
                let name = n.name().to_string();
                drop(n);
                let _ = g.remove(&name);
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let e = refused.expect("blockd opened an image qemu-io was writing");
    assert!(e.starts_with("Failed to get shared \"write\" lock"), "{e}");
    let _ = std::fs::remove_file(path);
}
