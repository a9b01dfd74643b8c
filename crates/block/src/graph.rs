//! The block graph: the registry of named nodes and every change to its topology.
//!
//! `Graph` is the main-context token (DESIGN.md): it is `!Send`, so only the thread that
//! created it (the main context) can hold it, and every graph change is a method on it. Each
//! change drains the nodes it touches for its whole duration, so no request ever sees a
//! half-changed topology; requests see the before or the after through atomically swapped
//! `Arc`s.

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::backend::BlockBackend;
use crate::drain::drained_all;
use crate::drivers;
use crate::node::{Child, Node, ParentRef};
use crate::options::{ChildSpec, Opts};
use crate::perm::{Perm, Use};

/// Flags inherited by children opened together with a parent.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenFlags {
    pub read_only: bool,
    pub cache_direct: bool,
    pub no_flush: bool,
    pub force_share: bool,
    /// `discard=unmap`: discard requests deallocate (inherited by children, as in QEMU).
    pub discard_unmap: bool,
}

pub struct Graph {
    nodes: BTreeMap<String, Arc<Node>>,
    next_auto: u64,
    drivers: Vec<drivers::DriverEntry>,
    _main_context_only: PhantomData<*const ()>,
}

impl Default for Graph {
    fn default() -> Self {
        Self::new()
    }
}

impl Graph {
    pub fn new() -> Graph {
        Graph {
            nodes: BTreeMap::new(),
            next_auto: 0,
            drivers: drivers::builtin(),
            _main_context_only: PhantomData,
        }
    }

    /// Add a driver (a format or protocol from another crate) to this graph's registry; a
    /// driver of the same name is replaced.
    pub fn register_driver(&mut self, entry: drivers::DriverEntry) {
        self.drivers.retain(|d| d.name != entry.name);
        self.drivers.push(entry);
    }

