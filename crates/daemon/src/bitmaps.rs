//! Dirty bitmap commands: `block-dirty-bitmap-add|remove|clear|enable|disable|merge`,
//! `x-debug-block-dirty-bitmap-sha256`, and the `dirty-bitmaps` member of
//! `query-named-block-nodes`, with QEMU's checks, messages and order of checks.
//!
//! Each of the six actions is split as in QEMU's transaction actions, so `transaction` can use
//! them: [`prepare`] checks everything and makes the change (a remove only marks the bitmap
//! busy), returning a [`BitmapUndo`]; [`BitmapUndo::commit`] makes it final (the remove
//! happens here) and [`BitmapUndo::abort`] undoes it. A standalone command is prepare +
//! commit. Everything runs on the main context; nothing here awaits.

use std::rc::Rc;
use std::sync::Arc;

use blockd_block::dirty_bitmap::{CheckFlags, default_granularity};
use blockd_block::{DirtyBitmap, Node};
use blockd_qmp::schema::{ObjectDef, Type, member, optional};
use blockd_qmp::{QmpError, Server};
use serde_json::{Map, Value, json};

use crate::state::Daemon;

/// The six bitmap actions (command names, also the transaction action kinds).
pub const ACTIONS: &[&str] = &[
    "block-dirty-bitmap-add",
    "block-dirty-bitmap-remove",
    "block-dirty-bitmap-clear",
    "block-dirty-bitmap-enable",
    "block-dirty-bitmap-disable",
    "block-dirty-bitmap-merge",
];

/// What a prepared action did, to be committed or undone.
pub enum BitmapUndo {
    /// A new bitmap (abort removes it).
    Added {
        node: Arc<Node>,
        bitmap: Arc<DirtyBitmap>,
    },
    /// A bitmap to remove at commit; marked busy meanwhile so no other action can use it.
    Removing {
        node: Arc<Node>,
        bitmap: Arc<DirtyBitmap>,
    },
    /// The bits before a clear or merge (abort puts them back).
    Changed {
        bitmap: Arc<DirtyBitmap>,
        node: Arc<Node>,
        backup: Arc<DirtyBitmap>,
    },
    /// Enable or disable: what it was.
    Toggled {
        bitmap: Arc<DirtyBitmap>,
        was_enabled: bool,
    },
}

impl BitmapUndo {
    /// Make the action final.
    pub fn commit(self, d: &Daemon) {
        if let BitmapUndo::Removing { node, bitmap } = self {
            bitmap.set_busy(false);
            node.dirty_bitmaps().remove(&d.graph.borrow(), &bitmap);
        }
    }

    /// Undo the action (for `transaction`).
    pub fn abort(self, d: &Daemon) {
        match self {
            BitmapUndo::Added { node, bitmap } => {
                node.dirty_bitmaps().remove(&d.graph.borrow(), &bitmap);
            }
            BitmapUndo::Removing { bitmap, .. } => bitmap.set_busy(false),
            BitmapUndo::Changed {
                bitmap,
                node,
                backup,
            } => {
                // Under the list's lock: no write is marked halfway through the restore.
                node.dirty_bitmaps().locked(|| bitmap.copy_from(&backup));
            }
            BitmapUndo::Toggled {
                bitmap,
                was_enabled,
            } => bitmap.set_enabled(was_enabled),
        }
    }
}

fn str_arg<'a>(a: &'a Map<String, Value>, k: &str) -> &'a str {
    a.get(k).and_then(Value::as_str).unwrap_or_default()
}

fn bool_arg(a: &Map<String, Value>, k: &str) -> bool {
    a.get(k).and_then(Value::as_bool).unwrap_or(false)
}

/// QEMU's `block_dirty_bitmap_lookup`: the node by node name, then the bitmap.
fn lookup(d: &Daemon, node: &str, name: &str) -> Result<(Arc<Node>, Arc<DirtyBitmap>), QmpError> {
    let n = d
        .node(node)
        .ok_or_else(|| format!("Node '{node}' not found"))?;
    let b = n
        .dirty_bitmaps()
        .find(name)
        .ok_or_else(|| format!("Dirty bitmap '{name}' not found"))?;
    Ok((n, b))
}

fn check(b: &DirtyBitmap, flags: CheckFlags) -> Result<(), QmpError> {
    b.check(flags).map_err(|e| QmpError::generic(e.message))
}

