//! Reopening nodes with new options while they are in use (QMP's blockdev-reopen): the
//! read-only flag (a backing node made writable for a commit and read-only again), the
//! children `file`/`backing` (another node, or `backing: null`), and whatever each driver can
//! change. Options left out go back to their defaults; the driver and the node-name stay.
//!
//! All nodes of one reopen change together, in three steps that mirror QEMU's
//! prepare/commit/abort: [`Graph::reopen_plan`] reads the list and finds the nodes to drain
//! (the listed ones, the children opened with them, old and new children);
//! [`ReopenPlan::flush`] writes back what is cached, inside the drained section; and
//! [`Graph::reopen_commit`] prepares every driver, checks the permissions of the whole new
//! topology, then commits all, or aborts all if anything failed. Only the main context holds
//! the [`Graph`] token, and the commit takes the [`DrainGuard`] as proof of the drain.

use std::sync::Arc;

use serde_json::{Map, Value};

use crate::drain::DrainGuard;
use crate::driver::ReopenRequest;
use crate::graph::{Graph, OpenFlags};
use crate::node::{Child, Node, ParentRef};
use crate::options::Opts;
use crate::perm::{Perm, Use};

/// One node to reopen and its new options.
struct Entry {
    node: Arc<Node>,
    opts: Map<String, Value>,
    /// The entry of the parent this node was opened with (it inherits that parent's new
    /// flags, as QEMU's implicitly opened children do).
    inherits_from: Option<usize>,
}

/// The nodes of a reopen and their new options, before anything changed.
pub struct ReopenPlan {
    entries: Vec<Entry>,
    drain: Vec<Arc<Node>>,
}

/// A prepared entry: the driver's state and the generic state to commit.
struct Prepared {
    node: Arc<Node>,
    state: Option<Box<dyn std::any::Any + Send>>,
    children: Vec<Child>,
    read_only: bool,
    length: Option<u64>,
    limits: Option<crate::driver::Limits>,
}

fn push_unique(v: &mut Vec<Arc<Node>>, n: &Arc<Node>) {
    if !v.iter().any(|x| Arc::ptr_eq(x, n)) {
        v.push(n.clone());
    }
}

/// Is `target` `node` or below it?
fn reaches(node: &Arc<Node>, target: &Arc<Node>) -> bool {
    Arc::ptr_eq(node, target) || node.children().iter().any(|c| reaches(&c.node, target))
}

impl ReopenPlan {
    /// The nodes to drain for the commit.
    pub fn drain_nodes(&self) -> Vec<Arc<Node>> {
        self.drain.clone()
    }

    /// The node-names being reopened (those listed and the children opened with them).
    pub fn node_names(&self) -> Vec<String> {
        self.entries
            .iter()
            .map(|e| e.node.name().to_string())
            .collect()
    }

    /// Write back what the nodes cache before they change (QEMU flushes every node of a
    /// reopen first). Call inside the drained section.
    pub async fn flush(&self) -> Result<(), String> {
        for e in &self.entries {
            e.node
                .driver()
                .flush(&e.node)
                .await
                .map_err(|err| format!("Error flushing drive: {}", crate::strerror(&err)))?;
        }
        Ok(())
    }
}

impl Graph {
    /// Read a blockdev-reopen list (BlockdevOptions, each naming an existing node). Nothing
    /// changes yet; drain [`ReopenPlan::drain_nodes`] and call [`Graph::reopen_commit`].
    pub fn reopen_plan(&self, list: Vec<Map<String, Value>>) -> Result<ReopenPlan, String> {
        let mut entries: Vec<Entry> = Vec::new();
        for opts in list {
            let name = match opts.get("node-name") {
                Some(Value::String(n)) => n.clone(),
                _ => return Err("node-name not specified".into()),
            };
            let node = self
                .node(&name)
                .ok_or_else(|| format!("Failed to find node with node-name='{name}'"))?;
            // A node listed twice: the last options win.
            entries.retain(|e| !Arc::ptr_eq(&e.node, &node));
            entries.push(Entry {
                node,
                opts,
                inherits_from: None,
            });
        }
        let listed = entries.len();
        for i in 0..listed {
            expand(&mut entries, i)?;
        }
        let mut drain = Vec::new();
        for e in &entries {
            push_unique(&mut drain, &e.node);
            for c in e.node.children().iter() {
                push_unique(&mut drain, &c.node);
            }
            for key in ["file", "backing"] {
                if let Some(Value::String(r)) = e.opts.get(key)
                    && let Some(n) = self.node(r)
                {
                    push_unique(&mut drain, &n);
                }
            }
        }
        Ok(ReopenPlan { entries, drain })
    }

