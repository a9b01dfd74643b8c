//! Adaptive polling: busy-poll before sleeping, with a window that grows and shrinks the way
//! QEMU's `poll-max-ns`, `poll-grow` and `poll-shrink` iothread properties describe.
//!
//! After each wait the loop reports how long it waited for an event (`block_ns`):
//! * the event came within the polling window: keep the window;
//! * it came later than `poll-max-ns`: polling would not have helped, shrink (divide by
//!   `poll-shrink`, or drop to zero when `poll-shrink` is 0);
//! * otherwise a longer window would have caught it: grow (multiply by `poll-grow`, 2 when 0;
//!   the first step is 4 µs), capped at `poll-max-ns`.
//!
//! Only waits with storage I/O in flight are polled and reported: a context whose ring holds
//! nothing but waits for peers (socket receives, accepts, timeouts) sleeps at once, as QEMU's
//! loop stops polling while it watches an fd without a poll handler.

/// QEMU's default `poll-max-ns` for iothreads.
pub const DEFAULT_IOTHREAD_POLL_MAX_NS: u64 = 32768;
/// Where a window that was zero starts when it first grows.
const POLL_START_NS: u64 = 4000;

/// The adaptive polling knobs of an iothread (QEMU's property names and meanings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PollParams {
    /// Longest busy-poll window in nanoseconds; 0 disables polling.
    pub max_ns: u64,
    /// Factor the window grows by; 0 selects the default (2).
    pub grow: u64,
    /// Divisor the window shrinks by; 0 resets the window to zero.
    pub shrink: u64,
}

impl PollParams {
    pub const fn disabled() -> PollParams {
        PollParams {
            max_ns: 0,
            grow: 0,
            shrink: 0,
        }
    }

    /// The defaults of a QEMU iothread.
    pub const fn iothread_default() -> PollParams {
        PollParams {
            max_ns: DEFAULT_IOTHREAD_POLL_MAX_NS,
            grow: 0,
            shrink: 0,
        }
    }
}

impl Default for PollParams {
    fn default() -> Self {
        Self::iothread_default()
    }
}

#[derive(Debug)]
pub(crate) struct AdaptivePoll {
    params: PollParams,
    ns: u64,
}

impl AdaptivePoll {
    pub(crate) fn new(params: PollParams) -> Self {
        AdaptivePoll { params, ns: 0 }
    }

    pub(crate) fn params(&self) -> PollParams {
        self.params
    }

    pub(crate) fn set_params(&mut self, p: PollParams) {
        self.params = p;
        self.ns = self.ns.min(p.max_ns);
    }

    pub(crate) fn current_ns(&self) -> u64 {
        self.ns
    }

    pub(crate) fn record_wait(&mut self, block_ns: u64) {
        let max = self.params.max_ns;
        if max == 0 {
            self.ns = 0;
        } else if block_ns <= self.ns {
            // Caught by polling: the window is right.
        } else if block_ns > max {
            self.ns = match self.params.shrink {
                0 => 0,
                s => self.ns / s,
            };
        } else if self.ns < max {
            let grow = if self.params.grow == 0 {
                2
            } else {
                self.params.grow
            };
            self.ns = if self.ns == 0 {
                POLL_START_NS
            } else {
                self.ns.saturating_mul(grow)
            }
            .min(max);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_from_start_to_max_and_shrinks() {
        let mut p = AdaptivePoll::new(PollParams::iothread_default());
        p.record_wait(10_000);
        assert_eq!(p.current_ns(), 4000);
        p.record_wait(10_000);
        assert_eq!(p.current_ns(), 8000);
        p.record_wait(10_000);
        assert_eq!(p.current_ns(), 16000);
        p.record_wait(10_000);
        assert_eq!(p.current_ns(), 16000, "caught within the window: unchanged");
        p.record_wait(20_000);
        assert_eq!(p.current_ns(), 32000);
        p.record_wait(30_000);
        assert_eq!(p.current_ns(), 32000);
        p.record_wait(32_000);
        assert_eq!(p.current_ns(), 32000);
        p.record_wait(32_500);
        assert_eq!(p.current_ns(), 32768, "capped at poll-max-ns");
        p.record_wait(1_000_000);
        assert_eq!(p.current_ns(), 0, "poll-shrink=0 resets");
    }

    #[test]
    fn custom_grow_and_shrink() {
        let mut p = AdaptivePoll::new(PollParams {
            max_ns: 100_000,
            grow: 4,
            shrink: 2,
        });
        p.record_wait(50_000);
        p.record_wait(50_000);
        assert_eq!(p.current_ns(), 16000);
        p.record_wait(200_000);
        assert_eq!(p.current_ns(), 8000);
        p.set_params(PollParams::disabled());
        assert_eq!(p.current_ns(), 0);
        p.record_wait(10);
        assert_eq!(p.current_ns(), 0);
    }
}
