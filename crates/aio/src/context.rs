//! The AioContext: one single-threaded event loop per thread.
//!
//! A context owns a run queue of tasks, bottom halves, timers, an io_uring ring (which also
//! carries fd readiness, as poll operations) and, on demand, a Linux AIO context. Everything in
//! it is touched only by its own thread; the only door in from other threads is the lock-free
//! remote queue in [`Shared`], reached through a [`ContextHandle`](crate::ContextHandle).
//!
//! One turn of the loop: drain the remote queue, run scheduled bottom halves, fire due timers,
//! run the tasks that are ready, reap completions from the ring in user space (waking their
//! tasks). When nothing is ready it busy-polls for the adaptive window (only while storage I/O
//! is in flight: see [`Core::idle`]), then sleeps in one
//! `io_uring_enter` that also submits every SQE queued during the turn.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::pin::{Pin, pin};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use async_task::Runnable;
use concurrent_queue::ConcurrentQueue;
use io_uring::{opcode, types};

use crate::bh::BhTable;
use crate::handle::ContextHandle;
use crate::linux_aio::LinuxAio;
use crate::poll::{AdaptivePoll, PollParams};
use crate::ring::{Completion, Ring, TOKEN_LINUX_AIO, TOKEN_WAKE};
use crate::timer::Timers;
use crate::wake::Handshake;

/// Ring size of a context.
const RING_ENTRIES: u32 = 256;

/// Work sent to a context from another thread.
pub(crate) enum Remote {
    Task(Runnable),
    Call(Box<dyn FnOnce() + Send>),
    Bh(usize),
}

/// The part of a context other threads may touch: the remote queue and the wake handshake.
pub(crate) struct Shared {
    pub(crate) id: usize,
    pub(crate) name: String,
    pub(crate) remote: ConcurrentQueue<Remote>,
    pub(crate) handshake: Handshake,
    event_fd: OwnedFd,
    pub(crate) stop_requested: AtomicBool,
    pub(crate) eventfd_writes: AtomicUsize,
}

impl Shared {
    /// Queue work for the context and wake it (a syscall only if it sleeps).
    pub(crate) fn send(&self, msg: Remote) -> Result<(), Remote> {
        match self.remote.push(msg) {
            Ok(()) => {
                self.notify();
                Ok(())
            }
            Err(e) => Err(e.into_inner()),
        }
    }

    pub(crate) fn notify(&self) {
        if self.handshake.notify() {
            self.eventfd_writes.fetch_add(1, Ordering::Relaxed);
            let one: u64 = 1;
            // SAFETY: writing 8 bytes from a valid u64 to an eventfd we own.
            unsafe {
                libc::write(
                    self.event_fd.as_raw_fd(),
                    (&one as *const u64).cast(),
                    std::mem::size_of::<u64>(),
                );
            }
        }
    }
}

static NEXT_ID: AtomicUsize = AtomicUsize::new(1);

/// Owns this thread's context. On thread exit its destructor shuts the context down while
/// the context is still reachable as current, then detaches it.
struct CurrentSlot(Option<Rc<Core>>);

impl Drop for CurrentSlot {
    fn drop(&mut self) {
        if let Some(core) = self.0.take() {
            core.shutdown();
            let _ = CORE_PTR.try_with(|p| p.set(std::ptr::null()));
        }
    }
}

thread_local! {
    /// The context of this thread, if any (ownership).
    static CURRENT: RefCell<CurrentSlot> = const { RefCell::new(CurrentSlot(None)) };
    /// Fast access to the same context: no destructor, so reading it is a plain TLS load.
    /// Non-null exactly while `CURRENT` holds the core it points to.
    static CORE_PTR: Cell<*const Core> = const { Cell::new(std::ptr::null()) };
}

/// Run `f` with this thread's context core. `None` when the thread has no context.
#[inline]
pub(crate) fn with_core<R>(f: impl FnOnce(&Core) -> R) -> Option<R> {
    let p = CORE_PTR.try_with(|c| c.get()).ok()?;
    if p.is_null() {
        return None;
    }
    // SAFETY: CORE_PTR is non-null only while CURRENT holds an Rc to this Core (it is cleared
    // before that Rc is released), and the Core is only ever accessed through shared
    // references, so the reference is valid for the duration of `f`.
    Some(f(unsafe { &*p }))
}

