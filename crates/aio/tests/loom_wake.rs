//! Model check of the sleep/wake handshake (`blockd_aio::wake`) with loom: every interleaving of
//! two wakers and the loop is explored, and a lost wake shows up as a deadlock (the loop asleep
//! on its eventfd with work queued). A deliberately broken handshake, the classic check-then-act
//! waker, is run through the same model to show that the model does catch a lost wake.

use std::sync::atomic::Ordering;

use blockd_aio::wake::{Handshake, SLEEPING, StateCell};
use loom::sync::atomic::{AtomicU8, AtomicUsize};
use loom::sync::{Arc, Condvar, Mutex};
use loom::thread;

/// loom's atomic behind the handshake's cell trait.
struct LoomCell(AtomicU8);

impl StateCell for LoomCell {
    fn new(v: u8) -> Self {
        LoomCell(AtomicU8::new(v))
    }
    fn load(&self, o: Ordering) -> u8 {
        self.0.load(o)
    }
    fn swap(&self, v: u8, o: Ordering) -> u8 {
        self.0.swap(v, o)
    }
    fn compare_exchange(&self, c: u8, n: u8, s: Ordering, f: Ordering) -> Result<u8, u8> {
        self.0.compare_exchange(c, n, s, f)
    }
}

trait Protocol: Send + Sync + 'static {
    fn create() -> Self;
    fn notify(&self) -> bool;
    fn begin_drain(&self);
    fn prepare_sleep(&self) -> bool;
    fn end_sleep(&self);
}

impl Protocol for Handshake<LoomCell> {
    fn create() -> Self {
        Handshake::new()
    }
    fn notify(&self) -> bool {
        Handshake::notify(self)
    }
    fn begin_drain(&self) {
        Handshake::begin_drain(self)
    }
    fn prepare_sleep(&self) -> bool {
        Handshake::prepare_sleep(self)
    }
    fn end_sleep(&self) {
        Handshake::end_sleep(self)
    }
}

/// Broken on purpose: the waker only looks whether the loop sleeps and leaves no trace when it
/// does not, so a loop that is about to sleep misses the work queued just before.
struct CheckThenAct(AtomicU8);

impl Protocol for CheckThenAct {
    fn create() -> Self {
        CheckThenAct(AtomicU8::new(0))
    }
    fn notify(&self) -> bool {
        self.0.load(Ordering::SeqCst) == SLEEPING
    }
    fn begin_drain(&self) {}
    fn prepare_sleep(&self) -> bool {
        self.0.store(SLEEPING, Ordering::SeqCst);
        true
    }
    fn end_sleep(&self) {
        self.0.store(0, Ordering::SeqCst);
    }
}

/// The eventfd: a counter the loop blocks on.
struct EventFd {
    count: Mutex<u64>,
    cv: Condvar,
}

impl EventFd {
    fn write(&self) {
        *self.count.lock().unwrap() += 1;
        self.cv.notify_one();
    }
    fn read_blocking(&self) {
        let mut c = self.count.lock().unwrap();
        while *c == 0 {
            c = self.cv.wait(c).unwrap();
        }
        *c = 0;
    }
}

struct Loop<P> {
    handshake: P,
    queued: AtomicUsize,
    eventfd: EventFd,
}

fn model<P: Protocol>(wakers: usize) {
    let mut b = loom::model::Builder::new();
    // Bounded preemptions keep the two-waker search to seconds; every lost-wake schedule needs
    // at most two preemptions (waker between push and notify, loop between drain and sleep).
    b.preemption_bound = Some(3);
    b.check(move || {
        let l = Arc::new(Loop {
            handshake: P::create(),
            queued: AtomicUsize::new(0),
            eventfd: EventFd {
                count: Mutex::new(0),
                cv: Condvar::new(),
            },
        });
        let threads: Vec<_> = (0..wakers)
            .map(|_| {
                let l = l.clone();
                thread::spawn(move || {
                    l.queued.fetch_add(1, Ordering::SeqCst);
                    if l.handshake.notify() {
                        l.eventfd.write();
                    }
                })
            })
            .collect();
        // The event loop: drain, and sleep when there is nothing to do.
        let mut seen = 0;
        loop {
            l.handshake.begin_drain();
            seen += l.queued.swap(0, Ordering::SeqCst);
            if seen == wakers {
                break;
            }
            if l.handshake.prepare_sleep() {
                l.eventfd.read_blocking();
                l.handshake.end_sleep();
            } else {
                thread::yield_now();
            }
        }
        for t in threads {
            t.join().unwrap();
        }
    });
}

#[test]
fn handshake_never_loses_a_wake_one_waker() {
    model::<Handshake<LoomCell>>(1);
}

#[test]
fn handshake_never_loses_a_wake_two_wakers() {
    model::<Handshake<LoomCell>>(2);
}

#[test]
#[should_panic(expected = "deadlock")]
fn model_catches_a_broken_handshake() {
    model::<CheckThenAct>(1);
}
