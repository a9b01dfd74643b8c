//! Timers: sleep and deadline futures on the context's clock, cancelled by dropping them.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use crate::context::with_core;

#[derive(Default)]
pub(crate) struct Timers {
    map: BTreeMap<(Instant, u64), Waker>,
    seq: u64,
}

impl Timers {
    fn insert(&mut self, at: Instant, w: Waker) -> (Instant, u64) {
        self.seq += 1;
        let key = (at, self.seq);
        self.map.insert(key, w);
        key
    }

    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.map.keys().next().map(|k| k.0)
    }

    /// Remove and return the wakers of every timer due at `now`, earliest first.
    pub(crate) fn take_due(&mut self, now: Instant) -> Vec<Waker> {
        let mut out = Vec::new();
        while let Some(entry) = self.map.first_entry() {
            if entry.key().0 > now {
                break;
            }
            out.push(entry.remove());
        }
        out
    }

    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }
}

/// Completes at its deadline. Dropping it cancels the timer.
#[must_use = "futures do nothing unless awaited"]
pub struct Sleep {
    deadline: Instant,
    key: Option<(Instant, u64)>,
}

/// Sleep for `d` on the current context.
pub fn sleep(d: Duration) -> Sleep {
    sleep_until(Instant::now() + d)
}

/// Sleep until `deadline` on the current context.
pub fn sleep_until(deadline: Instant) -> Sleep {
    Sleep {
        deadline,
        key: None,
    }
}

impl Sleep {
    pub fn deadline(&self) -> Instant {
        self.deadline
    }
}

impl Future for Sleep {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if Instant::now() >= self.deadline {
            if let Some(k) = self.key.take() {
                let _ = with_core(|c| c.timers.borrow_mut().map.remove(&k));
            }
            return Poll::Ready(());
        }
        let deadline = self.deadline;
        let key = self.key;
        let new_key = with_core(|c| {
            let mut t = c.timers.borrow_mut();
            match key.and_then(|k| t.map.get_mut(&k).map(|w| (k, w))) {
                Some((k, w)) => {
                    if !w.will_wake(cx.waker()) {
                        *w = cx.waker().clone();
                    }
                    k
                }
                // First poll, or the timer fired (and was removed) but the deadline is not
                // reached by our clock reading yet: register again.
                None => t.insert(deadline, cx.waker().clone()),
            }
        })
        .expect("timer polled on a thread without an AioContext");
        self.key = Some(new_key);
        Poll::Pending
    }
}

impl Drop for Sleep {
    fn drop(&mut self) {
        if let Some(k) = self.key.take() {
            let _ = with_core(|c| c.timers.borrow_mut().map.remove(&k));
        }
    }
}

/// The deadline of [`timeout`] passed first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

impl std::fmt::Display for Elapsed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("deadline has elapsed")
    }
}

impl std::error::Error for Elapsed {}

/// Run `fut` for at most `d`; on expiry `fut` is dropped (cancelling what it was doing).
pub async fn timeout<F: Future>(d: Duration, fut: F) -> Result<F::Output, Elapsed> {
    let mut fut = std::pin::pin!(fut);
    let mut timer = std::pin::pin!(sleep(d));
    std::future::poll_fn(|cx| {
        if let Poll::Ready(v) = fut.as_mut().poll(cx) {
            return Poll::Ready(Ok(v));
        }
        if timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(Elapsed));
        }
        Poll::Pending
    })
    .await
}

/// Number of armed timers on this thread's context (for tests).
pub fn armed_timers() -> usize {
    with_core(|c| c.timers.borrow().len()).unwrap_or(0)
}
