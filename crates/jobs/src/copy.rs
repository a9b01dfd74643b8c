//! The copy loop stream and commit share.

use blockd_aio::IoBuf;
use blockd_block::{BlockBackend, ReqFlags, strerror};

use crate::control::{ErrorAction, JobCtx, OnError};

/// QEMU copies in chunks of this size (stream and commit).
pub const CHUNK: u64 = 512 * 1024;

/// Is `[off, off+n)` held by one of the layers? Returns the answer and the length of the
/// prefix it holds for (QEMU's `bdrv_is_allocated_above`).
pub(crate) async fn allocated_in_layers(
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

/// How a chunk gets from the chain into the destination.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Stream: `src` and `dst` are the top; each chunk is a copy-on-read of the top (a
    /// serialising request, so the top's users may write meanwhile), and ranges the top
    /// already holds are left alone (its own data wins).
    CopyOnRead,
    /// Commit: read through `src`, write into `dst` (which nobody else writes).
    ReadWrite,
}

/// Copy what `layers` hold (QEMU's `is_allocated_above` of the chain segment) from `src` (which
/// reads through the whole chain) to `dst`, chunk by chunk, with pause points, rate limiting,
/// progress and the error policy.
pub(crate) async fn copy_above(
    ctx: &JobCtx,
    src: &BlockBackend,
    dst: &BlockBackend,
    mode: Mode,
    layers: &[BlockBackend],
    on_error: OnError,
) -> Result<(), String> {
    let skip_dst_allocated = mode == Mode::CopyOnRead;
    let len = src.length();
    ctx.set_total(len);
    let mut first_error: Option<String> = None;
    let mut off = 0;
    while off < len {
        if ctx.is_cancelled() {
            return Ok(());
        }
        let want = CHUNK.min(len - off);
        // What the destination holds may stay; of the rest, only what the layers hold is copied.
        let step = async {
            let mut n = want;
            if skip_dst_allocated {
                let st = dst.block_status(off, want).await?;
                if st.allocated {
                    return Ok::<(u64, bool), std::io::Error>((st.len.min(want), false));
                }
                n = st.len.min(want);
            }
            let (copy, n) = allocated_in_layers(layers, off, n).await?;
            Ok((n, copy))
        };
        let (n, copy) = match step.await {
            Ok(v) => v,
            Err(e) => match handle_error(ctx, on_error, true, &e, &mut first_error).await {
                ErrorAction::Stop => continue,
                ErrorAction::Ignore => (want, false),
                ErrorAction::Report => break,
            },
        };
        if copy && mode == Mode::CopyOnRead {
            // A read error and a write error are not told apart here; QEMU's stream reports
            // copy-on-read failures as read errors too.
            if let Err(e) = dst.copy_on_read(off, n).await {
                match handle_error(ctx, on_error, true, &e, &mut first_error).await {
                    ErrorAction::Stop => continue,
                    ErrorAction::Ignore => {}
                    ErrorAction::Report => break,
                }
            }
        } else if copy {
            let (r, buf) = src.read(off, IoBuf::new(n as usize, 4096)).await;
            let r = match r {
                Ok(()) => dst
                    .write(off, buf, ReqFlags::NONE)
                    .await
                    .0
                    .map_err(|e| (false, e)),
                Err(e) => Err((true, e)),
            };
            if let Err((read, e)) = r {
                match handle_error(ctx, on_error, read, &e, &mut first_error).await {
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
