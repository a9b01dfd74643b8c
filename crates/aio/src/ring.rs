//! A context's io_uring ring and the slots that track its in-flight operations.
//!
//! Every operation gets a slot; the slot's index and a generation form the SQE's `user_data`.
//! While the operation's future lives, the future owns the memory the kernel uses (buffers, iovec
//! arrays, sockaddrs); if the future is dropped before the completion arrives, that memory moves
//! into the slot (an *orphan*) and is released only when the completion is reaped. Completions are
//! reaped only by the thread that owns the ring (the context's thread): the ring is `!Send`.

use std::any::Any;
use std::io;
use std::task::Waker;

use io_uring::{IoUring, opcode, squeue};

/// `user_data` of operations whose completions nobody waits for (cancellations).
pub(crate) const TOKEN_IGNORE: u64 = u64::MAX;
/// `user_data` of the read the ring keeps armed on the context's wake eventfd.
pub(crate) const TOKEN_WAKE: u64 = u64::MAX - 1;
/// `user_data` of the read armed on the Linux AIO completion eventfd.
pub(crate) const TOKEN_LINUX_AIO: u64 = u64::MAX - 2;

enum Slot {
    Free { next: u32 },
    Waiting { waker: Option<Waker> },
    Done { res: i32, flags: u32 },
    Orphaned { keep: Option<Box<dyn Any>> },
}

struct SlotEntry {
    generation: u32,
    /// The operation waits for a peer (see [`Ring::peer_waits`]).
    peer: bool,
    slot: Slot,
}

/// What a reaped completion was for.
pub(crate) enum Completion {
    /// An operation's slot: its waker (if a task waits) is to be woken.
    Woke(Option<Waker>),
    /// An orphan's resources, to be dropped once no borrow is held.
    Released(Option<Box<dyn Any>>),
    Wake,
    LinuxAio,
    Ignored,
}

pub(crate) struct Ring {
    uring: IoUring,
    slots: Vec<SlotEntry>,
    free_head: u32,
    in_flight: usize,
    /// Of `in_flight`, the operations that wait for something outside this process (a socket's
    /// peer, a timeout) rather than for storage: busy-polling for them only burns CPU.
    peer_waits: usize,
    orphans: usize,
    /// SQEs pushed since the last `io_uring_enter`.
    unsubmitted: usize,
    pub(crate) submits: u64,
}

const NO_SLOT: u32 = u32::MAX;

impl Ring {
    pub(crate) fn new(entries: u32) -> io::Result<Ring> {
        // A ring is used by exactly one thread: tell the kernel so it can skip locking and
        // cross-CPU task-work interrupts. Fall back for older kernels.
        let uring = IoUring::builder()
            .setup_single_issuer()
            .setup_cqsize(entries * 4)
            .build(entries)
            .or_else(|_| IoUring::builder().setup_cqsize(entries * 4).build(entries))
            .or_else(|_| IoUring::new(entries))?;
        Ok(Ring {
            uring,
            slots: Vec::with_capacity(entries as usize),
            free_head: NO_SLOT,
            in_flight: 0,
            peer_waits: 0,
            orphans: 0,
            unsubmitted: 0,
            submits: 0,
        })
    }

    /// Reserve a slot for a new operation (`peer`: it waits for a peer, see
    /// [`Ring::peer_waits`]); returns its `user_data`.
    pub(crate) fn alloc_slot(&mut self, peer: bool) -> u64 {
        let idx = if self.free_head != NO_SLOT {
            let idx = self.free_head;
            let e = &mut self.slots[idx as usize];
            if let Slot::Free { next } = e.slot {
                self.free_head = next;
            }
            e.generation = e.generation.wrapping_add(1);
            e.peer = peer;
            e.slot = Slot::Waiting { waker: None };
            idx
        } else {
            self.slots.push(SlotEntry {
                generation: 0,
                peer,
                slot: Slot::Waiting { waker: None },
            });
            (self.slots.len() - 1) as u32
        };
        self.in_flight += 1;
        self.peer_waits += peer as usize;
        ((self.slots[idx as usize].generation as u64) << 32) | idx as u64
    }

    fn entry(&mut self, user_data: u64) -> Option<&mut SlotEntry> {
        let idx = (user_data & 0xffff_ffff) as usize;
        let generation = (user_data >> 32) as u32;
        self.slots
            .get_mut(idx)
            .filter(|e| e.generation == generation)
    }

    fn release(&mut self, user_data: u64) {
        let idx = (user_data & 0xffff_ffff) as u32;
        let head = self.free_head;
        if let Some(e) = self.entry(user_data) {
            e.slot = Slot::Free { next: head };
            self.free_head = idx;
        }
    }

    /// Queue an SQE. The memory it points to must stay valid until its completion is reaped:
    /// callers guarantee that through [`crate::op::Op`], which owns that memory.
    ///
    /// # Safety
    /// Every pointer in `sqe` must remain valid (and, for buffers the kernel writes, unaliased)
    /// until the completion carrying the SQE's `user_data` has been reaped by this ring.
    pub(crate) unsafe fn push(&mut self, sqe: &squeue::Entry) {
        loop {
            // SAFETY: forwarded from the caller's contract.
            let pushed = unsafe { self.uring.submission().push(sqe) };
            if pushed.is_ok() {
                self.unsubmitted += 1;
                return;
            }
            // Submission queue full: hand what we have to the kernel and retry.
            let _ = self.submit();
        }
    }

    /// Queue a cancellation of the operation with `user_data` (completion ignored).
    pub(crate) fn push_cancel(&mut self, user_data: u64) {
        let sqe = opcode::AsyncCancel::new(user_data)
            .build()
            .user_data(TOKEN_IGNORE);
        // SAFETY: AsyncCancel carries no pointers.
        unsafe { self.push(&sqe) };
    }

