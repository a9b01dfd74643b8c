//! What a job type needs from the program that runs it: the main context's graph.

use std::cell::RefCell;
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use blockd_block::Graph;

/// The owner of the block graph (the daemon). Only the main context has one.
pub trait GraphHost {
    fn graph(&self) -> &RefCell<Graph>;
    /// Nodes were added or removed (the host forgets what it kept about removed ones).
    fn graph_changed(&self) {}
}

/// Run a graph change whose nodes the caller has already drained: its own drain resolves at
/// once, so the change completes in one poll and the graph is borrowed only for that poll
/// (never across an await). `None` if it would have had to wait.
pub fn run_drained<F: Future>(f: F) -> Option<F::Output> {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => Some(v),
        Poll::Pending => None,
    }
}
