//! The I/O-independent half of a qemu-io clone.
//!
//! This crate turns one qemu-io command line into a typed [`Command`] (or the
//! exact diagnostic qemu-io 10.0.2 prints for it), and formats everything qemu-io
//! prints that does not depend on the block layer: summary/statistics lines, the
//! `-v` hexdump, pattern-verification messages, `map`/`alloc`/`length`/`info`
//! lines and the `help` texts.
//!
//! [`exec`] runs the commands on blockd's block layer; `src/bin/blockd-io.rs` is the
//! executable (qemu-io's command line and interactive mode).
//!
//! Behaviour follows `docs/reference/qemu-io-behaviour.md` (black-box
//! observations of the real tool); no QEMU source was consulted.
#![deny(unsafe_code)]

pub mod command;
#[allow(unsafe_code)] // raise(3) for `sigraise`, poll(2) on stdin
pub mod exec;
pub mod format;
pub mod getopt;
pub mod help;
pub mod monitor;
pub mod numbers;

pub use command::{Command, CommandError, Message, Stream, parse_command};
