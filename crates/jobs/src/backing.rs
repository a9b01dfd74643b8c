//! The backing file name written into an overlay's header once a stream or commit changed its
//! backing node (QEMU writes the new backing node's file name, or the user's `backing-file`,
//! and its format; `backing-mask-protocol` writes `raw` for a protocol node).

use std::sync::Arc;

use blockd_block::Node;

/// The file name a node is known by: its own (a protocol node) or its file child's.
pub fn node_filename(n: &Node) -> Option<String> {
    n.driver()
        .filename()
        .or_else(|| n.child("file").and_then(|f| f.driver().filename()))
}

/// What to write: `None` when the overlay becomes standalone.
#[derive(Debug, Clone, Default)]
pub struct BackingName {
    /// The user's `backing-file` (else the new backing node's file name).
    pub explicit: Option<String>,
    pub mask_protocol: bool,
}

impl BackingName {
    /// (name, format) for `base` as the overlay's new backing node.
    pub fn resolve(&self, base: Option<&Arc<Node>>) -> (Option<String>, Option<String>) {
        let Some(b) = base else {
            return (None, None);
        };
        let name = self.explicit.clone().or_else(|| node_filename(b));
        let fmt = if self.mask_protocol && !b.driver().is_format() {
            "raw"
        } else {
            b.driver().format_name()
        };
        (name, Some(fmt.to_string()))
    }

    /// Rewrite the overlay's header (the caller has drained it and changed the graph).
    pub async fn write(&self, overlay: &Arc<Node>, base: Option<&Arc<Node>>) -> Result<(), String> {
        let (name, fmt) = self.resolve(base);
        blockd_qcow2::backing_name::change_backing_file(overlay, name.as_deref(), fmt.as_deref())
            .await
            .map_err(|e| {
                format!(
                    "Could not update backing file name: {}",
                    blockd_block::strerror(&e)
                )
            })
    }
}
