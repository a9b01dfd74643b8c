//! blockd's event loop layer (DESIGN.md, `aio`).
//!
//! * [`AioContext`]: a single-threaded executor per thread: tasks (`async-task`), bottom halves,
//!   timers, fd readiness and an io_uring ring; Linux AIO on demand. `context.rs` has the loop.
//! * [`ContextHandle`]: the only way in from other threads (spawn, call-and-await, one-shot BH).
//! * [`IoThread`]: a named thread running one context, with QEMU's adaptive polling knobs.
//! * [`ops`]: ring operations as futures; [`linux_aio`]: the `aio=native` engine;
//!   [`blocking`]: the thread pool for calls the ring cannot make.
//! * [`IoBuf`]: aligned buffers owned by the ring while the kernel uses them, pooled per thread.
//! * [`block_on`]: for the top of programs and tests only; it refuses to nest.
//!
//! The request path on a context: task → `ops::*` creates an [`Op`] (SQE queued in `ring.rs`) →
//! the loop submits every queued SQE in one `io_uring_enter` → completion reaped in user space by
//! the same thread → the task's waker pushes it on the local run queue → it resumes.

pub mod bh;
pub mod blocking;
pub mod buf;
mod context;
pub mod handle;
pub mod iothread;
pub mod linux_aio;
pub mod oneshot;
mod op;
pub mod ops;
pub mod poll;
mod ring;
pub mod timer;
pub mod wake;

pub use bh::BottomHalf;
pub use buf::IoBuf;
pub use context::{AioContext, ContextStats, NestedLoopError, Task, block_on, spawn, yield_now};
pub use handle::{ContextHandle, RemoteTask};
pub use iothread::IoThread;
pub use op::{Op, OpId};
pub use poll::PollParams;
pub use timer::{Elapsed, sleep, sleep_until, timeout};
