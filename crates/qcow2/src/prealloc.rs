//! QEMU's guess that an image was created with metadata preallocation (or otherwise has host
//! clusters that were never written): when the file occupies clearly less disk than the
//! clusters the refcounts count, holes in the file under data clusters are real zeroes, and a
//! want-zero block status (map, NBD `base:allocation`) looks into the file for them (QEMU's
//! BDRV_BLOCK_RECURSE). QEMU decides once per open, at the first block status; so does this.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use async_lock::OnceCell;
use blockd_block::Node;

use crate::image::Image;

#[derive(Default)]
pub struct Detection(OnceCell<bool>);

impl Detection {
    /// Whether block status should look into the file under data clusters.
    pub async fn recurse(&self, img: &Image, file: &Arc<Node>) -> bool {
        *self
            .0
            .get_or_init(|| async { looks_preallocated(img, file).await.unwrap_or(false) })
            .await
    }
}

/// More clusters in use than the file's disk allocation can hold (with QEMU's slack of a ninth
/// or two clusters): some of them were never written.
async fn looks_preallocated(img: &Image, file: &Arc<Node>) -> io::Result<bool> {
    let Some(path) = file.driver().filename() else {
        // Only host files say how much of them is allocated.
        return Ok(false);
    };
    let allocated = std::fs::metadata(&path)?.blocks() * 512;
    let cs = img.geo.cluster_size;
    let real_clusters = allocated / cs;
    let threshold = (real_clusters * 10 / 9).max(real_clusters + 2);
    let end_cluster = file.length().div_ceil(cs);
    let per_block = img.geo.rc_entries;
    let _alloc = img.alloc.lock().await;
    let mut in_use = 0u64;
    for t in 0..end_cluster.div_ceil(per_block) {
        let Some(values) = img.refcount_block_values(file, t).await? else {
            continue;
        };
        let first = t * per_block;
        let n = (end_cluster - first).min(per_block) as usize;
        in_use += values[..n].iter().filter(|&&v| v != 0).count() as u64;
        if in_use > threshold {
            return Ok(true);
        }
    }
    Ok(false)
}