    /// Record interest of a task in a slot's completion; returns the result once it is there.
    pub(crate) fn poll_slot(&mut self, user_data: u64, waker: &Waker) -> Option<(i32, u32)> {
        let e = self.entry(user_data)?;
        match &mut e.slot {
            Slot::Done { res, flags } => {
                let out = (*res, *flags);
                self.release(user_data);
                Some(out)
            }
            Slot::Waiting { waker: w } => {
                match w {
                    Some(old) if old.will_wake(waker) => {}
                    _ => *w = Some(waker.clone()),
                }
                None
            }
            _ => None,
        }
    }

    /// The operation's future is gone. Returns `true` when the slot was already complete (and is
    /// now free); otherwise `keep` is held until the completion arrives and a cancel is queued.
    pub(crate) fn orphan(&mut self, user_data: u64, keep: Option<Box<dyn Any>>) -> bool {
        let Some(e) = self.entry(user_data) else {
            return true;
        };
        match e.slot {
            Slot::Done { .. } => {
                self.release(user_data);
                drop(keep);
                true
            }
            Slot::Waiting { .. } => {
                e.slot = Slot::Orphaned { keep };
                self.orphans += 1;
                self.push_cancel(user_data);
                false
            }
            _ => true,
        }
    }

    /// Submit queued SQEs without waiting.
    pub(crate) fn submit(&mut self) -> io::Result<usize> {
        if self.unsubmitted == 0 && !self.uring.submission().taskrun() {
            return Ok(0);
        }
        self.unsubmitted = 0;
        self.submits += 1;
        retry_eintr(|| self.uring.submit())
    }

    /// Submit queued SQEs and block until a completion arrives or `timeout` passes.
    pub(crate) fn submit_and_wait(
        &mut self,
        timeout: Option<std::time::Duration>,
    ) -> io::Result<()> {
        self.unsubmitted = 0;
        self.submits += 1;
        let res = match timeout {
            None => self.uring.submit_and_wait(1),
            Some(d) => {
                let ts = io_uring::types::Timespec::from(d);
                let args = io_uring::types::SubmitArgs::new().timespec(&ts);
                self.uring.submitter().submit_with_args(1, &args)
            }
        };
        match res {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    pub(crate) fn has_unsubmitted(&self) -> bool {
        self.unsubmitted > 0
    }

    pub(crate) fn has_completions(&mut self) -> bool {
        !self.uring.completion().is_empty()
    }

    /// Move completions from the CQ into their slots. `out` receives what the caller must do
    /// once it no longer borrows the ring (wake tasks, drop orphans' memory).
    /// Move completions from the CQ into their slots, handing each to `on` as it goes. `on`
    /// runs while the ring is borrowed: it may wake tasks (which only queues them) and drop
    /// orphans' memory, but must not touch the ring.
    pub(crate) fn reap(&mut self, mut on: impl FnMut(Completion)) -> usize {
        let mut n = 0;
        loop {
            // Copy a batch of CQEs out (one head update per batch), then act on them.
            let mut batch =
                [const { std::mem::MaybeUninit::<io_uring::cqueue::Entry>::uninit() }; 32];
            let got = self.uring.completion().fill(&mut batch);
            let count = got.len();
            if count == 0 {
                break;
            }
            n += count;
            for c in got.iter() {
                let (user_data, res, flags) = (c.user_data(), c.result(), c.flags());
                let c = match user_data {
                    TOKEN_IGNORE => Completion::Ignored,
                    TOKEN_WAKE => Completion::Wake,
                    TOKEN_LINUX_AIO => Completion::LinuxAio,
                    _ => self.complete(user_data, res, flags),
                };
                on(c);
            }
            if count < batch.len() {
                break;
            }
        }
        n
    }

    fn complete(&mut self, user_data: u64, res: i32, flags: u32) -> Completion {
        let Some(e) = self.entry(user_data) else {
            return Completion::Ignored;
        };
        let peer = e.peer as usize;
        match std::mem::replace(&mut e.slot, Slot::Done { res, flags }) {
            Slot::Waiting { waker } => {
                self.in_flight -= 1;
                self.peer_waits -= peer;
                Completion::Woke(waker)
            }
            Slot::Orphaned { keep } => {
                self.in_flight -= 1;
                self.peer_waits -= peer;
                self.orphans -= 1;
                self.release(user_data);
                Completion::Released(keep)
            }
            other => {
                // A second completion for a finished slot (multishot); keep the first.
                e.slot = other;
                Completion::Ignored
            }
        }
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// In-flight operations that wait for a peer: socket receives and accepts, readiness polls,
    /// timeouts. Their completion time is set by someone else, so it is not worth a busy-poll.
    pub(crate) fn peer_waits(&self) -> usize {
        self.peer_waits
    }

    pub(crate) fn orphans(&self) -> usize {
        self.orphans
    }

    /// Orphans' memory is leaked rather than freed when the ring is torn down before their
    /// completions arrived (the kernel may still write into it).
    pub(crate) fn leak_orphans(&mut self) {
        for e in self.slots.iter_mut() {
            if let Slot::Orphaned { keep } = &mut e.slot {
                std::mem::forget(keep.take());
            }
        }
    }
}

fn retry_eintr(mut f: impl FnMut() -> io::Result<usize>) -> io::Result<usize> {
    loop {
        match f() {
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                // CQ overflow backlog: the caller reaps, and submission is retried next turn.
                return Ok(0);
            }
            other => return other,
        }
    }
}
