//! Block jobs (DESIGN.md, `jobs`): QEMU's job state machine and verbs (`status.rs`), the
//! coordinator on the main context with transactions and events (`job.rs`), the worker's side:
//! pause points, cancellation, rate limiting, progress and error policy (`control.rs`,
//! `ratelimit.rs`), and the job types (`stream.rs`).
#![forbid(unsafe_code)]

pub mod backing;
pub mod backup;
pub mod bitmap;
pub mod cbw;
pub mod commit;
pub mod control;
mod copy;
pub mod host;
pub mod job;
pub mod mirror;
pub mod ratelimit;
pub mod snapshot_access;
pub mod status;
pub mod stream;

pub use control::{ErrorAction, JobCtx, OnError};
pub use host::{GraphHost, run_drained};
pub use job::{Job, JobDriver, JobManager, JobSpec, LocalFuture, Txn, Worker};
pub use status::{JobStatus, Verb};
