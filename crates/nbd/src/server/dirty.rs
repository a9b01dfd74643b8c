//! Dirty bitmaps exported as `qemu:dirty-bitmap:NAME` meta contexts (QMP `block-export-add`
//! `bitmaps`, legacy `nbd-server-add` `bitmap`, `qemu-nbd -B`).
//!
//! [`export_bitmaps`] finds each bitmap (by name on the exported node or down its backing
//! chain and filters, or as `{node, name}`), refuses what QEMU refuses (in use, inconsistent,
//! recording while the export is read-only) and marks them busy for as long as the export
//! lives ([`ExportedBitmap`] clears the mark when dropped). A client selects contexts in the
//! handshake; a block status reply then carries, per selected bitmap, extents of flag 1
//! (dirty) or 0 (clean), as QEMU's server does.

use std::sync::Arc;

use blockd_block::dirty_bitmap::CheckFlags;
use blockd_block::{DirtyBitmap, Node};

/// Prefix of the meta context names of exported bitmaps.
pub const CTX_PREFIX: &str = "qemu:dirty-bitmap:";
/// NBD_STATE_DIRTY of the bitmap contexts.
pub const STATE_DIRTY: u64 = 1;

/// A bitmap named in the export's options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BitmapSpec {
    /// A bitmap of the exported node or of a node below it (backing chain, filters).
    Name(String),
    /// A bitmap of any node.
    Node { node: String, name: String },
}

/// A bitmap an export exposes; busy while any export configuration holds it.
#[derive(Debug)]
pub struct ExportedBitmap {
    pub bitmap: Arc<DirtyBitmap>,
    /// `qemu:dirty-bitmap:NAME`.
    pub context: String,
}

impl Drop for ExportedBitmap {
    fn drop(&mut self) {
        self.bitmap.set_busy(false);
    }
}

/// Look up, check and take the bitmaps of an export of `node`. `find_node` resolves node names
/// of `{node, name}` specifications.
pub fn export_bitmaps(
    node: &Arc<Node>,
    specs: &[BitmapSpec],
    writable: bool,
    find_node: impl Fn(&str) -> Option<Arc<Node>>,
) -> Result<Vec<Arc<ExportedBitmap>>, String> {
    let mut found = Vec::new();
    for spec in specs {
        let b = match spec {
            BitmapSpec::Name(name) => {
                find_below(node, name).ok_or_else(|| format!("Bitmap '{name}' is not found"))?
            }
            BitmapSpec::Node { node, name } => find_node(node)
                .ok_or_else(|| format!("Node '{node}' not found"))?
                .dirty_bitmaps()
                .find(name)
                .ok_or_else(|| format!("Dirty bitmap '{name}' not found"))?,
        };
        b.check(CheckFlags::ALLOW_RO).map_err(|e| e.message)?;
        // A read-only export of a writable node would show a bitmap that keeps changing.
        if !writable && !node.is_read_only() && b.is_enabled() {
            return Err(format!(
                "Enabled bitmap '{}' incompatible with readonly export",
                b.name().unwrap_or_default()
            ));
        }
        if found.iter().any(|x: &Arc<DirtyBitmap>| Arc::ptr_eq(x, &b)) {
            continue;
        }
        found.push(b);
    }
    Ok(found
        .into_iter()
        .map(|b| {
            b.set_busy(true);
            let context = format!("{CTX_PREFIX}{}", b.name().unwrap_or_default());
            Arc::new(ExportedBitmap { bitmap: b, context })
        })
        .collect())
}

/// `name` on `node`, else on the nodes its data comes from (backing file, a filter's child).
fn find_below(node: &Arc<Node>, name: &str) -> Option<Arc<DirtyBitmap>> {
    let mut cur = node.clone();
    for _ in 0..1000 {
        if let Some(b) = cur.dirty_bitmaps().find(name) {
            return Some(b);
        }
        let next = cur.child("backing").or_else(|| {
            cur.driver()
                .is_filter()
                .then(|| cur.children().first().map(|c| c.node.clone()))
                .flatten()
        })?;
        cur = next;
    }
    None
}

/// Which exported bitmaps (indices) a meta context query selects; `list` allows the
/// `qemu:` and `qemu:dirty-bitmap:` wildcards (NBD_OPT_LIST_META_CONTEXT only).
pub fn matching(exported: &[Arc<ExportedBitmap>], query: &str, list: bool) -> Vec<usize> {
    let all = || (0..exported.len()).collect();
    if list && (query == "qemu:" || query == CTX_PREFIX) {
        return all();
    }
    exported
        .iter()
        .position(|e| e.context == query)
        .into_iter()
        .collect()
}

/// Extents of `[off, end)` as (length, flags), at most `cap`.
pub fn extents(b: &DirtyBitmap, off: u64, end: u64, cap: usize) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut pos = off;
    while pos < end && out.len() < cap {
        let dirty = b.get(pos);
        let next = if dirty {
            b.next_clean(pos, end)
        } else {
            b.next_dirty(pos, end)
        }
        .unwrap_or(end)
        .max(pos + 1);
        out.push((next - pos, if dirty { STATE_DIRTY } else { 0 }));
        pos = next;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_follow_the_bits() {
        let b = DirtyBitmap::new(Some("b"), 65536, 1 << 20).unwrap();
        b.set_range(70000, 1);
        b.set_range(300_000, 200_000);
        assert_eq!(
            extents(&b, 0, 1 << 20, 100),
            vec![
                (65536, 0),
                (65536, 1),
                (131072, 0),
                (262144, 1),
                (524288, 0)
            ]
        );
        assert_eq!(extents(&b, 100, 70000, 100), vec![(65436, 0), (4464, 1)]);
        assert_eq!(extents(&b, 0, 1 << 20, 1), vec![(65536, 0)]);
        // A bitmap shorter than the request (the image grew): the rest reads clean.
        assert_eq!(extents(&b, 1 << 20, (1 << 20) + 512, 9), vec![(512, 0)]);
    }
}
