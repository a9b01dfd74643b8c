//! blockdev-reopen of a qcow2 node: the read-only flag toggles and the runtime options
//! (overlap checks, passing discards down) change; everything that can fail is checked in
//! [`prepare`], and [`Prepared::commit`] only stores the new values. The node is drained
//! during both, so no request sees a half-changed image.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use blockd_block::Node;
use blockd_block::driver::{ReopenPrepared, ReopenRequest, cannot_change};

use crate::cache::CacheConfig;
use crate::driver::{RuntimeOpts, file_perms, runtime_opts};
use crate::header;
use crate::image::Image;

/// The values a committed reopen stores.
pub struct Prepared {
    read_only: bool,
    overlap: bool,
    pass_discard: bool,
    lazy: Option<bool>,
}

impl Prepared {
    pub(crate) fn commit(self, img: &Image) {
        img.overlap_check.store(self.overlap, Ordering::Relaxed);
        img.pass_discard.store(self.pass_discard, Ordering::Relaxed);
        img.read_only.store(self.read_only, Ordering::Release);
        if let Some(l) = self.lazy {
            img.lazy_refcounts.store(l, Ordering::Relaxed);
        }
    }
}

/// Check the new options against the image; nothing changes yet.
pub(crate) fn prepare(
    img: &Image,
    node: &Node,
    req: &mut ReopenRequest<'_>,
) -> Result<ReopenPrepared, String> {
    let RuntimeOpts {
        overlap,
        lazy,
        pass_discard,
    } = runtime_opts(req.opts, true)?;
    if req.opts.take("encrypt").is_some() {
        return Err(cannot_change("encrypt"));
    }
    // The data file child stays: restating it (its node-name, which is what the reopen
    // layer leaves for a child opened with the image) is fine, another node is not.
    let data_child = node.child("data-file");
    match req.opts.take("data-file") {
        None => {}
        Some(serde_json::Value::String(n))
            if data_child.as_ref().is_some_and(|d| d.name() == n) => {}
        Some(_) => return Err(cannot_change("data-file")),
    }
    let h = img.header();
    if lazy == Some(true) && h.version < 3 {
        return Err(
            "Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level"
                .into(),
        );
    }
    // The caches are sized at open; resizing them under users is not done (yet). Options
    // left out mean the defaults, so this also refuses going back to them.
    let cache = CacheConfig::from_opts(req.opts, h.size, h.cluster_size(), h.l2_entry_size())?;
    if cache != img.cache {
        return Err("qcow2: changing the cache options in a reopen is not supported yet".into());
    }

    let file = req
        .children
        .iter()
        .find(|c| c.name == "file")
        .ok_or_else(|| format!("Node '{}' has no file", node.name()))?;
    // The image keeps its file for the write-back at close; replacing it is not done (yet).
    if img
        .file
        .as_ref()
        .is_some_and(|f| !Arc::ptr_eq(f, &file.node))
    {
        return Err("qcow2: replacing the 'file' child in a reopen is not supported yet".into());
    }

    if req.read_only {
        // The layer flushed every node of the reopen first: nothing may stay cached dirty
        // once writes are refused (it could never be written back).
        // What lazy refcounts left unordered is written and the dirty bit cleared first.
        if !img.is_read_only() && img.dirty_marked.load(Ordering::Acquire) {
            crate::driver::run_sync(|| img.mark_clean()).map_err(|e| {
                format!(
                    "qcow2: could not mark node '{}' clean: {}",
                    node.name(),
                    blockd_block::strerror(&e)
                )
            })?;
        }
        if !img.is_read_only() && img.has_dirty() {
            return Err(format!(
                "qcow2: node '{}' still has unwritten metadata after the flush",
                node.name()
            ));
        }
    } else if img.is_read_only() {
        // As a writable open would, except that a repair or a header update does not run
        // under the node's users.
        if h.incompatible & header::INCOMPAT_CORRUPT != 0 || img.corrupt.load(Ordering::SeqCst) {
            return Err("qcow2: Image is corrupt; cannot be opened read/write".into());
        }
        if h.incompatible & header::INCOMPAT_DIRTY != 0 {
            return Err(format!(
                "qcow2: node '{}' has the dirty bit set and needs a refcount repair; it cannot be made writable in a reopen (repair it with 'qemu-img check -r all' offline)",
                node.name()
            ));
        }
        // Persistent bitmaps (autoclear bit 0) are marked in use again once the reopen is
        // committed (`reopen_commit_post`); other autoclear bits are not maintained.
        let maintained = header::AUTOCLEAR_BITMAPS
            | if h.has_data_file() {
                header::AUTOCLEAR_DATA_FILE_RAW
            } else {
                0
            };
        if h.version >= 3 && h.autoclear & !maintained != 0 {
            return Err(format!(
                "qcow2: node '{}' has autoclear feature bits set; making it writable in a reopen is not supported yet",
                node.name()
            ));
        }
    }

    let (perm, shared) = file_perms(
        req.read_only,
        req.flags.force_share || node.is_force_share(),
    );
    Ok(ReopenPrepared {
        state: Box::new(Prepared {
            read_only: req.read_only,
            overlap,
            pass_discard,
            lazy: if h.version >= 3 {
                Some(lazy.unwrap_or(h.compatible & header::COMPAT_LAZY_REFCOUNTS != 0))
            } else {
                None
            },
        }),
        child_perms: std::iter::once("file")
            .chain(data_child.is_some().then_some("data-file"))
            .map(|c| (c.to_string(), perm, shared))
            .collect(),
        length: None,
        limits: None,
    })
}
