//! A pool of threads for calls io_uring cannot make asynchronously (open, fstat of odd files,
//! ioctls, `aio=threads`). The result comes back through a oneshot whose waker belongs to the
//! submitting task, so the task resumes on its own context.
//!
//! Workers are started on demand up to a limit (QEMU's thread pool default is 64) and exit after
//! being idle for a while. The queue mutex is held only to push or pop a job.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::Duration;

use crate::handle::RemoteTask;
use crate::oneshot;

const MAX_WORKERS: usize = 64;
const IDLE_EXIT: Duration = Duration::from_secs(10);

type Job = Box<dyn FnOnce() + Send>;

struct Pool {
    state: Mutex<PoolState>,
    cv: Condvar,
}

struct PoolState {
    jobs: VecDeque<Job>,
    workers: usize,
    idle: usize,
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| Pool {
        state: Mutex::new(PoolState {
            jobs: VecDeque::new(),
            workers: 0,
            idle: 0,
        }),
        cv: Condvar::new(),
    })
}

/// Run `f` on a pool thread; await the result on the calling context. A panic in `f` resolves
/// the future to `Err(Canceled)`.
pub fn spawn_blocking<F, R>(f: F) -> RemoteTask<R>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    let (tx, rx) = oneshot::channel();
    let job: Job = Box::new(move || {
        if let Ok(v) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
            tx.send(v);
        }
    });
    let p = pool();
    let start_worker = {
        let mut s = p.state.lock().unwrap_or_else(|e| e.into_inner());
        s.jobs.push_back(job);
        if s.idle == 0 && s.workers < MAX_WORKERS {
            s.workers += 1;
            true
        } else {
            false
        }
    };
    if start_worker {
        let spawned = std::thread::Builder::new()
            .name("blockd-worker".into())
            .spawn(worker);
        if spawned.is_err() {
            p.state.lock().unwrap_or_else(|e| e.into_inner()).workers -= 1;
        }
    }
    p.cv.notify_one();
    RemoteTask::from_receiver(rx)
}

fn worker() {
    let p = pool();
    let mut s = p.state.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        if let Some(job) = s.jobs.pop_front() {
            drop(s);
            job();
            s = p.state.lock().unwrap_or_else(|e| e.into_inner());
            continue;
        }
        s.idle += 1;
        let (guard, timeout) =
            p.cv.wait_timeout(s, IDLE_EXIT)
                .unwrap_or_else(|e| e.into_inner());
        s = guard;
        s.idle -= 1;
        if timeout.timed_out() && s.jobs.is_empty() {
            s.workers -= 1;
            return;
        }
    }
}
