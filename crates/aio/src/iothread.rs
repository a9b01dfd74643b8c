//! IoThreads: named threads each running one AioContext, created and destroyed at run time.

use std::io;
use std::sync::mpsc;
use std::thread::JoinHandle;

use crate::context::AioContext;
use crate::handle::ContextHandle;
use crate::poll::PollParams;

/// A running iothread. Dropping it stops and joins the thread.
pub struct IoThread {
    id: String,
    handle: ContextHandle,
    thread: Option<JoinHandle<()>>,
}

impl IoThread {
    /// Start an iothread named `id` with the given polling parameters.
    pub fn spawn(id: &str, poll: PollParams) -> io::Result<IoThread> {
        let (tx, rx) = mpsc::channel();
        let name = id.to_string();
        let thread = std::thread::Builder::new()
            .name(format!("iothread-{id}"))
            .spawn(move || {
                let ctx = match AioContext::new(&name) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                ctx.set_poll_params(poll);
                let _ = tx.send(Ok(ctx.handle()));
                // Cannot fail: nothing runs this context's loop yet.
                let _ = ctx.run_until_stopped();
                // Cancel whatever is left, wait for the kernel, detach from the thread.
                ctx.shutdown();
            })?;
        let handle = rx
            .recv()
            .map_err(|_| io::Error::other("iothread exited during start-up"))??;
        Ok(IoThread {
            id: id.to_string(),
            handle,
            thread: Some(thread),
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn handle(&self) -> &ContextHandle {
        &self.handle
    }

    /// The OS thread id (QEMU's `thread-id` in query-iothreads).
    pub async fn thread_id(&self) -> Option<i64> {
        // SAFETY: gettid has no preconditions.
        self.handle
            .call(|| unsafe { libc::gettid() } as i64)
            .await
            .ok()
    }

    /// Change the adaptive polling parameters at run time.
    pub async fn set_poll_params(&self, p: PollParams) -> bool {
        self.handle
            .call(move || {
                if let Some(c) = AioContext::current() {
                    c.set_poll_params(p)
                }
            })
            .await
            .is_ok()
    }

    pub async fn poll_params(&self) -> Option<PollParams> {
        self.handle
            .call(|| AioContext::current().map(|c| c.poll_params()))
            .await
            .ok()
            .flatten()
    }

    /// Stop the loop, cancel its remaining tasks and join the thread. Blocks the caller until
    /// the thread has exited: call it from the main program, not from a context's task (use
    /// [`IoThread::stop_async`] there).
    pub fn stop(mut self) {
        self.stop_and_join();
    }

    /// Stop from async code: the join happens on the blocking pool, so the caller's loop keeps
    /// running while the iothread winds down.
    pub async fn stop_async(mut self) {
        self.handle.request_stop();
        if let Some(t) = self.thread.take() {
            let _ = crate::blocking::spawn_blocking(move || t.join()).await;
        }
    }

    fn stop_and_join(&mut self) {
        self.handle.request_stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for IoThread {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}
