//! Internal snapshots over QMP (`blockdev-snapshot-internal-sync` as a command and a
//! transaction action, `blockdev-snapshot-delete-internal-sync`), through the format
//! driver's snapshot interface (qcow2 on open images). Each runs inside a drained section of
//! the node; an aborted transaction deletes the snapshot its action created.

use std::rc::Rc;
use std::sync::Arc;

use blockd_block::{DrainGuard, Node, drained};
use blockd_jobs::LocalFuture;
use blockd_qmp::QmpError;
use serde_json::{Map, Value, json};

use crate::snapshot::{lookup, s};
use crate::state::Daemon;
use crate::transaction::{Action, TxnCtx};

/// `blockdev-snapshot-internal-sync`.
pub struct InternalSnapshot {
    args: Map<String, Value>,
    node: Option<Arc<Node>>,
    /// (id, name) of the snapshot made here (deleted on abort).
    created: Option<(String, String)>,
    drain: Option<DrainGuard>,
}

impl InternalSnapshot {
    pub fn new(args: Map<String, Value>) -> InternalSnapshot {
        InternalSnapshot {
            args,
            node: None,
            created: None,
            drain: None,
        }
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// QEMU's `bdrv_can_snapshot`: the format keeps internal snapshots (qcow2 in blockd).
fn can_snapshot(node: &Node) -> bool {
    node.driver().format_name() == "qcow2"
}

/// QEMU's `qmp_get_root_bs`: the node, which only BlockBackends may use.
fn root_node(d: &Daemon, name: &str) -> Result<Arc<Node>, QmpError> {
    let n = lookup(d, Some(name), Some(name))?;
    if !d.node_parents(&n).is_empty() {
        return Err("Need a root block node".into());
    }
    Ok(n)
}

impl Action for InternalSnapshot {
    fn prepare<'a>(&'a mut self, cx: &'a TxnCtx) -> LocalFuture<'a, Result<(), QmpError>> {
        Box::pin(async move {
            let d = &cx.daemon;
            let device = s(&self.args, "device").unwrap_or_default().to_string();
            let name = s(&self.args, "name").unwrap_or_default().to_string();
            let node = root_node(d, &device)?;
            self.node = Some(node.clone());
            self.drain = Some(drained(&node).await);
            if let Some(m) = crate::jobs::manager() {
                m.check_not_blocked(std::slice::from_ref(&node))?;
            }
            if node.is_read_only() {
                return Err(QmpError::generic(format!("Device '{device}' is read only")));
            }
            let drv = node.driver();
            if !can_snapshot(&node) {
                return Err(QmpError::generic(format!(
                    "Block format '{}' used by device '{device}' does not support internal snapshots",
                    drv.format_name()
                )));
            }
            if name.is_empty() {
                return Err("Name is empty".into());
            }
            if drv.snapshots().iter().any(|sn| sn.name == name) {
                return Err(QmpError::generic(format!(
                    "Snapshot with name '{name}' already exists on device '{device}'"
                )));
            }
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            // QEMU keeps snapshot names in a 256-byte buffer: longer ones are cut
            let stored = truncate(&name, 255).to_string();
            let info = blockd_block::driver::SnapshotInfo {
                id: String::new(),
                name: stored.clone(),
                date_sec: now.as_secs(),
                // microseconds, as QEMU's clocks give them
                date_nsec: now.subsec_micros() * 1000,
                // the storage daemon's virtual clock is the host clock
                vm_clock_nsec: now.as_micros() as u64 * 1000,
                vm_state_size: 0,
                icount: None,
            };
            drv.snapshot_create(&node, info).await.map_err(|e| {
                QmpError::generic(format!(
                    "Failed to create snapshot '{name}' on device '{device}': {}",
                    blockd_block::strerror(&e)
                ))
            })?;
            // the id the driver gave it
            let id = drv
                .snapshots()
                .iter()
                .rev()
                .find(|sn| sn.name == stored)
                .map(|sn| sn.id.clone())
                .unwrap_or_default();
            self.created = Some((id, stored));
            Ok(())
        })
    }

    fn abort<'a>(&'a mut self, _cx: &'a TxnCtx) -> LocalFuture<'a, ()> {
        Box::pin(async move {
            if let (Some(node), Some((id, name))) = (self.node.clone(), self.created.take())
                && let Err(e) = node
                    .driver()
                    .snapshot_delete(&node, Some(&id), Some(&name))
                    .await
            {
                tracing::error!("internal snapshot abort: {}", blockd_block::strerror(&e));
            }
        })
    }

    fn clean(&mut self, _cx: &TxnCtx) {
        self.drain = None;
    }
}

/// `blockdev-snapshot-delete-internal-sync`: returns the deleted snapshot's SnapshotInfo.
pub async fn delete_internal(d: Rc<Daemon>, a: Map<String, Value>) -> Result<Value, QmpError> {
    let device = s(&a, "device").unwrap_or_default().to_string();
    let (id, name) = (s(&a, "id"), s(&a, "name"));
    let node = root_node(&d, &device)?;
    if id.is_none() && name.is_none() {
        return Err("Name or id must be provided".into());
    }
    let _drain = drained(&node).await;
    if let Some(m) = crate::jobs::manager() {
        m.check_not_blocked(std::slice::from_ref(&node))?;
    }
    let drv = node.driver();
    if !can_snapshot(&node) {
        return Err("Failed to get a snapshot list: Operation not supported".into());
    }
    let snaps = drv.snapshots();
    let found = snaps
        .iter()
        .find(|sn| id.is_none_or(|i| sn.id == i) && name.is_none_or(|n| sn.name == n))
        .cloned()
        .ok_or_else(|| {
            QmpError::generic(format!(
                "Snapshot with id '{}' and name '{}' does not exist on device '{device}'",
                id.unwrap_or("null"),
                name.unwrap_or("null")
            ))
        })?;
    drv.snapshot_delete(&node, Some(&found.id), Some(&found.name))
        .await
        .map_err(|e| {
            QmpError::generic(format!(
                "Failed to delete snapshot: {}",
                blockd_block::strerror(&e)
            ))
        })?;
    let mut v = json!({
        "id": found.id,
        "name": found.name,
        "vm-state-size": found.vm_state_size,
        "date-sec": found.date_sec,
        "date-nsec": found.date_nsec,
        "vm-clock-sec": found.vm_clock_nsec / 1_000_000_000,
        "vm-clock-nsec": found.vm_clock_nsec % 1_000_000_000,
    });
    if let Some(i) = found.icount {
        v["icount"] = json!(i);
    }
    Ok(v)
}
