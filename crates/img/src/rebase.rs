//! `qemu-img rebase`: give an image a new backing file (or none).
//!
//! Safe mode keeps what the image reads: every cluster the image does not allocate itself is
//! compared between the old backing chain and the new backing file (zeroes where there is none
//! or past its end), and where they differ the old contents are written into the image, in
//! order, a whole cluster at a time. Then the header names the new backing file. `-u` only
//! rewrites the header.

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use blockd_aio::IoBuf;
use blockd_block::{BlockBackend, Node, Perm, ReqFlags};

use crate::getopt::{self, LongOpt, lo};
use crate::image::{self, Cache, OpenRequest};
use crate::progress::Progress;
use crate::{CmdResult, Failure};

const CHUNK: u64 = 2 << 20;

const OPT_OBJECT: u32 = 256;
const OPT_IMAGE_OPTS: u32 = 257;

const LONG: &[LongOpt] = &[
    lo("help", false, b'h' as u32),
    lo("object", true, OPT_OBJECT),
    lo("image-opts", false, OPT_IMAGE_OPTS),
    lo("force-share", false, b'U' as u32),
    lo("format", true, b'f' as u32),
    lo("backing", true, b'b' as u32),
    lo("backing-format", true, b'F' as u32),
    lo("backing-cache", true, b'T' as u32),
    lo("backing-unsafe", false, b'u' as u32),
    lo("cache", true, b't' as u32),
    lo("compress", false, b'c' as u32),
    lo("progress", false, b'p' as u32),
    lo("quiet", false, b'q' as u32),
];

/// `name` relative to the directory of `base` (unless absolute), as QEMU resolves backing
/// file names.
pub fn relative_to(base: &str, name: &str) -> String {
    if name.starts_with('/') {
        return name.to_string();
    }
    match base.rfind('/') {
        Some(i) => format!("{}{name}", &base[..=i]),
        None => name.to_string(),
    }
}

/// Rewrite the qcow2 header of `path` to name `backing` (format `fmt`), or no backing file.
pub fn set_backing(path: &str, backing: Option<&str>, fmt: Option<&str>) -> Result<(), String> {
    let mut h = blockd_qcow2::read_header_file(path)?;
    h.backing_file = backing.map(str::to_string);
    h.backing_format = fmt.map(str::to_string);
    let mut bytes = h.serialize()?;
    bytes.resize(h.cluster_size() as usize, 0);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| blockd_block::strerror(&e))?;
    f.write_all_at(&bytes, 0)
        .and_then(|_| f.sync_data())
        .map_err(|e| blockd_block::strerror(&e))
}

