//! Linux AIO (`io_setup`/`io_submit`/`io_getevents`) as a second file I/O engine, for QEMU's
//! `aio=native`.
//!
//! Each context has at most one kernel AIO context, created on first use. Requests queued during
//! a turn are submitted in one `io_submit` just before the loop's `io_uring_enter` (QEMU's
//! plugging). Completion is signalled on an eventfd whose read is armed *in the context's own
//! ring*, so completions are reaped only by the owning thread (rule 5): there is no second
//! poller that could race on the in-flight count (QEMU's bug with two threads reaping one
//! context's Linux AIO events). Memory of dropped requests is held until their events arrive.

use std::any::Any;
use std::future::Future;
use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use crate::buf::IoBuf;
use crate::context::{Core, with_core};
use crate::ops::{BufResult, BufsResult};

const MAX_EVENTS: usize = 256;

const IOCB_CMD_PREAD: u16 = 0;
const IOCB_CMD_PWRITE: u16 = 1;
const IOCB_CMD_PREADV: u16 = 7;
const IOCB_CMD_PWRITEV: u16 = 8;
const IOCB_FLAG_RESFD: u32 = 1;

/// The kernel's `struct iocb` (little-endian layout).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Iocb {
    aio_data: u64,
    aio_key: u32,
    aio_rw_flags: i32,
    aio_lio_opcode: u16,
    aio_reqprio: i16,
    aio_fildes: u32,
    aio_buf: u64,
    aio_nbytes: u64,
    aio_offset: i64,
    aio_reserved2: u64,
    aio_flags: u32,
    aio_resfd: u32,
}

/// The kernel's `struct io_event`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct IoEvent {
    data: u64,
    obj: u64,
    res: i64,
    res2: i64,
}

enum LSlot {
    Free,
    Waiting(Option<Waker>),
    Done(i64),
    Orphaned(Option<Box<dyn Any>>),
}

pub(crate) struct LinuxAio {
    ctx: libc::c_ulong,
    efd: OwnedFd,
    efd_buf: Box<u64>,
    armed: bool,
    slots: Vec<(u32, LSlot)>,
    free: Vec<u32>,
    pending: Vec<Iocb>,
    in_kernel: usize,
}

fn sys_ret(r: libc::c_long) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

