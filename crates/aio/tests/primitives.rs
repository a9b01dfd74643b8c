//! Unit-level tests of every event loop primitive, run on real contexts and a real ring.

use std::cell::{Cell, RefCell};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use blockd_aio::{
    AioContext, BottomHalf, IoBuf, IoThread, PollParams, block_on, ops, sleep, spawn, timeout,
};

fn temp_path(tag: &str) -> std::path::PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    std::env::temp_dir().join(format!(
        "blockd-aio-{}-{}-{}",
        tag,
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors we then own.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: fresh descriptors.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

#[test]
fn spawn_and_join_tasks() {
    let out = block_on(async {
        let a = spawn(async { 20 });
        let b = spawn(async { 22 });
        a.await + b.await
    })
    .unwrap();
    assert_eq!(out, 42);
}

#[test]
fn block_on_refuses_to_nest() {
    let r = block_on(async {
        let inner = block_on(async { 1 });
        inner.unwrap_err()
    })
    .unwrap();
    assert!(
        r.to_string().contains("nested event loops are not allowed"),
        "{r}"
    );
}

#[test]
fn block_on_refuses_inside_a_task_on_an_iothread() {
    let t = IoThread::spawn("nest", PollParams::disabled()).unwrap();
    let err = block_on(
        t.handle()
            .spawn(|| async { block_on(async { 5 }).unwrap_err() }),
    )
    .unwrap()
    .unwrap();
    assert_eq!(err.context, "nest");
    t.stop();
}

#[test]
fn timers_fire_in_deadline_order() {
    let order = block_on(async {
        let order = Rc::new(RefCell::new(Vec::new()));
        let mut tasks = Vec::new();
        for (i, ms) in [30u64, 10, 20, 0, 25].into_iter().enumerate() {
            let order = order.clone();
            tasks.push(spawn(async move {
                sleep(Duration::from_millis(ms)).await;
                order.borrow_mut().push(i);
            }));
        }
        for t in tasks {
            t.await;
        }
        order.take()
    })
    .unwrap();
    assert_eq!(order, vec![3, 1, 2, 4, 0]);
}

#[test]
fn sleep_waits_at_least_its_duration() {
    let start = Instant::now();
    block_on(sleep(Duration::from_millis(20))).unwrap();
    assert!(start.elapsed() >= Duration::from_millis(20));
}

#[test]
fn dropped_timer_is_cancelled() {
    block_on(async {
        let fired = Rc::new(Cell::new(false));
        let f = fired.clone();
        let t = spawn(async move {
            sleep(Duration::from_millis(20)).await;
            f.set(true);
        });
        sleep(Duration::from_millis(1)).await;
        assert_eq!(blockd_aio::timer::armed_timers(), 1);
        drop(t); // cancels the task, which drops its Sleep
        blockd_aio::yield_now().await;
        assert_eq!(blockd_aio::timer::armed_timers(), 0);
        sleep(Duration::from_millis(40)).await;
        assert!(!fired.get());
    })
    .unwrap();
}

#[test]
fn timeout_expires_and_passes() {
    block_on(async {
        let r = timeout(Duration::from_millis(5), sleep(Duration::from_secs(10))).await;
        assert!(r.is_err());
        let r = timeout(Duration::from_secs(10), async { 7 }).await;
        assert_eq!(r, Ok(7));
    })
    .unwrap();
}

#[test]
fn bottom_halves_run_once_per_schedule_and_can_be_cancelled() {
    block_on(async {
        let runs = Rc::new(Cell::new(0));
        let r = runs.clone();
        let bh = BottomHalf::new(move || r.set(r.get() + 1));
        bh.schedule();
        bh.schedule(); // already scheduled: no second run
        blockd_aio::yield_now().await;
        blockd_aio::yield_now().await;
        assert_eq!(runs.get(), 1);
        bh.schedule();
        bh.cancel();
        blockd_aio::yield_now().await;
        blockd_aio::yield_now().await;
        assert_eq!(runs.get(), 1);
    })
    .unwrap();
}

#[test]
fn bottom_halves_scheduled_from_other_threads_run_on_the_owner() {
    let t = IoThread::spawn("bh", PollParams::disabled()).unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    // Create the BH on the iothread; its callback records the thread it runs on.
    let bh = block_on(t.handle().call(move || {
        let me = std::thread::current().id();
        BottomHalf::new(move || {
            assert_eq!(std::thread::current().id(), me);
            r.fetch_add(1, Ordering::SeqCst);
        })
    }))
    .unwrap()
    .unwrap();
    let mut threads = Vec::new();
    for _ in 0..4 {
        let bh = bh.clone();
        threads.push(std::thread::spawn(move || {
            for _ in 0..100 {
                bh.schedule();
                std::thread::sleep(Duration::from_micros(200));
            }
        }));
    }
    for th in threads {
        th.join().unwrap();
    }
    // Every schedule is followed by a run, coalescing schedules made while one is pending.
    let deadline = Instant::now() + Duration::from_secs(5);
    while bh.is_scheduled() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(20));
    let n = runs.load(Ordering::SeqCst);
    assert!((1..=400).contains(&n), "{n} runs");
    assert!(!bh.is_scheduled());
    t.stop();
}

#[test]
fn handle_call_and_spawn_run_on_the_target_thread() {
    let t = IoThread::spawn("target", PollParams::iothread_default()).unwrap();
    let tid = std::thread::current().id();
    let other = block_on(t.handle().call(|| std::thread::current().id()))
        .unwrap()
        .unwrap();
    assert_ne!(tid, other);
    // The spawned future is built on the target and may be !Send.
    let v = block_on(t.handle().spawn(|| async {
        let local = Rc::new(5);
        blockd_aio::yield_now().await;
        *local * 2
    }))
    .unwrap()
    .unwrap();
    assert_eq!(v, 10);
    t.stop();
}

#[test]
fn remote_task_reports_cancellation_when_the_context_stops() {
    let t = IoThread::spawn("stopper", PollParams::disabled()).unwrap();
    let dropped = Arc::new(AtomicUsize::new(0));
    struct Guard(Arc<AtomicUsize>);
    impl Drop for Guard {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    let d = dropped.clone();
    let pending = t.handle().spawn(move || async move {
        let _g = Guard(d);
        std::future::pending::<()>().await;
    });
    // Make sure the task started.
    block_on(t.handle().call(|| ())).unwrap().unwrap();
    let h = t.handle().clone();
    t.stop();
    assert_eq!(dropped.load(Ordering::SeqCst), 1, "stop cancels the task");
    assert!(block_on(pending).unwrap().is_err());
    // Work sent after the stop is refused, not lost silently.
    assert!(block_on(h.call(|| 1)).unwrap().is_err());
}

#[test]
fn iothread_poll_params_can_change_at_run_time() {
    let t = IoThread::spawn("knobs", PollParams::iothread_default()).unwrap();
    let p = block_on(t.poll_params()).unwrap().unwrap();
    assert_eq!(p.max_ns, 32768);
    let newp = PollParams {
        max_ns: 100_000,
        grow: 3,
        shrink: 2,
    };
    assert!(block_on(t.set_poll_params(newp)).unwrap());
    assert_eq!(block_on(t.poll_params()).unwrap().unwrap(), newp);
    assert!(block_on(t.thread_id()).unwrap().unwrap() > 0);
    t.stop();
}

#[test]
fn remote_wake_of_a_sleeping_context_uses_the_eventfd_but_a_busy_one_does_not() {
    let ctx = AioContext::current_or_new().unwrap();
    let t = IoThread::spawn("sleeper", PollParams::disabled()).unwrap();
    let h = t.handle().clone();
    let before = block_on(h.call(|| AioContext::current().unwrap().stats()))
        .unwrap()
        .unwrap();
    std::thread::sleep(Duration::from_millis(20)); // let it fall asleep
    let after = block_on(h.call(|| AioContext::current().unwrap().stats()))
        .unwrap()
        .unwrap();
    assert!(
        after.eventfd_writes > before.eventfd_writes,
        "sleeping target was kicked"
    );
    // While the target spins in a task, wakes are queued without a syscall.
    let busy = h.spawn(|| async {
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(50) {
            std::hint::spin_loop();
        }
        AioContext::current().unwrap().stats().eventfd_writes
    });
    std::thread::sleep(Duration::from_millis(5));
    let mid = h.clone();
    for _ in 0..100 {
        mid.schedule_oneshot(|| {});
    }
    let busy_writes = block_on(busy).unwrap().unwrap();
    let end = block_on(h.call(|| AioContext::current().unwrap().stats().eventfd_writes))
        .unwrap()
        .unwrap();
    assert!(
        end - busy_writes <= 2,
        "100 wakes of a busy context cost {} eventfd writes",
        end - busy_writes
    );
    drop(ctx);
    t.stop();
}

#[test]
fn file_read_write_vectored_sync_and_fallocate() {
    let path = temp_path("file");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    let fd = f.as_raw_fd();
    block_on(async move {
        let mut b = IoBuf::new(8192, 4096);
        b.fill(0xab);
        let (n, _b) = ops::write_at(fd, b, 4096).await;
        assert_eq!(n.unwrap(), 8192);
        let bufs = vec![
            IoBuf::from_slice(&[1u8; 512]),
            IoBuf::from_slice(&[2u8; 1024]),
        ];
        let (n, _) = ops::writev_at(fd, bufs, 0).await;
        assert_eq!(n.unwrap(), 1536);
        ops::fsync(fd).await.unwrap();
        ops::fdatasync(fd).await.unwrap();

        let (n, b) = ops::read_at(fd, IoBuf::new(4096, 512), 4096).await;
        assert_eq!(n.unwrap(), 4096);
        assert!(b.iter().all(|&x| x == 0xab));
        let (n, bufs) =
            ops::readv_at(fd, vec![IoBuf::new(512, 512), IoBuf::new(1024, 512)], 0).await;
        assert_eq!(n.unwrap(), 1536);
        assert!(bufs[0].iter().all(|&x| x == 1));
        assert!(bufs[1].iter().all(|&x| x == 2));

        let st = ops::statx_fd(fd).await.unwrap();
        assert_eq!(st.size, 12288);
        ops::punch_hole(fd, 4096, 4096).await.unwrap();
        let (_, b) = ops::read_at(fd, IoBuf::new(4096, 512), 4096).await;
        assert!(b.iter().all(|&x| x == 0), "punched range reads as zeroes");
        assert_eq!(ops::statx_fd(fd).await.unwrap().size, 12288, "size kept");
        match ops::zero_range(fd, 8192, 4096).await {
            Ok(()) => {
                let (_, b) = ops::read_at(fd, IoBuf::new(4096, 512), 8192).await;
                assert!(b.iter().all(|&x| x == 0));
            }
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EOPNOTSUPP), "{e}"),
        }
        let (n, _) = ops::read_at(fd, IoBuf::new(4096, 512), 1 << 20).await;
        assert_eq!(n.unwrap(), 0, "read at EOF");
        let st = ops::statx_path(&std::env::temp_dir())
            .unwrap()
            .await
            .unwrap();
        assert_eq!(st.mode as u32 & libc::S_IFMT, libc::S_IFDIR);
    })
    .unwrap();
    drop(f);
    let _ = std::fs::remove_file(path);
}