pub fn run(argv: &[String]) -> CmdResult {
    let p = getopt::parse(
        argv,
        ":hf:F:b:upt:T:qUc",
        LONG,
        &format!("{} rebase", crate::prog()),
    )
    .map_err(|e| Failure::getopt(e, "rebase"))?;
    let mut fmt: Option<String> = None;
    let mut backing: Option<String> = None;
    let mut backing_fmt: Option<String> = None;
    let mut unsafe_mode = false;
    let mut progress = false;
    let mut quiet = false;
    let mut cache = "writeback".to_string();
    let mut bcache = "writeback".to_string();
    let mut force_share = false;
    let mut image_opts = false;
    let mut compress = false;
    for (code, arg) in p.opts {
        let arg = arg.unwrap_or_default();
        match code {
            OPT_OBJECT => return Err(Failure::new("--object is not supported by blockd-img yet")),
            OPT_IMAGE_OPTS => image_opts = true,
            _ => match char::from_u32(code).unwrap_or('\0') {
                'h' => {
                    print!("{}", crate::help::REBASE);
                    return Ok(());
                }
                'f' => fmt = Some(arg),
                'F' => backing_fmt = Some(arg),
                'b' => backing = Some(arg),
                'u' => unsafe_mode = true,
                'p' => progress = true,
                'q' => quiet = true,
                't' => cache = arg,
                'T' => bcache = arg,
                'U' => force_share = true,
                'c' => compress = true,
                _ => {}
            },
        }
    }
    if quiet {
        progress = false;
    }
    if p.args.len() != 1 {
        return Err(Failure::usage("Expecting one image file name", "rebase"));
    }
    if !unsafe_mode && backing.is_none() {
        return Err(Failure::usage(
            "Must specify backing file (-b) or use unsafe mode (-u)",
            "rebase",
        ));
    }
    if image_opts && fmt.is_some() {
        return Err(Failure::new(
            "--image-opts and --format are mutually exclusive",
        ));
    }
    let cache = Cache::parse(&cache)
        .ok_or_else(|| Failure::new(format!("Invalid cache option: {cache}")))?;
    let bcache = Cache::parse(&bcache)
        .ok_or_else(|| Failure::new(format!("Invalid cache option: {bcache}")))?;
    let name = &p.args[0];
    // An empty name removes the backing file.
    let new_backing = backing.clone().filter(|b| !b.is_empty());
    let change_err = |e: &str| {
        Failure::new(format!(
            "Could not change the backing file to '{}': {e}",
            backing.as_deref().unwrap_or("")
        ))
    };
    if unsafe_mode {
        // Only the header changes: the image is not opened with its (possibly missing) chain.
        if image_opts {
            return Err(Failure::new(
                "rebase -u with --image-opts is not supported by blockd-img yet",
            ));
        }
        let is_qcow2 = match fmt.as_deref() {
            Some(f) => f == "qcow2",
            None => blockd_qcow2::read_header_file(name).is_ok(),
        };
        if let Err(e) = std::fs::metadata(name) {
            return Err(Failure::new(format!(
                "Could not open '{name}': Could not open '{name}': {}",
                blockd_block::strerror(&e)
            )));
        }
        if !is_qcow2 {
            return Err(change_err("Operation not supported"));
        }
        if new_backing.is_some() && backing_fmt.is_none() {
            return Err(change_err("backing format must be specified"));
        }
        crate::target::check_unlocked(name)
            .map_err(|e| Failure::new(format!("Could not open '{name}': {e}")))?;
        return set_backing(name, new_backing.as_deref(), backing_fmt.as_deref())
            .map_err(|e| change_err(&e));
    }
    let req = OpenRequest {
        name,
        image_opts,
        format: fmt.as_deref(),
        cache,
        aio: None,
        read_only: false,
        // -U shares the backing files only: the image itself is written.
        force_share: false,
        warn_probe: false,
    };
    let opened = image::open(&req).map_err(Failure::new)?;
    let top_file = file_name(&opened.options).unwrap_or_else(|| name.clone());
    let format = opened.node.driver().format_name();
    let new = match &new_backing {
        Some(b) => {
            let path = relative_to(&top_file, b);
            let breq = OpenRequest {
                name: &path,
                image_opts: false,
                format: backing_fmt.as_deref(),
                cache: bcache,
                aio: None,
                read_only: true,
                force_share,
                warn_probe: false,
            };
            let o = image::open(&breq).map_err(|e| {
                let inner = e
                    .strip_prefix(&format!("Could not open '{path}': "))
                    .unwrap_or(&e)
                    .to_string();
                Failure::new(format!("Could not open new backing file '{b}': {inner}"))
            })?;
            Some(o)
        }
        None => None,
    };
    if format != "qcow2" {
        return Err(change_err("Operation not supported"));
    }
    let blk = BlockBackend::new(
        &opened._graph,
        "",
        &opened.node,
        Perm::CONSISTENT_READ | Perm::WRITE,
        Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
    )
    .map_err(|e| Failure::new(format!("Could not open '{name}': {e}")))?;
    let new_blk = match &new {
        Some(o) => Some(
            BlockBackend::new(&o._graph, "", &o.node, Perm::CONSISTENT_READ, Perm::ALL)
                .map_err(Failure::new)?,
        ),
        None => None,
    };
    let cluster = opened.node.driver().cluster_size().unwrap_or(65536);
    let prog = Progress::new(progress, 2.0);
    prog.start();
    let stop = new_backing
        .as_ref()
        .and_then(|b| chain_layer(&opened.node, &top_file, &relative_to(&top_file, b)));
    let r = blockd_aio::block_on(copy_differences(
        &opened.node,
        &blk,
        new_blk.as_ref(),
        stop.as_ref(),
        cluster,
        // -c: the clusters written are stored compressed (whole clusters, as written here).
        if compress {
            ReqFlags::WRITE_COMPRESSED
        } else {
            ReqFlags::NONE
        },
        &prog,
    ))
    .map_err(|e| Failure::new(format!("cannot run the event loop: {}", e.context)))?;
    r.map_err(Failure::new)?;
    drop(blk);
    drop(new_blk);
    drop(new);
    drop(opened);
    if new_backing.is_some() && backing_fmt.is_none() {
        prog.finish();
        return Err(change_err("backing format must be specified"));
    }
    let r = set_backing(&top_file, new_backing.as_deref(), backing_fmt.as_deref());
    prog.finish();
    r.map_err(|e| change_err(&e))
}

/// The image file of a format node's options.
fn file_name(options: &serde_json::Map<String, serde_json::Value>) -> Option<String> {
    match options.get("file") {
        Some(serde_json::Value::Object(f)) => f.get("filename")?.as_str().map(str::to_string),
        _ => options.get("filename")?.as_str().map(str::to_string),
    }
}