/// Like [`with_core`], for the few callers that need the owning `Rc` (spawning).
pub(crate) fn with_core_rc<R>(f: impl FnOnce(&Rc<Core>) -> R) -> Option<R> {
    CURRENT
        .try_with(|c| c.borrow().0.as_ref().map(f))
        .ok()
        .flatten()
}

#[inline]
pub(crate) fn current_id() -> usize {
    with_core(|c| c.shared.id).unwrap_or(0)
}

/// Everything a context owns. Lives in an `Rc` on its thread.
pub(crate) struct Core {
    pub(crate) shared: Arc<Shared>,
    pub(crate) ring: RefCell<Ring>,
    pub(crate) run_queue: RefCell<VecDeque<Runnable>>,
    pub(crate) timers: RefCell<Timers>,
    pub(crate) bhs: RefCell<BhTable>,
    pub(crate) linux_aio: RefCell<Option<LinuxAio>>,
    /// Wakers of every live task, so shutdown can cancel them all.
    active: RefCell<Slab<Waker>>,
    poll: RefCell<AdaptivePoll>,
    wake_buf: RefCell<Box<u64>>,
    wake_armed: Cell<bool>,
    running: Cell<bool>,
    shut_down: Cell<bool>,
    pub(crate) stats: Stats,
}

/// Counters a context keeps about itself.
#[derive(Default, Debug)]
pub(crate) struct Stats {
    pub(crate) turns: Cell<u64>,
    pub(crate) sleeps: Cell<u64>,
    pub(crate) tasks_run: Cell<u64>,
}

/// A snapshot of a context's counters.
#[derive(Debug, Clone, Copy, Default)]
pub struct ContextStats {
    pub turns: u64,
    pub sleeps: u64,
    pub tasks_run: u64,
    pub io_uring_enters: u64,
    pub eventfd_writes: u64,
    pub poll_ns: u64,
}

/// Returned by `block_on` when it is called from code that runs on an event loop: a nested
/// event loop would re-enter the context (the root of QEMU's AIO_WAIT_WHILE deadlocks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NestedLoopError {
    pub context: String,
}

impl std::fmt::Display for NestedLoopError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "block_on called from code running on event loop '{}': await the future instead \
             (nested event loops are not allowed)",
            self.context
        )
    }
}

impl std::error::Error for NestedLoopError {}

/// A single-threaded event loop, bound to the thread that created it. Cheap to clone; `!Send`.
#[derive(Clone)]
pub struct AioContext {
    pub(crate) core: Rc<Core>,
}

/// A task spawned on a context. Await it for its output; dropping it cancels the task, `detach`
/// lets it run on.
pub type Task<T> = async_task::Task<T>;

