//! Block jobs over QMP, driven by Python's qemu.qmp (`tests/py/test_jobs.py`): stream, commit,
//! mirror, drive-mirror, blockdev-create, the job verbs and events, shutdown, compared step by
//! step with qemu-storage-daemon; the images checked with qemu-img. Env: JOBS_FIRE_ROUNDS
//! (commit under fire rounds per aio mode, default 40; the 200), JOBS_ONLY. Skipped
//! loudly without python3 + qemu.qmp + qemu-img/qemu-io unless
//! BLOCKD_REQUIRE_INTEROP is set.

mod common;

#[test]
fn block_stream_and_job_verbs_like_qemu() {
    common::run_script("test_jobs.py");
}
