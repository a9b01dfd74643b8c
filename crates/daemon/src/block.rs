//! Block commands: blockdev-add/-del/-reopen, the queries, block_resize and
//! x-blockdev-set-iothread. Graph changes happen here, on the main context; the graph's own
//! methods drain what they touch, and the moves between iothreads drain the node themselves.

use std::rc::Rc;
use std::sync::Arc;

use blockd_block::{Node, Perm, drained_all};
use blockd_qmp::QmpError;
use serde_json::{Map, Value, json};

use crate::state::{Busy, Daemon};

type R = Result<Value, QmpError>;

fn str_arg<'a>(a: &'a Map<String, Value>, k: &str) -> Option<&'a str> {
    a.get(k).and_then(Value::as_str)
}

pub(crate) fn bool_opt(o: Option<&Value>) -> Option<bool> {
    match o? {
        Value::Bool(b) => Some(*b),
        Value::String(s) => Some(s == "on" || s == "true"),
        _ => None,
    }
}

/// blockdev-add (and --blockdev): open the node and remember its options.
pub fn blockdev_add(d: &Daemon, args: Map<String, Value>) -> Result<(), String> {
    if args.get("node-name").is_none() {
        // QEMU: a top-level node of blockdev-add must be named
        return Err("'node-name' must be specified for the root node".into());
    }
    if let Some(v) = args.get("detect-zeroes")
        && v.as_str() != Some("off")
    {
        return Err("detect-zeroes other than 'off' is not supported by blockd yet".into());
    }
    let node = d.graph.borrow_mut().open(args.clone())?;
    d.record_options(&node, &args);
    d.owned.borrow_mut().insert(node.name().to_string());
    Ok(())
}

pub fn blockdev_del(d: &Daemon, args: Map<String, Value>) -> R {
    let name = str_arg(&args, "node-name").unwrap_or_default().to_string();
    if d.node(&name).is_none() {
        return Err(format!("Failed to find node with node-name='{name}'").into());
    }
    if !d.owned.borrow().contains(&name) {
        return Err(format!("Node {name} is not owned by the monitor").into());
    }
    d.graph.borrow_mut().remove(&name)?;
    d.prune();
    Ok(json!({}))
}

/// blockdev-reopen: every listed node (and the children opened with it) changes at once,
/// through the block layer's prepare/commit/abort, inside a drained section of the nodes
/// touched. No borrow of the graph is held across the drain or the flush.
pub async fn blockdev_reopen(d: &Daemon, args: Map<String, Value>) -> R {
    let list = match args.get("options") {
        Some(Value::Array(a)) => a.clone(),
        _ => return Err("Parameter 'options' is missing".into()),
    };
    let mut maps = Vec::new();
    for (i, item) in list.into_iter().enumerate() {
        let Value::Object(m) = item else {
            return Err(
                format!("Invalid parameter type for 'options[{i}]', expected: object").into(),
            );
        };
        if let Some(v) = m.get("detect-zeroes")
            && v.as_str() != Some("off")
        {
            return Err("detect-zeroes other than 'off' is not supported by blockd yet".into());
        }
        maps.push(m);
    }
    let plan = d.graph.borrow().reopen_plan(maps.clone())?;
    let drain = drained_all(&plan.drain_nodes()).await;
    plan.flush().await?;
    d.graph.borrow_mut().reopen_commit(plan, &drain)?;
    drop(drain);
    // Remember the options now in force (children given by reference keep their own).
    for m in &maps {
        if let Some(n) = str_arg(m, "node-name").and_then(|n| d.node(n)) {
            d.record_options(&n, m);
            // a new child runs its I/O where its parent does (as x-blockdev-set-iothread
            // moves a subtree)
            let ctx = d.node_ctx.borrow().get(n.name()).cloned();
            if let Some(ctx) = ctx {
                for sub in Daemon::subtree(&n) {
                    d.node_ctx
                        .borrow_mut()
                        .insert(sub.name().to_string(), ctx.clone());
                }
            }
        }
    }
    d.prune();
    Ok(json!({}))
}

/// The file name QEMU would show for a node: the protocol's path, the child's for formats
/// and filters, `<driver>://` for nodes without a file, or `json:{...}`.
pub(crate) fn filename(d: &Daemon, node: &Arc<Node>) -> String {
    let opts = d.node_opts.borrow().get(node.name()).cloned();
    let drv = node.driver().format_name();
    if let Some(f) = node.driver().filename() {
        return f;
    }
    if let Some(f) = opts
        .as_ref()
        .and_then(|o| o.get("filename"))
        .and_then(Value::as_str)
    {
        return f.to_string();
    }
    if let Some(child) = node.child("file") {
        return filename(d, &child);
    }
    if drv.starts_with("null") {
        return format!("{drv}://");
    }
    match opts {
        Some(o) => format!("json:{}", blockd_qmp::writer::to_string(&Value::Object(o))),
        None => format!("{drv}://"),
    }
}

fn backing_depth(node: &Arc<Node>) -> u64 {
    let mut depth = 0;
    let mut cur = node.clone();
    while let Some(b) = cur.child("backing") {
        depth += 1;
        cur = b;
    }
    depth
}