impl AioContext {
    /// Create the event loop of the calling thread. Fails if the thread already has one.
    pub fn new(name: &str) -> io::Result<AioContext> {
        if with_core(|_| ()).is_some() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "this thread already has an AioContext",
            ));
        }
        // SAFETY: plain syscall; the returned fd is checked and then owned.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: efd is a fresh descriptor we own.
        let event_fd = unsafe { OwnedFd::from_raw_fd(efd) };
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let shared = Arc::new(Shared {
            id,
            name: name.to_string(),
            remote: ConcurrentQueue::unbounded(),
            handshake: Handshake::new(),
            event_fd,
            stop_requested: AtomicBool::new(false),
            eventfd_writes: AtomicUsize::new(0),
        });
        let core = Rc::new(Core {
            shared,
            ring: RefCell::new(Ring::new(RING_ENTRIES)?),
            run_queue: RefCell::new(VecDeque::with_capacity(256)),
            timers: RefCell::new(Timers::default()),
            bhs: RefCell::new(BhTable::default()),
            linux_aio: RefCell::new(None),
            active: RefCell::new(Slab::default()),
            poll: RefCell::new(AdaptivePoll::new(PollParams::disabled())),
            wake_buf: RefCell::new(Box::new(0)),
            wake_armed: Cell::new(false),
            running: Cell::new(false),
            shut_down: Cell::new(false),
            stats: Stats::default(),
        });
        CURRENT.with(|c| c.borrow_mut().0 = Some(core.clone()));
        CORE_PTR.with(|p| p.set(Rc::as_ptr(&core)));
        Ok(AioContext { core })
    }

    /// This thread's context, if it has one.
    pub fn current() -> Option<AioContext> {
        with_core_rc(|c| AioContext { core: c.clone() })
    }

    /// This thread's context, creating one (named after the thread) if there is none. The
    /// created context lives as long as the thread.
    pub fn current_or_new() -> io::Result<AioContext> {
        match Self::current() {
            Some(c) => Ok(c),
            None => {
                let name = std::thread::current().name().unwrap_or("main").to_string();
                AioContext::new(&name)
            }
        }
    }

    pub fn handle(&self) -> ContextHandle {
        ContextHandle::new(self.core.shared.clone())
    }

    pub fn name(&self) -> &str {
        &self.core.shared.name
    }

    /// Spawn a task on this context (which must be the calling thread's).
    pub fn spawn<F>(&self, fut: F) -> Task<F::Output>
    where
        F: Future + 'static,
        F::Output: 'static,
    {
        self.core.spawn(fut)
    }

    /// Set the adaptive polling parameters (QEMU's poll-max-ns, poll-grow, poll-shrink).
    pub fn set_poll_params(&self, p: PollParams) {
        self.core.poll.borrow_mut().set_params(p);
    }

    pub fn poll_params(&self) -> PollParams {
        self.core.poll.borrow().params()
    }

    pub fn stats(&self) -> ContextStats {
        let s = &self.core.stats;
        ContextStats {
            turns: s.turns.get(),
            sleeps: s.sleeps.get(),
            tasks_run: s.tasks_run.get(),
            io_uring_enters: self.core.ring.borrow().submits,
            eventfd_writes: self.core.shared.eventfd_writes.load(Ordering::Relaxed) as u64,
            poll_ns: self.core.poll.borrow().current_ns(),
        }
    }

    /// Operations submitted to the ring whose completions have not been reaped yet.
    pub fn ring_in_flight(&self) -> usize {
        self.core.ring.borrow().in_flight()
    }

    /// Of those, the ones whose futures were dropped (their memory is held by the ring).
    pub fn ring_orphans(&self) -> usize {
        self.core.ring.borrow().orphans()
    }

    /// Run this context's loop until `fut` completes. Only for the top of a program, a test or
    /// an iothread's main function: from code already running on an event loop it returns
    /// [`NestedLoopError`] instead of re-entering the loop.
    pub fn block_on<F: Future>(&self, fut: F) -> Result<F::Output, NestedLoopError> {
        if self.core.running.get() {
            return Err(NestedLoopError {
                context: self.core.shared.name.clone(),
            });
        }
        let root_wake = Arc::new(RootWake {
            woken: AtomicBool::new(true),
            shared: self.core.shared.clone(),
        });
        let waker = Waker::from(root_wake.clone());
        let mut cx = Context::from_waker(&waker);
        let mut fut = pin!(fut);
        let mut out = None;
        self.core.run(|| {
            // Load first: the common turn has no root wake, and a plain load is cheaper than a
            // swap on the hot path.
            if root_wake.woken.load(Ordering::Acquire)
                && root_wake.woken.swap(false, Ordering::AcqRel)
                && let Poll::Ready(v) = fut.as_mut().poll(&mut cx)
            {
                out = Some(v);
                return true;
            }
            false
        });
        Ok(out.expect("event loop left before the root future completed"))
    }

    /// Run the loop until another thread calls [`ContextHandle::request_stop`]; the iothread
    /// main function.
    pub fn run_until_stopped(&self) -> Result<(), NestedLoopError> {
        if self.core.running.get() {
            return Err(NestedLoopError {
                context: self.core.shared.name.clone(),
            });
        }
        let shared = self.core.shared.clone();
        self.core
            .run(|| shared.stop_requested.load(Ordering::Acquire));
        Ok(())
    }

    /// Cancel every task, wait for in-flight ring operations (bounded), and detach the context
    /// from its thread. Also done when the thread exits.
    pub fn shutdown(self) {
        self.core.shutdown();
        let _ = CURRENT.try_with(|c| {
            let mut c = c.borrow_mut();
            if c.0.as_ref().is_some_and(|x| Rc::ptr_eq(x, &self.core)) {
                let _ = CORE_PTR.try_with(|p| p.set(std::ptr::null()));
                c.0 = None;
            }
        });
    }
}

