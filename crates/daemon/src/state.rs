//! The daemon's state on the main context: the block graph (the main-context token), the
//! iothreads, which context each node's I/O is run in, and what the monitor owns.
//!
//! The graph sits in a `RefCell` and is only ever borrowed for synchronous steps: no borrow
//! is held across an `.await`, so a slow command cannot make another one fail or wait.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::sync::Arc;

use blockd_aio::ContextHandle;
use blockd_block::{Graph, Node};
use blockd_qmp::Server;
use event_listener::Event;
use serde_json::{Map, Value};

use crate::iothreads::IoThreads;

pub struct Daemon {
    pub graph: RefCell<Graph>,
    pub iothreads: RefCell<IoThreads>,
    /// node-name → iothread id of the nodes moved to an iothread (others use the main context)
    pub node_ctx: RefCell<BTreeMap<String, String>>,
    /// nodes added by --blockdev or blockdev-add (only those can be deleted by the monitor)
    pub owned: RefCell<BTreeSet<String>>,
    /// the options each node was opened with (nested children get their own entry)
    pub node_opts: RefCell<BTreeMap<String, Map<String, Value>>>,
    pub server: RefCell<Option<Rc<Server>>>,
    /// NBD server and exports (blockd-nbd's QMP glue)
    pub nbd: RefCell<Option<blockd_nbd::qmp::NbdState>>,
    pub quit: Cell<bool>,
    /// SHUTDOWN's `reason`: "host-qmp-quit" or "host-signal"
    pub quit_reason: Cell<&'static str>,
    pub quit_event: Event,
    /// requests running through temporary backends (monitor qemu-io, block_resize)
    pub busy: Cell<usize>,
}

impl Daemon {
    pub fn new() -> Rc<Daemon> {
        Rc::new(Daemon {
            graph: RefCell::new({
                let mut g = blockd_drivers::graph();
                // the fleecing drivers live with the backup job
                g.register_driver(blockd_jobs::cbw::driver_entry());
                g.register_driver(blockd_jobs::snapshot_access::driver_entry());
                g
            }),
            iothreads: RefCell::new(IoThreads::default()),
            node_ctx: RefCell::new(BTreeMap::new()),
            owned: RefCell::new(BTreeSet::new()),
            node_opts: RefCell::new(BTreeMap::new()),
            server: RefCell::new(None),
            nbd: RefCell::new(None),
            quit: Cell::new(false),
            quit_reason: Cell::new("host-qmp-quit"),
            quit_event: Event::new(),
            busy: Cell::new(0),
        })
    }

    pub fn request_quit(&self, reason: &'static str) {
        if !self.quit.get() {
            self.quit_reason.set(reason);
        }
        self.quit.set(true);
        self.quit_event.notify(usize::MAX);
    }

    pub async fn wait_quit(&self) {
        loop {
            if self.quit.get() {
                return;
            }
            let l = self.quit_event.listen();
            if self.quit.get() {
                return;
            }
            l.await;
        }
    }

    pub fn node(&self, name: &str) -> Option<Arc<Node>> {
        self.graph.borrow().node(name)
    }

    /// The context whose thread runs I/O for `node` started by the daemon itself.
    pub fn node_context(&self, node: &str) -> Option<(String, ContextHandle)> {
        let id = self.node_ctx.borrow().get(node).cloned()?;
        let h = self.iothreads.borrow().handle(&id)?;
        Some((id, h))
    }

    /// Parents of `node` that are nodes of the graph.
    pub fn node_parents(&self, node: &Arc<Node>) -> Vec<Arc<Node>> {
        self.graph
            .borrow()
            .nodes()
            .filter(|n| n.children().iter().any(|c| Arc::ptr_eq(&c.node, node)))
            .cloned()
            .collect()
    }

    /// Record the options of `node` and of the children opened inline with it.
    pub fn record_options(&self, node: &Arc<Node>, opts: &Map<String, Value>) {
        self.node_opts
            .borrow_mut()
            .insert(node.name().to_string(), opts.clone());
        for c in node.children().iter() {
            if let Some(Value::Object(child)) = opts.get(&c.name) {
                let mut child = child.clone();
                if !child.contains_key("driver") && child.contains_key("filename") {
                    child.insert("driver".into(), Value::String("file".into()));
                }
                self.record_options(&c.node, &child);
            }
        }
    }

    /// Forget nodes that are no longer in the graph.
    pub fn prune(&self) {
        let g = self.graph.borrow();
        self.node_opts
            .borrow_mut()
            .retain(|n, _| g.node(n).is_some());
        self.node_ctx
            .borrow_mut()
            .retain(|n, _| g.node(n).is_some());
        self.owned.borrow_mut().retain(|n| g.node(n).is_some());
    }

    /// Every node below (and including) `node`.
    pub fn subtree(node: &Arc<Node>) -> Vec<Arc<Node>> {
        let mut out = vec![node.clone()];
        let mut i = 0;
        while i < out.len() {
            let kids: Vec<Arc<Node>> = out[i].children().iter().map(|c| c.node.clone()).collect();
            for k in kids {
                if !out.iter().any(|x| Arc::ptr_eq(x, &k)) {
                    out.push(k);
                }
            }
            i += 1;
        }
        out
    }
}

/// Counts a request through a temporary backend for as long as it lives.
pub struct Busy<'a>(&'a Daemon);

impl<'a> Busy<'a> {
    pub fn new(d: &'a Daemon) -> Busy<'a> {
        d.busy.set(d.busy.get() + 1);
        Busy(d)
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.busy.set(self.0.busy.get() - 1);
    }
}