/// The options in force for `node`, with what it inherited from the parents it was opened with.
pub(crate) fn flag(
    d: &Daemon,
    node: &Arc<Node>,
    get: &dyn Fn(&Map<String, Value>) -> Option<bool>,
) -> bool {
    if let Some(v) = d.node_opts.borrow().get(node.name()).and_then(get) {
        return v;
    }
    d.node_parents(node)
        .first()
        .is_some_and(|p| flag(d, p, get))
}

fn image_info(d: &Daemon, node: &Arc<Node>, chain: bool) -> Value {
    let name = filename(d, node);
    let mut v = json!({
        "filename": name,
        "format": node.driver().format_name(),
        "virtual-size": node.length(),
    });
    if let Some(cs) = node.driver().cluster_size() {
        v["cluster-size"] = json!(cs);
    }
    if node.driver().is_dirty() {
        v["dirty-flag"] = json!(true);
    }
    if let Some(fs) = node.driver().format_specific() {
        v["format-specific"] = fs;
    }
    if !name.starts_with("json:")
        && !name.contains("://")
        && let Ok(md) = std::fs::metadata(&name)
    {
        use std::os::unix::fs::MetadataExt;
        v["actual-size"] = json!(md.blocks() * 512);
    }
    if let Some(b) = node.child("backing") {
        // (the name as written in the image header, QEMU's `backing-filename`, is the
        // format driver's to tell; the resolved one is known here)
        v["full-backing-filename"] = json!(filename(d, &b));
        if chain {
            v["backing-image"] = image_info(d, &b, true);
        }
    }
    v
}

/// BlockDeviceInfo of a node (query-named-block-nodes).
fn device_info(d: &Daemon, node: &Arc<Node>, flat: bool) -> Value {
    let direct = flag(d, node, &|o| {
        o.get("cache").and_then(|c| bool_opt(c.get("direct")))
    });
    let no_flush = flag(d, node, &|o| {
        o.get("cache").and_then(|c| bool_opt(c.get("no-flush")))
    });
    let mut v = json!({
        "node-name": node.name(),
        "file": filename(d, node),
        "ro": node.is_read_only(),
        "drv": node.driver().format_name(),
        "encrypted": false,
        "detect_zeroes": "off",
        "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0,
        "write_threshold": 0,
        "backing_file_depth": backing_depth(node),
        "active": true,
        "cache": {"writeback": true, "direct": direct, "no-flush": no_flush},
        "image": image_info(d, node, !flat),
    });
    if let Some(b) = node.child("backing") {
        v["backing_file"] = json!(filename(d, &b));
    }
    if let Some(b) = crate::bitmaps::query(node) {
        v["dirty-bitmaps"] = b;
    }
    v
}

pub fn query_named_block_nodes(d: &Daemon, args: Map<String, Value>) -> R {
    let flat = args.get("flat").and_then(Value::as_bool).unwrap_or(false);
    let nodes: Vec<Arc<Node>> = d.graph.borrow().nodes().cloned().collect();
    Ok(Value::Array(
        nodes.iter().map(|n| device_info(d, n, flat)).collect(),
    ))
}

fn zero_stats() -> Value {
    let mut m = Map::new();
    for k in [
        "rd_bytes",
        "wr_bytes",
        "unmap_bytes",
        "zone_append_bytes",
        "rd_operations",
        "wr_operations",
        "flush_operations",
        "unmap_operations",
        "zone_append_operations",
        "rd_total_time_ns",
        "wr_total_time_ns",
        "flush_total_time_ns",
        "unmap_total_time_ns",
        "zone_append_total_time_ns",
        "wr_highest_offset",
        "rd_merged",
        "wr_merged",
        "unmap_merged",
        "zone_append_merged",
        "failed_rd_operations",
        "failed_wr_operations",
        "failed_flush_operations",
        "failed_unmap_operations",
        "failed_zone_append_operations",
        "invalid_rd_operations",
        "invalid_wr_operations",
        "invalid_flush_operations",
        "invalid_unmap_operations",
        "invalid_zone_append_operations",
    ] {
        m.insert(k.into(), json!(0));
    }
    m.insert("account_invalid".into(), json!(false));
    m.insert("account_failed".into(), json!(false));
    m.insert("timed_stats".into(), json!([]));
    Value::Object(m)
}

/// Node statistics: as in QEMU, a node counts I/O only through a BlockBackend of its own,
/// and blockd's only backends are the temporary ones of monitor commands, so the counters are
/// zero; the structure (with the protocol child as `parent`) is QEMU's.
fn node_stats(node: &Arc<Node>) -> Value {
    let mut v = json!({"node-name": node.name(), "stats": zero_stats()});
    if let Some(f) = node.child("file") {
        v["parent"] = node_stats(&f);
    }
    if let Some(b) = node.child("backing") {
        v["backing"] = node_stats(&b);
    }
    v
}

