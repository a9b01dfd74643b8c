//! Image files the daemon makes or probes for its commands' targets: drive-mirror's and
//! drive-backup's targets, blockdev-snapshot-sync's overlays (mode `absolute-paths`), and the
//! format of an existing target (mode `existing` without `format`).

use serde_json::Map;

use crate::state::Daemon;
use blockd_qmp::QmpError;

/// Create an image file: `raw` (a plain file of `size` bytes) or `qcow2` (formatted by
/// blockd-qcow2 with `opts`, qemu-img's option names such as `backing_file`), on this
/// context's event loop (no nested loop). The checks come first, in QEMU's order, so a refused
/// request leaves no file behind.
pub async fn create_image(
    path: &str,
    fmt: &str,
    size: u64,
    opts: &[(String, String)],
) -> Result<(), String> {
    let qcow2_opts = match fmt {
        "raw" => None,
        "qcow2" => {
            let mut kv = vec![("size".to_string(), size.to_string())];
            kv.extend(opts.iter().cloned());
            Some(blockd_qcow2::CreateOptions::from_qemu_opts(&kv)?)
        }
        other => {
            return Err(format!(
                "Creating '{other}' images is not supported by blockd yet"
            ));
        }
    };
    if fmt == "raw" && !opts.is_empty() {
        return Err("Backing file not supported for file format 'raw'".into());
    }
    let f = create_empty(path)?;
    let Some(c) = qcow2_opts else {
        return f
            .set_len(size)
            .map_err(|e| format!("Could not resize file: {}", blockd_block::strerror(&e)));
    };
    drop(f);
    // a private graph: the file is formatted before the daemon's graph opens it
    let mut g = blockd_block::Graph::new();
    let mut file = Map::new();
    file.insert("driver".into(), "file".into());
    file.insert("filename".into(), path.into());
    let node = g.open(file)?;
    let r = blockd_qcow2::create(&node, &c).await;
    let _ = g.remove(node.name());
    r
}

/// Create `path`, or truncate it to nothing when it exists (QEMU's file create).
pub fn create_empty(path: &str) -> Result<std::fs::File, String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| format!("Could not create '{path}': {}", blockd_block::strerror(&e)))
}

/// `backing_file` and `backing_fmt` options for [`create_image`].
pub fn backing_opts(backing: &str, backing_fmt: &str) -> Vec<(String, String)> {
    vec![
        ("backing_file".to_string(), backing.to_string()),
        ("backing_fmt".to_string(), backing_fmt.to_string()),
    ]
}

/// The format of an existing image file, probed from its first sector as QEMU does.
pub fn probe_format(d: &Daemon, path: &str) -> Result<String, QmpError> {
    let mut head = vec![0u8; 512];
    let n = std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read(&mut f, &mut head))
        .map_err(|e| {
            QmpError::generic(format!(
                "Could not open '{path}': {}",
                blockd_block::strerror(&e)
            ))
        })?;
    Ok(d.graph.borrow().probe_format(&head[..n], path).to_string())
}