#[test]
fn bad_descriptor_is_an_error_not_a_crash() {
    block_on(async {
        let (r, _) = ops::read_at(-1, IoBuf::new(512, 512), 0).await;
        assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EBADF));
    })
    .unwrap();
}

#[test]
fn poll_add_reports_readiness() {
    let (r, w) = pipe();
    let rfd = r.as_raw_fd();
    block_on(async move {
        let waiter = spawn(async move { ops::poll_add(rfd, libc::POLLIN).await });
        blockd_aio::sleep(Duration::from_millis(5)).await;
        let mut wf = std::fs::File::from(w);
        wf.write_all(b"x").unwrap();
        let ev = waiter.await.unwrap();
        assert!(ev & libc::POLLIN != 0);
    })
    .unwrap();
}

#[test]
fn tcp_accept_connect_send_recv() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let lfd = listener.as_raw_fd();
    block_on(async move {
        let server = spawn(async move {
            let conn = ops::accept(lfd).await.unwrap();
            let (n, b) = ops::recv(conn.as_raw_fd(), IoBuf::new(5, 1), 0).await;
            assert_eq!(&b[..n.unwrap()], b"hello");
            let bufs = vec![IoBuf::from_slice(b"wor"), IoBuf::from_slice(b"ld")];
            let (n, _) = ops::send_vectored(conn.as_raw_fd(), bufs, 0).await;
            assert_eq!(n.unwrap(), 5);
            ops::close(conn).await.unwrap();
        });
        // SAFETY: plain socket(2) call; the descriptor is owned below.
        let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        // SAFETY: fresh descriptor.
        let sock = unsafe { OwnedFd::from_raw_fd(s) };
        ops::connect(sock.as_raw_fd(), ops::SockAddr::inet(addr))
            .await
            .unwrap();
        let (n, _) = ops::send(sock.as_raw_fd(), IoBuf::from_slice(b"hello"), 0).await;
        assert_eq!(n.unwrap(), 5);
        let (n, bufs) = ops::recv_vectored(
            sock.as_raw_fd(),
            vec![IoBuf::new(2, 1), IoBuf::new(3, 1)],
            libc::MSG_WAITALL,
        )
        .await;
        assert_eq!(n.unwrap(), 5);
        assert_eq!(&bufs[0][..], b"wo");
        assert_eq!(&bufs[1][..], b"rld");
        server.await;
        // Peer closed: recv returns 0.
        let (n, _) = ops::recv(sock.as_raw_fd(), IoBuf::new(16, 1), 0).await;
        assert_eq!(n.unwrap(), 0);
    })
    .unwrap();
}

