//! `host_device` on a real block device: a loop device over a temporary file (needs root and
//! losetup; skipped with a message otherwise — it is not one of the interop tools CI requires).

use std::process::Command;

use blockd_aio::{IoBuf, block_on};
use blockd_block::options::parse;
use blockd_block::{BlockBackend, Graph, Perm, ReqFlags};

struct Loop {
    dev: String,
    backing: std::path::PathBuf,
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
        let _ = std::fs::remove_file(&self.backing);
    }
}

fn loop_device() -> Option<Loop> {
    let backing = std::env::temp_dir().join(format!("blockd-loop-{}.img", std::process::id()));
    std::fs::File::create(&backing)
        .ok()?
        .set_len(8 << 20)
        .ok()?;
    let out = Command::new("losetup")
        .args(["-f", "--show"])
        .arg(&backing)
        .output();
    match out {
        Ok(o) if o.status.success() => Some(Loop {
            dev: String::from_utf8_lossy(&o.stdout).trim().to_string(),
            backing,
        }),
        other => {
            eprintln!("SKIP: no loop device available ({other:?}): host_device test not run");
            let _ = std::fs::remove_file(&backing);
            None
        }
    }
}

#[test]
fn host_device_reads_writes_and_reports_the_device_size() {
    let Some(dev) = loop_device() else { return };
    let mut g = Graph::new();
    // A block device must be opened as host_device, like QEMU.
    let e = g
        .open(parse(&format!("driver=file,filename={}", dev.dev)).unwrap())
        .unwrap_err();
    assert!(e.contains("use driver 'host_device'"), "{e}");
    let node = g
        .open(
            parse(&format!(
                "driver=raw,file.driver=host_device,file.filename={},cache.direct=on",
                dev.dev
            ))
            .unwrap(),
        )
        .unwrap();
    assert_eq!(node.length(), 8 << 20);
    assert_eq!(
        node.child("file").unwrap().driver().format_name(),
        "host_device"
    );
    let be = BlockBackend::new(
        &g,
        "",
        &node,
        Perm::CONSISTENT_READ | Perm::WRITE,
        Perm::ALL,
    )
    .unwrap();
    block_on(async {
        let mut b = IoBuf::new(4096, 4096);
        b.fill(0x3c);
        let (r, _) = be.write(1 << 20, b, ReqFlags::FUA).await;
        r.unwrap();
        // Unaligned read through O_DIRECT on the device.
        let (r, b) = be.read((1 << 20) + 100, IoBuf::new(1000, 1)).await;
        r.unwrap();
        assert!(b.iter().all(|&x| x == 0x3c));
        be.flush().await.unwrap();
    })
    .unwrap();
    be.detach(&g);
    drop(node);
    drop(g);
    let data = std::fs::read(&dev.backing).unwrap();
    assert!(data[1 << 20..(1 << 20) + 4096].iter().all(|&x| x == 0x3c));
}
