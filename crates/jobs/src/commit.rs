//! `block-commit` of an intermediate layer: the data of `top` and of the layers between it and
//! `base` goes into `base`, then the overlay of `top` (the node whose backing file it is) gets
//! `base` as its backing file (QEMU's block/commit.c, by its documented behaviour). The commit
//! of the active layer is a mirror (`mirror.rs`, job type "commit").
//!
//! The worker runs in the chain's context through the job's BlockBackends: on `top` (reading
//! through the chain), on `base` (writing; others may not write it meanwhile), and read-only on
//! each committed layer (which ranges they hold). The graph change (prepare) happens in the
//! main context inside a drained section, where the overlay's qcow2 header is rewritten to name
//! the base (or the user's `backing-file`), as QEMU does. A base smaller than the top is grown
//! to the top's size before the copy, as QEMU does.

use std::cell::RefCell;
use std::rc::{Rc, Weak};
use std::sync::Arc;

use std::io;

use blockd_aio::IoBuf;
use blockd_block::driver::{BlockStatus, BufResult, IoFuture, ReqFlags};
use blockd_block::{BlockBackend, BlockDriver, Child, Node, Perm, drained_all};

use crate::control::{JobCtx, OnError};
use crate::host::{GraphHost, run_drained};
use crate::job::{JobDriver, LocalFuture, Worker};

pub struct CommitParams {
    /// The node whose backing file `top` is.
    pub overlay: Arc<Node>,
    pub top: Arc<Node>,
    pub base: Arc<Node>,
    /// What the overlay's header names afterwards (`backing-file`, `backing-mask-protocol`).
    pub backing: crate::backing::BackingName,
    pub on_error: OnError,
    /// `filter-node-name`: a `commit_top` filter of this name goes between the overlay and
    /// `top` while the job runs (as QEMU's; without a name blockd inserts none).
    pub filter_name: Option<String>,
}

/// QEMU's commit_top filter: the overlay reads `top` through it while the job runs.
struct CommitTop;

fn below(node: &Node) -> io::Result<Arc<Node>> {
    node.child("backing")
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEDIUM))
}

impl BlockDriver for CommitTop {
    fn format_name(&self) -> &'static str {
        "commit_top"
    }
    fn is_filter(&self) -> bool {
        true
    }
    fn read<'a>(&'a self, node: &'a Node, off: u64, buf: IoBuf) -> IoFuture<'a, BufResult> {
        Box::pin(async move {
            match below(node) {
                Ok(c) => blockd_block::io::aligned_read(&c, off, buf).await,
                Err(e) => (Err(e), buf),
            }
        })
    }
    fn write<'a>(
        &'a self,
        _node: &'a Node,
        _off: u64,
        buf: IoBuf,
        _flags: ReqFlags,
    ) -> IoFuture<'a, BufResult> {
        // The overlay never writes its backing file.
        Box::pin(async move { (Err(io::Error::from_raw_os_error(libc::EPERM)), buf) })
    }
    fn flush<'a>(&'a self, node: &'a Node) -> IoFuture<'a, io::Result<()>> {
        Box::pin(async move {
            let c = below(node)?;
            c.driver().flush(&c).await
        })
    }
    fn discard<'a>(
        &'a self,
        _node: &'a Node,
        _off: u64,
        _len: u64,
    ) -> IoFuture<'a, io::Result<()>> {
        Box::pin(async { Err(io::Error::from_raw_os_error(libc::EPERM)) })
    }
    fn write_zeroes<'a>(
        &'a self,
        _node: &'a Node,
        _off: u64,
        _len: u64,
        _flags: ReqFlags,
    ) -> IoFuture<'a, io::Result<()>> {
        Box::pin(async { Err(io::Error::from_raw_os_error(libc::EPERM)) })
    }
    fn block_status<'a>(
        &'a self,
        node: &'a Node,
        off: u64,
        len: u64,
    ) -> IoFuture<'a, io::Result<BlockStatus>> {
        Box::pin(async move {
            let c = below(node)?;
            c.driver().block_status(&c, off, len).await
        })
    }
    fn truncate<'a>(&'a self, _node: &'a Node, _len: u64) -> IoFuture<'a, io::Result<u64>> {
        Box::pin(async { Err(blockd_block::driver::not_supported()) })
    }
}

/// Put a `commit_top` filter named `name` between `overlay` and `top`.
async fn insert_commit_top(
    host: &Rc<dyn GraphHost>,
    name: &str,
    overlay: &Arc<Node>,
    top: &Arc<Node>,
) -> Result<Arc<Node>, String> {
    let filter = host.graph().borrow_mut().add_node(
        name,
        Box::new(CommitTop),
        vec![Child {
            name: "backing".into(),
            node: top.clone(),
            perm: Perm::CONSISTENT_READ,
            shared: Perm::ALL,
        }],
        top.length(),
    )?;
    let guard = drained_all(&[overlay.clone(), top.clone(), filter.clone()]).await;
    let r = {
        let mut g = host.graph().borrow_mut();
        run_drained(g.replace_child(overlay, "backing", &filter))
    };
    drop(guard);
    if let Err(e) = r.unwrap_or_else(|| Err("could not insert the commit filter".into())) {
        let mut g = host.graph().borrow_mut();
        let _ = run_drained(g.remove_filter(&filter));
        return Err(e);
    }
    host.graph_changed();
    Ok(filter)
}

