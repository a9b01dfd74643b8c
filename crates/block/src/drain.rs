//! Drain as a value (DESIGN.md rule 7): `drained(&node).await` quiesces the node's parents up to
//! the BlockBackends (whose new requests queue) and resolves when their in-flight requests have
//! finished. Dropping the guard resumes the queued requests. Drains nest and count; nothing here
//! enters another thread's context or runs a nested loop: waiting is an await on an event that
//! the last finishing request notifies, from whatever thread it ran on.

use std::sync::Arc;

use crate::node::Node;

/// A drained section of one or more nodes.
#[must_use = "the drained section ends when the guard is dropped"]
pub struct DrainGuard {
    nodes: Vec<Arc<Node>>,
}

impl DrainGuard {
    pub fn nodes(&self) -> &[Arc<Node>] {
        &self.nodes
    }
}

/// Drain `node`.
pub async fn drained(node: &Arc<Node>) -> DrainGuard {
    drained_all(std::slice::from_ref(node)).await
}

/// Drain several nodes at once (for graph changes that touch more than one).
pub async fn drained_all(nodes: &[Arc<Node>]) -> DrainGuard {
    let mut backends = Vec::new();
    for n in nodes {
        n.drained_begin(&mut backends);
    }
    for b in &backends {
        b.wait_idle().await;
    }
    DrainGuard {
        nodes: nodes.to_vec(),
    }
}

impl Drop for DrainGuard {
    fn drop(&mut self) {
        for n in self.nodes.iter().rev() {
            n.drained_end();
        }
    }
}
