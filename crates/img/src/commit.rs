//! `qemu-img commit`: write what an image (and the layers between it and the base) allocates
//! into the base of its backing chain, then empty the image unless `-d` or `-b`.
//!
//! The chain is read through a read-only open of the image (so reads see every layer above the
//! base); the base is opened writable on its own. Only extents some layer above the base
//! allocates are copied, zero extents as write-zeroes. Emptying the image writes a fresh
//! qcow2 header and tables with the same options and backing file (QEMU resets the image the
//! same way: nothing stays allocated).

use std::sync::Arc;
use std::time::{Duration, Instant};

use blockd_aio::IoBuf;
use blockd_block::{BlockBackend, Node, Perm, ReqFlags};

use crate::getopt::{self, LongOpt, lo};
use crate::image::{self, Cache, OpenRequest};
use crate::num::{self, NumError};
use crate::progress::Progress;
use crate::status::{backing, status_above};
use crate::{CmdResult, Failure};

const CHUNK: u64 = 2 << 20;

const OPT_OBJECT: u32 = 256;
const OPT_IMAGE_OPTS: u32 = 257;

const LONG: &[LongOpt] = &[
    lo("help", false, b'h' as u32),
    lo("object", true, OPT_OBJECT),
    lo("image-opts", false, OPT_IMAGE_OPTS),
    lo("quiet", false, b'q' as u32),
    lo("progress", false, b'p' as u32),
    lo("format", true, b'f' as u32),
    lo("cache", true, b't' as u32),
    lo("drop", false, b'd' as u32),
    lo("base", true, b'b' as u32),
    lo("rate", true, b'r' as u32),
];