/// Waker of a `block_on` root future.
struct RootWake {
    woken: AtomicBool,
    shared: Arc<Shared>,
}

impl Wake for RootWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref()
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        // From the loop's own thread this only flips the handshake to NOTIFIED (no syscall),
        // which keeps the loop from sleeping with the root ready to run.
        self.shared.notify();
    }
}

/// Spawn on the calling thread's context. Panics if the thread has none (a programming error:
/// every blockd thread that does I/O runs a context).
pub fn spawn<F>(fut: F) -> Task<F::Output>
where
    F: Future + 'static,
    F::Output: 'static,
{
    with_core_rc(|c| c.spawn(fut)).expect("blockd_aio::spawn on a thread without an AioContext")
}

/// Run `fut` to completion on this thread's event loop (created if missing). For the top of CLI
/// programs and tests only; see [`AioContext::block_on`].
pub fn block_on<F: Future>(fut: F) -> Result<F::Output, NestedLoopError> {
    let ctx = AioContext::current_or_new().map_err(|e| NestedLoopError {
        context: format!("<cannot create event loop: {e}>"),
    })?;
    ctx.block_on(fut)
}

/// Yield once to let other ready tasks of the context run.
pub async fn yield_now() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if yielded {
            Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    })
    .await
}

/// Schedule function of every task: the owner thread pushes to its local run queue, any other
/// thread goes through the remote queue and the wake handshake.
fn schedule_on(shared: &Arc<Shared>, runnable: Runnable) {
    let mut slot = Some(runnable);
    with_core(|c| {
        if c.shared.id == shared.id
            && let Some(r) = slot.take()
        {
            c.run_queue.borrow_mut().push_back(r);
        }
    });
    let Some(runnable) = slot else { return };
    if let Err(Remote::Task(r)) = shared.send(Remote::Task(runnable)) {
        // The context has shut down (its tasks were cancelled already): the task must not be
        // dropped on a foreign thread, so it is leaked.
        std::mem::forget(r);
    }
}

/// A future that removes its task from the context's active set when it goes away.
struct Tracked<F> {
    fut: F,
    key: usize,
    core: std::rc::Weak<Core>,
}

impl<F: Future> Future for Tracked<F> {
    type Output = F::Output;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // SAFETY: `fut` is structurally pinned: never moved out of `self`, dropped in place.
        unsafe { self.map_unchecked_mut(|s| &mut s.fut) }.poll(cx)
    }
}

impl<F> Drop for Tracked<F> {
    fn drop(&mut self) {
        if let Some(core) = self.core.upgrade() {
            core.active.borrow_mut().remove(self.key);
        }
    }
}

impl Core {
    pub(crate) fn spawn<F>(self: &Rc<Self>, fut: F) -> Task<F::Output>
    where
        F: Future + 'static,
        F::Output: 'static,
    {
        let key = self.active.borrow_mut().reserve();
        let tracked = Tracked {
            fut,
            key,
            core: Rc::downgrade(self),
        };
        let shared = self.shared.clone();
        let (runnable, task) = async_task::spawn_local(tracked, move |r| schedule_on(&shared, r));
        self.active.borrow_mut().fill(key, runnable.waker());
        if self.shut_down.get() {
            // Spawned after shutdown: cancel it right away (dropped here, on the owner thread).
            drop(runnable);
        } else {
            self.run_queue.borrow_mut().push_back(runnable);
        }
        task
    }

