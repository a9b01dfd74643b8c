//! Request serialisation on a node (QEMU's tracked and serialising requests).
//!
//! Every node has a [`RequestTracker`]. Writes through `io.rs` (write, write-zeroes, discard)
//! are tracked for as long as they run. A *serialising* request (a copy-on-read, a job copying a
//! range into the node, the read-modify-write of an unaligned write) excludes overlapping
//! writes: it waits for the overlapping requests that started before it, and overlapping
//! requests that start after it wait until it ends. So a copy of old data into a range can
//! never land after a newer write of that range.
//!
//! Order is by registration: a request only ever waits for older ones, so waits cannot form a
//! cycle. A plain write registers only once no older overlapping serialising request remains,
//! so a registered plain write never waits again. The state is a short list under a mutex
//! held for a few instructions (never across an await), usable from any thread; waiting is an
//! await on an event that every finishing request notifies.

use std::sync::{Arc, Mutex};

use event_listener::Event;

#[derive(Default)]
pub struct RequestTracker {
    state: Mutex<State>,
    finished: Event,
}

#[derive(Default)]
struct State {
    next_id: u64,
    requests: Vec<Tracked>,
}

#[derive(Clone, Copy)]
struct Tracked {
    id: u64,
    start: u64,
    end: u64,
    serialising: bool,
}

impl Tracked {
    fn overlaps(&self, start: u64, end: u64) -> bool {
        self.start < end && start < self.end
    }
}

/// A tracked request: it ends (and wakes the requests waiting for it) when dropped, also when
/// the future holding it is dropped.
#[must_use = "the request is tracked until the guard is dropped"]
pub struct TrackedRequest {
    tracker: Arc<RequestTracker>,
    id: u64,
}

impl RequestTracker {
    pub fn new() -> Arc<RequestTracker> {
        Arc::new(RequestTracker::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Track a write of `[offset, offset+len)`: waits while an overlapping serialising request
    /// runs, then registers.
    pub async fn write(self: &Arc<Self>, offset: u64, len: u64) -> TrackedRequest {
        let end = offset.saturating_add(len);
        loop {
            let listener = {
                let mut s = self.lock();
                if !s
                    .requests
                    .iter()
                    .any(|r| r.serialising && r.overlaps(offset, end))
                {
                    return self.register(&mut s, offset, end, false);
                }
                self.finished.listen()
            };
            listener.await;
        }
    }

    /// A serialising request over `[offset, offset+len)`: registers at once (newer overlapping
    /// writes and serialising requests wait for it), then waits for the overlapping requests
    /// that are older.
    pub async fn serialise(self: &Arc<Self>, offset: u64, len: u64) -> TrackedRequest {
        let end = offset.saturating_add(len);
        let guard = {
            let mut s = self.lock();
            self.register(&mut s, offset, end, true)
        };
        loop {
            let listener = {
                let s = self.lock();
                if !s
                    .requests
                    .iter()
                    .any(|r| r.id < guard.id && r.overlaps(offset, end))
                {
                    return guard;
                }
                self.finished.listen()
            };
            listener.await;
        }
    }

    fn register(
        self: &Arc<Self>,
        s: &mut State,
        start: u64,
        end: u64,
        ser: bool,
    ) -> TrackedRequest {
        let id = s.next_id;
        s.next_id += 1;
        s.requests.push(Tracked {
            id,
            start,
            end,
            serialising: ser,
        });
        TrackedRequest {
            tracker: self.clone(),
            id,
        }
    }

    /// Requests tracked right now (for tests and diagnostics).
    pub fn in_flight(&self) -> usize {
        self.lock().requests.len()
    }
}

impl Drop for TrackedRequest {
    fn drop(&mut self) {
        let mut s = self.tracker.lock();
        if let Some(i) = s.requests.iter().position(|r| r.id == self.id) {
            s.requests.swap_remove(i);
        }
        drop(s);
        self.tracker.finished.notify(usize::MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    fn poll_once<F: Future>(f: std::pin::Pin<&mut F>) -> Poll<F::Output> {
        f.poll(&mut Context::from_waker(Waker::noop()))
    }

    #[test]
    fn write_waits_for_overlapping_serialising() {
        let t = RequestTracker::new();
        let mut s = pin!(t.serialise(0, 4096));
        let Poll::Ready(s) = poll_once(s.as_mut()) else {
            panic!("nothing older: the serialising request runs at once")
        };
        // elsewhere: no wait
        let mut w0 = pin!(t.write(4096, 512));
        assert!(poll_once(w0.as_mut()).is_ready());
        let mut w = pin!(t.write(1024, 512));
        assert!(poll_once(w.as_mut()).is_pending());
        drop(s);
        assert!(poll_once(w.as_mut()).is_ready());
    }

    #[test]
    fn serialising_waits_for_older_writes_and_blocks_newer() {
        let t = RequestTracker::new();
        let Poll::Ready(w) = poll_once(pin!(t.write(0, 100)).as_mut()) else {
            panic!()
        };
        let mut s = pin!(t.serialise(50, 100));
        assert!(poll_once(s.as_mut()).is_pending());
        // a newer write of the range waits even though the serialising one still waits
        let mut w2 = pin!(t.write(120, 10));
        assert!(poll_once(w2.as_mut()).is_pending());
        drop(w);
        let Poll::Ready(s) = poll_once(s.as_mut()) else {
            panic!("the older write ended")
        };
        assert!(poll_once(w2.as_mut()).is_pending());
        drop(s);
        let Poll::Ready(_w2) = poll_once(w2.as_mut()) else {
            panic!("the serialising request ended")
        };
        assert_eq!(t.in_flight(), 1);
    }

    #[test]
    fn serialising_requests_queue_in_order() {
        let t = RequestTracker::new();
        let Poll::Ready(a) = poll_once(pin!(t.serialise(0, 10)).as_mut()) else {
            panic!()
        };
        let mut b = pin!(t.serialise(5, 10));
        assert!(poll_once(b.as_mut()).is_pending());
        drop(a);
        assert!(poll_once(b.as_mut()).is_ready());
    }
}
