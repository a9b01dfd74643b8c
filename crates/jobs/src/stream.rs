//! `block-stream`: copy the data of the backing layers between the top and the base into the
//! top, then make the base the top's backing file (QEMU's block/stream.c, by its documented
//! behaviour).
//!
//! The worker runs in the top's context through the job's own BlockBackends: one on the top
//! (reads through the chain, writes into the top) and a read-only one on each intermediate
//! layer (to ask which ranges they hold). The top's backend shares everything except `write`:
//! a concurrent writer could otherwise be overwritten by the copy of the chunk it races with
//! (blockd-block has no request serialisation yet), so the permission system refuses writers
//! while the job runs.
//!
//! The graph change (prepare) happens in the main context inside a drained section, and the
//! top's qcow2 header is rewritten there to name the base (or no backing file), as QEMU does.

use std::cell::RefCell;
use std::rc::{Rc, Weak};
use std::sync::Arc;

use blockd_block::{BlockBackend, Node, Perm, drained_all};

use crate::control::{JobCtx, OnError};
use crate::host::{GraphHost, run_drained};
use crate::job::{JobDriver, LocalFuture, Worker};

pub struct StreamParams {
    pub top: Arc<Node>,
    /// The node that stays below the top (`None`: stream the whole chain).
    pub base: Option<Arc<Node>>,
    /// What the top's header names afterwards (`backing-file`, `backing-mask-protocol`).
    pub backing: crate::backing::BackingName,
    pub on_error: OnError,
}

pub struct StreamJob {
    host: Weak<dyn GraphHost>,
    top: Arc<Node>,
    base: Option<Arc<Node>>,
    intermediates: Vec<Arc<Node>>,
    backing: crate::backing::BackingName,
    backends: RefCell<Vec<BlockBackend>>,
}

/// The layers strictly between `top` and `base` (all of the chain when `base` is `None`);
/// an error when `base` is not in the chain.
pub fn intermediates(top: &Arc<Node>, base: Option<&Arc<Node>>) -> Result<Vec<Arc<Node>>, String> {
    let mut out = Vec::new();
    let mut cur = top.child("backing");
    loop {
        match (&cur, base) {
            (Some(n), Some(b)) if Arc::ptr_eq(n, b) => return Ok(out),
            (Some(n), _) => {
                out.push(n.clone());
                cur = n.child("backing");
            }
            (None, None) => return Ok(out),
            (None, Some(b)) => {
                return Err(format!(
                    "Node '{}' is not a backing image of '{}'",
                    b.name(),
                    top.name()
                ));
            }
        }
    }
}

/// Build the stream job: its backends (a graph change, so `host` is the main context's) and
/// its worker.
pub fn new_stream(
    host: &Rc<dyn GraphHost>,
    p: StreamParams,
) -> Result<(Rc<StreamJob>, Worker), String> {
    if p.backing.explicit.is_some() && p.base.is_none() {
        return Err("backing file specified, but streaming the entire chain".into());
    }
    let inter = intermediates(&p.top, p.base.as_ref())?;
    let (top_be, layer_bes) = {
        let g = host.graph().borrow();
        let top_be = g.new_backend(
            "",
            &p.top,
            Perm::CONSISTENT_READ | Perm::WRITE,
            Perm::ALL.minus(Perm::WRITE),
        )?;
        let mut layers = Vec::new();
        for n in &inter {
            match g.new_backend("", n, Perm::CONSISTENT_READ, Perm::ALL) {
                Ok(b) => layers.push(b),
                Err(e) => {
                    top_be.detach(&g);
                    for b in layers {
                        b.detach(&g);
                    }
                    return Err(e);
                }
            }
        }
        (top_be, layers)
    };
    let mut all = vec![top_be.clone()];
    all.extend(layer_bes.iter().cloned());
    let job = Rc::new(StreamJob {
        host: Rc::downgrade(host),
        top: p.top,
        base: p.base,
        intermediates: inter,
        backing: p.backing,
        backends: RefCell::new(all),
    });
    let on_error = p.on_error;
    let worker: Worker = Box::new(move |ctx: JobCtx| {
        Box::pin(async move {
            // Nothing between the top and the base: no work, no progress (as QEMU reports).
            if layer_bes.is_empty() {
                return Ok(());
            }
            crate::copy::copy_above(&ctx, &top_be, &top_be, true, &layer_bes, on_error).await
        })
    });
    Ok((job, worker))
}

impl JobDriver for StreamJob {
    fn job_type(&self) -> &'static str {
        "stream"
    }

    fn nodes(&self) -> Vec<Arc<Node>> {
        let mut v = vec![self.top.clone()];
        v.extend(self.intermediates.iter().cloned());
        v
    }

    fn prepare(&self) -> LocalFuture<'_, Result<(), String>> {
        Box::pin(async move {
            // A top without backing file has nothing to stream and no name to rewrite.
            if self.top.child("backing").is_none() {
                return Ok(());
            }
            let host = self
                .host
                .upgrade()
                .ok_or_else(|| "the block graph is gone".to_string())?;
            let mut nodes = vec![self.top.clone()];
            nodes.extend(self.intermediates.iter().cloned());
            nodes.extend(self.base.iter().cloned());
            let guard = drained_all(&nodes).await;
            let r = if self.intermediates.is_empty() {
                Some(Ok(()))
            } else {
                let mut g = host.graph().borrow_mut();
                match &self.base {
                    Some(b) => run_drained(g.replace_child(&self.top, "backing", b)),
                    None => run_drained(g.remove_child(&self.top, "backing")),
                }
            };
            let r = match r {
                Some(Ok(())) => self.backing.write(&self.top, self.base.as_ref()).await,
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
            // Layers nobody uses any more, opened automatically as backing files, are closed.
            for n in &self.intermediates {
                if n.is_auto_named() && n.parent_count() == 0 && g.node(n.name()).is_some() {
                    let _ = g.remove(n.name());
                }
            }
        }
        host.graph_changed();
    }
}