    /// Names of the drivers this graph can open.
    pub fn driver_names(&self) -> Vec<&'static str> {
        self.drivers.iter().map(|d| d.name).collect()
    }

    /// The format whose probe scores highest for these first bytes of an image (QEMU's
    /// `bdrv_probe_all`); `raw` when none claims it.
    pub fn probe_format(&self, header: &[u8], filename: &str) -> &'static str {
        self.drivers
            .iter()
            .filter_map(|d| d.probe.map(|p| (p(header, filename), d.name)))
            .filter(|(score, _)| *score > 0)
            .max_by_key(|(score, _)| *score)
            .map_or("raw", |(_, name)| name)
    }

    pub fn node(&self, name: &str) -> Option<Arc<Node>> {
        self.nodes.get(name).cloned()
    }

    pub fn nodes(&self) -> impl Iterator<Item = &Arc<Node>> {
        self.nodes.values()
    }

    /// Open a node (and the children its options describe) from BlockdevOptions.
    pub fn open(&mut self, options: Map<String, Value>) -> Result<Arc<Node>, String> {
        self.open_with(options, OpenFlags::default())
    }

    pub fn open_with(
        &mut self,
        options: Map<String, Value>,
        inherit: OpenFlags,
    ) -> Result<Arc<Node>, String> {
        let mut o = Opts::new(options);
        let driver = o
            .take_str("driver")?
            .ok_or_else(|| "Parameter 'driver' is missing".to_string())?;
        let name = o.take_str("node-name")?;
        if let Some(n) = &name {
            check_node_name(n)?;
            if self.nodes.contains_key(n) {
                return Err(format!("Duplicate nodes with node-name='{n}'"));
            }
        }
        let mut flags = inherit;
        if let Some(ro) = o.take_bool("read-only")? {
            flags.read_only = ro;
        }
        let _ = o.take_bool("auto-read-only")?;
        if let Some(v) = o.take_bool("force-share")? {
            flags.force_share = v;
        }
        if let Some(Value::Object(cache)) = o.take("cache") {
            let mut c = Opts::nested(cache, "cache.");
            if let Some(d) = c.take_bool("direct")? {
                flags.cache_direct = d;
            }
            if let Some(d) = c.take_bool("no-flush")? {
                flags.no_flush = d;
            }
            c.finish(&driver, false)?;
        }
        let discard = o.take_str("discard")?;
        match discard.as_deref() {
            None => {}
            Some("ignore") | Some("off") => flags.discard_unmap = false,
            Some("unmap") | Some("on") => flags.discard_unmap = true,
            Some(other) => return Err(format!("Invalid discard option '{other}'")),
        }
        let _detect_zeroes = o.take_str("detect-zeroes")?;
        let entry = self
            .drivers
            .iter()
            .find(|d| d.name == driver)
            .copied()
            .ok_or_else(|| format!("Unknown driver '{driver}'"))?;
        let opened = (entry.open)(self, &driver, &mut o, flags)?;
        let is_format = opened.driver.is_format();
        o.finish(&driver, is_format)?;
        let (name, auto) = match name {
            Some(n) => (n, false),
            None => {
                self.next_auto += 1;
                (format!("#block{:03}", self.next_auto), true)
            }
        };
        let node = Node::new(
            name.clone(),
            auto,
            opened.driver,
            opened.children.clone(),
            opened.length,
            flags.read_only,
        );
        node.set_force_share(flags.force_share);
        node.set_discard_unmap(flags.discard_unmap);
        if let Err(e) = link_children(&node, &opened.children) {
            // Children opened for this node alone go with it.
            for c in &opened.children {
                if c.node.is_auto_named() && c.node.parent_count() == 0 {
                    self.nodes.remove(c.node.name());
                }
            }
            return Err(e);
        }
        self.nodes.insert(name, node.clone());
        Ok(node)
    }

    /// Add a node whose driver was built by the caller (filters of jobs, test drivers).
    pub fn add_node(
        &mut self,
        name: &str,
        driver: Box<dyn crate::driver::BlockDriver>,
        children: Vec<Child>,
        length: u64,
    ) -> Result<Arc<Node>, String> {
        check_node_name(name)?;
        if self.nodes.contains_key(name) {
            return Err(format!("Duplicate nodes with node-name='{name}'"));
        }
        let node = Node::new(
            name.to_string(),
            false,
            driver,
            children.clone(),
            length,
            false,
        );
        link_children(&node, &children)?;
        self.nodes.insert(name.to_string(), node.clone());
        Ok(node)
    }

    /// Open or look up a child given as nested options or a node-name reference.
    pub fn open_child(
        &mut self,
        o: &mut Opts,
        key: &str,
        flags: OpenFlags,
    ) -> Result<Option<Arc<Node>>, String> {
        match o.take_child(key) {
            None => Ok(None),
            Some(ChildSpec::Reference(n)) => self
                .node(&n)
                .map(Some)
                .ok_or_else(|| format!("Cannot find device='' nor node-name='{n}'")),
            Some(ChildSpec::Options(mut m)) => {
                // A child given only a filename is a file (QEMU picks the protocol from the
                // filename; blockd has one filename protocol).
                if !m.contains_key("driver") && m.contains_key("filename") {
                    m.insert("driver".into(), serde_json::Value::String("file".into()));
                }
                self.open_with(m, flags).map(Some)
            }
        }
    }

    /// blockdev-del: remove a node nobody uses. Children opened with it go too when unused.
    pub fn remove(&mut self, name: &str) -> Result<(), String> {
        let node = self
            .node(name)
            .ok_or_else(|| format!("Failed to find node with node-name='{name}'"))?;
        if node.parent_count() > 0 {
            return Err(format!(
                "Node '{name}' is busy: node is used as root of a block backend or a child"
            ));
        }
        self.nodes.remove(name);
        let me = ParentRef::Node(Arc::downgrade(&node));
        for c in node.children().iter() {
            c.node.remove_parent(&me);
            if c.node.is_auto_named() && c.node.parent_count() == 0 {
                let _ = self.remove(c.node.name());
            }
        }
        Ok(())
    }

    /// Attach a BlockBackend to `node`.
    pub fn new_backend(
        &self,
        name: &str,
        node: &Arc<Node>,
        perm: Perm,
        shared: Perm,
    ) -> Result<BlockBackend, String> {
        BlockBackend::new(self, name, node, perm, shared)
    }

    /// Point `parent`'s child `child_name` at `new_child`, inside a drain of all three nodes.
    pub async fn replace_child(
        &mut self,
        parent: &Arc<Node>,
        child_name: &str,
        new_child: &Arc<Node>,
    ) -> Result<(), String> {
        let old = parent
            .child(child_name)
            .ok_or_else(|| format!("Node '{}' has no child '{child_name}'", parent.name()))?;
        let _drain = drained_all(&[parent.clone(), old.clone(), new_child.clone()]).await;
        let me = ParentRef::Node(Arc::downgrade(parent));
        let mut children: Vec<Child> = parent.children().iter().cloned().collect();
        let edge = children
            .iter_mut()
            .find(|c| c.name == child_name)
            .expect("child present");
        let usage = Use {
            user: format!("node '{}'", parent.name()),
            role: child_name.to_string(),
            perm: edge.perm,
            shared: edge.shared,
        };
        crate::perm::check(new_child.name(), &new_child.uses(), &usage)?;
        edge.node = new_child.clone();
        new_child.add_parent(me.clone(), usage)?;
        parent.set_children(children);
        old.remove_parent(&me);
        Ok(())
    }

    /// Give `parent` a new child edge (a snapshot's overlay gets its backing node), inside a
    /// drain of both nodes; the permissions are checked first.
    pub async fn add_child(&mut self, parent: &Arc<Node>, child: Child) -> Result<(), String> {
        if parent.child(&child.name).is_some() {
            return Err(format!(
                "Node '{}' already has a child '{}'",
                parent.name(),
                child.name
            ));
        }
        let _drain = drained_all(&[parent.clone(), child.node.clone()]).await;
        let usage = Use {
            user: format!("node '{}'", parent.name()),
            role: child.name.clone(),
            perm: child.perm,
            shared: child.shared,
        };
        crate::perm::check(child.node.name(), &child.node.uses(), &usage)?;
        child
            .node
            .add_parent(ParentRef::Node(Arc::downgrade(parent)), usage)?;
        let mut children: Vec<Child> = parent.children().iter().cloned().collect();
        children.push(child);
        parent.set_children(children);
        Ok(())
    }

    /// Insert `filter` (already opened with `node` as its only child) above `node`: every other
    /// parent of `node` now uses `filter`.
    pub async fn insert_filter_above(
        &mut self,
        node: &Arc<Node>,
        filter: &Arc<Node>,
    ) -> Result<(), String> {
        let _drain = drained_all(&[node.clone(), filter.clone()]).await;
        let filter_ref = ParentRef::Node(Arc::downgrade(filter));
        let others: Vec<ParentRef> = node
            .lock_parents()
            .iter()
            .map(|p| p.parent.clone())
            .filter(|p| !crate::node::same_parent(p, &filter_ref) && !below(filter, p))
            .collect();
        for p in others {
            self.repoint_parent(&p, node, filter);
        }
        Ok(())
    }

    /// Remove a filter: its parents use its child again (its `file` child when it has more,
    /// as copy-before-write's `target`), and the filter is closed.
    pub async fn remove_filter(&mut self, filter: &Arc<Node>) -> Result<(), String> {
        let children = filter.children();
        let below = match children.as_slice() {
            [only] => only.node.clone(),
            more => more
                .iter()
                .find(|c| c.name == "file")
                .map(|c| c.node.clone())
                .ok_or_else(|| {
                    format!("Node '{}' is not a filter with one child", filter.name())
                })?,
        };
        let _drain = drained_all(&[filter.clone(), below.clone()]).await;
        let parents: Vec<ParentRef> = filter
            .lock_parents()
            .iter()
            .map(|p| p.parent.clone())
            .collect();
        for p in parents {
            self.repoint_parent(&p, filter, &below);
        }
        let me = ParentRef::Node(Arc::downgrade(filter));
        for c in children.iter() {
            c.node.remove_parent(&me);
        }
        filter.set_children(Vec::new());
        self.nodes.remove(filter.name());
        Ok(())
    }

    /// Drop `parent`'s child `child_name` (a stream job ending the backing chain), inside a
    /// drain of both nodes.
    pub async fn remove_child(
        &mut self,
        parent: &Arc<Node>,
        child_name: &str,
    ) -> Result<(), String> {
        let old = parent
            .child(child_name)
            .ok_or_else(|| format!("Node '{}' has no child '{child_name}'", parent.name()))?;
        let _drain = drained_all(&[parent.clone(), old.clone()]).await;
        let children: Vec<Child> = parent
            .children()
            .iter()
            .filter(|c| c.name != child_name)
            .cloned()
            .collect();
        parent.set_children(children);
        old.remove_parent(&ParentRef::Node(Arc::downgrade(parent)));
        Ok(())
    }

    /// Every parent of `from` uses `to` instead (a mirror's pivot), inside a drain of both.
    pub async fn replace_node(&mut self, from: &Arc<Node>, to: &Arc<Node>) -> Result<(), String> {
        let _drain = drained_all(&[from.clone(), to.clone()]).await;
        let to_ref = ParentRef::Node(Arc::downgrade(to));
        let parents: Vec<ParentRef> = from
            .lock_parents()
            .iter()
            .map(|p| p.parent.clone())
            .filter(|p| !crate::node::same_parent(p, &to_ref) && !below(to, p))
            .collect();
        for p in parents {
            self.repoint_parent(&p, from, to);
        }
        Ok(())
    }

    /// Make `backend` send its requests to `new_root`.
    pub async fn set_backend_root(
        &mut self,
        backend: &BlockBackend,
        new_root: &Arc<Node>,
    ) -> Result<(), String> {
        let old = backend.root();
        let _drain = drained_all(&[old.clone(), new_root.clone()]).await;
        self.repoint_parent(&backend.parent_ref(), &old, new_root);
        Ok(())
    }

    /// Move one parent edge from `from` to `to` (inside the caller's drain).
    fn repoint_parent(&mut self, p: &ParentRef, from: &Arc<Node>, to: &Arc<Node>) {
        let usage = from
            .lock_parents()
            .iter()
            .find(|l| crate::node::same_parent(&l.parent, p))
            .map(|l| l.usage.clone());
        let Some(usage) = usage else { return };
        match p {
            ParentRef::Node(w) => {
                if let Some(parent) = w.upgrade() {
                    let children: Vec<Child> = parent
                        .children()
                        .iter()
                        .map(|c| {
                            let mut c = c.clone();
                            if Arc::ptr_eq(&c.node, from) {
                                c.node = to.clone();
                            }
                            c
                        })
                        .collect();
                    // Moving an edge keeps the same use: nothing new to refuse.
                    let _ = to.add_parent(p.clone(), usage);
                    parent.set_children(children);
                }
            }
            ParentRef::Backend(w) => {
                if let Some(b) = w.upgrade() {
                    let _ = to.add_parent(p.clone(), usage);
                    b.root.store(to.clone());
                }
            }
        }
        from.remove_parent(p);
    }
}