impl LinuxAio {
    fn new() -> io::Result<LinuxAio> {
        let mut ctx: libc::c_ulong = 0;
        // SAFETY: io_setup writes the new context id into `ctx`, a valid u64.
        sys_ret(unsafe {
            libc::syscall(libc::SYS_io_setup, MAX_EVENTS as libc::c_long, &mut ctx)
        })?;
        // SAFETY: plain syscall; the fd is checked and then owned.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            let e = io::Error::last_os_error();
            // SAFETY: destroying the context we just created.
            unsafe { libc::syscall(libc::SYS_io_destroy, ctx) };
            return Err(e);
        }
        Ok(LinuxAio {
            ctx,
            // SAFETY: fresh descriptor we own.
            efd: unsafe { OwnedFd::from_raw_fd(efd) },
            efd_buf: Box::new(0),
            armed: false,
            slots: Vec::new(),
            free: Vec::new(),
            pending: Vec::new(),
            in_kernel: 0,
        })
    }

    fn token(&self, idx: u32) -> u64 {
        ((self.slots[idx as usize].0 as u64) << 32) | idx as u64
    }

    fn slot(&mut self, token: u64) -> Option<&mut LSlot> {
        let idx = (token & 0xffff_ffff) as usize;
        let generation = (token >> 32) as u32;
        self.slots
            .get_mut(idx)
            .filter(|s| s.0 == generation)
            .map(|s| &mut s.1)
    }

    fn release(&mut self, token: u64) {
        let idx = (token & 0xffff_ffff) as u32;
        if let Some(s) = self.slot(token) {
            *s = LSlot::Free;
            self.free.push(idx);
        }
    }

    fn queue(&mut self, mut iocb: Iocb) -> u64 {
        let idx = match self.free.pop() {
            Some(i) => {
                let e = &mut self.slots[i as usize];
                e.0 = e.0.wrapping_add(1);
                e.1 = LSlot::Waiting(None);
                i
            }
            None => {
                self.slots.push((0, LSlot::Waiting(None)));
                (self.slots.len() - 1) as u32
            }
        };
        let token = self.token(idx);
        iocb.aio_data = token;
        iocb.aio_flags |= IOCB_FLAG_RESFD;
        iocb.aio_resfd = self.efd.as_raw_fd() as u32;
        self.pending.push(iocb);
        token
    }

    fn complete(&mut self, token: u64, res: i64, wake: &mut Vec<Waker>) {
        let Some(s) = self.slot(token) else { return };
        match std::mem::replace(s, LSlot::Done(res)) {
            LSlot::Waiting(w) => wake.extend(w),
            LSlot::Orphaned(keep) => {
                self.release(token);
                drop(keep);
            }
            other => *s = other,
        }
    }

    /// Submit queued requests (called before every `io_uring_enter` of the owning loop).
    pub(crate) fn flush(core: &Core) {
        let mut wake = Vec::new();
        let arm = {
            let mut guard = core.linux_aio.borrow_mut();
            let Some(la) = guard.as_mut() else { return };
            if la.pending.is_empty() {
                return;
            }
            let mut done = 0;
            while done < la.pending.len() {
                let mut ptrs: Vec<*mut Iocb> = la.pending[done..]
                    .iter_mut()
                    .map(|i| i as *mut Iocb)
                    .collect();
                // SAFETY: the iocbs are valid for the call (the kernel copies them); the buffers
                // they point to are owned by the requests' futures or slots until completion.
                let r = unsafe {
                    libc::syscall(
                        libc::SYS_io_submit,
                        la.ctx,
                        ptrs.len() as libc::c_long,
                        ptrs.as_mut_ptr(),
                    )
                };
                match sys_ret(r) {
                    Ok(0) => break,
                    Ok(n) => {
                        done += n;
                        la.in_kernel += n;
                    }
                    Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => break,
                    Err(e) => {
                        // The first request was refused: fail it and go on with the rest.
                        let token = la.pending[done].aio_data;
                        let errno = e.raw_os_error().unwrap_or(libc::EIO);
                        la.complete(token, -(errno as i64), &mut wake);
                        done += 1;
                    }
                }
            }
            la.pending.drain(..done);
            let arm = la.in_kernel > 0 && !la.armed;
            if arm {
                la.armed = true;
            }
            arm.then(|| (la.efd.as_raw_fd(), &mut *la.efd_buf as *mut u64))
        };
        if let Some((efd, buf)) = arm {
            core.arm_linux_aio_read(efd, buf);
        }
        for w in wake {
            w.wake();
        }
    }

    /// The completion eventfd fired: reap every event, on the owning thread.
    pub(crate) fn on_eventfd(core: &Core) {
        let mut wake = Vec::new();
        let arm = {
            let mut guard = core.linux_aio.borrow_mut();
            let Some(la) = guard.as_mut() else { return };
            la.armed = false;
            la.reap(&mut wake, false);
            let arm = la.in_kernel > 0;
            if arm {
                la.armed = true;
            }
            arm.then(|| (la.efd.as_raw_fd(), &mut *la.efd_buf as *mut u64))
        };
        if let Some((efd, buf)) = arm {
            core.arm_linux_aio_read(efd, buf);
        }
        for w in wake {
            w.wake();
        }
    }

    fn reap(&mut self, wake: &mut Vec<Waker>, block: bool) {
        let mut events = [IoEvent::default(); 64];
        loop {
            let ts = libc::timespec {
                tv_sec: 0,
                tv_nsec: if block { 100_000_000 } else { 0 },
            };
            let min = if block { 1 } else { 0 };
            // SAFETY: `events` has room for 64 events; ts is a valid timespec.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_io_getevents,
                    self.ctx,
                    min as libc::c_long,
                    events.len() as libc::c_long,
                    events.as_mut_ptr(),
                    &ts,
                )
            };
            let n = match sys_ret(r) {
                Ok(n) => n,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(_) => 0,
            };
            for ev in &events[..n] {
                self.in_kernel = self.in_kernel.saturating_sub(1);
                self.complete(ev.data, ev.res, wake);
            }
            if n < events.len() {
                break;
            }
        }
    }

    /// No request queued or in the kernel (the loop may sleep without watching the ring).
    pub(crate) fn is_idle(core: &Core) -> bool {
        core.linux_aio
            .borrow()
            .as_ref()
            .is_none_or(|la| la.in_kernel == 0 && la.pending.is_empty())
    }

    /// At context shutdown: wait (bounded) for requests in the kernel, then tear down.
    pub(crate) fn shutdown_wait(core: &Core) {
        let Some(mut la) = core.linux_aio.borrow_mut().take() else {
            return;
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut wake = Vec::new();
        while la.in_kernel > 0 && Instant::now() < deadline {
            la.reap(&mut wake, true);
        }
        drop(wake);
        if la.armed {
            // Complete the ring's pending eventfd read so the ring can drain.
            let one: u64 = 1;
            // SAFETY: 8-byte write from a valid u64 to our eventfd.
            unsafe { libc::write(la.efd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        }
        if la.in_kernel > 0 {
            // The kernel may still write into orphaned memory: leak it.
            for s in la.slots.iter_mut() {
                if let LSlot::Orphaned(keep) = &mut s.1 {
                    std::mem::forget(keep.take());
                }
            }
            std::mem::forget(la);
            return;
        }
        // SAFETY: destroying our own context, nothing is in flight.
        unsafe { libc::syscall(libc::SYS_io_destroy, la.ctx) };
        if la.armed {
            // The eventfd buffer is still the target of a ring read until it is reaped.
            std::mem::forget(std::mem::take(&mut la.efd_buf));
        }
    }
}

/// Check that the kernel offers Linux AIO (no context needed: for open-time checks; each
/// context creates its own AIO context on first use).
pub fn available() -> io::Result<()> {
    let mut ctx: libc::c_ulong = 0;
    // SAFETY: io_setup writes a context id into `ctx`.
    sys_ret(unsafe { libc::syscall(libc::SYS_io_setup, 1 as libc::c_long, &mut ctx) })?;
    // SAFETY: destroying the context just created, with nothing in flight.
    unsafe { libc::syscall(libc::SYS_io_destroy, ctx) };
    Ok(())
}

/// Make sure this thread's context has a Linux AIO context (for `aio=native` opens).
pub fn probe() -> io::Result<()> {
    with_core(ensure).unwrap_or_else(|| Err(io::Error::other("no AioContext on this thread")))
}

fn ensure(core: &Core) -> io::Result<()> {
    let mut la = core.linux_aio.borrow_mut();
    if la.is_none() {
        *la = Some(LinuxAio::new()?);
    }
    Ok(())
}

/// A request in a context's Linux AIO queue; like [`crate::Op`] it owns its memory.
#[must_use = "futures do nothing unless awaited"]
pub struct AioOp<T: 'static, R> {
    token: Result<u64, Option<io::Error>>,
    data: Option<T>,
    map: fn(i64, T) -> R,
    fail: fn(io::Error, T) -> R,
    _not_send: PhantomData<*const ()>,
}

impl<T: 'static, R> Unpin for AioOp<T, R> {}

impl<T: 'static, R> AioOp<T, R> {
    /// # Safety
    /// The buffer pointers in `iocb` must point into heap memory owned by `data`.
    unsafe fn submit(
        iocb: Iocb,
        data: T,
        map: fn(i64, T) -> R,
        fail: fn(io::Error, T) -> R,
    ) -> Self {
        let token = with_core(|c| {
            ensure(c)?;
            Ok(c.linux_aio
                .borrow_mut()
                .as_mut()
                .expect("ensured")
                .queue(iocb))
        })
        .unwrap_or_else(|| Err(io::Error::other("no AioContext on this thread")))
        .map_err(Some);
        AioOp {
            token,
            data: Some(data),
            map,
            fail,
            _not_send: PhantomData,
        }
    }
}

