//! qemu-io as a monitor command: the `qemu-io NODE "COMMAND"` of QEMU's human monitor, run by
//! blockd-storage-daemon's `human-monitor-command`.
//!
//! The caller (on the main context) attaches a temporary [`BlockBackend`] to the node and hands
//! it here, on whichever context should do the I/O. One command runs, its aio requests are
//! waited for, and the text qemu-io would have printed comes back with the backend, which the
//! caller detaches on the main context. Everything is awaited: no nested event loop.
//!
//! Commands that open, close or reopen images, and `quit`, work on the program's own image in
//! qemu-io; a monitor command has none, so they are refused as QEMU's monitor refuses them.

use std::sync::Arc;

use blockd_block::{BlockBackend, Node};

use crate::command::{Command, parse_command};
use crate::exec::{Executor, Out};

/// Run one qemu-io command line on `backend` (attached to `node`). Returns the output and the
/// backend.
pub async fn run_command(
    backend: BlockBackend,
    node: Arc<Node>,
    line: &str,
) -> (String, Option<BlockBackend>) {
    let mut ex = Executor::with_backend(backend, node, Out::capturing());
    match parse_command(line, true) {
        Ok(Some(Command::Open(_) | Command::Close | Command::Quit)) => {
            let name = line.split_whitespace().next().unwrap_or_default();
            ex.out.err(&format!("command \"{name}\" not found\n"));
        }
        Ok(Some(Command::Reopen(_))) => {
            ex.out
                .err("reopen: not supported through the monitor yet (use blockdev-reopen)\n");
        }
        Ok(Some(Command::Abort | Command::Sigraise { .. })) => {
            // they would take the whole daemon down with the monitor's command
            let name = line.split_whitespace().next().unwrap_or_default();
            ex.out.err(&format!(
                "{name}: refused through the monitor (it would end the daemon)\n"
            ));
        }
        Ok(Some(Command::WaitBreak { .. })) => {
            // would wait forever with the monitor's command in flight
            ex.out
                .err("wait_break: no breakpoint can exist (no blkdebug)\n");
        }
        _ => {
            ex.run_line(line).await;
        }
    }
    ex.drain_aio().await;
    let out = ex.out.take_captured();
    (out, ex.take_backend())
}