pub struct CommitJob {
    me: Weak<CommitJob>,
    filter: RefCell<Option<Arc<Node>>>,
    host: Weak<dyn GraphHost>,
    overlay: Arc<Node>,
    /// `top` and the layers below it, down to (not including) `base`.
    layers: Vec<Arc<Node>>,
    base: Arc<Node>,
    backing: crate::backing::BackingName,
    backends: RefCell<Vec<BlockBackend>>,
}

pub async fn new_commit(
    host: &Rc<dyn GraphHost>,
    p: CommitParams,
) -> Result<(Rc<CommitJob>, Worker), String> {
    let mut layers = vec![p.top.clone()];
    layers.extend(crate::stream::intermediates(&p.top, Some(&p.base))?);
    let filter = match &p.filter_name {
        Some(name) => Some(insert_commit_top(host, name, &p.overlay, &p.top).await?),
        None => None,
    };
    let mut made: Vec<BlockBackend> = Vec::new();
    let r = (|| {
        let g = host.graph().borrow();
        // A base smaller than the top grows first (as QEMU's commit), hence `resize`.
        made.push(g.new_backend(
            "",
            &p.base,
            Perm::CONSISTENT_READ | Perm::WRITE | Perm::RESIZE,
            Perm::ALL.minus(Perm::WRITE).minus(Perm::RESIZE),
        )?);
        for n in &layers {
            made.push(g.new_backend("", n, Perm::CONSISTENT_READ, Perm::ALL)?);
        }
        Ok::<(), String>(())
    })();
    if let Err(e) = r {
        let mut g = host.graph().borrow_mut();
        for b in made {
            b.detach(&g);
        }
        if let Some(f) = &filter {
            let _ = run_drained(g.replace_child(&p.overlay, "backing", &p.top));
            let _ = run_drained(g.remove_filter(f));
        }
        return Err(e);
    }
    let base_be = made[0].clone();
    let layer_bes: Vec<BlockBackend> = made[1..].to_vec();
    let job = Rc::new_cyclic(|me| CommitJob {
        me: me.clone(),
        filter: RefCell::new(filter),
        host: Rc::downgrade(host),
        overlay: p.overlay,
        layers,
        base: p.base,
        backing: p.backing,
        backends: RefCell::new(made),
    });
    let on_error = p.on_error;
    let worker: Worker = Box::new(move |ctx: JobCtx| {
        Box::pin(async move {
            // `top` reads through the chain: its view is what base must hold afterwards.
            let src = layer_bes[0].clone();
            if base_be.length() < src.length() {
                base_be
                    .truncate(src.length())
                    .await
                    .map_err(|e| blockd_block::strerror(&e))?;
            }
            crate::copy::copy_above(
                &ctx,
                &src,
                &base_be,
                crate::copy::Mode::ReadWrite,
                &layer_bes,
                on_error,
            )
            .await?;
            base_be
                .flush()
                .await
                .map_err(|e| blockd_block::strerror(&e))
        })
    });
    Ok((job, worker))
}

impl JobDriver for CommitJob {
    fn job_type(&self) -> &'static str {
        "commit"
    }

    fn nodes(&self) -> Vec<Arc<Node>> {
        let mut v = vec![self.overlay.clone(), self.base.clone()];
        v.extend(self.layers.iter().cloned());
        v
    }

    fn prepare(&self) -> LocalFuture<'_, Result<(), String>> {
        Box::pin(async move {
            let host = self
                .host
                .upgrade()
                .ok_or_else(|| "the block graph is gone".to_string())?;
            let filter = self.filter.borrow_mut().take();
            let mut nodes = vec![self.overlay.clone(), self.base.clone()];
            nodes.extend(self.layers.iter().cloned());
            nodes.extend(filter.iter().cloned());
            let guard = drained_all(&nodes).await;
            let r = {
                let mut g = host.graph().borrow_mut();
                let r = run_drained(g.replace_child(&self.overlay, "backing", &self.base));
                // the filter has no parent any more: it goes
                if let Some(f) = &filter {
                    let _ = run_drained(g.remove_filter(f));
                }
                r
            };
            let r = match r {
                Some(Ok(())) => self.backing.write(&self.overlay, Some(&self.base)).await,
                Some(Err(e)) => Err(e),
                None => Err("graph change could not complete in its drained section".into()),
            };
            drop(guard);
            r
        })
    }

    fn clean(&self) {
        // A filter still in place (failure, cancel): the overlay reads `top` directly again,
        // in a drained section, which is awaited: on its own task.
        if self.filter.borrow().is_some()
            && let Some(me) = self.me.upgrade()
        {
            blockd_aio::spawn(async move {
                let Some(filter) = me.filter.borrow_mut().take() else {
                    return;
                };
                let Some(host) = me.host.upgrade() else {
                    return;
                };
                let top = me.layers[0].clone();
                let guard = drained_all(&[me.overlay.clone(), top.clone(), filter.clone()]).await;
                {
                    let mut g = host.graph().borrow_mut();
                    let _ = run_drained(g.replace_child(&me.overlay, "backing", &top));
                    let _ = run_drained(g.remove_filter(&filter));
                }
                drop(guard);
                host.graph_changed();
            })
            .detach();
        }
        let Some(host) = self.host.upgrade() else {
            return;
        };
        {
            let mut g = host.graph().borrow_mut();
            for b in self.backends.borrow_mut().drain(..) {
                b.detach(&g);
            }
            for n in &self.layers {
                if n.is_auto_named() && n.parent_count() == 0 && g.node(n.name()).is_some() {
                    let _ = g.remove(n.name());
                }
            }
        }
        host.graph_changed();
    }
}