impl<T: 'static, R> Future for AioOp<T, R> {
    type Output = R;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<R> {
        let token = match &mut self.token {
            Ok(t) => *t,
            Err(e) => {
                let e = e
                    .take()
                    .unwrap_or_else(|| io::Error::other("polled after completion"));
                let d = self.data.take().expect("AioOp data");
                return Poll::Ready((self.fail)(e, d));
            }
        };
        let res = with_core(|c| {
            let mut g = c.linux_aio.borrow_mut();
            let la = g.as_mut()?;
            let s = la.slot(token)?;
            match s {
                LSlot::Done(r) => {
                    let r = *r;
                    la.release(token);
                    Some(r)
                }
                LSlot::Waiting(w) => {
                    if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                        *w = Some(cx.waker().clone());
                    }
                    None
                }
                _ => None,
            }
        })
        .flatten();
        match res {
            Some(r) => {
                self.token = Err(None);
                let d = self.data.take().expect("AioOp data");
                Poll::Ready((self.map)(r, d))
            }
            None => Poll::Pending,
        }
    }
}

impl<T: 'static, R> Drop for AioOp<T, R> {
    fn drop(&mut self) {
        let Ok(token) = self.token else { return };
        let mut keep = self.data.take().map(|d| Box::new(d) as Box<dyn Any>);
        let handled = with_core(|c| {
            let Ok(mut g) = c.linux_aio.try_borrow_mut() else {
                return false;
            };
            let Some(la) = g.as_mut() else { return false };
            match la.slot(token) {
                Some(LSlot::Done(_)) => {
                    la.release(token);
                    true
                }
                Some(s @ LSlot::Waiting(_)) => {
                    *s = LSlot::Orphaned(keep.take());
                    true
                }
                _ => true,
            }
        });
        if handled != Some(true) {
            std::mem::forget(keep);
        }
    }
}

