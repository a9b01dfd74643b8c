//! Reaching a context from other threads.
//!
//! A [`ContextHandle`] is `Send + Sync + Clone`. It can spawn a task on its context, run a
//! closure there and await the result (the lock-free replacement for QEMU's
//! `aio_wait_bh_oneshot`: the caller awaits, nothing polls a foreign loop), and schedule one-shot
//! bottom halves. Each of these pushes onto the context's lock-free remote queue and wakes the
//! context with a syscall only when it sleeps.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use crate::context::{Remote, Shared, current_id, with_core_rc};
use crate::oneshot::{self, Canceled};

#[derive(Clone)]
pub struct ContextHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ContextHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContextHandle")
            .field("name", &self.shared.name)
            .field("id", &self.shared.id)
            .finish()
    }
}

/// The result of work sent to another context. Resolves to `Err(Canceled)` if the context shut
/// down (or the task was cancelled) before producing it. Dropping it does not cancel the work.
#[must_use = "futures do nothing unless awaited"]
pub struct RemoteTask<T> {
    rx: oneshot::Receiver<T>,
}

impl<T> RemoteTask<T> {
    pub(crate) fn from_receiver(rx: oneshot::Receiver<T>) -> Self {
        RemoteTask { rx }
    }
}

impl<T> Future for RemoteTask<T> {
    type Output = Result<T, Canceled>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.rx).poll(cx)
    }
}

impl ContextHandle {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        ContextHandle { shared }
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    pub fn id(&self) -> usize {
        self.shared.id
    }

    /// Is the calling thread this context's thread?
    pub fn is_current(&self) -> bool {
        current_id() == self.shared.id
    }

    /// Run `f` on the context and deliver its result. From the context's own thread the closure
    /// still runs on the next turn (never re-entrantly).
    pub fn call<F, R>(&self, f: F) -> RemoteTask<R>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        self.schedule_oneshot(move || tx.send(f()));
        RemoteTask { rx }
    }

    /// Spawn a task on the context. `make` runs there and builds the future, which therefore
    /// need not be `Send`; only its output crosses back.
    pub fn spawn<F, Fut>(&self, make: F) -> RemoteTask<Fut::Output>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future + 'static,
        Fut::Output: Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        self.schedule_oneshot(move || {
            let fut = make();
            let spawned = with_core_rc(|c| {
                c.spawn(async move {
                    tx.send(fut.await);
                })
            });
            if let Some(task) = spawned {
                task.detach();
            }
        });
        RemoteTask { rx }
    }

    /// Run `f` once on the context's next turn (QEMU's `aio_bh_schedule_oneshot`). Returns
    /// `false` if the context has shut down (then `f` is dropped unrun).
    pub fn schedule_oneshot(&self, f: impl FnOnce() + Send + 'static) -> bool {
        self.shared.send(Remote::Call(Box::new(f))).is_ok()
    }

    /// Ask the context's `run_until_stopped` loop to return.
    pub fn request_stop(&self) {
        self.shared.stop_requested.store(true, Ordering::Release);
        self.shared.notify();
    }
}