pub fn run(argv: &[String]) -> CmdResult {
    let p = getopt::parse(
        argv,
        ":f:ht:b:dpqr:",
        LONG,
        &format!("{} commit", crate::prog()),
    )
    .map_err(|e| Failure::getopt(e, "commit"))?;
    let mut fmt: Option<String> = None;
    let mut cache = "writeback".to_string();
    let mut base_name: Option<String> = None;
    let mut skip_empty = false;
    let mut progress = false;
    let mut quiet = false;
    let mut rate = 0u64;
    let mut image_opts = false;
    for (code, arg) in p.opts {
        let arg = arg.unwrap_or_default();
        match code {
            OPT_OBJECT => return Err(Failure::new("--object is not supported by blockd-img yet")),
            OPT_IMAGE_OPTS => image_opts = true,
            _ => match char::from_u32(code).unwrap_or('\0') {
                'h' => {
                    print!("{}", crate::help::COMMIT);
                    return Ok(());
                }
                'f' => fmt = Some(arg),
                't' => cache = arg,
                'b' => {
                    base_name = Some(arg);
                    // A base below the backing file leaves the image as it is.
                    skip_empty = true;
                }
                'd' => skip_empty = true,
                'p' => progress = true,
                'q' => quiet = true,
                'r' => {
                    rate = match num::cvtnum(&arg) {
                        Ok(n) => n,
                        Err(NumError::Range) => {
                            return Err(Failure::new(
                                "Invalid rate limit specified. Must be between 0 and 9223372036854775807.",
                            ));
                        }
                        Err(NumError::Invalid) => {
                            return Err(Failure::new(format!(
                                "Invalid rate limit specified: '{arg}'."
                            )));
                        }
                    }
                }
                _ => {}
            },
        }
    }
    if quiet {
        progress = false;
    }
    if p.args.len() != 1 {
        return Err(Failure::usage("Expecting one image file name", "commit"));
    }
    if image_opts && fmt.is_some() {
        return Err(Failure::new(
            "--image-opts and --format are mutually exclusive",
        ));
    }
    let cache = Cache::parse(&cache)
        .ok_or_else(|| Failure::new(format!("Invalid cache option: {cache}")))?;
    let name = &p.args[0];
    // The chain, read-only and shared: the base is written through its own open below.
    let req = OpenRequest {
        name,
        image_opts,
        format: fmt.as_deref(),
        cache,
        aio: None,
        read_only: true,
        force_share: true,
        warn_probe: false,
    };
    let opened = image::open(&req).map_err(Failure::new)?;
    let top = opened.node.clone();
    let top_file = file_name(&opened.options).unwrap_or_else(|| name.clone());
    // The chain is read shared (the base is opened for writing below), so make sure nobody
    // else writes the image: it is about to be committed and emptied.
    crate::target::check_unlocked(&top_file)
        .map_err(|e| Failure::new(format!("Could not open '{name}': {e}")))?;
    if backing(&top).is_none() {
        return Err(Failure::new("Image does not have a backing file"));
    }
    let names = crate::map::chain_filenames(&top, &top_file);
    let mut layers = vec![top.clone()];
    while let Some(b) = backing(layers.last().expect("top")) {
        layers.push(b);
    }
    let base_depth = match &base_name {
        None => 1,
        Some(b) => {
            let want = std::fs::canonicalize(b).ok();
            let found = names
                .iter()
                .enumerate()
                .skip(1)
                .find(|(_, n)| want.is_some() && std::fs::canonicalize(n).ok() == want)
                .map(|(i, _)| i);
            match found {
                Some(i) => i,
                None => {
                    return Err(Failure::new(format!(
                        "Did not find '{b}' in the backing chain of '{name}'"
                    )));
                }
            }
        }
    };
    let Some(base_file) = names.get(base_depth).cloned() else {
        return Err(Failure::new(
            "committing into this backing file is not supported by blockd-img yet",
        ));
    };
    let base_node = layers[base_depth].clone();
    let base_fmt = base_node.driver().format_name();
    let breq = OpenRequest {
        name: &base_file,
        image_opts: false,
        format: Some(base_fmt),
        cache,
        aio: None,
        read_only: false,
        force_share: false,
        warn_probe: false,
    };
    let base = image::open(&breq).map_err(Failure::new)?;
    let base_blk = BlockBackend::new(
        &base._graph,
        "",
        &base.node,
        Perm::CONSISTENT_READ | Perm::WRITE | Perm::RESIZE,
        Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
    )
    .map_err(|e| Failure::new(format!("Could not open '{base_file}': {e}")))?;
    let top_blk = BlockBackend::new(&opened._graph, "", &top, Perm::CONSISTENT_READ, Perm::ALL)
        .map_err(|e| Failure::new(format!("Could not open '{name}': {e}")))?;
    let prog = Progress::new(progress, 1.0);
    prog.start();
    let r = blockd_aio::block_on(copy_down(
        &top,
        &top_blk,
        &base_blk,
        base_depth as u32,
        rate,
        &prog,
    ))
    .map_err(|e| Failure::new(format!("cannot run the event loop: {}", e.context)))?;
    r.map_err(Failure::new)?;
    prog.finish();
    drop_all(top_blk, base_blk);
    let top_format = top.driver().format_name();
    drop(top);
    drop(layers);
    drop(base);
    drop(opened);
    if !skip_empty {
        if top_format != "qcow2" {
            return Err(Failure::new(format!(
                "Emptying a '{top_format}' image after commit is not supported by blockd-img yet (use -d)"
            )));
        }
        empty_qcow2(&top_file).map_err(Failure::new)?;
    }
    if !quiet {
        println!("Image committed.");
    }
    Ok(())
}

fn drop_all(a: BlockBackend, b: BlockBackend) {
    drop(a);
    drop(b);
}

fn file_name(options: &serde_json::Map<String, serde_json::Value>) -> Option<String> {
    match options.get("file") {
        Some(serde_json::Value::Object(f)) => f.get("filename")?.as_str().map(str::to_string),
        _ => options.get("filename")?.as_str().map(str::to_string),
    }
}

