//! Transactions, snapshots and backup over QMP, driven by Python's qemu.qmp
//! (`tests/py/test_transaction.py`, `test_snapshot.py`, `test_backup.py`), compared step by step
//! with qemu-storage-daemon; images checked with qemu-img. Env: TXN_ROUNDS (seed scenario
//! rounds, default 20; the 200), TXN_ONLY. Skipped loudly without python3 + qemu.qmp +
//! qemu-img/qemu-io unless BLOCKD_REQUIRE_INTEROP is set.

mod common;

#[test]
fn transaction_rules_and_seed_scenario() {
    common::run_script("test_transaction.py");
}

#[test]
fn backup_and_fleecing_like_qemu() {
    common::run_script("test_backup.py");
}

#[test]
fn snapshots_like_qemu() {
    common::run_script("test_snapshot.py");
}
