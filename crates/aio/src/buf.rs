//! Owned, aligned I/O buffers and the per-thread pool that recycles them.
//!
//! An [`IoBuf`] is handed to a ring operation by value and comes back with the result. While the
//! kernel may touch the memory, the ring (not the caller) owns it: if the submitting future is
//! dropped, the buffer moves into the ring's slot and is released only when the completion is
//! reaped (DESIGN.md rule 8).
//!
//! Buffers are allocated with the alignment the device asks for (512 or 4096 for O_DIRECT).
//! Dropping a buffer returns it to the dropping thread's pool, so the steady-state I/O path of a
//! context allocates nothing. The pool is per thread (one context per thread), so it needs no lock.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::cell::RefCell;
use std::ptr::NonNull;

/// Smallest pooled capacity; smaller requests are rounded up to this.
const MIN_CLASS: usize = 4096;
/// Largest pooled capacity (bigger buffers are freed on drop).
const MAX_POOLED: usize = 4 << 20;
/// Buffers kept per (capacity, alignment) class.
const PER_CLASS: usize = 64;
/// Bytes a thread's pool keeps at most.
const POOL_BYTES: usize = 64 << 20;

/// An allocation: what the pool keeps. No Drop: freeing is explicit.
#[derive(Clone, Copy)]
struct RawBuf {
    ptr: NonNull<u8>,
    cap: usize,
    align: usize,
}

impl RawBuf {
    fn alloc(cap: usize, align: usize) -> RawBuf {
        let layout = Layout::from_size_align(cap.max(1), align).expect("buffer layout");
        // SAFETY: layout has non-zero size. Zeroing makes every byte initialised, so slices
        // over the buffer never expose uninitialised memory.
        let raw = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        RawBuf { ptr, cap, align }
    }

    fn free(self) {
        let layout = Layout::from_size_align(self.cap.max(1), self.align).expect("buffer layout");
        // SAFETY: allocated in `alloc` with this very layout; every RawBuf is freed at most once
        // (by IoBuf's drop when the pool declines it, or by the pool's drop).
        unsafe { dealloc(self.ptr.as_ptr(), layout) }
    }

    fn poolable(&self) -> bool {
        self.cap <= MAX_POOLED && self.cap.is_power_of_two()
    }
}

/// An owned, aligned, initialised byte buffer with a length (≤ capacity).
pub struct IoBuf {
    raw: RawBuf,
    len: usize,
}

// SAFETY: IoBuf uniquely owns its allocation, like a Vec<u8>.
unsafe impl Send for IoBuf {}
// SAFETY: shared access only hands out &[u8].
unsafe impl Sync for IoBuf {}

impl IoBuf {
    /// A buffer of `len` bytes aligned to `align` (a power of two), from this thread's pool when
    /// one fits. Contents are unspecified (zeroed when freshly allocated, old data when reused).
    pub fn new(len: usize, align: usize) -> IoBuf {
        assert!(align.is_power_of_two(), "alignment must be a power of two");
        let cap = class_of(len);
        let raw = POOL
            .try_with(|p| p.borrow_mut().take(cap, align))
            .ok()
            .flatten()
            .unwrap_or_else(|| RawBuf::alloc(cap, align));
        IoBuf { raw, len }
    }

    /// A zero-filled buffer.
    pub fn zeroed(len: usize, align: usize) -> IoBuf {
        let mut b = IoBuf::new(len, align);
        b.as_mut_slice().fill(0);
        b
    }

    /// A buffer holding a copy of `data` (alignment 4096).
    pub fn from_slice(data: &[u8]) -> IoBuf {
        let mut b = IoBuf::new(data.len(), 4096);
        b.as_mut_slice().copy_from_slice(data);
        b
    }

    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn capacity(&self) -> usize {
        self.raw.cap
    }
    pub fn align(&self) -> usize {
        self.raw.align
    }

    /// Change the length within the capacity (the bytes are already initialised).
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.raw.cap, "IoBuf::set_len beyond capacity");
        self.len = len;
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for cap >= len initialised bytes, uniquely owned by self.
        unsafe { std::slice::from_raw_parts(self.raw.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.raw.ptr.as_ptr(), self.len) }
    }

    /// Raw pointer for the kernel. Valid while the buffer lives.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.raw.ptr.as_ptr()
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.raw.ptr.as_ptr()
    }
}

impl std::ops::Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl std::ops::DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

impl std::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoBuf")
            .field("len", &self.len)
            .field("cap", &self.raw.cap)
            .field("align", &self.raw.align)
            .finish()
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        let raw = self.raw;
        let kept = raw.poolable() && POOL.try_with(|p| p.borrow_mut().put(raw)).unwrap_or(false);
        if !kept {
            raw.free();
        }
    }
}

fn class_of(len: usize) -> usize {
    if len <= MAX_POOLED {
        len.max(MIN_CLASS).next_power_of_two()
    } else {
        len
    }
}

struct Pool {
    classes: Vec<(usize, usize, Vec<RawBuf>)>,
    bytes: usize,
    allocs_saved: u64,
}

impl Pool {
    fn take(&mut self, cap: usize, align: usize) -> Option<RawBuf> {
        let (_, _, list) = self
            .classes
            .iter_mut()
            .find(|(c, a, _)| *c == cap && *a == align)?;
        let b = list.pop()?;
        self.bytes -= b.cap;
        self.allocs_saved += 1;
        Some(b)
    }

    /// Keep `b` (true), or decline when the pool is full (false).
    fn put(&mut self, b: RawBuf) -> bool {
        if self.bytes + b.cap > POOL_BYTES {
            return false;
        }
        let idx = match self
            .classes
            .iter()
            .position(|(c, a, _)| *c == b.cap && *a == b.align)
        {
            Some(i) => i,
            None => {
                self.classes.push((b.cap, b.align, Vec::new()));
                self.classes.len() - 1
            }
        };
        let list = &mut self.classes[idx].2;
        if list.len() >= PER_CLASS {
            return false;
        }
        self.bytes += b.cap;
        list.push(b);
        true
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        for (_, _, list) in self.classes.iter_mut() {
            for b in list.drain(..) {
                b.free();
            }
        }
    }
}

thread_local! {
    static POOL: RefCell<Pool> = const {
        RefCell::new(Pool { classes: Vec::new(), bytes: 0, allocs_saved: 0 })
    };
}

/// How many allocations this thread's pool has saved so far (for tests and benchmarks).
pub fn pool_reuse_count() -> u64 {
    POOL.with(|p| p.borrow().allocs_saved)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignment_and_reuse() {
        for align in [512usize, 4096] {
            let b = IoBuf::new(1000, align);
            assert_eq!(b.as_ptr() as usize % align, 0);
            assert_eq!(b.len(), 1000);
            let addr = b.as_ptr();
            drop(b);
            let before = pool_reuse_count();
            let c = IoBuf::new(3000, align);
            assert_eq!(c.as_ptr(), addr, "same class comes back from the pool");
            assert_eq!(pool_reuse_count(), before + 1);
        }
    }

    #[test]
    fn large_buffers_are_not_pooled() {
        let b = IoBuf::new(MAX_POOLED + 1, 4096);
        assert_eq!(b.capacity(), MAX_POOLED + 1);
        drop(b);
    }

    #[test]
    fn buffers_cross_threads() {
        let mut b = IoBuf::zeroed(4096, 4096);
        b[0] = 7;
        let b = std::thread::spawn(move || {
            assert_eq!(b[0], 7);
            b
        })
        .join()
        .unwrap();
        assert_eq!(b[0], 7);
    }
}
