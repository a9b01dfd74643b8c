//! Creating the raw target of `convert` / `dd` (qemu-img creates it with the format's create
//! options before copying): the size rounded up to 512 bytes, the first block allocated (as
//! QEMU does so O_DIRECT users can probe alignment), `preallocation=off|falloc|full`, and the
//! raw `-o` options with qemu-img's errors.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

/// The raw format's creation options (after `-o` parsing).
#[derive(Debug, Default, Clone)]
pub struct RawOptions {
    pub prealloc: Option<String>,
}

/// Parse the `-o` list of a raw target. `size` is accepted and ignored (the size comes from
/// the source, as in qemu-img convert).
pub fn raw_options(list: &[(String, String)]) -> Result<RawOptions, String> {
    let mut o = RawOptions::default();
    for (k, v) in list {
        match k.as_str() {
            "size" | "extent_size_hint" => {
                blockd_block::options::parse_size(v).map_err(|_| {
                    format!(
                        "Parameter '{k}' expects a non-negative number below 2^64\n\
                         Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
                         and exabytes, respectively."
                    )
                })?;
            }
            "nocow" => {
                if !matches!(v.as_str(), "on" | "off" | "yes" | "no" | "true" | "false") {
                    return Err("Parameter 'nocow' expects 'on' or 'off'".to_string());
                }
            }
            "preallocation" => o.prealloc = Some(v.clone()),
            other => return Err(format!("Invalid parameter '{other}'")),
        }
    }
    Ok(o)
}

/// Split an option list (`a=b,c=d`, `,,` escapes a comma); a bare word is `help` or a boolean
/// switched on. `None` when an item is empty.
pub fn split_opts(s: &str) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    for it in blockd_block::options::split_list(s) {
        if it.is_empty() {
            return None;
        }
        match it.split_once('=') {
            Some((k, v)) => out.push((k.to_string(), v.to_string())),
            None => {
                let v = if it == "help" || it == "?" {
                    String::new()
                } else {
                    "on".into()
                };
                out.push((it, v));
            }
        }
    }
    Some(out)
}

pub const RAW_OPTION_HELP: &str = "\
Supported options:
  extent_size_hint=<size> - Extent size hint for the image file, 0 to disable
  nocow=<bool (on/off)>  - Turn off copy-on-write (valid only on btrfs)
  preallocation=<str>    - Preallocation mode (allowed values: off, falloc, full)
  size=<size>            - Virtual disk size
";

pub const RAW_FORMAT_HELP: &str = "\
Supported raw options:
  size=<size>            - Virtual disk size

The protocol level may support further options.
Specify the target filename to include those options.
";

/// Refuse to recreate an image someone uses: take the write lock of an existing `path` the
/// way qemu-img's create does (a source of the same command counts too), and let it go.
pub fn check_unlocked(path: &str) -> Result<(), String> {
    if std::fs::metadata(path).is_err() {
        return Ok(());
    }
    let mut graph = blockd_drivers::graph();
    let mut file = serde_json::Map::new();
    file.insert("driver".into(), "file".into());
    file.insert("filename".into(), path.into());
    let Ok(node) = graph.open(file) else {
        // Not openable as a file: creating it reports the real error.
        return Ok(());
    };
    use blockd_block::Perm;
    let blk = graph.new_backend("", &node, Perm::WRITE | Perm::RESIZE, Perm::ALL)?;
    blk.detach(&graph);
    Ok(())
}

/// Create (or truncate) a raw image file of `size` bytes. Errors are qemu-img's texts without
/// the file name prefix.
pub fn create_raw(filename: &str, size: u64, opts: &RawOptions) -> Result<(), String> {
    if let Some(v) = &opts.prealloc
        && !matches!(v.as_str(), "off" | "metadata" | "falloc" | "full")
    {
        return Err(format!("invalid parameter value: {v}"));
    }
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(filename)
        .map_err(|e| {
            format!(
                "Could not create '{filename}': {}",
                blockd_block::strerror(&e)
            )
        })?;
    let len = size
        .div_ceil(512)
        .checked_mul(512)
        .filter(|&l| l <= i64::MAX as u64)
        .ok_or_else(|| "Could not resize file: Invalid argument".to_string())?;
    match opts.prealloc.as_deref() {
        None | Some("off") => {
            set_len(&f, len)?;
            let first = len.min(4096) as usize;
            if first > 0 {
                f.write_all_at(&vec![0u8; first], 0).map_err(|e| {
                    format!("Could not write zeros: {}", blockd_block::strerror(&e))
                })?;
            }
            Ok(())
        }
        Some("falloc") => {
            set_len(&f, len)?;
            if len > 0 {
                let fd = f.as_raw_fd();
                let r =
                    blockd_aio::block_on(
                        async move { blockd_aio::ops::fallocate(fd, 0, 0, len).await },
                    )
                    .map_err(|e| {
                        format!("Could not preallocate data for the new file: {}", e.context)
                    })?;
                r.map_err(|e| {
                    format!(
                        "Could not preallocate new data: {}",
                        blockd_block::strerror(&e)
                    )
                })?;
            }
            Ok(())
        }
        Some("full") => {
            set_len(&f, 0)?;
            let chunk = vec![0u8; 1 << 20];
            let mut off = 0u64;
            let mut w = &f;
            while off < len {
                let n = (len - off).min(chunk.len() as u64) as usize;
                w.write_all(&chunk[..n]).map_err(|e| {
                    format!(
                        "Could not write zeros for preallocation: {}",
                        blockd_block::strerror(&e)
                    )
                })?;
                off += n as u64;
            }
            f.sync_data()
                .map_err(|e| format!("Could not flush file: {}", blockd_block::strerror(&e)))
        }
        Some("metadata") => Err("Unsupported preallocation mode: metadata".into()),
        Some(other) => Err(format!("invalid parameter value: {other}")),
    }
}

fn set_len(f: &File, len: u64) -> Result<(), String> {
    f.set_len(len).map_err(|e| {
        if e.raw_os_error() == Some(libc::EFBIG) {
            "The image size is too large for file format 'raw'".to_string()
        } else {
            format!("Could not resize file: {}", blockd_block::strerror(&e))
        }
    })
}

/// Whether blockd can create images of this format.
pub fn can_create(fmt: &str) -> bool {
    matches!(fmt, "raw" | "qcow2")
}

/// The qcow2 creation options of `-o` (and `-B`/`-F`) for an image of `size` bytes; errors are
/// qemu-img's option errors (printed without the file name).
pub fn qcow2_options(
    size: u64,
    opts: &[(String, String)],
    backing: Option<&str>,
    backing_fmt: Option<&str>,
) -> Result<blockd_qcow2::CreateOptions, String> {
    let mut c = blockd_qcow2::CreateOptions::from_qemu_opts(opts)?;
    c.set("size", &size.to_string())?;
    if let Some(b) = backing {
        c.set("backing_file", b)?;
    }
    if let Some(f) = backing_fmt {
        c.set("backing_fmt", f)?;
    }
    Ok(c)
}

/// Create a qcow2 image on a fresh file, formatted by blockd-qcow2.
pub fn create_qcow2(filename: &str, c: &blockd_qcow2::CreateOptions) -> Result<(), String> {
    c.validate()?;
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(filename)
        .map_err(|e| {
            format!(
                "Could not create '{filename}': {}",
                blockd_block::strerror(&e)
            )
        })?;
    crate::create::format_qcow2(filename, c)
}
