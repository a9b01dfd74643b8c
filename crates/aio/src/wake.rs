//! The sleep/wake handshake between an event loop and the threads that wake it.
//!
//! A context's thread is in one of three states, kept in one atomic byte:
//!
//! * `RUNNING`: the loop is busy (or busy-polling). A waker only queues its work and flips the
//!   state to `NOTIFIED`: no syscall.
//! * `SLEEPING`: the loop is blocked in `io_uring_enter`. A waker that finds this state writes
//!   the context's eventfd, which completes a read the ring keeps armed, and the loop wakes.
//! * `NOTIFIED`: someone queued work since the loop last looked. The loop refuses to go to sleep.
//!
//! The loop's side: [`Handshake::begin_drain`] before it looks at its remote queue (clearing any
//! notification it is about to consume), [`Handshake::prepare_sleep`] just before it blocks (which
//! fails if a notification arrived in between), and [`Handshake::end_sleep`] when it wakes.
//! The waker's side: queue the work, then [`Handshake::notify`], and write the eventfd only when
//! that returns `true`. A wake is never lost: either the waker's swap happens before the loop's
//! compare-exchange (which then fails), or after it (and the waker sees `SLEEPING`).
//!
//! The protocol is generic over the atomic so that `tests/loom_wake.rs` can model-check it with
//! loom's atomics; the executor uses [`std::sync::atomic::AtomicU8`].

use std::sync::atomic::{AtomicU8, Ordering};

pub const RUNNING: u8 = 0;
pub const SLEEPING: u8 = 1;
pub const NOTIFIED: u8 = 2;

/// The few atomic operations the handshake needs, so it can run on std's or loom's atomics.
pub trait StateCell {
    fn new(v: u8) -> Self;
    fn load(&self, o: Ordering) -> u8;
    fn swap(&self, v: u8, o: Ordering) -> u8;
    fn compare_exchange(&self, cur: u8, new: u8, s: Ordering, f: Ordering) -> Result<u8, u8>;
}

impl StateCell for AtomicU8 {
    fn new(v: u8) -> Self {
        AtomicU8::new(v)
    }
    fn load(&self, o: Ordering) -> u8 {
        AtomicU8::load(self, o)
    }
    fn swap(&self, v: u8, o: Ordering) -> u8 {
        AtomicU8::swap(self, v, o)
    }
    fn compare_exchange(&self, cur: u8, new: u8, s: Ordering, f: Ordering) -> Result<u8, u8> {
        AtomicU8::compare_exchange(self, cur, new, s, f)
    }
}

#[derive(Debug)]
pub struct Handshake<S: StateCell = AtomicU8> {
    state: S,
}

impl<S: StateCell> Default for Handshake<S> {
    fn default() -> Self {
        Self::new()
    }
}

impl<S: StateCell> Handshake<S> {
    pub fn new() -> Self {
        Handshake {
            state: S::new(RUNNING),
        }
    }

    /// Waker side, after queueing work. Returns `true` when the loop sleeps and must be kicked
    /// with a syscall (the eventfd write).
    #[inline]
    pub fn notify(&self) -> bool {
        // Cheap exit while the loop already knows: no write to a shared cache line.
        if self.state.load(Ordering::Acquire) == NOTIFIED {
            return false;
        }
        self.state.swap(NOTIFIED, Ordering::AcqRel) == SLEEPING
    }

    /// Loop side, before draining the remote queue: consume any pending notification.
    #[inline]
    pub fn begin_drain(&self) {
        if self.state.load(Ordering::Acquire) != RUNNING {
            self.state.swap(RUNNING, Ordering::AcqRel);
        }
    }

    /// Loop side, just before blocking. `false` means work arrived since the last drain: do not
    /// sleep, drain again.
    #[inline]
    pub fn prepare_sleep(&self) -> bool {
        match self
            .state
            .compare_exchange(RUNNING, SLEEPING, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => true,
            Err(_) => {
                // NOTIFIED: leave it set; begin_drain clears it before the queue is read.
                false
            }
        }
    }

    /// Loop side, after the blocking call returned (for whatever reason).
    #[inline]
    pub fn end_sleep(&self) {
        // Keep NOTIFIED if a waker set it: the next begin_drain consumes it.
        let _ = self
            .state
            .compare_exchange(SLEEPING, RUNNING, Ordering::AcqRel, Ordering::Acquire);
    }

    pub fn state(&self) -> u8 {
        self.state.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_while_running_needs_no_syscall() {
        let h: Handshake = Handshake::new();
        assert!(!h.notify());
        assert_eq!(h.state(), NOTIFIED);
        // A notified loop refuses to sleep until it drained.
        assert!(!h.prepare_sleep());
        h.begin_drain();
        assert!(h.prepare_sleep());
        assert!(h.notify(), "a sleeping loop must be kicked");
        assert!(!h.notify(), "only the first waker kicks");
        h.end_sleep();
        assert_eq!(h.state(), NOTIFIED);
        h.begin_drain();
        assert_eq!(h.state(), RUNNING);
    }
}
