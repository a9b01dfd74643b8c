//! NBD for blockd (DESIGN.md, `nbd`): the protocol of the NBD project's `doc/proto.md`.
//!
//! * [`proto`]: wire formats with checked parsing (every length bounded before allocation).
//! * [`server`]: [`NbdServer`] (listeners, handshake, max-connections, handshake timeout) and
//!   its exports, each served from the context (main or iothread) it was created with.
//! * [`client`]: the `nbd` block driver (a connection owned by one context per thread).
//! * [`qmp`]: QMP glue (`nbd-server-start`, `block-export-add`, ...) and the daemon's
//!   `--nbd-server`/`--export type=nbd` parsers.

pub mod client;
pub mod proto;
pub mod qmp;
pub mod server;
mod sock;

pub use server::{Export, ExportConfig, NbdServer, RemoveMode, ServerConfig};