#[test]
fn unix_socket_connect() {
    let path = temp_path("sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let lfd = listener.as_raw_fd();
    let p = path.clone();
    block_on(async move {
        let acc = spawn(async move { ops::accept(lfd).await.unwrap() });
        // SAFETY: plain socket(2) call.
        let s = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        // SAFETY: fresh descriptor.
        let sock = unsafe { OwnedFd::from_raw_fd(s) };
        ops::connect(sock.as_raw_fd(), ops::SockAddr::unix(&p).unwrap())
            .await
            .unwrap();
        let conn = acc.await;
        let (n, _) = ops::send(sock.as_raw_fd(), IoBuf::from_slice(b"ping"), 0).await;
        assert_eq!(n.unwrap(), 4);
        let (n, b) = ops::recv(conn.as_raw_fd(), IoBuf::new(4, 1), 0).await;
        assert_eq!(&b[..n.unwrap()], b"ping");
    })
    .unwrap();
    let _ = std::fs::remove_file(path);
}

#[test]
fn ring_timeout_and_nop() {
    block_on(async {
        let start = Instant::now();
        ops::ring_timeout(Duration::from_millis(10)).await.unwrap();
        assert!(start.elapsed() >= Duration::from_millis(9));
        ops::nop().await.unwrap();
    })
    .unwrap();
}

#[test]
fn async_cancel_of_a_pending_recv() {
    let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
    let fd = a.as_raw_fd();
    block_on(async move {
        let op = ops::recv(fd, IoBuf::new(64, 1), 0);
        let id = op.id();
        let waiter = spawn(op);
        blockd_aio::yield_now().await;
        ops::cancel(id).await.unwrap();
        let (r, _buf) = waiter.await;
        assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::ECANCELED));
        // Cancelling something that already finished says so.
        let done = ops::nop();
        let id = done.id();
        done.await.unwrap();
        assert_eq!(
            ops::cancel(id).await.unwrap_err().raw_os_error(),
            Some(libc::ENOENT)
        );
    })
    .unwrap();
}