    /// Reopen every node of `plan` at once, inside the drained section `drained` of its
    /// [`ReopenPlan::drain_nodes`]: all drivers prepare, the new permissions are checked, and
    /// then all commit; on any error all abort and nothing has changed.
    pub fn reopen_commit(&mut self, plan: ReopenPlan, drained: &DrainGuard) -> Result<(), String> {
        for n in &plan.drain {
            if !drained.nodes().iter().any(|d| Arc::ptr_eq(d, n)) || n.quiesce_counter() == 0 {
                return Err(format!("Node '{}' is not drained for the reopen", n.name()));
            }
        }
        let mut prepared: Vec<Prepared> = Vec::new();
        let mut flags_of: Vec<OpenFlags> = Vec::new();
        let mut result = Ok(());
        for e in &plan.entries {
            let inherited = e.inherits_from.map(|i| flags_of[i]).unwrap_or_default();
            match self.prepare_entry(e, inherited) {
                Ok((p, flags)) => {
                    prepared.push(p);
                    flags_of.push(flags);
                }
                Err(err) => {
                    result = Err(err);
                    break;
                }
            }
        }
        // The graph may have changed while the caller drained: a child named now must be one
        // the plan drained.
        if result.is_ok()
            && let Some(c) = prepared
                .iter()
                .flat_map(|p| p.children.iter())
                .find(|c| !plan.drain.iter().any(|d| Arc::ptr_eq(d, &c.node)))
        {
            result = Err(format!(
                "Node '{}' changed during the reopen; try again",
                c.node.name()
            ));
        }
        if result.is_ok() {
            result = check_permissions(&prepared);
        }
        if let Err(e) = result {
            for p in prepared {
                if let Some(state) = p.state {
                    p.node.driver().reopen_abort(&p.node, state);
                }
            }
            return Err(e);
        }
        let mut affected: Vec<Arc<Node>> = Vec::new();
        let mut dropped: Vec<Arc<Node>> = Vec::new();
        let committed: Vec<Arc<Node>> = prepared.iter().map(|p| p.node.clone()).collect();
        for mut p in prepared {
            let node = p.node.clone();
            if let Some(state) = p.state.take() {
                node.driver().reopen_commit(&node, state);
            }
            node.set_read_only(p.read_only);
            if let Some(len) = p.length {
                node.set_length(len);
            }
            if let Some(l) = p.limits {
                node.set_limits(l);
            }
            let me = ParentRef::Node(Arc::downgrade(&node));
            let old = node.children();
            node.set_children(p.children.clone());
            for oc in old.iter() {
                let kept = p
                    .children
                    .iter()
                    .any(|c| c.name == oc.name && Arc::ptr_eq(&c.node, &oc.node));
                if !kept {
                    oc.node.remove_parent(&me);
                    push_unique(&mut dropped, &oc.node);
                }
                push_unique(&mut affected, &oc.node);
            }
            for nc in &p.children {
                let kept = old
                    .iter()
                    .any(|c| c.name == nc.name && Arc::ptr_eq(&c.node, &nc.node));
                if kept {
                    nc.node.set_parent_usage(&me, nc.perm, nc.shared);
                } else {
                    nc.node.add_parent_checked(
                        me.clone(),
                        Use {
                            user: format!("node '{}'", node.name()),
                            role: nc.name.clone(),
                            perm: nc.perm,
                            shared: nc.shared,
                        },
                    );
                }
                push_unique(&mut affected, &nc.node);
            }
            push_unique(&mut affected, &node);
        }
        for n in &affected {
            n.refresh_perms();
        }
        for n in &committed {
            n.driver().reopen_commit_post(n);
        }
        // Children opened with a node and replaced by the reopen are closed, as in QEMU.
        for n in dropped {
            if n.is_auto_named() && n.parent_count() == 0 && self.node(n.name()).is_some() {
                let _ = self.remove(n.name());
            }
        }
        Ok(())
    }

