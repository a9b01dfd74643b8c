//! `block-stream`: copy the data of the backing layers between the top and the base into the
//! top, then make the base the top's backing file (QEMU's block/stream.c, by its documented
//! behaviour).
//!
//! The worker runs in the top's context through the job's own BlockBackends: one on the top
//! (copy-on-read into the top) and a read-only one on each intermediate layer (to ask which
//! ranges they hold). Each copy is a copy-on-read request of blockd-block
//! (`BlockBackend::copy_on_read`): a serialising request on the top, so users may keep writing
//! the top meanwhile; a range they wrote is never overwritten by the older backing data.
//!
//! With `filter-node-name`, a `copy-on-read` filter with `bottom` = the lowest streamed layer
//! is inserted above the top while the job runs (the top's users then read through it and
//! copy what they read, as in QEMU), and removed at the end.
//!
//! The graph change (prepare) happens in the main context inside a drained section, and the
//! top's qcow2 header is rewritten there to name the base (or no backing file), as QEMU does.

use std::cell::RefCell;
use std::rc::{Rc, Weak};
use std::sync::Arc;

use blockd_block::drivers::copy_on_read::CopyOnRead;
use blockd_block::{BlockBackend, Child, Node, Perm, drained_all};

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
    /// `filter-node-name`: insert a copy-on-read filter of this name above the top.
    pub filter_name: Option<String>,
}

pub struct StreamJob {
    me: Weak<StreamJob>,
    filter: RefCell<Option<Arc<Node>>>,
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

/// Build the stream job: its filter and backends (graph changes, so `host` is the main
/// context's) and its worker.
pub async fn new_stream(
    host: &Rc<dyn GraphHost>,
    p: StreamParams,
) -> Result<(Rc<StreamJob>, Worker), String> {
    if p.backing.explicit.is_some() && p.base.is_none() {
        return Err("backing file specified, but streaming the entire chain".into());
    }
    let inter = intermediates(&p.top, p.base.as_ref())?;
    let filter = match &p.filter_name {
        Some(name) => Some(insert_filter(host, name, &p.top, inter.last()).await?),
        None => None,
    };
    let remove_filter = |host: &Rc<dyn GraphHost>| {
        if let Some(f) = &filter {
            let mut g = host.graph().borrow_mut();
            let _ = run_drained(g.remove_filter(f));
        }
    };
    let (top_be, layer_bes) = {
        let g = host.graph().borrow();
        // Copies write unchanged data; the top's users keep writing (serialised).
        let top_be = match g.new_backend(
            "",
            &p.top,
            Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
            Perm::ALL,
        ) {
            Ok(b) => b,
            Err(e) => {
                drop(g);
                remove_filter(host);
                return Err(e);
            }
        };
        let mut layers = Vec::new();
        for n in &inter {
            match g.new_backend("", n, Perm::CONSISTENT_READ, Perm::ALL) {
                Ok(b) => layers.push(b),
                Err(e) => {
                    top_be.detach(&g);
                    for b in layers {
                        b.detach(&g);
                    }
                    drop(g);
                    remove_filter(host);
                    return Err(e);
                }
            }
        }
        (top_be, layers)
    };
    let mut all = vec![top_be.clone()];
    all.extend(layer_bes.iter().cloned());
    let job = Rc::new_cyclic(|me| StreamJob {
        me: me.clone(),
        filter: RefCell::new(filter),
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
            crate::copy::copy_above(
                &ctx,
                &top_be,
                &top_be,
                crate::copy::Mode::CopyOnRead,
                &layer_bes,
                on_error,
            )
            .await
        })
    });
    Ok((job, worker))
}

/// Insert a copy-on-read filter named `name` above `top` (its users move to it), copying what
/// the layers down to `bottom` hold (nothing when there is no layer to stream: `bottom` is
/// then the top itself, as QEMU's).
async fn insert_filter(
    host: &Rc<dyn GraphHost>,
    name: &str,
    top: &Arc<Node>,
    bottom: Option<&Arc<Node>>,
) -> Result<Arc<Node>, String> {
    let filter = {
        let mut g = host.graph().borrow_mut();
        g.add_node(
            name,
            Box::new(CopyOnRead::new(Some(bottom.unwrap_or(top).clone()))),
            vec![Child {
                name: "file".into(),
                node: top.clone(),
                perm: CopyOnRead::child_perm(top.is_read_only()),
                shared: Perm::ALL,
            }],
            top.length(),
        )?
    };
    let guard = drained_all(&[top.clone(), filter.clone()]).await;
    let r = {
        let mut g = host.graph().borrow_mut();
        run_drained(g.insert_filter_above(top, &filter))
    };
    drop(guard);
    if let Err(e) = r.unwrap_or_else(|| Err("could not insert the copy-on-read filter".into())) {
        let mut g = host.graph().borrow_mut();
        let _ = run_drained(g.remove_filter(&filter));
        return Err(e);
    }
    host.graph_changed();
    Ok(filter)
}

impl StreamJob {
    /// Remove the filter: its users use the top again (main context, drained).
    async fn remove_filter(&self) -> Result<(), String> {
        let Some(filter) = self.filter.borrow_mut().take() else {
            return Ok(());
        };
        let host = self.host.upgrade().ok_or("the block graph is gone")?;
        let guard = drained_all(&[filter.clone(), self.top.clone()]).await;
        let r = {
            let mut g = host.graph().borrow_mut();
            run_drained(g.remove_filter(&filter))
        };
        drop(guard);
        host.graph_changed();
        r.unwrap_or_else(|| Err("could not remove the copy-on-read filter".into()))
    }
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
            self.remove_filter().await?;
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
        // A filter still in place (the job failed, was cancelled or never started) goes in a
        // drained section, which is awaited: on its own task.
        if self.filter.borrow().is_some()
            && let Some(me) = self.me.upgrade()
        {
            blockd_aio::spawn(async move {
                if let Err(e) = me.remove_filter().await {
                    eprintln!("blockd-jobs: stream: {e}");
                }
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
