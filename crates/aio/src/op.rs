//! The future of one ring operation.
//!
//! An [`Op`] is submitted when it is created (so its id exists at once, for `cancel`), owns the
//! memory the kernel uses while it is in flight, and turns the completion into a typed result.
//! Dropping it before completion hands that memory to the ring (see `ring.rs`) and queues an
//! async cancel.

use std::future::Future;
use std::io;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};

use io_uring::squeue;

use crate::context::with_core;

/// Identifies an in-flight operation, for [`crate::ops::cancel`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpId(pub(crate) u64);

/// A submitted ring operation owning `T` (its buffers) and mapping the result with `map`.
#[must_use = "futures do nothing unless awaited"]
pub struct Op<T: 'static, R> {
    user_data: u64,
    data: Option<T>,
    map: fn(i32, u32, T) -> R,
    done: bool,
    _not_send: PhantomData<*const ()>,
}

impl<T: 'static, R> Unpin for Op<T, R> {}

impl<T: 'static, R> Op<T, R> {
    /// Submit `sqe` on this thread's ring.
    ///
    /// # Safety
    /// Every pointer in `sqe` must point into heap memory owned by `data` (or be static), so
    /// that it stays valid while `data` lives, wherever the `Op` is moved.
    pub(crate) unsafe fn submit(sqe: squeue::Entry, data: T, map: fn(i32, u32, T) -> R) -> Self {
        // SAFETY: forwarded from the caller's contract.
        unsafe { Self::submit_as(false, sqe, data, map) }
    }

    /// [`Op::submit`] for an operation that waits for a peer (a socket receive or accept, a
    /// readiness poll, a timeout): the context does not busy-poll for its completion.
    ///
    /// # Safety
    /// As for [`Op::submit`].
    pub(crate) unsafe fn submit_peer(
        sqe: squeue::Entry,
        data: T,
        map: fn(i32, u32, T) -> R,
    ) -> Self {
        // SAFETY: forwarded from the caller's contract.
        unsafe { Self::submit_as(true, sqe, data, map) }
    }

    unsafe fn submit_as(
        peer: bool,
        sqe: squeue::Entry,
        data: T,
        map: fn(i32, u32, T) -> R,
    ) -> Self {
        let user_data = with_core(|c| {
            let mut ring = c.ring.borrow_mut();
            let ud = ring.alloc_slot(peer);
            // SAFETY: the caller guarantees the pointers live in `data`, which this Op (or, once
            // it is dropped, the ring's slot) keeps until the completion is reaped.
            unsafe { ring.push(&sqe.user_data(ud)) };
            ud
        })
        .expect("blockd-aio: ring operation on a thread without an AioContext");
        Op {
            user_data,
            data: Some(data),
            map,
            done: false,
            _not_send: PhantomData,
        }
    }

    pub fn id(&self) -> OpId {
        OpId(self.user_data)
    }
}

impl<T: 'static, R> Future for Op<T, R> {
    type Output = R;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<R> {
        assert!(!self.done, "Op polled after completion");
        let ud = self.user_data;
        let res = with_core(|c| c.ring.borrow_mut().poll_slot(ud, cx.waker()))
            .expect("Op polled on a thread without an AioContext");
        match res {
            Some((res, flags)) => {
                self.done = true;
                let data = self.data.take().expect("Op data present until completion");
                Poll::Ready((self.map)(res, flags, data))
            }
            None => Poll::Pending,
        }
    }
}

impl<T: 'static, R> Drop for Op<T, R> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let data = self.data.take();
        let ud = self.user_data;
        let mut keep = data.map(|d| Box::new(d) as Box<dyn std::any::Any>);
        let handled = with_core(|c| {
            // The ring may be borrowed if we are dropped from inside it (not expected); then
            // leak rather than free memory the kernel may still use.
            match c.ring.try_borrow_mut() {
                Ok(mut ring) => {
                    ring.orphan(ud, keep.take());
                    true
                }
                Err(_) => false,
            }
        });
        if handled != Some(true) {
            // No context (thread exiting): the kernel may still write into this memory.
            std::mem::forget(keep);
        }
    }
}

/// Map a raw result to `io::Result<u32>`.
pub(crate) fn cvt(res: i32) -> io::Result<u32> {
    if res < 0 {
        Err(io::Error::from_raw_os_error(-res))
    } else {
        Ok(res as u32)
    }
}
