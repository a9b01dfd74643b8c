//! Rewriting the backing file name (and the backing format extension) of an open image: what a
//! stream or commit does once a layer left the chain, so that the image, reopened later, names
//! the node that is now its backing file.
//!
//! The header is rebuilt from the in-memory copy with the new name, written over cluster 0 in
//! place (it must fit there, as in QEMU) and flushed; the in-memory header changes only once
//! the write is durable. The metadata allocation lock is held meanwhile, so no L1 growth,
//! refcount table move or snapshot update (which patch header fields) interleaves.

use std::io;
use std::sync::Arc;

use blockd_block::Node;

use crate::driver::Qcow2;
use crate::image::pwrite;

/// The qcow2 driver of `node`, if it is a qcow2 node.
pub fn qcow2_of(node: &Node) -> Option<&Qcow2> {
    let any: &dyn std::any::Any = node.driver();
    any.downcast_ref::<Qcow2>()
}

fn einval(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg.into())
}

/// Set the backing file name of the qcow2 image open in `node` to `name` and its backing
/// format to `format` (`None` removes it; `name == None` removes both, making the image
/// standalone). Errors: not a qcow2 node, read-only, a name too long or a header that would
/// not fit in its cluster. Call it with the node drained (no guest I/O changes metadata
/// meanwhile); graph changes are the caller's.
pub async fn change_backing_file(
    node: &Arc<Node>,
    name: Option<&str>,
    format: Option<&str>,
) -> io::Result<()> {
    let q = qcow2_of(node).ok_or_else(|| {
        einval(format!(
            "Node '{}' is not a qcow2 image (its backing file name cannot be changed)",
            node.name()
        ))
    })?;
    let img = &q.image;
    if img.is_read_only() {
        return Err(io::Error::from_raw_os_error(libc::EACCES));
    }
    if let Some(n) = name {
        if n.len() > crate::header::MAX_BACKING_NAME as usize {
            return Err(einval("Backing file name too long"));
        }
        if n.contains('\0') {
            return Err(einval("Backing file name contains a NUL byte"));
        }
    }
    let file = node
        .child("file")
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEDIUM))?;
    let _alloc = img.alloc.lock().await;
    let mut h = img.header();
    h.backing_file = name.map(str::to_string);
    h.backing_format = name.and(format).map(str::to_string);
    if h.backing_file.is_none() {
        h.backing_file_offset = 0;
        h.backing_file_size = 0;
    }
    let mut bytes = h.serialize().map_err(einval)?;
    // The rest of cluster 0 is zeroed, as QEMU leaves it (no stale bytes of a longer name).
    let cs = h.cluster_size().min(file.length()) as usize;
    if bytes.len() < cs {
        bytes.resize(cs, 0);
    }
    pwrite(&file, 0, &bytes).await?;
    file.driver().flush(&file).await?;
    let mut cur = img.header.lock().unwrap_or_else(|e| e.into_inner());
    cur.backing_file = h.backing_file;
    cur.backing_format = h.backing_format;
    if let Some(n) = &cur.backing_file {
        cur.backing_file_size = n.len() as u32;
        cur.backing_file_offset = u64::from_be_bytes(bytes[8..16].try_into().unwrap_or_default());
    } else {
        cur.backing_file_offset = 0;
        cur.backing_file_size = 0;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockd_block::{Graph, options};

    fn open(g: &mut Graph, path: &str) -> Arc<Node> {
        let o = options::parse(&format!(
            "driver=qcow2,node-name=top,backing=,file.driver=file,file.filename={path}"
        ))
        .unwrap();
        g.open(o).unwrap()
    }

    #[test]
    fn rewrites_name_and_format_in_place() {
        let dir = std::env::temp_dir().join(format!("blockd-bn-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("top.qcow2");
        let p = path.to_str().unwrap();
        std::fs::File::create(&path).unwrap();
        let kv: Vec<(String, String)> = [
            ("size", "1M"),
            ("backing_file", "a-rather-long-original-backing-name.qcow2"),
            ("backing_fmt", "qcow2"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let opts = crate::CreateOptions::from_qemu_opts(&kv).unwrap();
        let mut g = Graph::new();
        let file = g
            .open(options::parse(&format!("driver=file,filename={p}")).unwrap())
            .unwrap();
        blockd_aio::block_on(crate::create(&file, &opts))
            .unwrap()
            .unwrap();
        g.remove(file.name()).unwrap();
        g.register_driver(crate::driver_entry());
        let node = open(&mut g, p);
        blockd_aio::block_on(change_backing_file(&node, Some("b.raw"), Some("raw")))
            .unwrap()
            .unwrap();
        let h = crate::read_header_file(p).unwrap();
        assert_eq!(h.backing_file.as_deref(), Some("b.raw"));
        assert_eq!(h.backing_format.as_deref(), Some("raw"));
        assert_eq!(qcow2_of(&node).unwrap().image.header(), h);
        blockd_aio::block_on(change_backing_file(&node, None, Some("raw")))
            .unwrap()
            .unwrap();
        let h = crate::read_header_file(p).unwrap();
        assert_eq!(h.backing_file, None);
        assert_eq!(h.backing_format, None);
        // a name that cannot fit in a 64 KiB cluster header is refused, the header unchanged
        let long = "x".repeat(2000);
        let e = blockd_aio::block_on(change_backing_file(&node, Some(&long), None)).unwrap();
        assert!(e.is_err());
        assert_eq!(crate::read_header_file(p).unwrap().backing_file, None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