fn iocb(op: u16, fd: RawFd, buf: u64, nbytes: u64, offset: u64, rw_flags: i32) -> Iocb {
    Iocb {
        aio_lio_opcode: op,
        aio_fildes: fd as u32,
        aio_buf: buf,
        aio_nbytes: nbytes,
        aio_offset: offset as i64,
        aio_rw_flags: rw_flags,
        ..Iocb::default()
    }
}

fn map_buf(res: i64, b: IoBuf) -> BufResult {
    if res < 0 {
        (Err(io::Error::from_raw_os_error(-res as i32)), b)
    } else {
        (Ok(res as usize), b)
    }
}

fn fail_buf(e: io::Error, b: IoBuf) -> BufResult {
    (Err(e), b)
}

/// Vectored buffers with their iovec array.
pub struct AioIovecs {
    bufs: Vec<IoBuf>,
    iov: Vec<libc::iovec>,
}

fn map_bufs(res: i64, v: AioIovecs) -> BufsResult {
    if res < 0 {
        (Err(io::Error::from_raw_os_error(-res as i32)), v.bufs)
    } else {
        (Ok(res as usize), v.bufs)
    }
}

fn fail_bufs(e: io::Error, v: AioIovecs) -> BufsResult {
    (Err(e), v.bufs)
}

pub fn read_at(fd: RawFd, mut buf: IoBuf, offset: u64) -> AioOp<IoBuf, BufResult> {
    let cb = iocb(
        IOCB_CMD_PREAD,
        fd,
        buf.as_mut_ptr() as u64,
        buf.len() as u64,
        offset,
        0,
    );
    // SAFETY: the pointer is into `buf`, owned by the request.
    unsafe { AioOp::submit(cb, buf, map_buf, fail_buf) }
}

pub fn write_at(fd: RawFd, buf: IoBuf, offset: u64, rw_flags: i32) -> AioOp<IoBuf, BufResult> {
    let cb = iocb(
        IOCB_CMD_PWRITE,
        fd,
        buf.as_ptr() as u64,
        buf.len() as u64,
        offset,
        rw_flags,
    );
    // SAFETY: the pointer is into `buf`, owned by the request.
    unsafe { AioOp::submit(cb, buf, map_buf, fail_buf) }
}

fn iovecs(mut bufs: Vec<IoBuf>) -> AioIovecs {
    let iov = bufs
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        })
        .collect();
    AioIovecs { bufs, iov }
}

pub fn readv_at(fd: RawFd, bufs: Vec<IoBuf>, offset: u64) -> AioOp<AioIovecs, BufsResult> {
    let v = iovecs(bufs);
    let cb = iocb(
        IOCB_CMD_PREADV,
        fd,
        v.iov.as_ptr() as u64,
        v.iov.len() as u64,
        offset,
        0,
    );
    // SAFETY: iovec array and buffers are heap memory owned by `v`.
    unsafe { AioOp::submit(cb, v, map_bufs, fail_bufs) }
}

pub fn writev_at(
    fd: RawFd,
    bufs: Vec<IoBuf>,
    offset: u64,
    rw_flags: i32,
) -> AioOp<AioIovecs, BufsResult> {
    let v = iovecs(bufs);
    let cb = iocb(
        IOCB_CMD_PWRITEV,
        fd,
        v.iov.as_ptr() as u64,
        v.iov.len() as u64,
        offset,
        rw_flags,
    );
    // SAFETY: iovec array and buffers are heap memory owned by `v`.
    unsafe { AioOp::submit(cb, v, map_bufs, fail_bufs) }
}