#[test]
fn blocking_pool_result_completes_on_the_submitting_context() {
    let t = IoThread::spawn("pool-user", PollParams::disabled()).unwrap();
    let (ctx_thread, worker_thread, resumed_thread) = block_on(t.handle().spawn(|| async {
        let me = std::thread::current().id();
        let worker = blockd_aio::blocking::spawn_blocking(|| {
            std::thread::sleep(Duration::from_millis(5));
            std::thread::current().id()
        })
        .await
        .unwrap();
        (me, worker, std::thread::current().id())
    }))
    .unwrap()
    .unwrap();
    assert_ne!(ctx_thread, worker_thread);
    assert_eq!(ctx_thread, resumed_thread);
    // A panicking job is reported, not propagated.
    let r = block_on(blockd_aio::blocking::spawn_blocking(|| -> u8 {
        panic!("boom")
    }))
    .unwrap();
    assert!(r.is_err());
    t.stop();
}

#[test]
fn linux_aio_reads_and_writes() {
    let path = temp_path("laio");
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    f.write_all(&[7u8; 65536]).unwrap();
    let fd = f.as_raw_fd();
    block_on(async move {
        blockd_aio::linux_aio::probe().unwrap();
        // Several requests queued in one turn go to the kernel in one io_submit.
        let mut tasks = Vec::new();
        for i in 0..8u64 {
            tasks.push(spawn(async move {
                let mut b = IoBuf::new(4096, 4096);
                b.fill(i as u8 + 1);
                let (n, _) = blockd_aio::linux_aio::write_at(fd, b, i * 4096, 0).await;
                n.unwrap()
            }));
        }
        for t in tasks {
            assert_eq!(t.await, 4096);
        }
        let (n, b) = blockd_aio::linux_aio::read_at(fd, IoBuf::new(4096, 4096), 3 * 4096).await;
        assert_eq!(n.unwrap(), 4096);
        assert!(b.iter().all(|&x| x == 4));
        let (n, _) = blockd_aio::linux_aio::writev_at(
            fd,
            vec![
                IoBuf::from_slice(&[9u8; 4096]),
                IoBuf::from_slice(&[10u8; 4096]),
            ],
            32768,
            0,
        )
        .await;
        assert_eq!(n.unwrap(), 8192);
        let (n, bufs) = blockd_aio::linux_aio::readv_at(
            fd,
            vec![IoBuf::new(4096, 4096), IoBuf::new(4096, 4096)],
            32768,
        )
        .await;
        assert_eq!(n.unwrap(), 8192);
        assert!(bufs[0].iter().all(|&x| x == 9) && bufs[1].iter().all(|&x| x == 10));
        let (r, _) = blockd_aio::linux_aio::read_at(-1, IoBuf::new(512, 512), 0).await;
        assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EBADF));
    })
    .unwrap();
    let mut back = Vec::new();
    std::fs::File::open(&path)
        .unwrap()
        .read_to_end(&mut back)
        .unwrap();
    assert!(back[4096 * 2..4096 * 3].iter().all(|&x| x == 3));
    let _ = std::fs::remove_file(path);
}

