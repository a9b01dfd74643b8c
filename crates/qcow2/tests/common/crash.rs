//! The kill-a-writer harness of the crash tests (`crash.rs`, `lazy_refcounts.rs`): a child
//! test process allocates, discards and zeroes forever, printing the last flushed round; the
//! parent kills it with SIGKILL and checks what is durable.

use std::process::{Command, Stdio};
use std::time::Duration;

use blockd_aio::block_on;
use blockd_block::ReqFlags;

use super::{Rng, backend, graph, open_qcow2, run, write};

/// Where round `r` writes its 4 KiB block (filled with [`round_byte`]).
pub fn round_offset(r: u64) -> u64 {
    (r % 4096) * 4096 * 7 % (64 << 20)
}

pub fn round_byte(r: u64) -> u8 {
    (r % 251) as u8 + 1
}

/// The writer, run in the child: allocating writes, discards and zero writes on the 64 MiB
/// image at `path` forever; after each flush it prints `durable N`.
pub fn writer(path: &str) {
    let mut g = graph();
    let node = open_qcow2(&mut g, path, "").unwrap();
    let be = backend(&g, &node);
    block_on(async {
        let mut rng = Rng(std::process::id() as u64);
        for round in 0u64.. {
            write(&be, round_offset(round), &[round_byte(round); 4096]).await;
            let off = rng.below(64 << 20) / 512 * 512;
            match rng.below(4) {
                0 => be.discard(off, 65536).await.unwrap(),
                1 => be
                    .write_zeroes(off, 8192, ReqFlags::MAY_UNMAP)
                    .await
                    .unwrap(),
                _ => write(&be, off, &[0xee; 1536]).await,
            }
            if round % 16 == 15 {
                be.flush().await.unwrap();
                println!("durable {round}");
            }
        }
    })
    .unwrap();
}

/// Run this test binary's `child_test` (which calls [`writer`] when `env` is set) on `path`,
/// SIGKILL it after `ms` milliseconds, and return the last round it reported durable.
pub fn kill_writer_after(child_test: &str, env: &str, path: &str, ms: u64) -> Option<u64> {
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(&exe)
        .args(["--exact", child_test, "--nocapture", "--test-threads=1"])
        .env(env, path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(ms));
    child.kill().unwrap(); // SIGKILL
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("durable "))
        .filter_map(|n| n.parse::<u64>().ok())
        .max()
}

/// `qemu-img ARGS`, retried while the killed writer's io_uring (torn down asynchronously by
/// the kernel) still holds the file and its lock.
pub fn qemu_img_after_kill(args: &[&str]) -> std::process::Output {
    let mut o = run("qemu-img", args);
    for _ in 0..100 {
        if !String::from_utf8_lossy(&o.stderr).contains("Failed to get") {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
        o = run("qemu-img", args);
    }
    o
}

/// The flushed round `r`'s block reads back from the guest view `raw` (a later random write
/// of 0xee or a zeroing may have hit it instead).
pub fn assert_round_survived(raw: &[u8], r: u64, what: &str) {
    let off = round_offset(r) as usize;
    let blk = &raw[off..off + 4096];
    assert!(
        blk.contains(&round_byte(r)) || blk.iter().all(|&b| b == 0xee || b == 0),
        "{what}: flushed round {r} lost"
    );
}