/// Whether a layer above `depth` allocates the extent at `off`, and for how long (≤ `n`).
async fn allocated_above(
    top: &Arc<Node>,
    depth: u32,
    off: u64,
    n: u64,
) -> std::io::Result<(bool, u64)> {
    let mut len = n;
    let mut layer = Some(top.clone());
    let mut d = 0;
    while let Some(l) = layer {
        if d >= depth {
            break;
        }
        if off >= l.length() {
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
        layer = backing(&l);
        d += 1;
    }
    Ok((false, len))
}

async fn copy_down(
    top: &Arc<Node>,
    top_blk: &BlockBackend,
    base: &BlockBackend,
    depth: u32,
    rate: u64,
    prog: &Progress,
) -> Result<(), String> {
    let size = top_blk.length();
    if base.length() < size {
        base.truncate(size).await.map_err(|e| {
            format!(
                "Top image is larger than base image, and base image could not be resized: {}",
                blockd_block::strerror(&e)
            )
        })?;
    }
    let io = |what: &str, e: std::io::Error| format!("{what}: {}", blockd_block::strerror(&e));
    let started = Instant::now();
    let mut buf = Some(IoBuf::new(CHUNK as usize, 4096));
    let mut off = 0u64;
    let mut moved = 0u64;
    while off < size {
        let n = (size - off).min(CHUNK);
        let (allocated, n) = allocated_above(top, depth, off, n)
            .await
            .map_err(|e| io("error while reading image metadata", e))?;
        if allocated {
            if rate > 0 {
                let due = Duration::from_secs_f64(moved as f64 / rate as f64);
                if due > started.elapsed() {
                    blockd_aio::sleep(due - started.elapsed()).await;
                }
            }
            let e = status_above(top, off, n, depth.saturating_sub(1))
                .await
                .map_err(|e| io("error while reading image metadata", e))?;
            let n = e.len.clamp(1, n);
            if e.zero {
                base.write_zeroes(off, n, ReqFlags::MAY_UNMAP)
                    .await
                    .map_err(|e| io("error while writing to the base image", e))?;
            } else {
                let mut b = buf.take().expect("buffer");
                b.set_len(n as usize);
                let (r, b) = top_blk.read(off, b).await;
                if let Err(e) = r {
                    return Err(io("error while reading from the image", e));
                }
                let (r, b) = base.write(off, b, ReqFlags::NONE).await;
                buf = Some(b);
                r.map_err(|e| io("error while writing to the base image", e))?;
            }
            moved += n;
            off += n;
        } else {
            off += n;
        }
        prog.set(100.0 * off as f64 / size.max(1) as f64);
    }
    base.flush()
        .await
        .map_err(|e| io("error while flushing the base image", e))
}

/// Make a committed qcow2 image empty: a fresh header and tables with its options, size and
/// backing file, so it reads everything from the backing file again.
fn empty_qcow2(path: &str) -> Result<(), String> {
    let h = blockd_qcow2::read_header_file(path)?;
    if h.has_data_file() {
        return empty_keeping_tables(path);
    }
    if h.nb_snapshots > 0 {
        return Err(
            "Emptying an image with internal snapshots is not supported by blockd-img yet".into(),
        );
    }
    let mut o: Vec<(String, String)> = vec![
        (
            "compat".into(),
            if h.version >= 3 { "1.1" } else { "0.10" }.into(),
        ),
        ("cluster_size".into(), h.cluster_size().to_string()),
        ("refcount_bits".into(), h.refcount_bits().to_string()),
    ];
    if h.version >= 3 {
        o.push(("extended_l2".into(), on(h.extended_l2())));
        o.push(("lazy_refcounts".into(), on(h.compatible & 1 != 0)));
        o.push((
            "compression_type".into(),
            if h.compression_type == 1 {
                "zstd"
            } else {
                "zlib"
            }
            .into(),
        ));
    }
    if let Some(b) = &h.backing_file {
        o.push(("backing_file".into(), b.clone()));
    }
    if let Some(f) = &h.backing_format {
        o.push(("backing_fmt".into(), f.clone()));
    }
    let c = crate::target::qcow2_options(h.size, &o, None, None)?;
    crate::target::create_qcow2(path, &c)
}

/// An image with a data file is emptied in place as QEMU does: its tables stay, every
/// cluster is discarded (the data file's clusters too), so it reads from its backing file.
fn empty_keeping_tables(path: &str) -> Result<(), String> {
    let mut graph = blockd_drivers::graph();
    let opts = serde_json::json!({
        "driver": "qcow2",
        // qemu-img commit opens with discards passed down.
        "discard": "unmap",
        "backing": null,
        "file": {"driver": "file", "filename": path},
    });
    let serde_json::Value::Object(m) = opts else {
        unreachable!()
    };
    let node = graph.open(m)?;
    let q = blockd_qcow2::backing_name::qcow2_of(&node).ok_or("not a qcow2 image")?;
    let fail =
        |e: std::io::Error| format!("Could not empty {path}: {}", blockd_block::strerror(&e));
    blockd_aio::block_on(async {
        q.image.make_empty(&node).await.map_err(fail)?;
        node.driver().flush(&node).await.map_err(fail)
    })
    .map_err(|e| format!("cannot run the event loop: {}", e.context))?
}

fn on(b: bool) -> String {
    if b { "on" } else { "off" }.into()
}
