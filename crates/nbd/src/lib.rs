//! NBD for blockd (DESIGN.md, `nbd`): the protocol of the NBD project's `doc/proto.md`.
//!
//! * [`proto`]: wire formats with checked parsing (every length bounded before allocation).
//! * [`server`]: [`NbdServer`] (listeners, handshake, max-connections, handshake timeout) and
//!   its exports, each served from the context (main or iothread) it was created with.
//! * [`client`]: the `nbd` block driver (a connection owned by one context per thread).
//! * [`qmp`]: QMP glue (`nbd-server-start`, `block-export-add`, ...) and the daemon's
//!   `--nbd-server`/`--export type=nbd` parsers.

//!
//! Wiring into the daemon (main context): `qmp::NbdState::new()` once; the QMP handlers call
//! `qmp::nbd_server_start`, `nbd_server_stop`, `block_export_add` (with a lookup from iothread
//! id to its `ContextHandle`), `block_export_del`, `query_block_exports`, `nbd_server_add`,
//! `nbd_server_remove`; `--nbd-server`/`--export type=nbd` go through
//! `qmp::parse_nbd_server_option`/`parse_export_option` into the same functions. Register a
//! callback with `NbdState::on_export_deleted`; when it fires, call `reap_deleted(&graph)` and
//! emit `BLOCK_EXPORT_DELETED {"id": ..}` for each id it returns.

pub mod client;
pub mod proto;
pub mod qmp;
pub mod server;
mod sock;

pub use server::{DetectZeroes, Export, ExportConfig, NbdServer, RemoveMode, ServerConfig};