/// Check and do one bitmap action (`kind` is one of [`ACTIONS`], `args` its arguments as the
/// QMP command takes them). Main context only.
pub fn prepare(d: &Daemon, kind: &str, args: &Map<String, Value>) -> Result<BitmapUndo, QmpError> {
    let node = str_arg(args, "node");
    match kind {
        "block-dirty-bitmap-add" => add(d, args),
        "block-dirty-bitmap-remove" => {
            let (n, b) = lookup(d, node, str_arg(args, "name"))?;
            check(&b, CheckFlags::BUSY | CheckFlags::READONLY)?;
            b.set_busy(true);
            Ok(BitmapUndo::Removing { node: n, bitmap: b })
        }
        "block-dirty-bitmap-clear" => {
            let (n, b) = lookup(d, node, str_arg(args, "name"))?;
            check(&b, CheckFlags::DEFAULT)?;
            let backup = n.dirty_bitmaps().locked(|| {
                let backup = b.duplicate(None);
                b.clear();
                backup
            });
            Ok(BitmapUndo::Changed {
                bitmap: b,
                node: n,
                backup,
            })
        }
        "block-dirty-bitmap-enable" | "block-dirty-bitmap-disable" => {
            let (_, b) = lookup(d, node, str_arg(args, "name"))?;
            check(&b, CheckFlags::ALLOW_RO)?;
            let was_enabled = b.is_enabled();
            b.set_enabled(kind == "block-dirty-bitmap-enable");
            Ok(BitmapUndo::Toggled {
                bitmap: b,
                was_enabled,
            })
        }
        "block-dirty-bitmap-merge" => merge(d, args),
        other => Err(format!("'{other}' is not a dirty bitmap action").into()),
    }
}

fn add(d: &Daemon, args: &Map<String, Value>) -> Result<BitmapUndo, QmpError> {
    let node_name = str_arg(args, "node");
    let name = str_arg(args, "name");
    if name.is_empty() {
        return Err("Bitmap name cannot be empty".into());
    }
    let node = d
        .node(node_name)
        .ok_or_else(|| format!("Cannot find device='{node_name}' nor node-name='{node_name}'"))?;
    let granularity = match args.get("granularity") {
        Some(v) => {
            let g = v
                .as_u64()
                .filter(|g| *g <= u32::MAX as u64)
                .ok_or("Parameter 'granularity' expects uint32_t")?;
            if g < 512 || !g.is_power_of_two() {
                return Err("Granularity must be power of 2 and at least 512".into());
            }
            g
        }
        None => default_granularity(node.driver().cluster_size()),
    };
    let persistent = bool_arg(args, "persistent");
    let disabled = bool_arg(args, "disabled");
    if persistent {
        persistent_allowed(&node, name, granularity)?;
    }
    if node.dirty_bitmaps().find(name).is_some() {
        return Err(format!("Bitmap already exists: {name}").into());
    }
    let b = DirtyBitmap::new(Some(name), granularity, node.length())?;
    b.set_enabled(!disabled);
    b.set_persistent(persistent);
    node.dirty_bitmaps().add(&d.graph.borrow(), b.clone())?;
    Ok(BitmapUndo::Added { node, bitmap: b })
}

/// Can `node` store a new persistent bitmap? Only drivers that keep the node's bitmap list
/// (qcow2) store them; QEMU's refusal otherwise.
fn persistent_allowed(node: &Arc<Node>, name: &str, granularity: u64) -> Result<(), QmpError> {
    if node.driver().dirty_bitmap_list().is_none() {
        return Err(format!(
            "Can't store persistent bitmaps to {}: Operation not supported",
            node.name()
        )
        .into());
    }
    if let Some(q) = blockd_qcow2::backing_name::qcow2_of(node) {
        q.can_store_new_bitmap(name, granularity).map_err(|e| {
            format!(
                "Can't make bitmap '{name}' persistent in '{}': {e}",
                node.name()
            )
        })?;
    }
    Ok(())
}

/// A merge source: a name on the target's node, or `{node, name}`.
fn merge_source(d: &Daemon, target_node: &str, v: &Value) -> Result<Arc<DirtyBitmap>, QmpError> {
    let (node, name) = match v {
        Value::String(s) => (target_node.to_string(), s.clone()),
        Value::Object(m) => (
            str_arg(m, "node").to_string(),
            str_arg(m, "name").to_string(),
        ),
        _ => return Err("Invalid parameter type for 'bitmaps', expected: array".into()),
    };
    let n = d
        .node(&node)
        .ok_or_else(|| format!("Node '{node}' not found"))?;
    n.dirty_bitmaps()
        .find(&name)
        .ok_or_else(|| format!("Dirty bitmap '{name}' not found").into())
}

