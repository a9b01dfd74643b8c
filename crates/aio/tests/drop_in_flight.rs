//! Dropping futures with reads and writes in flight must never let a buffer be reused before
//! the kernel is done with it (DESIGN.md rule 8). The per-thread pool hands back the most recently
//! freed buffer first, so an implementation that released a dropped operation's buffer early
//! would hand that very buffer to the next allocation: the tests check addresses directly, and
//! check the bytes the kernel finally wrote.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};

use blockd_aio::{AioContext, IoBuf, block_on, ops, spawn, yield_now};

fn temp_file(tag: &str) -> (std::fs::File, std::path::PathBuf) {
    static N: AtomicUsize = AtomicUsize::new(0);
    let path = std::env::temp_dir().join(format!(
        "blockd-aio-drop-{}-{}-{}",
        tag,
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    (f, path)
}

#[test]
fn a_read_dropped_while_the_kernel_holds_it_keeps_its_buffer() {
    let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
    let fd = a.as_raw_fd();
    block_on(async move {
        let ctx = AioContext::current().unwrap();
        let op = ops::recv(fd, IoBuf::new(4096, 4096), 0);
        yield_now().await; // the loop submits it: the kernel now owns the buffer
        yield_now().await;
        assert_eq!(ctx.ring_in_flight(), 1);
        // Find the buffer's address: allocate everything the pool has of this class.
        drop(op);
        assert_eq!(
            ctx.ring_orphans(),
            1,
            "the ring holds the dropped read's buffer"
        );
        let fresh: Vec<IoBuf> = (0..8).map(|_| IoBuf::new(4096, 4096)).collect();
        // The cancel queued by the drop completes the read; only then may the buffer return.
        for _ in 0..100 {
            if ctx.ring_orphans() == 0 {
                break;
            }
            yield_now().await;
        }
        assert_eq!(
            ctx.ring_orphans(),
            0,
            "cancelled read completed and released its buffer"
        );
        drop(fresh);
        // Nothing arrives into freed memory afterwards: data sent now stays in the socket.
        use std::io::Write;
        b.write_all(b"late").unwrap();
        let (n, buf) = ops::recv(fd, IoBuf::new(4, 1), 0).await;
        assert_eq!(&buf[..n.unwrap()], b"late");
    })
    .unwrap();
}

#[test]
fn dropped_pending_recv_buffer_is_not_handed_out_again_before_completion() {
    let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
    let fd = a.as_raw_fd();
    block_on(async move {
        let mut buf = IoBuf::new(4096, 4096);
        let addr = buf.as_mut_ptr() as usize;
        let op = ops::recv(fd, buf, 0);
        yield_now().await;
        drop(op);
        // Before the completion is reaped, no allocation may get the same memory.
        let again = IoBuf::new(4096, 4096);
        assert_ne!(
            again.as_ptr() as usize,
            addr,
            "buffer reused while the kernel held it"
        );
        drop(again);
        // After the completion (cancelled), the pool gives it back: it was recycled, not leaked.
        let ctx = AioContext::current().unwrap();
        while ctx.ring_orphans() > 0 {
            yield_now().await;
        }
        let held: Vec<IoBuf> = (0..4).map(|_| IoBuf::new(4096, 4096)).collect();
        assert!(
            held.iter().any(|b| b.as_ptr() as usize == addr),
            "released buffer returns to the pool"
        );
    })
    .unwrap();
}

/// Many tasks write, read and drop at every stage (before submission, in flight, completed but
/// not polled) while reusing pool buffers; every block must end up holding exactly the bytes its
/// dropped or awaited write carried.
#[test]
fn dropping_reads_and_writes_under_load_never_reuses_a_live_buffer() {
    const TASKS: u64 = 16;
    const ROUNDS: u64 = 200;
    const BLOCK: usize = 4096;
    let (f, path) = temp_file("load");
    let fd = f.as_raw_fd();
    f.set_len(TASKS * ROUNDS * 2 * BLOCK as u64).unwrap();
    block_on(async move {
        let mut tasks = Vec::new();
        for t in 0..TASKS {
            tasks.push(spawn(async move {
                let mut live_addrs = Vec::new();
                for r in 0..ROUNDS {
                    let tag = ((t * ROUNDS + r) % 251) as u8 + 1;
                    let base = (t * ROUNDS + r) * 2 * BLOCK as u64;
                    // A write we drop; where it is dropped varies with the round.
                    let mut a = IoBuf::new(BLOCK, 4096);
                    a.fill(tag);
                    let a_addr = a.as_ptr() as usize;
                    let op = ops::write_at(fd, a, base);
                    match r % 3 {
                        0 => {}                 // before submission
                        1 => yield_now().await, // submitted, maybe in flight
                        _ => {
                            yield_now().await; // likely completed, not yet polled
                            yield_now().await;
                        }
                    }
                    let ctx = AioContext::current().unwrap();
                    let before = ctx.ring_orphans();
                    drop(op);
                    let write_orphaned = ctx.ring_orphans() > before;
                    // The next allocation must not be memory the kernel may still use.
                    let mut b = IoBuf::new(BLOCK, 4096);
                    if write_orphaned {
                        assert_ne!(
                            b.as_ptr() as usize,
                            a_addr,
                            "dropped write's buffer handed out while in flight"
                        );
                    }
                    // A read we drop, into a buffer from the same pool class.
                    let rd = ops::read_at(fd, IoBuf::new(BLOCK, 4096), base + BLOCK as u64);
                    if r % 2 == 0 {
                        yield_now().await;
                    }
                    drop(rd);
                    b.fill(tag ^ 0xff);
                    let (n, b) = ops::write_at(fd, b, base + BLOCK as u64).await;
                    assert_eq!(n.unwrap(), BLOCK);
                    live_addrs.push(b.as_ptr() as usize);
                    drop(b);
                    yield_now().await;
                }
                live_addrs.len()
            }));
        }
        for t in tasks {
            assert_eq!(t.await, ROUNDS as usize);
        }
        // Let every orphan complete.
        let ctx = AioContext::current().unwrap();
        while ctx.ring_in_flight() > 0 {
            yield_now().await;
        }
    })
    .unwrap();
    let mut data = Vec::new();
    std::fs::File::open(&path)
        .unwrap()
        .read_to_end(&mut data)
        .unwrap();
    for i in 0..TASKS * ROUNDS {
        let tag = (i % 251) as u8 + 1;
        let a = &data[(i as usize) * 2 * BLOCK..][..BLOCK];
        let b = &data[(i as usize) * 2 * BLOCK + BLOCK..][..BLOCK];
        // A dropped write either ran with its own bytes or (if cancelled in time) not at all.
        assert!(
            a.iter().all(|&x| x == tag) || a.iter().all(|&x| x == 0),
            "block {i}: a dropped write's buffer was overwritten before the kernel used it"
        );
        assert!(
            b.iter().all(|&x| x == tag ^ 0xff),
            "block {i}: awaited write corrupted"
        );
    }
    drop(f);
    let _ = std::fs::remove_file(path);
}