#[test]
fn linux_aio_with_o_direct_when_the_filesystem_supports_it() {
    let path = temp_path("laio-direct");
    std::fs::write(&path, vec![5u8; 1 << 20]).unwrap();
    use std::os::unix::fs::OpenOptionsExt;
    let f = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) => {
            eprintln!("SKIP: O_DIRECT not supported on {}: {e}", path.display());
            let _ = std::fs::remove_file(path);
            return;
        }
    };
    let fd = f.as_raw_fd();
    block_on(async move {
        let mut tasks = Vec::new();
        for i in 0..32u64 {
            tasks.push(spawn(async move {
                let (n, b) =
                    blockd_aio::linux_aio::read_at(fd, IoBuf::new(4096, 4096), i * 4096).await;
                assert_eq!(n.unwrap(), 4096);
                assert!(b.iter().all(|&x| x == 5));
            }));
        }
        for t in tasks {
            t.await;
        }
    })
    .unwrap();
    let _ = std::fs::remove_file(path);
}

/// A context that slept in the ring (its wake read armed) and then went idle must still wake for
/// remote work. (The lost wake this guards against, ppoll on the eventfd while the ring's read of
/// it was armed, needs the read to be completed by an io-wq worker to show; this test does not
/// reliably provoke that, blockd-block's drain_and_graph test did in about 1 run of 3.)
#[test]
fn remote_wakes_are_not_lost_after_sleeping_in_the_ring() {
    let t = IoThread::spawn("armed", PollParams::disabled()).unwrap();
    let h = t.handle().clone();
    block_on(async move {
        for i in 0..2000 {
            // A ring op in flight while the iothread sleeps: it sleeps in io_uring_enter with
            // its wake read armed; after the op completes, the ring is idle but the read stays.
            h.spawn(|| async { ops::ring_timeout(Duration::from_micros(20)).await.unwrap() })
                .await
                .unwrap();
            blockd_aio::sleep(Duration::from_micros(50)).await;
            let r = timeout(Duration::from_secs(5), h.call(|| 1)).await;
            assert_eq!(r, Ok(Ok(1)), "round {i}: remote wake lost");
        }
    })
    .unwrap();
    t.stop();
}