fn merge(d: &Daemon, args: &Map<String, Value>) -> Result<BitmapUndo, QmpError> {
    let node_name = str_arg(args, "node");
    let target = str_arg(args, "target");
    let (node, dst) = lookup(d, node_name, target)?;
    check(&dst, CheckFlags::DEFAULT)?;
    let list = match args.get("bitmaps") {
        Some(Value::Array(a)) => a.clone(),
        _ => Vec::new(),
    };
    // Every source is found and checked before anything changes; the merge goes into a copy
    // that replaces the target's bits at once.
    let mut sources = Vec::new();
    for v in &list {
        let src = merge_source(d, node_name, v)?;
        check(&src, CheckFlags::ALLOW_RO)?;
        dst.can_merge(&src)?;
        sources.push(src);
    }
    let backup = node.dirty_bitmaps().locked(|| {
        let backup = dst.duplicate(None);
        for s in &sources {
            // lengths checked above
            let _ = dst.merge_from(s);
        }
        backup
    });
    Ok(BitmapUndo::Changed {
        bitmap: dst,
        node,
        backup,
    })
}

/// x-debug-block-dirty-bitmap-sha256.
fn sha256(d: &Daemon, args: &Map<String, Value>) -> Result<Value, QmpError> {
    let node = str_arg(args, "node");
    let name = str_arg(args, "name");
    let n = d
        .node(node)
        .ok_or_else(|| format!("Node '{node}' not found"))?;
    let b = n
        .dirty_bitmaps()
        .find(name)
        .ok_or_else(|| format!("Dirty bitmap '{name}' not found"))?;
    Ok(json!({"sha256": b.sha256_hex()}))
}

/// BlockDirtyInfo of one bitmap.
pub fn dirty_info(b: &DirtyBitmap) -> Value {
    let mut v = json!({
        "name": b.name().unwrap_or_default(),
        "recording": b.is_recording(),
        "persistent": b.is_persistent(),
        "busy": b.is_busy(),
        "granularity": b.granularity(),
        "count": b.count(),
    });
    if b.is_inconsistent() {
        v["inconsistent"] = json!(true);
    }
    v
}

/// The `dirty-bitmaps` member of a node's BlockDeviceInfo (absent without named bitmaps).
pub fn query(node: &Node) -> Option<Value> {
    let named = node.dirty_bitmaps().named();
    if named.is_empty() {
        return None;
    }
    Some(Value::Array(named.iter().map(|b| dirty_info(b)).collect()))
}

/// The argument types of the six actions (also the transaction's action data).
pub fn action_args(kind: &str) -> ObjectDef {
    let name = || vec![member("node", Type::Str), member("name", Type::Str)];
    let mut members = match kind {
        "block-dirty-bitmap-add" => {
            let mut m = name();
            m.push(optional("granularity", Type::Int));
            m.push(optional("persistent", Type::Bool));
            m.push(optional("disabled", Type::Bool));
            m
        }
        "block-dirty-bitmap-merge" => vec![
            member("node", Type::Str),
            member("target", Type::Str),
            member(
                "bitmaps",
                Type::array(Type::Alternate(Rc::new(vec![
                    Type::Str,
                    Type::object(vec![member("node", Type::Str), member("name", Type::Str)]),
                ]))),
            ),
        ],
        _ => name(),
    };
    members.shrink_to_fit();
    ObjectDef {
        members,
        ..Default::default()
    }
}

/// Register the bitmap commands.
pub fn register(server: &Rc<Server>, d: &Rc<Daemon>) {
    for kind in ACTIONS {
        let dd = d.clone();
        server.register(kind, action_args(kind), Type::object(vec![]), move |a| {
            let r = prepare(&dd, kind, &a).map(|u| {
                u.commit(&dd);
                json!({})
            });
            Box::pin(async move { r })
        });
    }
    let dd = d.clone();
    server.register(
        "x-debug-block-dirty-bitmap-sha256",
        ObjectDef {
            members: vec![member("node", Type::Str), member("name", Type::Str)],
            ..Default::default()
        },
        Type::object(vec![member("sha256", Type::Str)]),
        move |a| {
            let r = sha256(&dd, &a);
            Box::pin(async move { r })
        },
    );
}
