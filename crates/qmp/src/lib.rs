//! blockd's QMP monitor (DESIGN.md, `qmp`): the QEMU Machine Protocol as qemu-storage-daemon
//! speaks it.
//!
//! * input: [`lexer`] (bytes → tokens, with QEMU's error recovery), [`streamer`] (tokens →
//!   top-level values, with QEMU's nesting, size and count limits), [`parser`] (tokens →
//!   `serde_json::Value`, QEMU's error texts);
//! * output: [`writer`] (QEMU's JSON layout, ASCII only, CRLF);
//! * [`schema`]: argument types checked before a handler runs, and `query-qmp-schema`;
//! * [`server`]: the command table, monitors (greeting, capability negotiation, command mode,
//!   ids echoed verbatim, replies in request order), async handlers on the main context;
//! * [`events`]: timestamps, QEMU's per-source rate limit, a `Send` sink for other threads.
#![forbid(unsafe_code)]

pub mod error;
pub mod events;
pub mod lexer;
pub mod parser;
pub mod schema;
pub mod server;
pub mod streamer;
pub mod writer;

pub use error::{ErrorClass, QmpError};
pub use events::{BlockIoError, EventSink, ImageCorrupted};
pub use schema::{Member, ObjectDef, Type, member, optional};
pub use server::{HandlerFuture, Server};