#[test]
fn polling_adapts_to_storage_waits_but_not_to_waits_for_a_peer() {
    std::thread::spawn(|| {
        let ctx = AioContext::new("poller").unwrap();
        // A window bound no wait here reaches: every recorded wait grows the window.
        ctx.set_poll_params(PollParams {
            max_ns: 10_000_000_000,
            grow: 0,
            shrink: 0,
        });
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut peer = b.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(2));
            peer.write_all(b"x").unwrap();
        });
        let (r, _) = ctx
            .block_on(ops::recv(a.as_raw_fd(), IoBuf::new(1, 1), 0))
            .unwrap();
        assert_eq!(r.unwrap(), 1);
        writer.join().unwrap();
        assert_eq!(
            ctx.stats().poll_ns,
            0,
            "a wait for a socket's peer neither polls nor grows the window"
        );

        // A read the kernel completes later (a pipe stands in for slow storage) does.
        let (rd, wr) = pipe();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(2));
            let mut w = std::fs::File::from(wr);
            w.write_all(b"y").unwrap();
        });
        let (r, _) = ctx
            .block_on(ops::read_at(rd.as_raw_fd(), IoBuf::new(1, 1), u64::MAX))
            .unwrap();
        assert_eq!(r.unwrap(), 1);
        writer.join().unwrap();
        assert!(ctx.stats().poll_ns > 0, "{:?}", ctx.stats());
        drop(b);
    })
    .join()
    .unwrap();
}

#[test]
fn splice_moves_file_data_through_a_pipe_into_a_socket() {
    let path = temp_path("splice");
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + i / 4096) as u8).collect();
    std::fs::write(&path, &data).unwrap();
    let file = std::fs::File::open(&path).unwrap();
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    let want = data.len() - 1000;
    let reader = std::thread::spawn(move || {
        let mut b = b;
        let mut got = vec![0u8; want];
        b.read_exact(&mut got).unwrap();
        got
    });
    let moved = block_on(async move {
        // A small pipe, so the transfer takes several rounds through it.
        let mut pipe = ops::Pipe::new(64 << 10).unwrap();
        assert!(pipe.capacity() >= 4096);
        let mut file = file;
        let mut off = 1000u64;
        let mut left = want;
        while left > 0 {
            let (r, f, p) = ops::splice_file_to_pipe(file, off, pipe, left).await;
            (file, pipe) = (f, p);
            let mut n = r.unwrap();
            assert!(n > 0 && n <= left);
            off += n as u64;
            left -= n;
            while n > 0 {
                let (r, p) = ops::splice_pipe_to(pipe, a.as_raw_fd(), n).await;
                pipe = p;
                n -= r.unwrap();
            }
        }
        off
    })
    .unwrap();
    assert_eq!(moved, data.len() as u64);
    assert!(reader.join().unwrap() == data[1000..], "bytes differ");
    // Past the end of the file there is nothing to move.
    let file = std::fs::File::open(&path).unwrap();
    let (r, _, _) = block_on(ops::splice_file_to_pipe(
        file,
        data.len() as u64,
        ops::Pipe::new(4096).unwrap(),
        4096,
    ))
    .unwrap();
    assert_eq!(r.unwrap(), 0);
    std::fs::remove_file(&path).unwrap();
}
