//! Stress: 4 threads wake tasks on 3 contexts a million times. Nothing may be lost (every task
//! sees its final count and completes), nothing may run twice (no task is polled concurrently,
//! none is polled more often than it was woken, none after completion), every thread is joined.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};
use std::time::Duration;

use blockd_aio::{IoThread, PollParams, block_on, timeout};

const WAKER_THREADS: usize = 4;
const CONTEXTS: usize = 3;
const TOTAL_WAKES: u64 = 1_000_000;
const PER_PAIR: u64 = TOTAL_WAKES.div_ceil((WAKER_THREADS * CONTEXTS) as u64);

struct Signal {
    sent: AtomicU64,
    waker: Mutex<Option<Waker>>,
    in_poll: AtomicBool,
    polls: AtomicU64,
    done: AtomicBool,
}

impl Signal {
    fn new() -> Arc<Signal> {
        Arc::new(Signal {
            sent: AtomicU64::new(0),
            waker: Mutex::new(None),
            in_poll: AtomicBool::new(false),
            polls: AtomicU64::new(0),
            done: AtomicBool::new(false),
        })
    }

    fn fire(&self) {
        self.sent.fetch_add(1, Ordering::SeqCst);
        let w = self.waker.lock().unwrap().clone();
        if let Some(w) = w {
            w.wake();
        }
    }

    /// The task: wait until every wake of its sender arrived.
    async fn wait_all(self: Arc<Self>) -> u64 {
        std::future::poll_fn(|cx| {
            assert!(
                !self.in_poll.swap(true, Ordering::SeqCst),
                "task polled concurrently"
            );
            assert!(
                !self.done.load(Ordering::SeqCst),
                "task polled after completion"
            );
            self.polls.fetch_add(1, Ordering::SeqCst);
            *self.waker.lock().unwrap() = Some(cx.waker().clone());
            let seen = self.sent.load(Ordering::SeqCst);
            let r = if seen >= PER_PAIR {
                self.done.store(true, Ordering::SeqCst);
                Poll::Ready(seen)
            } else {
                Poll::Pending
            };
            self.in_poll.store(false, Ordering::SeqCst);
            r
        })
        .await
    }
}

#[test]
fn four_threads_wake_tasks_on_three_contexts_a_million_times() {
    // One context never polls, one polls with QEMU's default window, one with a large window.
    let params = [
        PollParams::disabled(),
        PollParams::iothread_default(),
        PollParams {
            max_ns: 200_000,
            grow: 4,
            shrink: 4,
        },
    ];
    let iothreads: Vec<IoThread> = (0..CONTEXTS)
        .map(|i| IoThread::spawn(&format!("stress{i}"), params[i]).unwrap())
        .collect();
    let signals: Vec<Vec<Arc<Signal>>> = (0..CONTEXTS)
        .map(|_| (0..WAKER_THREADS).map(|_| Signal::new()).collect())
        .collect();

    let mut waiters = Vec::new();
    for (c, t) in iothreads.iter().enumerate() {
        for s in &signals[c] {
            let s = s.clone();
            waiters.push(t.handle().spawn(move || s.wait_all()));
        }
    }
    // Each waker thread also sends calls that count on the target context: none may be lost.
    let calls_done = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..WAKER_THREADS)
        .map(|w| {
            let sigs: Vec<Arc<Signal>> = (0..CONTEXTS).map(|c| signals[c][w].clone()).collect();
            let handles: Vec<_> = iothreads.iter().map(|t| t.handle().clone()).collect();
            let calls_done = calls_done.clone();
            std::thread::spawn(move || {
                for i in 0..PER_PAIR {
                    for s in &sigs {
                        s.fire();
                    }
                    if i % 1000 == 0 {
                        for h in &handles {
                            let cd = calls_done.clone();
                            assert!(h.schedule_oneshot(move || {
                                cd.fetch_add(1, Ordering::SeqCst);
                            }));
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }

    let results = block_on(async move {
        let mut out = Vec::new();
        for w in waiters {
            out.push(
                timeout(Duration::from_secs(60), w)
                    .await
                    .expect("a wake was lost: task never saw its final count")
                    .expect("task cancelled"),
            );
        }
        out
    })
    .unwrap();
    assert_eq!(results.len(), CONTEXTS * WAKER_THREADS);
    assert!(results.iter().all(|&n| n == PER_PAIR));

    // Flush the calls queue of every context, then count.
    for t in &iothreads {
        block_on(t.handle().call(|| ())).unwrap().unwrap();
    }
    let expected_calls = (WAKER_THREADS * CONTEXTS) as u64 * PER_PAIR.div_ceil(1000);
    assert_eq!(calls_done.load(Ordering::SeqCst), expected_calls);

    let mut total_polls = 0;
    for row in &signals {
        for s in row {
            let polls = s.polls.load(Ordering::SeqCst);
            // One poll at start, at most one per wake after that.
            assert!(
                polls <= PER_PAIR + 1,
                "task ran {polls} times for {PER_PAIR} wakes"
            );
            total_polls += polls;
        }
    }
    eprintln!(
        "{} wakes, {} task polls (wakes coalesce while a task is queued)",
        PER_PAIR * (WAKER_THREADS * CONTEXTS) as u64,
        total_polls
    );
    for t in iothreads {
        t.stop();
    }
}
