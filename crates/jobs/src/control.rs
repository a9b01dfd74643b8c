//! The link between a job's coordinator (main context) and its worker task (the node's
//! context, maybe an iothread): the requests the main context makes (pause, cancel, complete,
//! speed), the progress counters, and the messages the worker sends back. The shared state is a
//! mutex held for a few instructions, never across an await (DESIGN.md rule 4); each side waits
//! on an `Event` the other notifies.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use event_listener::Event;

use crate::ratelimit::{RateLimit, SLICE};

/// What a job does when its source or target fails (QEMU's BlockdevOnError).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnError {
    #[default]
    Report,
    Ignore,
    Stop,
    Enospc,
}

impl OnError {
    pub fn parse(s: &str) -> Result<OnError, String> {
        Ok(match s {
            "report" => OnError::Report,
            "ignore" => OnError::Ignore,
            "stop" => OnError::Stop,
            "enospc" => OnError::Enospc,
            _ => return Err(format!("Parameter 'on-error' does not accept value '{s}'")),
        })
    }
}

/// What the job does about one error (QEMU's BlockErrorAction).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorAction {
    Report,
    Ignore,
    Stop,
}

impl ErrorAction {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorAction::Report => "report",
            ErrorAction::Ignore => "ignore",
            ErrorAction::Stop => "stop",
        }
    }
}

/// Worker → main context.
#[derive(Debug)]
pub(crate) enum Msg {
    /// The worker stopped at a pause point.
    Paused,
    /// The worker left its pause point.
    Resumed,
    /// The job converged (READY).
    Ready,
    /// An I/O error and what was done about it.
    Error {
        read: bool,
        action: ErrorAction,
        nospace: bool,
    },
    /// The worker returned.
    Done(Result<(), String>),
}

#[derive(Default)]
struct State {
    pause_count: u32,
    cancelled: bool,
    force: bool,
    complete: bool,
    limit: RateLimit,
    speed: u64,
    /// The worker is waiting at a pause point.
    paused: bool,
    /// The worker is running (not sleeping, not paused): QEMU's `busy`.
    busy: bool,
}

pub(crate) struct Control {
    state: Mutex<State>,
    /// Wakes the worker (pause ended, cancel, complete, speed change).
    wake: Event,
    inbox: Mutex<VecDeque<Msg>>,
    inbox_event: Event,
    current: AtomicU64,
    total: AtomicU64,
}

impl Control {
    pub(crate) fn new(speed: u64) -> Arc<Control> {
        let c = Control {
            state: Mutex::new(State {
                pause_count: 1,
                ..State::default()
            }),
            wake: Event::new(),
            inbox: Mutex::new(VecDeque::new()),
            inbox_event: Event::new(),
            current: AtomicU64::new(0),
            total: AtomicU64::new(0),
        };
        c.lock().limit.set_speed(speed, SLICE);
        c.lock().speed = speed;
        Arc::new(c)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn kick(&self) {
        self.wake.notify(usize::MAX);
    }

    // ---- main-context side ----

    pub(crate) fn pause(&self) {
        self.lock().pause_count += 1;
        self.kick();
    }

    pub(crate) fn resume(&self) {
        {
            let mut s = self.lock();
            s.pause_count = s.pause_count.saturating_sub(1);
        }
        self.kick();
    }

    pub(crate) fn cancel(&self, force: bool) {
        {
            let mut s = self.lock();
            s.cancelled = true;
            s.force |= force;
        }
        self.kick();
    }

    pub(crate) fn request_complete(&self) {
        self.lock().complete = true;
        self.kick();
    }

    pub(crate) fn set_speed(&self, speed: u64) {
        {
            let mut s = self.lock();
            s.speed = speed;
            s.limit.set_speed(speed, SLICE);
        }
        self.kick();
    }

    pub(crate) fn speed(&self) -> u64 {
        self.lock().speed
    }

    pub(crate) fn busy(&self) -> bool {
        self.lock().busy
    }

    pub(crate) fn worker_paused(&self) -> bool {
        self.lock().paused
    }

    pub(crate) fn is_cancelled(&self) -> bool {
        let s = self.lock();
        s.cancelled && s.force
    }

    pub(crate) fn cancel_requested(&self) -> bool {
        self.lock().cancelled
    }

    pub(crate) fn progress(&self) -> (u64, u64) {
        (
            self.current.load(Ordering::Relaxed),
            self.total.load(Ordering::Relaxed),
        )
    }

    /// The next messages from the worker (waits for at least one).
    pub(crate) async fn recv(&self) -> Vec<Msg> {
        loop {
            let l = self.inbox_event.listen();
            {
                let mut q = self.inbox.lock().unwrap_or_else(|e| e.into_inner());
                if !q.is_empty() {
                    return q.drain(..).collect();
                }
            }
            l.await;
        }
    }

    // ---- worker side ----

    pub(crate) fn send(&self, m: Msg) {
        self.inbox
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(m);
        self.inbox_event.notify(usize::MAX);
    }

    pub(crate) fn set_busy(&self, b: bool) {
        self.lock().busy = b;
    }
}

/// What a job's worker task gets: pause points, cancellation, rate limiting, progress and
/// error policy. `Send`, so the worker may run in the node's iothread.
#[derive(Clone)]
pub struct JobCtx {
    pub(crate) ctl: Arc<Control>,
}

impl JobCtx {
    /// A pause point: a paused job stops here until it is resumed (or cancelled).
    pub async fn pause_point(&self) {
        let mut was_paused = false;
        loop {
            let l = {
                let mut s = self.ctl.lock();
                if s.pause_count == 0 || (s.cancelled && s.force) {
                    if was_paused {
                        s.paused = false;
                        s.busy = true;
                        drop(s);
                        self.ctl.send(Msg::Resumed);
                    }
                    return;
                }
                if !was_paused {
                    was_paused = true;
                    s.paused = true;
                    s.busy = false;
                    drop(s);
                    self.ctl.send(Msg::Paused);
                    continue;
                }
                self.ctl.wake.listen()
            };
            l.await;
        }
    }