    /// Prepare one node: generic options, children, then the driver.
    fn prepare_entry(
        &self,
        e: &Entry,
        inherited: OpenFlags,
    ) -> Result<(Prepared, OpenFlags), String> {
        let node = &e.node;
        let drv = node.driver();
        let mut o = Opts::new(e.opts.clone());
        if let Some(d) = o.take_str("driver")?
            && d != drv.format_name()
        {
            return Err(crate::driver::cannot_change("driver"));
        }
        if let Some(n) = o.take_str("node-name")?
            && n != node.name()
        {
            return Err(crate::driver::cannot_change("node-name"));
        }
        let mut flags = inherited;
        if e.inherits_from.is_none() {
            flags = OpenFlags::default();
        }
        if let Some(ro) = o.take_bool("read-only")? {
            flags.read_only = ro;
        }
        let _ = o.take_bool("auto-read-only")?;
        if let Some(v) = o.take_bool("force-share")? {
            flags.force_share = v;
        }
        if flags.force_share != node.is_force_share() && e.inherits_from.is_none() {
            return Err(crate::driver::cannot_change("force-share"));
        }
        if let Some(Value::Object(cache)) = o.take("cache") {
            let mut c = Opts::nested(cache, "cache.");
            if let Some(d) = c.take_bool("direct")? {
                flags.cache_direct = d;
            }
            if let Some(d) = c.take_bool("no-flush")? {
                flags.no_flush = d;
            }
            c.finish(drv.format_name(), drv.is_format())?;
        }
        match o.take_str("discard")?.as_deref() {
            None => {}
            Some("ignore") | Some("off") => flags.discard_unmap = false,
            Some("unmap") | Some("on") => flags.discard_unmap = true,
            Some(other) => return Err(format!("Invalid discard option '{other}'")),
        }
        let _ = o.take_str("detect-zeroes")?;
        let mut children: Vec<Child> = node.children().iter().cloned().collect();
        for key in ["file", "backing"] {
            let current = children.iter().position(|c| c.name == key);
            match o.take(key) {
                None => {
                    if key == "backing" && current.is_some() {
                        return Err(format!("backing is missing for '{}'", node.name()));
                    }
                }
                Some(Value::String(r)) => {
                    let target = self
                        .node(&r)
                        .ok_or_else(|| format!("Cannot find device='' nor node-name='{r}'"))?;
                    if reaches(&target, node) {
                        return Err(format!(
                            "Making '{r}' a {key} child of '{}' would create a cycle",
                            node.name()
                        ));
                    }
                    match current {
                        Some(i) => children[i].node = target,
                        None if key == "backing" && drv.supports_backing() => {
                            // QEMU's permissions for a backing file: read it, let others
                            // write (a commit) but not resize it; the driver may refine them.
                            children.push(Child {
                                name: "backing".into(),
                                node: target,
                                perm: Perm::CONSISTENT_READ,
                                shared: Perm::CONSISTENT_READ | Perm::WRITE | Perm::WRITE_UNCHANGED,
                            });
                        }
                        None if key == "backing" => {
                            return Err(format!(
                                "Driver '{}' of node '{}' does not support backing files",
                                drv.format_name(),
                                node.name()
                            ));
                        }
                        None => return Err(crate::driver::cannot_change(key)),
                    }
                }
                Some(Value::Null) if key == "backing" => {
                    if let Some(i) = current {
                        children.remove(i);
                    }
                }
                Some(Value::Object(_)) => {
                    // nested options only describe a child opened with this node (`expand`)
                    return Err(crate::driver::cannot_change(key));
                }
                Some(_) => {
                    return Err(format!(
                        "Invalid parameter type for '{key}', expected: BlockdevRef"
                    ));
                }
            }
        }
        let read_only = flags.read_only;
        let mut req = ReopenRequest {
            read_only,
            flags,
            opts: &mut o,
            children: &children,
        };
        let prep = drv.reopen_prepare(node, &mut req)?;
        if let Err(err) = o.finish(drv.format_name(), drv.is_format()) {
            drv.reopen_abort(node, prep.state);
            return Err(err);
        }
        for (name, perm, shared) in &prep.child_perms {
            if let Some(c) = children.iter_mut().find(|c| &c.name == name) {
                c.perm = *perm;
                c.shared = *shared;
            }
        }
        Ok((
            Prepared {
                node: node.clone(),
                state: Some(prep.state),
                children,
                read_only,
                length: prep.length,
                limits: prep.limits,
            },
            flags,
        ))
    }
}

