//! Snapshots over QMP, each a transaction action and a standalone command.
//!
//! External (`blockdev-snapshot-sync`, `blockdev-snapshot`): an overlay is put on top of a
//! node. Prepare, inside a drained section of the node that lasts until clean: QEMU's checks;
//! for `-sync` the overlay image is created (mode absolute-paths, the default: the old
//! image's file name and format as its backing file, written as QEMU writes them) or an
//! existing one opened, without its backing; the overlay gets the node as its backing child
//! and takes the place of the node in every parent (QEMU's `bdrv_append`). Commit reopens the
//! old node read-only. Abort moves the parents back, detaches the backing and closes an
//! overlay opened here. As in QEMU, an overlay opened by `-sync` that ends up with no user
//! (the node had no parents) is closed again at the end.
//!
//! Internal snapshots are `internal_snapshot.rs`; `blockdev-snapshot-internal-sync` is
//! registered here with the other snapshot actions.

use std::rc::Rc;
use std::sync::Arc;

use blockd_block::{Child, DrainGuard, Node, Perm, drained, drained_all};
use blockd_jobs::{LocalFuture, run_drained};
use blockd_qmp::QmpError;
use blockd_qmp::schema::{ObjectDef, Type, member, optional};
use serde_json::{Map, Value, json};

use crate::state::Daemon;
use crate::transaction::{Action, TxnCtx};

pub(crate) fn s<'a>(a: &'a Map<String, Value>, k: &str) -> Option<&'a str> {
    a.get(k).and_then(Value::as_str)
}

fn obj(members: Vec<blockd_qmp::Member>) -> ObjectDef {
    ObjectDef {
        members,
        ..Default::default()
    }
}

fn snapshot_sync_args() -> ObjectDef {
    obj(vec![
        optional("device", Type::Str),
        optional("node-name", Type::Str),
        member("snapshot-file", Type::Str),
        optional("snapshot-node-name", Type::Str),
        optional("format", Type::Str),
        optional("mode", Type::enumeration(&["existing", "absolute-paths"])),
    ])
}

fn snapshot_args() -> ObjectDef {
    obj(vec![
        member("node", Type::Str),
        member("overlay", Type::Str),
    ])
}

/// The transaction actions of this module and their argument types.
pub fn action_args() -> Vec<(&'static str, ObjectDef)> {
    vec![
        ("blockdev-snapshot", snapshot_args()),
        ("blockdev-snapshot-sync", snapshot_sync_args()),
        (
            "blockdev-snapshot-internal-sync",
            obj(vec![member("device", Type::Str), member("name", Type::Str)]),
        ),
    ]
}

pub fn make_action(kind: &str, data: &Map<String, Value>) -> Option<Box<dyn Action>> {
    Some(match kind {
        "blockdev-snapshot-sync" => Box::new(ExternalSnapshot::new(data.clone(), true)),
        "blockdev-snapshot" => Box::new(ExternalSnapshot::new(data.clone(), false)),
        "blockdev-snapshot-internal-sync" => Box::new(
            crate::internal_snapshot::InternalSnapshot::new(data.clone()),
        ),
        _ => return None,
    })
}

pub fn register(server: &Rc<blockd_qmp::Server>, d: &Rc<Daemon>) {
    let empty = || Type::object(vec![]);
    for (name, def) in action_args() {
        let dd = d.clone();
        server.register(name, def, empty(), move |a| {
            let d = dd.clone();
            Box::pin(async move {
                let action = make_action(name, &a).expect("registered kind");
                crate::transaction::run_one(&d, action).await
            })
        });
    }
    let dd = d.clone();
    server.register(
        "blockdev-snapshot-delete-internal-sync",
        obj(vec![
            member("device", Type::Str),
            optional("id", Type::Str),
            optional("name", Type::Str),
        ]),
        Type::Any,
        move |a| Box::pin(crate::internal_snapshot::delete_internal(dd.clone(), a)),
    );
}

/// QEMU's `bdrv_lookup_bs`: by BlockBackend name (the daemon has none) or node-name.
pub(crate) fn lookup(
    d: &Daemon,
    device: Option<&str>,
    node_name: Option<&str>,
) -> Result<Arc<Node>, QmpError> {
    if let Some(n) = node_name.and_then(|n| d.node(n)) {
        return Ok(n);
    }
    Err(QmpError::generic(format!(
        "Cannot find device='{}' nor node-name='{}'",
        device.unwrap_or_default(),
        node_name.unwrap_or_default()
    )))
}

/// Is `target` `node` or below it?
fn reaches(node: &Arc<Node>, target: &Arc<Node>) -> bool {
    Arc::ptr_eq(node, target) || node.children().iter().any(|c| reaches(&c.node, target))
}

