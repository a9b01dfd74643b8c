//! A qcow2 image from the fuzzer's bytes: header parsing, opening (tables, snapshots),
//! reads and block status over the whole disk, and the consistency check must all end with
//! data or a clean error. Run: `cargo +nightly fuzz run image` in crates/qcow2 (seed it with
//! small images from `qemu-img create`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = blockd_qcow2::header::Header::parse(data, data.len() as u64);
    let path = std::env::temp_dir().join(format!("blockd-qcow2-fuzz-{}.qcow2", std::process::id()));
    if std::fs::write(&path, data).is_err() {
        return;
    }
    blockd_qcow2::exercise_image(&path.display().to_string());
});
