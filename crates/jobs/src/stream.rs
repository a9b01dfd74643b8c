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
//! The graph change (prepare) happens in the main context inside a drained section. The qcow2
//! header's backing file name is not rewritten: blockd-qcow2 has no way yet to change the
//! backing file of an open image (the on-disk chain still names the old layers, which still
//! hold the same data, so the image reads the same).

use std::cell::RefCell;
use std::rc::{Rc, Weak};
use std::sync::Arc;

use blockd_aio::IoBuf;
use blockd_block::{BlockBackend, Node, Perm, ReqFlags, drained_all, strerror};

use crate::control::{ErrorAction, JobCtx, OnError};
use crate::host::{GraphHost, run_drained};
use crate::job::{JobDriver, LocalFuture, Worker};

/// QEMU streams in chunks of this size.
pub const CHUNK: u64 = 512 * 1024;

pub struct StreamParams {
    pub top: Arc<Node>,
    /// The node that stays below the top (`None`: stream the whole chain).
    pub base: Option<Arc<Node>>,
    pub backing_file: Option<String>,
    pub on_error: OnError,
}

pub struct StreamJob {
    host: Weak<dyn GraphHost>,
    top: Arc<Node>,
    base: Option<Arc<Node>>,
    intermediates: Vec<Arc<Node>>,
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
    if p.backing_file.is_some() && p.base.is_none() {
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
        backends: RefCell::new(all),
    });
    let on_error = p.on_error;
    let worker: Worker =
        Box::new(move |ctx: JobCtx| Box::pin(run(ctx, top_be, layer_bes, on_error)));
    Ok((job, worker))
}

/// Is `[off, off+n)` held by one of the layers? Returns the answer and the length of the
/// prefix it holds for (QEMU's `bdrv_is_allocated_above`).
async fn allocated_in_layers(
    layers: &[BlockBackend],
    off: u64,
    mut n: u64,
) -> std::io::Result<(bool, u64)> {
    for l in layers {
        let st = l.block_status(off, n).await?;
        if st.allocated {
            return Ok((true, st.len.min(n)));
        }
        n = st.len.min(n);
    }
    Ok((false, n))
}

async fn run(
    ctx: JobCtx,
    top: BlockBackend,
    layers: Vec<BlockBackend>,
    on_error: OnError,
) -> Result<(), String> {
    let len = top.length();
    ctx.set_total(len);
    let mut first_error: Option<String> = None;
    let mut off = 0;
    while off < len {
        if ctx.is_cancelled() {
            return Ok(());
        }
        let want = CHUNK.min(len - off);
        // What the top holds is already there; below it, only the layers above the base count.
        let step = async {
            let st = top.block_status(off, want).await?;
            if st.allocated {
                return Ok::<(u64, bool), std::io::Error>((st.len.min(want), false));
            }
            let (copy, n) = allocated_in_layers(&layers, off, st.len.min(want)).await?;
            Ok((n, copy))
        };
        let (n, copy) = match step.await {
            Ok(v) => v,
            Err(e) => match handle_error(&ctx, on_error, true, &e, &mut first_error).await {
                ErrorAction::Stop => continue,
                ErrorAction::Ignore => (want, false),
                ErrorAction::Report => break,
            },
        };
        if copy {
            let (r, buf) = top.read(off, IoBuf::new(n as usize, 4096)).await;
            let r = match r {
                Ok(()) => top
                    .write(off, buf, ReqFlags::NONE)
                    .await
                    .0
                    .map_err(|e| (false, e)),
                Err(e) => Err((true, e)),
            };
            if let Err((read, e)) = r {
                match handle_error(&ctx, on_error, read, &e, &mut first_error).await {
                    ErrorAction::Stop => continue,
                    ErrorAction::Ignore => {}
                    ErrorAction::Report => break,
                }
            }
        }
        off += n;
        ctx.add_progress(n);
        ctx.rate_limit(if copy { n } else { 0 }).await;
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// The error policy; an error that is not retried makes the job fail in the end even when
/// ignored, as QEMU's stream does.
async fn handle_error(
    ctx: &JobCtx,
    on_error: OnError,
    read: bool,
    e: &std::io::Error,
    first: &mut Option<String>,
) -> ErrorAction {
    let action = ctx.error_action(on_error, read, e);
    match action {
        ErrorAction::Stop => ctx.pause_point().await,
        _ => {
            first.get_or_insert_with(|| strerror(e));
        }
    }
    action
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
            if self.intermediates.is_empty() {
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
            let r = {
                let mut g = host.graph().borrow_mut();
                match &self.base {
                    Some(b) => run_drained(g.replace_child(&self.top, "backing", b)),
                    None => run_drained(g.remove_child(&self.top, "backing")),
                }
            };
            drop(guard);
            r.unwrap_or_else(|| {
                Err("graph change could not complete in its drained section".into())
            })?;
            Ok(())
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