/// QEMU's op blockers that matter here: a node a job works on, a node that is some node's
/// backing file.
fn check_not_blocked(d: &Daemon, node: &Arc<Node>) -> Result<(), QmpError> {
    if let Some(m) = crate::jobs::manager() {
        m.check_not_blocked(std::slice::from_ref(node))?;
    }
    let g = d.graph.borrow();
    for p in g.nodes() {
        if p.child("backing").is_some_and(|b| Arc::ptr_eq(&b, node)) {
            return Err(QmpError::generic(format!(
                "Node '{}' is busy: node is used as backing hd of '{}'",
                node.name(),
                p.name()
            )));
        }
    }
    Ok(())
}

/// The options that reopen `node` as it is now, read-only (for the top node): the recorded
/// options, children opened with it given as nested options, others by reference.
fn current_options(d: &Daemon, node: &Arc<Node>, top: bool) -> Map<String, Value> {
    let mut o = d
        .node_opts
        .borrow()
        .get(node.name())
        .cloned()
        .unwrap_or_default();
    o.insert("driver".into(), node.driver().format_name().into());
    if top {
        o.insert("node-name".into(), node.name().into());
        o.insert("read-only".into(), true.into());
    } else {
        o.remove("node-name");
    }
    for c in node.children().iter() {
        let recorded = d.node_opts.borrow().contains_key(c.node.name());
        let v = if c.node.is_auto_named() && recorded {
            Value::Object(current_options(d, &c.node, false))
        } else {
            Value::String(c.node.name().to_string())
        };
        o.insert(c.name.clone(), v);
    }
    o
}

/// Reopen `node` read-only (QEMU's `bdrv_reopen_set_read_only`), keeping its other options.
pub async fn reopen_read_only(d: &Daemon, node: &Arc<Node>) -> Result<(), String> {
    if node.is_read_only() {
        return Ok(());
    }
    let opts = current_options(d, node, true);
    let plan = d.graph.borrow().reopen_plan(vec![opts.clone()])?;
    let drain = drained_all(&plan.drain_nodes()).await;
    plan.flush().await?;
    d.graph.borrow_mut().reopen_commit(plan, &drain)?;
    drop(drain);
    d.record_options(node, &opts);
    Ok(())
}

/// `blockdev-snapshot-sync` (`sync`) or `blockdev-snapshot`.
struct ExternalSnapshot {
    args: Map<String, Value>,
    sync: bool,
    old: Option<Arc<Node>>,
    new: Option<Arc<Node>>,
    /// The overlay was opened by this action (closed again on abort).
    opened: bool,
    /// The overlay took the old node's place.
    appended: bool,
    drain: Option<DrainGuard>,
}

impl ExternalSnapshot {
    fn new(args: Map<String, Value>, sync: bool) -> ExternalSnapshot {
        ExternalSnapshot {
            args,
            sync,
            old: None,
            new: None,
            opened: false,
            appended: false,
            drain: None,
        }
    }

    async fn do_prepare(&mut self, cx: &TxnCtx) -> Result<(), QmpError> {
        let d = &cx.daemon;
        let a = self.args.clone();
        let old = if self.sync {
            lookup(d, s(&a, "device"), s(&a, "node-name"))?
        } else {
            let n = s(&a, "node");
            lookup(d, n, n)?
        };
        self.old = Some(old.clone());
        // paired with clean
        self.drain = Some(drained(&old).await);
        check_not_blocked(d, &old)?;
        if !old.is_read_only() {
            old.driver()
                .flush(&old)
                .await
                .map_err(|_| QmpError::generic("An IO error has occurred"))?;
        }
        let new = if self.sync {
            self.open_new_overlay(d, &old).await?
        } else {
            let ov = s(&a, "overlay");
            lookup(d, ov, ov)?
        };
        self.new = Some(new.clone());
        // Only users that do not read the overlay yet (a mirror target) may stay.
        if new.cumulative_perm().0.contains(Perm::CONSISTENT_READ) {
            return Err("The overlay is already in use".into());
        }
        if new.driver().is_filter() {
            return Err("Filters cannot be used as overlays".into());
        }
        if new.child("backing").is_some() {
            return Err("The overlay already has a backing image".into());
        }
        if !new.driver().supports_backing() {
            return Err("The overlay does not support backing images".into());
        }
        if reaches(&old, &new) {
            return Err(QmpError::generic(format!(
                "Making '{}' a backing child of '{}' would create a cycle",
                old.name(),
                new.name()
            )));
        }
        self.append(d, &old, &new).await?;
        Ok(())
    }