/// Is the parent `p` a node at or below `top`? Moving its edge onto `top` would make a cycle
/// (a backup target whose backing file is the source stays on the source; QEMU's
/// `should_update_child`).
fn below(top: &Arc<Node>, p: &ParentRef) -> bool {
    fn reaches(n: &Arc<Node>, target: &Arc<Node>) -> bool {
        Arc::ptr_eq(n, target) || n.children().iter().any(|c| reaches(&c.node, target))
    }
    match p {
        ParentRef::Node(w) => w.upgrade().is_some_and(|pn| reaches(top, &pn)),
        ParentRef::Backend(_) => false,
    }
}

/// Make `node` a parent of each of its children, checking permissions; on a refusal the edges
/// made so far are undone.
fn link_children(node: &Arc<Node>, children: &[Child]) -> Result<(), String> {
    let me = ParentRef::Node(Arc::downgrade(node));
    for (i, c) in children.iter().enumerate() {
        let usage = Use {
            user: format!("node '{}'", node.name()),
            role: c.name.clone(),
            perm: c.perm,
            shared: c.shared,
        };
        let r = crate::perm::check(c.node.name(), &c.node.uses(), &usage)
            .and_then(|_| c.node.add_parent(me.clone(), usage));
        if let Err(e) = r {
            for done in &children[..i] {
                done.node.remove_parent(&me);
            }
            return Err(e);
        }
    }
    Ok(())
}

fn check_node_name(n: &str) -> Result<(), String> {
    let ok = n.len() < 32
        && n.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c));
    if ok {
        Ok(())
    } else {
        Err("Invalid node-name: '".to_string() + n + "'")
    }
}