/// Add entries for the children `entries[i]` was opened with (auto-named children): they are
/// reopened too, with the nested options given for them or none.
fn expand(entries: &mut Vec<Entry>, i: usize) -> Result<(), String> {
    let node = entries[i].node.clone();
    for c in node.children().iter() {
        if !c.node.is_auto_named() || entries.iter().any(|e| Arc::ptr_eq(&e.node, &c.node)) {
            continue;
        }
        let mut child_opts = match entries[i].opts.get(&c.name) {
            None => Map::new(),
            Some(Value::String(s)) if s == c.node.name() => Map::new(),
            Some(Value::Object(m)) => m.clone(),
            // replaced or detached: the old child is not reopened
            Some(_) => continue,
        };
        if let Some(Value::Object(_)) = entries[i].opts.get(&c.name) {
            entries[i]
                .opts
                .insert(c.name.clone(), Value::String(c.node.name().to_string()));
            if !child_opts.contains_key("driver") && child_opts.contains_key("filename") {
                child_opts.insert("driver".into(), Value::String("file".into()));
            }
            if child_opts.get("node-name").is_some() {
                // an auto-named child cannot be given a name by a reopen
                return Err(crate::driver::cannot_change("node-name"));
            }
        }
        entries.push(Entry {
            node: c.node.clone(),
            opts: child_opts,
            inherits_from: Some(i),
        });
        let j = entries.len() - 1;
        expand(entries, j)?;
    }
    Ok(())
}

/// The permissions of the topology after the reopen: every node touched keeps only users
/// that agree with each other, and a read-only node has no writer (QEMU's messages).
fn check_permissions(prepared: &[Prepared]) -> Result<(), String> {
    let is_entry = |n: &Arc<Node>| prepared.iter().find(|p| Arc::ptr_eq(&p.node, n));
    let mut affected: Vec<Arc<Node>> = Vec::new();
    for p in prepared {
        push_unique(&mut affected, &p.node);
        for c in p.node.children().iter().chain(p.children.iter()) {
            push_unique(&mut affected, &c.node);
        }
    }
    for n in &affected {
        let mut uses: Vec<Use> = Vec::new();
        for (parent, u) in n.parent_uses() {
            let replaced = match &parent {
                ParentRef::Node(w) => w.upgrade().is_some_and(|pn| is_entry(&pn).is_some()),
                ParentRef::Backend(_) => false,
            };
            if !replaced {
                uses.push(u);
            }
        }
        for p in prepared {
            for c in p.children.iter().filter(|c| Arc::ptr_eq(&c.node, n)) {
                uses.push(Use {
                    user: format!("node '{}'", p.node.name()),
                    role: c.name.clone(),
                    perm: c.perm,
                    shared: c.shared,
                });
            }
        }
        let (perm, shared) = uses.iter().fold((Perm::NONE, Perm::ALL), |(p, s), u| {
            (p | u.perm, Perm(s.0 & u.shared.0))
        });
        let read_only = is_entry(n).map_or(n.is_read_only(), |p| p.read_only);
        if read_only && (perm.contains(Perm::WRITE) || perm.contains(Perm::WRITE_UNCHANGED)) {
            return Err(if n.is_read_only() {
                "Block node is read-only".to_string()
            } else {
                format!(
                    "Read-only block node '{}' cannot support read-write users",
                    n.name()
                )
            });
        }
        for i in 0..uses.len() {
            crate::perm::check(n.name(), &uses[..i], &uses[i])?;
        }
        n.driver().check_perm(perm, shared)?;
    }
    Ok(())
}