/// Write into the image every cluster it does not allocate whose contents differ between the
/// old chain (what the image reads now) and the new backing file. When the new backing file is
/// part of the old chain (`stop` is that layer), only what the layers above it allocate can
/// differ. Progress moves one step per extent handled, as qemu-img counts it.
async fn copy_differences(
    node: &Arc<Node>,
    blk: &BlockBackend,
    new: Option<&BlockBackend>,
    stop: Option<&Arc<Node>>,
    cluster: u64,
    flags: ReqFlags,
    prog: &Progress,
) -> Result<(), String> {
    let size = blk.length();
    let new_len = new.map_or(0, |b| b.length());
    let step = if size == 0 {
        100.0
    } else {
        100.0 / (size / size.min(CHUNK)) as f32
    };
    let meta = |e: std::io::Error| {
        format!(
            "error while reading image metadata: {}",
            blockd_block::strerror(&e)
        )
    };
    let mut old_buf = Some(IoBuf::new(CHUNK as usize, 4096));
    let mut new_buf = Some(IoBuf::new(CHUNK as usize, 4096));
    let mut off = 0u64;
    while off < size {
        let mut n = (size - off).min(CHUNK);
        let s = node
            .driver()
            .block_status(node, off, n)
            .await
            .map_err(meta)?;
        n = s.len.clamp(1, n);
        if s.allocated {
            off += n;
            continue;
        }
        if let Some(stop) = stop {
            let (allocated, len) = allocated_between(node, stop, off, n).await.map_err(meta)?;
            n = len;
            if !allocated {
                off += n;
                continue;
            }
        }
        let start = off / cluster * cluster;
        let end = (off + n)
            .div_ceil(cluster)
            .saturating_mul(cluster)
            .min(size);
        let mut c = start;
        while c < end {
            let len = cluster.min(end - c);
            compare_and_copy(blk, new, new_len, c, len, flags, &mut old_buf, &mut new_buf).await?;
            c += len;
        }
        off += n;
        prog.add(step, 100);
    }
    blk.flush()
        .await
        .map_err(|e| format!("error while flushing: {}", blockd_block::strerror(&e)))
}

/// Whether a layer below `top` and above `stop` allocates the extent at `off`, and how long
/// that answer holds (at most `n`).
async fn allocated_between(
    top: &Arc<Node>,
    stop: &Arc<Node>,
    off: u64,
    n: u64,
) -> std::io::Result<(bool, u64)> {
    let mut len = n;
    let mut layer = crate::status::backing(top);
    while let Some(l) = layer {
        if Arc::ptr_eq(&l, stop) {
            break;
        }
        if off >= l.length() {
            // A shorter layer reads zeroes there: that may differ from the new backing file.
            return Ok((true, len));
        }
        let s = l
            .driver()
            .block_status(&l, off, len.min(l.length() - off))
            .await?;
        if s.allocated {
            return Ok((true, s.len.clamp(1, len)));
        }
        len = s.len.clamp(1, len);
        layer = crate::status::backing(&l);
    }
    Ok((false, len))
}

/// The layer of `top`'s backing chain stored in `path` (the same file), if any.
fn chain_layer(top: &Arc<Node>, top_file: &str, path: &str) -> Option<Arc<Node>> {
    let want = std::fs::canonicalize(path).ok()?;
    let names = crate::map::chain_filenames(top, top_file);
    let mut layer = crate::status::backing(top);
    for name in names.iter().skip(1) {
        let l = layer?;
        if std::fs::canonicalize(name).ok().as_ref() == Some(&want) {
            return Some(l);
        }
        layer = crate::status::backing(&l);
    }
    None
}

#[allow(clippy::too_many_arguments)]
async fn compare_and_copy(
    blk: &BlockBackend,
    new: Option<&BlockBackend>,
    new_len: u64,
    off: u64,
    len: u64,
    flags: ReqFlags,
    old_buf: &mut Option<IoBuf>,
    new_buf: &mut Option<IoBuf>,
) -> Result<(), String> {
    let rd = |e: std::io::Error| {
        format!(
            "error while reading from old backing file: {}",
            blockd_block::strerror(&e)
        )
    };
    let mut o = old_buf.take().expect("buffer");
    o.set_len(len as usize);
    let (r, o) = blk.read(off, o).await;
    let mut o = o;
    if let Err(e) = r {
        *old_buf = Some(o);
        return Err(rd(e));
    }
    let mut nb = new_buf.take().expect("buffer");
    nb.set_len(len as usize);
    nb.as_mut_slice().fill(0);
    if let Some(b) = new
        && off < new_len
    {
        let part = (new_len - off).min(len) as usize;
        let mut tmp = nb;
        tmp.set_len(part);
        let (r, t) = b.read(off, tmp).await;
        nb = t;
        nb.set_len(len as usize);
        if let Err(e) = r {
            *old_buf = Some(o);
            *new_buf = Some(nb);
            return Err(format!(
                "error while reading from new backing file: {}",
                blockd_block::strerror(&e)
            ));
        }
    }
    let differs = o.as_slice() != nb.as_slice();
    *new_buf = Some(nb);
    if differs {
        let (r, back) = blk.write(off, o, flags).await;
        o = back;
        if let Err(e) = r {
            *old_buf = Some(o);
            return Err(format!(
                "error while writing to COW image: {}",
                blockd_block::strerror(&e)
            ));
        }
    }
    *old_buf = Some(o);
    Ok(())
}
