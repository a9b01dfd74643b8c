//! Event loop benchmark (not a test): `cargo bench -p blockd-aio`.
//!
//! Prints, in one run:
//! * local spawn-and-run cost (spawn a task, run it, join it);
//! * cross-thread call round trip (`ContextHandle::call`) with the target asleep and with it
//!   busy-polling, median and 99th percentile;
//! * io_uring no-op operations per second through the executor (tasks awaiting `ops::nop`)
//!   against raw `io-uring` crate calls with the same queue depth, and the executor's overhead
//!   per operation.

use std::time::{Duration, Instant};

use blockd_aio::{AioContext, IoThread, PollParams, block_on, ops, spawn};

fn median_p99(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    (v[v.len() / 2], v[v.len() * 99 / 100])
}

fn spawn_cost() {
    const N: u32 = 200_000;
    block_on(async {
        // warm up
        for _ in 0..1000 {
            spawn(async {}).await;
        }
        let start = Instant::now();
        for _ in 0..N {
            spawn(async {}).await;
        }
        let one = start.elapsed() / N;
        let start = Instant::now();
        let tasks: Vec<_> = (0..N).map(|i| spawn(async move { i })).collect();
        for t in tasks {
            t.await;
        }
        let batch = start.elapsed() / N;
        println!(
            "local spawn+run+join, one at a time:   {:>8.0} ns/task",
            one.as_nanos()
        );
        println!(
            "local spawn+run+join, {N} at once: {:>8.0} ns/task",
            batch.as_nanos()
        );
    })
    .unwrap();
}

fn call_round_trip(label: &str, target: PollParams, caller: PollParams, gap: Duration) {
    const N: usize = 20_000;
    let t = IoThread::spawn("bench-target", target).unwrap();
    let h = t.handle().clone();
    let ctx = AioContext::current_or_new().unwrap();
    ctx.set_poll_params(caller);
    let samples = block_on(async move {
        let mut v = Vec::with_capacity(N);
        for i in 0..N + 1000 {
            if !gap.is_zero() {
                // Let the target fall asleep (not timed).
                std::thread::sleep(gap);
            }
            let start = Instant::now();
            h.call(|| ()).await.unwrap();
            if i >= 1000 {
                v.push(start.elapsed());
            }
        }
        v
    })
    .unwrap();
    ctx.set_poll_params(PollParams::disabled());
    let (med, p99) = median_p99(samples);
    println!(
        "cross-thread call round trip, {label:<34} median {:>6.2} us  p99 {:>7.2} us",
        med.as_nanos() as f64 / 1000.0,
        p99.as_nanos() as f64 / 1000.0
    );
    t.stop();
}

fn raw_nops(depth: u32, total: u64) -> f64 {
    let mut ring = io_uring::IoUring::new(256).unwrap();
    let start = Instant::now();
    let mut done = 0u64;
    while done < total {
        {
            let mut sq = ring.submission();
            for _ in 0..depth {
                let e = io_uring::opcode::Nop::new().build().user_data(7);
                // SAFETY: a nop carries no pointers.
                unsafe { sq.push(&e).unwrap() };
            }
        }
        ring.submit_and_wait(depth as usize).unwrap();
        for c in ring.completion() {
            assert_eq!(c.result(), 0);
            done += 1;
        }
    }
    total as f64 / start.elapsed().as_secs_f64()
}

fn executor_nops(depth: u32, total: u64) -> f64 {
    block_on(async move {
        let per_task = total / depth as u64;
        let start = Instant::now();
        let tasks: Vec<_> = (0..depth)
            .map(|_| {
                spawn(async move {
                    for _ in 0..per_task {
                        ops::nop().await.unwrap();
                    }
                })
            })
            .collect();
        let enters_before = AioContext::current().unwrap().stats().io_uring_enters;
        for t in tasks {
            t.await;
        }
        let rate = (per_task * depth as u64) as f64 / start.elapsed().as_secs_f64();
        let enters = AioContext::current().unwrap().stats().io_uring_enters - enters_before;
        if std::env::var_os("AIO_BENCH_VERBOSE").is_some() {
            println!(
                "  depth {depth}: {:.1} ops per io_uring_enter",
                (per_task * depth as u64) as f64 / enters as f64
            );
        }
        rate
    })
    .unwrap()
}

fn nops() {
    // AIO_BENCH_NOPS shrinks the run (e.g. under valgrind --tool=callgrind).
    let total: u64 = std::env::var("AIO_BENCH_NOPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000_000);
    for depth in [1u32, 32] {
        // Interleave the two to share the machine's noise.
        let mut raw = Vec::new();
        let mut exe = Vec::new();
        for _ in 0..3 {
            raw.push(raw_nops(depth, total));
            exe.push(executor_nops(depth, total));
        }
        let raw = raw.into_iter().fold(0.0, f64::max);
        let exe = exe.into_iter().fold(0.0, f64::max);
        let overhead_ns = (1e9 / exe) - (1e9 / raw);
        println!(
            "io_uring nop, depth {depth:>2}: raw {:>6.2} M ops/s, executor {:>6.2} M ops/s, ratio {:.2}, executor overhead {:>6.1} ns/op",
            raw / 1e6,
            exe / 1e6,
            exe / raw,
            overhead_ns
        );
    }
}

fn main() {
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let want = |name: &str| filter.as_deref().is_none_or(|f| name.contains(f));
    if want("spawn") {
        spawn_cost();
    }
    if want("call") {
        call_round_trip(
            "target asleep (no polling):",
            PollParams::disabled(),
            PollParams::disabled(),
            Duration::from_micros(200),
        );
        call_round_trip(
            "both polling (poll-max-ns 1 ms):",
            PollParams {
                max_ns: 1_000_000,
                grow: 0,
                shrink: 0,
            },
            PollParams {
                max_ns: 1_000_000,
                grow: 0,
                shrink: 0,
            },
            Duration::ZERO,
        );
        call_round_trip(
            "QEMU defaults, back to back:",
            PollParams::iothread_default(),
            PollParams::disabled(),
            Duration::ZERO,
        );
    }
    if want("nop") {
        nops();
    }
}