pub fn query_blockstats(d: &Daemon, args: Map<String, Value>) -> R {
    let query_nodes = args
        .get("query-nodes")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if !query_nodes {
        // statistics per BlockBackend: the daemon has no named backends (no exports yet)
        return Ok(json!([]));
    }
    let nodes: Vec<Arc<Node>> = d.graph.borrow().nodes().cloned().collect();
    Ok(Value::Array(nodes.iter().map(node_stats).collect()))
}

pub fn query_block(_d: &Daemon) -> R {
    // query-block lists BlockBackends that have a name or a device; the daemon has none.
    Ok(json!([]))
}

pub fn debug_block_graph(d: &Daemon) -> R {
    let nodes: Vec<Arc<Node>> = d.graph.borrow().nodes().cloned().collect();
    let id_of = |n: &Arc<Node>| {
        nodes
            .iter()
            .position(|x| Arc::ptr_eq(x, n))
            .map(|i| i as u64 + 1)
    };
    let mut out_nodes = Vec::new();
    let mut edges = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        out_nodes.push(json!({"id": i as u64 + 1, "type": "block-driver", "name": n.name()}));
        for c in n.children().iter() {
            if let Some(child) = id_of(&c.node) {
                // QAPI's BlockPermission names ("consistent-read", ...)
                let qapi = |p: blockd_block::Perm| -> Vec<String> {
                    p.names().iter().map(|n| n.replace(' ', "-")).collect()
                };
                edges.push(json!({
                    "parent": i as u64 + 1, "child": child, "name": c.name,
                    "perm": qapi(c.perm), "shared-perm": qapi(c.shared),
                }));
            }
        }
    }
    Ok(json!({"nodes": out_nodes, "edges": edges}))
}

fn find_node(d: &Daemon, args: &Map<String, Value>) -> Result<Arc<Node>, QmpError> {
    let device = str_arg(args, "device").unwrap_or_default();
    let name = str_arg(args, "node-name").unwrap_or_default();
    if !name.is_empty()
        && let Some(n) = d.node(name)
    {
        return Ok(n);
    }
    Err(format!("Cannot find device='{device}' nor node-name='{name}'").into())
}

pub async fn block_resize(d: Rc<Daemon>, args: Map<String, Value>) -> R {
    let node = find_node(&d, &args)?;
    let size = args.get("size").and_then(Value::as_i64).unwrap_or(-1);
    if size < 0 {
        return Err("Parameter 'size' expects a >0 size".into());
    }
    let backend = {
        let g = d.graph.borrow();
        g.new_backend("", &node, Perm::RESIZE, Perm::ALL)?
    };
    let _busy = Busy::new(&d);
    let r = backend.truncate(size as u64).await;
    backend.detach(&d.graph.borrow());
    match r {
        Ok(_) => Ok(json!({})),
        Err(e) => Err(format!("Could not resize: {}", blockd_block::strerror(&e)).into()),
    }
}

/// Move a node (and its children) to an iothread, or back to the main context: the node is
/// drained, so no request of the old placement is in flight when the new one starts.
pub async fn set_iothread(d: Rc<Daemon>, args: Map<String, Value>) -> R {
    let name = str_arg(&args, "node-name").unwrap_or_default().to_string();
    let force = args.get("force").and_then(Value::as_bool).unwrap_or(false);
    let node = d
        .node(&name)
        .ok_or_else(|| QmpError::from(format!("Cannot find node {name}")))?;
    let target = match args.get("iothread") {
        Some(Value::String(id)) => {
            if !d.iothreads.borrow().contains(id) {
                return Err(format!("Cannot find iothread {id}").into());
            }
            Some(id.clone())
        }
        _ => None,
    };
    let node_parents = d.node_parents(&node);
    if !node_parents.is_empty() {
        return Err(format!("Node {name} is not a root node").into());
    }
    if node.parent_count() > 0 && !force {
        return Err(format!(
            "Node {name} is associated with a BlockBackend and could be in use (use force=true to override this check)"
        )
        .into());
    }
    let subtree = Daemon::subtree(&node);
    if export_in(&d, &subtree) {
        // QEMU moves an export created with fixed-iothread=false along with its node; blockd's
        // NBD exports keep the context they were created in (blockd-nbd cannot move one), so
        // every export refuses, as QEMU's fixed-iothread=true ones do.
        return Err("Cannot change iothread of active block backend".into());
    }
    let _drain = drained_all(&subtree).await;
    // the iothread may have been deleted while draining
    if let Some(t) = &target
        && !d.iothreads.borrow().contains(t)
    {
        return Err(format!("Cannot find iothread {t}").into());
    }
    let mut map = d.node_ctx.borrow_mut();
    for n in &subtree {
        match &target {
            Some(t) => {
                map.insert(n.name().to_string(), t.clone());
            }
            None => {
                map.remove(n.name());
            }
        }
    }
    Ok(json!({}))
}

/// Is one of `nodes` the root of an NBD export?
fn export_in(d: &Daemon, nodes: &[Arc<Node>]) -> bool {
    let nbd = d.nbd.borrow();
    let Some(st) = nbd.as_ref() else {
        return false;
    };
    st.server()
        .exports()
        .iter()
        .any(|e| nodes.iter().any(|n| Arc::ptr_eq(n, &e.backend().root())))
}
