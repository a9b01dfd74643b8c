//! A qcow2 image from the fuzzer's bytes: header parsing, opening (tables, snapshots),
//! reads and block status over the whole disk, and the consistency check must all end with
//! data or a clean error. Run: `./fuzz/make-seeds.sh` once (seed corpus of small qemu-img
//! images), then `RUSTC_BOOTSTRAP=1 cargo fuzz run image` in crates/qcow2. RSS grows to a few
//! hundred MB under the default AddressSanitizer options: that is ASan's 256 MB quarantine, not
//! a leak (with `ASAN_OPTIONS=quarantine_size_mb=1` it stays flat at ~80 MB over 16,000 runs).
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