    /// The loop. `done` is checked every turn; the loop returns when it says so.
    fn run(self: &Rc<Self>, mut done: impl FnMut() -> bool) {
        self.running.set(true);
        struct Running<'a>(&'a Cell<bool>);
        impl Drop for Running<'_> {
            fn drop(&mut self) {
                self.0.set(false);
            }
        }
        let _running = Running(&self.running);

        loop {
            if done() {
                return;
            }
            let progress = self.turn();
            if progress || !self.run_queue.borrow().is_empty() {
                continue;
            }
            if done() {
                return;
            }
            self.idle();
        }
    }

    /// One pass over every source of work. Returns whether anything happened.
    fn turn(self: &Rc<Self>) -> bool {
        self.stats.turns.set(self.stats.turns.get() + 1);
        let mut progress = self.drain_remote();
        progress |= BhTable::run_scheduled(self);
        progress |= self.fire_timers();
        progress |= self.run_tasks();
        // Everything queued this turn goes to the kernel in one io_uring_enter; completions
        // the kernel produced inline are reaped right away, in the same turn.
        self.flush_submissions();
        progress |= self.reap();
        progress
    }

    fn drain_remote(&self) -> bool {
        // Every push is followed by a notify, so a RUNNING state means an empty queue.
        if self.shared.handshake.state() == crate::wake::RUNNING {
            return false;
        }
        self.shared.handshake.begin_drain();
        let mut any = false;
        while let Ok(msg) = self.shared.remote.pop() {
            any = true;
            match msg {
                Remote::Task(r) => self.run_queue.borrow_mut().push_back(r),
                Remote::Call(f) => f(),
                Remote::Bh(id) => BhTable::schedule_local(self, id),
            }
        }
        any
    }

    fn run_tasks(&self) -> bool {
        // Run the tasks ready now; tasks they wake run next turn, after completions are reaped.
        let n = self.run_queue.borrow().len();
        for _ in 0..n {
            let Some(r) = self.run_queue.borrow_mut().pop_front() else {
                break;
            };
            r.run();
        }
        self.stats
            .tasks_run
            .set(self.stats.tasks_run.get() + n as u64);
        n > 0
    }

    fn fire_timers(&self) -> bool {
        if self.timers.borrow().len() == 0 {
            return false;
        }
        let due = self.timers.borrow_mut().take_due(Instant::now());
        let any = !due.is_empty();
        for w in due {
            w.wake();
        }
        any
    }

    /// Reap completions in user space and act on them with no borrow held.
    fn reap(&self) -> bool {
        let mut linux_aio = false;
        let n = self.ring.borrow_mut().reap(|c| match c {
            // Waking only pushes the task on this context's run queue: no ring access.
            Completion::Woke(Some(w)) => w.wake(),
            Completion::Woke(None) | Completion::Ignored => {}
            // Orphans hold plain memory (buffers, iovecs, addresses).
            Completion::Released(keep) => drop(keep),
            Completion::Wake => self.wake_armed.set(false),
            Completion::LinuxAio => linux_aio = true,
        });
        if linux_aio {
            // Reaping Linux AIO events may re-arm its eventfd read: needs the ring.
            LinuxAio::on_eventfd(self);
        }
        n > 0
    }

    fn flush_submissions(&self) {
        LinuxAio::flush(self);
        let _ = self.ring.borrow_mut().submit();
    }

    /// Nothing is ready: poll for the adaptive window, then sleep until a completion, a remote
    /// wake or the next timer.
    ///
    /// Only storage I/O is polled for: while everything in flight waits for a peer (a socket
    /// receive, an accept, a timeout) the loop sleeps at once and the wait does not steer the
    /// window, as QEMU's loop does not poll while it watches an fd that has no poll handler (an
    /// NBD client's socket). A spinning server thread would take the CPU its client needs to
    /// send the next request.
    fn idle(self: &Rc<Self>) {
        self.flush_submissions();
        let start = Instant::now();
        let storage_in_flight = {
            let ring = self.ring.borrow();
            ring.in_flight() > ring.peer_waits()
        } || !LinuxAio::is_idle(self);
        let window = if storage_in_flight {
            self.poll.borrow().current_ns()
        } else {
            0
        };
        if window > 0 {
            let until = start + Duration::from_nanos(window);
            loop {
                if self.ring.borrow_mut().has_completions()
                    || !self.shared.remote.is_empty()
                    || self.shared.handshake.state() == crate::wake::NOTIFIED
                    || self
                        .timers
                        .borrow()
                        .next_deadline()
                        .is_some_and(|d| d <= Instant::now())
                {
                    self.poll
                        .borrow_mut()
                        .record_wait(start.elapsed().as_nanos() as u64);
                    return;
                }
                if Instant::now() >= until {
                    break;
                }
                std::hint::spin_loop();
            }
        }
        let timeout = self
            .timers
            .borrow()
            .next_deadline()
            .map(|d| d.saturating_duration_since(Instant::now()));
        // With nothing in flight in the ring, sleep on the eventfd directly: one wake-up path
        // fewer than a ring completion, so a remote wake of an idle context costs about what a
        // bare eventfd round trip costs. Never while the ring's own wake read is armed: the
        // kernel may complete that read (consuming the count) before ppoll looks, and the wake
        // would be lost.
        let ring_idle = {
            let ring = self.ring.borrow();
            ring.in_flight() == 0
                && !ring.has_unsubmitted()
                && !self.wake_armed.get()
                && LinuxAio::is_idle(self)
        };
        if !ring_idle {
            self.arm_wake_read();
        }
        if !self.shared.handshake.prepare_sleep() {
            return;
        }
        self.stats.sleeps.set(self.stats.sleeps.get() + 1);
        let r = if ring_idle {
            self.sleep_on_eventfd(timeout)
        } else {
            self.ring.borrow_mut().submit_and_wait(timeout)
        };
        self.shared.handshake.end_sleep();
        if let Err(e) = r {
            // Nothing sensible to do but not spin: report and back off briefly.
            eprintln!(
                "blockd-aio: waiting for events failed in '{}': {e}",
                self.shared.name
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        if storage_in_flight {
            self.poll
                .borrow_mut()
                .record_wait(start.elapsed().as_nanos() as u64);
        }
    }

    /// Block in ppoll(2) on the wake eventfd until a remote wake or `timeout`, then consume it.
    fn sleep_on_eventfd(&self, timeout: Option<Duration>) -> io::Result<()> {
        let fd = self.shared.event_fd.as_raw_fd();
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ts = timeout.map(|d| libc::timespec {
            tv_sec: d.as_secs().min(i64::MAX as u64) as libc::time_t,
            tv_nsec: d.subsec_nanos() as libc::c_long,
        });
        let tsp = ts
            .as_ref()
            .map_or(std::ptr::null(), |t| t as *const libc::timespec);
        // SAFETY: one valid pollfd; tsp is null or points to a live timespec.
        let r = unsafe { libc::ppoll(&mut pfd, 1, tsp, std::ptr::null()) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINTR) {
                return Err(e);
            }
        }
        if r > 0 {
            let mut v: u64 = 0;
            // SAFETY: 8-byte read into a valid u64 from our non-blocking eventfd.
            unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
        }
        Ok(())
    }

    fn arm_wake_read(&self) {
        if self.wake_armed.get() {
            return;
        }
        let ptr: *mut u64 = &mut **self.wake_buf.borrow_mut();
        let sqe = opcode::Read::new(types::Fd(self.shared.event_fd.as_raw_fd()), ptr.cast(), 8)
            .build()
            .user_data(TOKEN_WAKE);
        // SAFETY: the 8-byte target is a Box owned by the core, which outlives the ring's use
        // of it: shutdown reaps or cancels every ring operation before the core is dropped.
        unsafe { self.ring.borrow_mut().push(&sqe) };
        self.wake_armed.set(true);
    }

    pub(crate) fn arm_linux_aio_read(&self, efd: i32, buf: *mut u64) {
        let sqe = opcode::Read::new(types::Fd(efd), buf.cast(), 8)
            .build()
            .user_data(TOKEN_LINUX_AIO);
        // SAFETY: `buf` is owned by the LinuxAio of this core, which lives until shutdown has
        // drained the ring.
        unsafe { self.ring.borrow_mut().push(&sqe) };
    }

    fn shutdown(&self) {
        if self.shut_down.replace(true) {
            return;
        }
        // Cancel every task: wake them all, then drop (instead of run) every runnable. Dropping
        // a runnable drops the task's future on this thread.
        let wakers = self.active.borrow_mut().take_all();
        for w in wakers {
            w.wake();
        }
        self.drain_remote_for_shutdown();
        while let Some(r) = self.run_queue.borrow_mut().pop_front() {
            drop(r);
        }
        self.shared.remote.close();
        self.drain_remote_for_shutdown();
        // Wait for the kernel to finish with orphaned memory (cancels were queued when the
        // futures were dropped), bounded so a stuck device cannot hang the exit.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let _ = self.reap();
            let left = self.ring.borrow().in_flight();
            LinuxAio::shutdown_wait(self);
            if left == 0 || Instant::now() >= deadline {
                break;
            }
            let _ = self
                .ring
                .borrow_mut()
                .submit_and_wait(Some(Duration::from_millis(100)));
        }
        if self.wake_armed.get() {
            // Kick our own eventfd so the read completes, and reap it.
            self.shared.handshake.begin_drain();
            let one: u64 = 1;
            // SAFETY: 8-byte write from a valid u64 to our eventfd.
            unsafe {
                libc::write(
                    self.shared.event_fd.as_raw_fd(),
                    (&one as *const u64).cast(),
                    8,
                );
            }
            let deadline = Instant::now() + Duration::from_secs(1);
            while self.wake_armed.get() && Instant::now() < deadline {
                let _ = self
                    .ring
                    .borrow_mut()
                    .submit_and_wait(Some(Duration::from_millis(50)));
                let _ = self.reap();
            }
        }
        let mut ring = self.ring.borrow_mut();
        if ring.in_flight() > 0 {
            ring.leak_orphans();
            if self.wake_armed.get() {
                // The wake buffer may still be written: leak it too.
                std::mem::forget(std::mem::take(&mut *self.wake_buf.borrow_mut()));
            }
        }
    }

    fn drain_remote_for_shutdown(&self) {
        while let Ok(msg) = self.shared.remote.pop() {
            match msg {
                Remote::Task(r) => drop(r),
                // Dropping the closure drops its result sender: the caller sees Canceled.
                Remote::Call(f) => drop(f),
                Remote::Bh(_) => {}
            }
        }
    }
}

impl Drop for Core {
    fn drop(&mut self) {
        // The last reference went away (the thread exited, or every AioContext clone was
        // dropped): cancel what is left and let the kernel finish with our memory first.
        self.shutdown();
    }
}

/// A minimal slab of wakers with reserve-then-fill insertion.
struct Slab<T> {
    entries: Vec<Option<T>>,
    free: Vec<usize>,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab {
            entries: Vec::new(),
            free: Vec::new(),
        }
    }
}

impl<T> Slab<T> {
    fn reserve(&mut self) -> usize {
        match self.free.pop() {
            Some(k) => k,
            None => {
                self.entries.push(None);
                self.entries.len() - 1
            }
        }
    }
    fn fill(&mut self, k: usize, v: T) {
        self.entries[k] = Some(v);
    }
    fn remove(&mut self, k: usize) {
        if let Some(e) = self.entries.get_mut(k)
            && e.take().is_some()
        {
            self.free.push(k);
        }
    }
    fn take_all(&mut self) -> Vec<T> {
        self.free.clear();
        let out: Vec<T> = self.entries.iter_mut().filter_map(Option::take).collect();
        self.free.extend(0..self.entries.len());
        out
    }
}
