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

use blockd_block::{BlockBackend, Node, Perm, drained_all};

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
}

pub struct CommitJob {
    host: Weak<dyn GraphHost>,
    overlay: Arc<Node>,
    /// `top` and the layers below it, down to (not including) `base`.
    layers: Vec<Arc<Node>>,
    base: Arc<Node>,
    backing: crate::backing::BackingName,
    backends: RefCell<Vec<BlockBackend>>,
}

pub fn new_commit(
    host: &Rc<dyn GraphHost>,
    p: CommitParams,
) -> Result<(Rc<CommitJob>, Worker), String> {
    let mut layers = vec![p.top.clone()];
    layers.extend(crate::stream::intermediates(&p.top, Some(&p.base))?);
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
        let g = host.graph().borrow();
        for b in made {
            b.detach(&g);
        }
        return Err(e);
    }
    let base_be = made[0].clone();
    let layer_bes: Vec<BlockBackend> = made[1..].to_vec();
    let job = Rc::new(CommitJob {
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
            let mut nodes = vec![self.overlay.clone(), self.base.clone()];
            nodes.extend(self.layers.iter().cloned());
            let guard = drained_all(&nodes).await;
            let r = {
                let mut g = host.graph().borrow_mut();
                run_drained(g.replace_child(&self.overlay, "backing", &self.base))
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