    /// Create (or find) the overlay image and open it without its backing.
    async fn open_new_overlay(
        &mut self,
        d: &Rc<Daemon>,
        old: &Arc<Node>,
    ) -> Result<Arc<Node>, QmpError> {
        let a = &self.args;
        let file = s(a, "snapshot-file").unwrap_or_default().to_string();
        let format = s(a, "format").unwrap_or("qcow2").to_string();
        let node_name = s(a, "snapshot-node-name").map(str::to_string);
        if s(a, "node-name").is_some() && node_name.is_none() {
            return Err("New overlay node-name missing".into());
        }
        if let Some(n) = &node_name
            && d.node(n).is_some()
        {
            return Err("New overlay node-name already in use".into());
        }
        if s(a, "mode") != Some("existing") {
            let backing = crate::block::filename(d, old);
            let opts = crate::image_files::backing_opts(&backing, old.driver().format_name());
            crate::image_files::create_image(&file, &format, old.length(), &opts).await?;
        }
        let mut o = Map::new();
        o.insert("driver".into(), format.clone().into());
        if let Some(n) = &node_name {
            o.insert("node-name".into(), n.clone().into());
        }
        o.insert("file".into(), json!({"driver": "file", "filename": file}));
        if format != "raw" {
            // QEMU opens the overlay with BDRV_O_NO_BACKING
            o.insert("backing".into(), Value::Null);
        }
        if old.is_read_only() {
            o.insert("read-only".into(), true.into());
        }
        // QEMU opens the overlay with the old node's flags: its cache mode too
        let cache = |k: &'static str| {
            crate::block::flag(d, old, &move |m: &Map<String, Value>| {
                m.get("cache")
                    .and_then(|c| crate::block::bool_opt(c.get(k)))
            })
        };
        o.insert(
            "cache".into(),
            json!({"direct": cache("direct"), "no-flush": cache("no-flush")}),
        );
        let new = d.graph.borrow_mut().open(o.clone())?;
        self.opened = true;
        d.record_options(&new, &o);
        // the overlay's I/O runs where the old node's does
        let ctx = d.node_ctx.borrow().get(old.name()).cloned();
        if let Some(ctx) = ctx {
            for n in Daemon::subtree(&new) {
                if !Arc::ptr_eq(&n, old) {
                    d.node_ctx
                        .borrow_mut()
                        .insert(n.name().to_string(), ctx.clone());
                }
            }
        }
        Ok(new)
    }

    /// QEMU's `bdrv_append`: `old` becomes the overlay's backing and the overlay takes its
    /// place in every parent; both are drained (the old node since prepare).
    async fn append(
        &mut self,
        d: &Daemon,
        old: &Arc<Node>,
        new: &Arc<Node>,
    ) -> Result<(), QmpError> {
        let guard = drained_all(&[old.clone(), new.clone()]).await;
        let r = {
            let mut g = d.graph.borrow_mut();
            run_drained(g.add_child(
                new,
                Child {
                    name: "backing".into(),
                    node: old.clone(),
                    perm: Perm::CONSISTENT_READ,
                    shared: Perm::ALL,
                },
            ))
            .unwrap_or_else(|| Err("the nodes are not drained".into()))
        };
        if let Err(e) = r {
            drop(guard);
            return Err(e.into());
        }
        let r = {
            let mut g = d.graph.borrow_mut();
            run_drained(g.replace_node(old, new))
                .unwrap_or_else(|| Err("the nodes are not drained".into()))
        };
        if let Err(e) = r {
            let mut g = d.graph.borrow_mut();
            let _ = run_drained(g.remove_child(new, "backing"));
            drop(g);
            drop(guard);
            return Err(e.into());
        }
        self.appended = true;
        drop(guard);
        Ok(())
    }
}

impl Action for ExternalSnapshot {
    fn prepare<'a>(&'a mut self, cx: &'a TxnCtx) -> LocalFuture<'a, Result<(), QmpError>> {
        Box::pin(self.do_prepare(cx))
    }

    fn commit<'a>(&'a mut self, cx: &'a TxnCtx) -> LocalFuture<'a, ()> {
        Box::pin(async move {
            if let Some(old) = self.old.clone() {
                // as QEMU: a failure leaves the old node writable, the snapshot stands
                if let Err(e) = reopen_read_only(&cx.daemon, &old).await {
                    tracing::warn!("snapshot: reopening '{}' read-only: {e}", old.name());
                }
            }
        })
    }

    fn abort<'a>(&'a mut self, cx: &'a TxnCtx) -> LocalFuture<'a, ()> {
        Box::pin(async move {
            let d = &cx.daemon;
            let (Some(old), Some(new)) = (self.old.clone(), self.new.clone()) else {
                return;
            };
            if self.appended {
                let guard = drained_all(&[old.clone(), new.clone()]).await;
                let mut g = d.graph.borrow_mut();
                let r = run_drained(g.replace_node(&new, &old))
                    .unwrap_or_else(|| Err("the nodes are not drained".into()))
                    .and_then(|_| {
                        run_drained(g.remove_child(&new, "backing"))
                            .unwrap_or_else(|| Err("the nodes are not drained".into()))
                    });
                drop(g);
                drop(guard);
                if let Err(e) = r {
                    tracing::error!("snapshot abort: {e}");
                }
                self.appended = false;
            }
            if self.opened {
                let _ = d.graph.borrow_mut().remove(new.name());
                self.opened = false;
                self.new = None;
            }
        })
    }

    fn clean(&mut self, cx: &TxnCtx) {
        self.drain = None;
        // QEMU drops its reference to an overlay it opened: with no user it is closed
        if let Some(new) = self.new.take()
            && self.opened
            && new.parent_count() == 0
        {
            let _ = cx.daemon.graph.borrow_mut().remove(new.name());
        }
    }
}
