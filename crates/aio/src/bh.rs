//! Bottom halves: callbacks that run once on their context's next turn after being scheduled.
//!
//! A [`BottomHalf`] is created on its context with a callback that may borrow context-local
//! state (`FnMut`, not `Send`). Scheduling is possible from any thread (the handle is `Send`):
//! from the owner it goes straight onto the context's list, from elsewhere through the remote
//! queue. Scheduling an already scheduled BH is a no-op; `cancel` unschedules it.
//! One-shot BHs (QEMU's `aio_bh_schedule_oneshot`) are [`ContextHandle::schedule_oneshot`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::context::{Core, Remote, Shared, current_id, with_core};

struct BhState {
    id: usize,
    scheduled: AtomicBool,
}

/// A reusable bottom half. Dropping the last clone deletes it.
#[derive(Clone)]
pub struct BottomHalf {
    state: Arc<BhState>,
    owner: Arc<Shared>,
    _deleter: Arc<Deleter>,
}

struct Deleter {
    id: usize,
    owner: Arc<Shared>,
}

impl Drop for Deleter {
    fn drop(&mut self) {
        let id = self.id;
        if current_id() == self.owner.id {
            let _ = with_core(|c| c.bhs.borrow_mut().remove(id));
        } else {
            let _ = self.owner.send(Remote::Call(Box::new(move || {
                let _ = with_core(|c| c.bhs.borrow_mut().remove(id));
            })));
        }
    }
}

type Callback = Box<dyn FnMut()>;

#[derive(Default)]
pub(crate) struct BhTable {
    entries: Vec<Option<(Arc<BhState>, Option<Callback>)>>,
    free: Vec<usize>,
    scheduled: Vec<usize>,
}

impl BhTable {
    fn remove(&mut self, id: usize) {
        if let Some(e) = self.entries.get_mut(id)
            && e.take().is_some()
        {
            self.free.push(id);
        }
    }

    pub(crate) fn schedule_local(core: &Core, id: usize) {
        core.bhs.borrow_mut().scheduled.push(id);
    }

    /// Run every BH scheduled before this call. Returns whether any ran.
    pub(crate) fn run_scheduled(core: &Core) -> bool {
        let ids = std::mem::take(&mut core.bhs.borrow_mut().scheduled);
        if ids.is_empty() {
            return false;
        }
        let mut ran = false;
        for id in ids {
            // Take the callback out so it can schedule or create BHs itself.
            let taken = {
                let mut t = core.bhs.borrow_mut();
                match t.entries.get_mut(id) {
                    Some(Some((state, cb))) if state.scheduled.swap(false, Ordering::AcqRel) => {
                        cb.take().map(|cb| (state.clone(), cb))
                    }
                    _ => None,
                }
            };
            if let Some((state, mut cb)) = taken {
                cb();
                ran = true;
                let mut t = core.bhs.borrow_mut();
                if let Some(Some((s, slot))) = t.entries.get_mut(id)
                    && Arc::ptr_eq(s, &state)
                {
                    *slot = Some(cb);
                }
            }
        }
        ran
    }
}

impl BottomHalf {
    /// Create a BH on the calling thread's context.
    pub fn new(callback: impl FnMut() + 'static) -> BottomHalf {
        with_core(|core| {
            let mut t = core.bhs.borrow_mut();
            let id = t.free.pop().unwrap_or_else(|| {
                t.entries.push(None);
                t.entries.len() - 1
            });
            let state = Arc::new(BhState {
                id,
                scheduled: AtomicBool::new(false),
            });
            t.entries[id] = Some((state.clone(), Some(Box::new(callback))));
            BottomHalf {
                state,
                owner: core.shared.clone(),
                _deleter: Arc::new(Deleter {
                    id,
                    owner: core.shared.clone(),
                }),
            }
        })
        .expect("BottomHalf::new on a thread without an AioContext")
    }

    /// Run the callback on the owner context's next turn (once, however often this is called
    /// before it runs). Callable from any thread.
    pub fn schedule(&self) {
        if self.state.scheduled.swap(true, Ordering::AcqRel) {
            return;
        }
        let id = self.state.id;
        if current_id() == self.owner.id {
            let _ = with_core(|c| BhTable::schedule_local(c, id));
        } else {
            let _ = self.owner.send(Remote::Bh(id));
        }
    }

    /// Unschedule: a scheduled callback that has not run yet will not run.
    pub fn cancel(&self) {
        self.state.scheduled.store(false, Ordering::Release);
    }

    pub fn is_scheduled(&self) -> bool {
        self.state.scheduled.load(Ordering::Acquire)
    }
}