    /// The job was cancelled (forcefully: its work should stop now).
    pub fn is_cancelled(&self) -> bool {
        self.ctl.is_cancelled()
    }

    /// Some cancel was requested (also the soft one of a READY mirror).
    pub fn cancel_requested(&self) -> bool {
        self.ctl.cancel_requested()
    }

    /// `job-complete` was accepted.
    pub fn complete_requested(&self) -> bool {
        self.ctl.lock().complete
    }

    /// Sleep for `d` unless woken by a pause, cancel, complete or speed change; then a pause
    /// point (QEMU's `job_sleep_ns`).
    pub async fn sleep(&self, d: Duration) {
        if !self.is_cancelled() && !d.is_zero() {
            let l = self.ctl.wake.listen();
            let wake_now = {
                let s = self.ctl.lock();
                s.pause_count > 0 || s.cancelled || s.complete
            };
            if !wake_now {
                self.ctl.set_busy(false);
                let _ = blockd_aio::timeout(d, l).await;
                self.ctl.set_busy(true);
            }
        }
        self.pause_point().await;
    }

    /// Wait until a complete or cancel request comes (a READY job's idle wait), with pause
    /// points.
    pub async fn wait_for_request(&self, poll: Duration) {
        loop {
            if self.complete_requested() || self.cancel_requested() {
                return;
            }
            self.sleep(poll).await;
        }
    }

    /// Account `n` bytes of work against `speed` and sleep as long as the limit asks (at
    /// least a pause point).
    pub async fn rate_limit(&self, n: u64) {
        let delay = self.ctl.lock().limit.delay(n, Instant::now());
        self.sleep(delay).await;
    }

    pub fn set_total(&self, n: u64) {
        self.ctl.total.store(n, Ordering::Relaxed);
    }

    pub fn add_total(&self, n: u64) {
        self.ctl.total.fetch_add(n, Ordering::Relaxed);
    }

    pub fn add_progress(&self, n: u64) {
        self.ctl.current.fetch_add(n, Ordering::Relaxed);
    }

    /// The job converged: it goes READY (once).
    pub fn set_ready(&self) {
        self.ctl.send(Msg::Ready);
    }

    /// Decide what to do about an I/O error by the job's policy (QEMU's
    /// `block_job_error_action`), report it, and with `stop` pause the job (it retries the
    /// failed step once resumed).
    pub fn error_action(&self, policy: OnError, read: bool, err: &io::Error) -> ErrorAction {
        let nospace = err.raw_os_error() == Some(libc::ENOSPC);
        let action = match policy {
            OnError::Report => ErrorAction::Report,
            OnError::Ignore => ErrorAction::Ignore,
            OnError::Stop => ErrorAction::Stop,
            OnError::Enospc if nospace => ErrorAction::Stop,
            OnError::Enospc => ErrorAction::Report,
        };
        if action == ErrorAction::Stop {
            // Paused before the message goes out: the next pause point stops.
            self.ctl.lock().pause_count += 1;
        }
        self.ctl.send(Msg::Error {
            read,
            action,
            nospace,
        });
        action
    }
}
