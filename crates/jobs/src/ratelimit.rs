//! `speed` limiting with QEMU's ratelimit semantics: time is cut into slices (100 ms for
//! block jobs); each slice may dispatch `speed * slice` bytes; work beyond the quota pushes the
//! end of the slice out in proportion to the excess, and the caller sleeps until then. A speed
//! of 0 means unlimited.

use std::time::{Duration, Instant};

/// The slice length block jobs use.
pub const SLICE: Duration = Duration::from_millis(100);

#[derive(Debug, Clone)]
pub struct RateLimit {
    slice: Duration,
    /// Bytes allowed per slice; 0 = unlimited.
    quota: u64,
    start: Option<Instant>,
    end: Option<Instant>,
    dispatched: u64,
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit::new()
    }
}

impl RateLimit {
    pub fn new() -> RateLimit {
        RateLimit {
            slice: SLICE,
            quota: 0,
            start: None,
            end: None,
            dispatched: 0,
        }
    }

    /// Set the speed in bytes per second (0: unlimited).
    pub fn set_speed(&mut self, speed: u64, slice: Duration) {
        self.slice = slice;
        let q = speed as u128 * slice.as_nanos() / 1_000_000_000;
        // A non-zero speed below one byte per slice still limits.
        self.quota = if speed == 0 { 0 } else { (q as u64).max(1) };
    }

    /// Account `n` bytes at `now`; how long the caller must wait before going on.
    pub fn delay(&mut self, n: u64, now: Instant) -> Duration {
        if self.quota == 0 {
            return Duration::ZERO;
        }
        if self.end.is_none_or(|e| e < now) {
            // The previous (maybe stretched) slice is over: start a fresh one.
            self.start = Some(now);
            self.end = Some(now + self.slice);
            self.dispatched = 0;
        }
        self.dispatched = self.dispatched.saturating_add(n);
        if self.dispatched < self.quota {
            return Duration::ZERO;
        }
        let slices = self.dispatched as f64 / self.quota as f64;
        let start = self.start.unwrap_or(now);
        let end = start + self.slice.mul_f64(slices);
        self.end = Some(end);
        end.saturating_duration_since(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_never_waits() {
        let mut r = RateLimit::new();
        assert_eq!(r.delay(1 << 40, Instant::now()), Duration::ZERO);
    }

    #[test]
    fn quota_and_stretch() {
        let mut r = RateLimit::new();
        // 10 MB/s: 1 MB per 100 ms slice
        r.set_speed(10_000_000, SLICE);
        let t0 = Instant::now();
        assert_eq!(r.delay(500_000, t0), Duration::ZERO);
        // reaching the quota ends the slice: wait for the rest of it
        let d = r.delay(500_000, t0 + Duration::from_millis(10));
        assert_eq!(d, Duration::from_millis(90));
        // 3 MB more in the same (stretched) slice: 4 slices from the start
        let d = r.delay(3_000_000, t0 + Duration::from_millis(20));
        assert_eq!(d, Duration::from_millis(380));
        // after the stretched slice, a new slice starts
        let t1 = t0 + Duration::from_millis(401);
        assert_eq!(r.delay(100, t1), Duration::ZERO);
    }

    #[test]
    fn average_rate_is_the_speed() {
        let mut r = RateLimit::new();
        r.set_speed(1_000_000, SLICE);
        let mut now = Instant::now();
        let start = now;
        for _ in 0..100 {
            now += r.delay(64 * 1024, now);
        }
        let secs = (now - start).as_secs_f64();
        let rate = 100.0 * 65536.0 / secs;
        assert!((rate - 1_000_000.0).abs() < 50_000.0, "rate {rate}");
    }
}
