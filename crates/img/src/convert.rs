//! `qemu-img convert`: copy one or more source images (concatenated) into a new or existing
//! target.
//!
//! The copy walks the sources in chunks of at most 2 MiB, each classified by block status down
//! the backing chain (data, or zeroes/holes that need no read). `-m` worker tasks on the main
//! loop claim chunks in order, read them in parallel, and write them in order (or as they
//! complete with `-W`). Data chunks are scanned for runs of zeroes at least `-S` bytes long,
//! which are left sparse (or written as zeroes when the target does not start zeroed). Each
//! worker owns one buffer for the whole run: nothing is allocated per chunk.

use std::cell::{Cell, RefCell};
use std::future::{Future, poll_fn};
use std::io;
use std::pin::pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use blockd_aio::IoBuf;
use blockd_block::{BlockBackend, Node, Perm, ReqFlags};

use crate::getopt::{self, LongOpt, lo};
use crate::image::{self, Cache, OpenRequest};
use crate::num::{self, NumError};
use crate::progress::Progress;
use crate::status::{is_zero, status_above};
use crate::target;
use crate::{CmdResult, Failure};

/// The error of a copy whose failed requests printed their own messages.
const REPORTED: &str = "\0reported";

/// Largest chunk (QEMU's convert buffer).
const CHUNK: u64 = 2 << 20;
const MAX_COROUTINES: i64 = 16;

const OPT_IMAGE_OPTS: u32 = 256;
const OPT_OBJECT: u32 = 257;
const OPT_SALVAGE: u32 = 258;
const OPT_SKIP_BROKEN: u32 = 259;
const OPT_BITMAPS: u32 = 260;
const OPT_TARGET_IMAGE_OPTS: u32 = 261;
const OPT_TARGET_IS_ZERO: u32 = 262;

const LONG: &[LongOpt] = &[
    lo("help", false, b'h' as u32),
    lo("quiet", false, b'q' as u32),
    lo("object", true, OPT_OBJECT),
    lo("image-opts", false, OPT_IMAGE_OPTS),
    lo("source-image-opts", false, OPT_IMAGE_OPTS),
    lo("source-format", true, b'f' as u32),
    lo("output-format", true, b'O' as u32),
    lo("options", true, b'o' as u32),
    lo("source-cache", true, b'T' as u32),
    lo("output-cache", true, b't' as u32),
    lo("snapshot", true, b'l' as u32),
    lo("sparse-size", true, b'S' as u32),
    lo("salvage", false, OPT_SALVAGE),
    lo("skip-broken-bitmaps", false, OPT_SKIP_BROKEN),
    lo("oob-writes", false, b'W' as u32),
    lo("backing", true, b'B' as u32),
    lo("backing-format", true, b'F' as u32),
    lo("bitmaps", false, OPT_BITMAPS),
    lo("target-image-opts", false, OPT_TARGET_IMAGE_OPTS),
    lo("target-is-zero", false, OPT_TARGET_IS_ZERO),
    lo("force-share", false, b'U' as u32),
    lo("rate", true, b'r' as u32),
    lo("parallel", true, b'm' as u32),
    lo("copy-range-offloading", false, b'C' as u32),
];

/// How the copy runs (the command line after checks).
#[derive(Debug, Clone)]
struct Params {
    parallel: usize,
    /// `-S` in bytes; 0 writes every byte (fully allocated target).
    min_sparse: u64,
    compress: bool,
    oob_writes: bool,
    /// How in-order writes (no `-W`) keep their order.
    order: Order,
    /// The target reads as zeroes before the copy (new file, or `--target-is-zero`).
    target_zero: bool,
    /// `-B`: the target gets a backing file, so only what the source's top layer allocates
    /// is copied (the rest comes from the backing file).
    top_only: bool,
    salvage: bool,
    /// `-C`: data extents are copied as they are (qemu-img hands them to copy_file_range, which
    /// does not look for zeroes inside them).
    copy_range: bool,
    /// Bytes per second (`-r`), 0 = unlimited.
    rate: u64,
    writethrough: bool,
}

pub fn run(argv: &[String]) -> CmdResult {
    let p = getopt::parse(
        argv,
        ":hf:O:B:CcF:o:l:S:pt:T:qnm:WUr:",
        LONG,
        &format!("{} convert", crate::prog()),
    )
    .map_err(|e| Failure::getopt(e, "convert"))?;
    let mut src_fmt: Option<String> = None;
    let mut out_fmt: Option<String> = None;
    let mut backing: Option<String> = None;
    let mut backing_fmt: Option<String> = None;
    let mut compress = false;
    let mut optstr: Vec<String> = Vec::new();
    let mut snapshot: Option<String> = None;
    let mut min_sparse: u64 = 4096;
    let mut progress = false;
    let mut quiet = false;
    let mut cache = "unsafe".to_string();
    let mut src_cache = "writeback".to_string();
    let mut no_create = false;
    let mut parallel = 8usize;
    let mut oob = false;
    let mut force_share = false;
    let mut rate: u64 = 0;
    let mut image_opts = false;
    let mut target_image_opts = false;
    let mut target_is_zero = false;
    let mut salvage = false;
    let mut bitmaps = false;
    let mut skip_broken = false;
    let mut copy_range = false;
    for (code, arg) in p.opts {
        let arg = arg.unwrap_or_default();
        match code {
            OPT_IMAGE_OPTS => image_opts = true,
            OPT_OBJECT => {
                return Err(Failure::new("--object is not supported by blockd-img yet"));
            }
            OPT_SALVAGE => salvage = true,
            OPT_SKIP_BROKEN => skip_broken = true,
            OPT_BITMAPS => bitmaps = true,
            OPT_TARGET_IMAGE_OPTS => target_image_opts = true,
            OPT_TARGET_IS_ZERO => target_is_zero = true,
            _ => match char::from_u32(code).unwrap_or('\0') {
                'h' => {
                    print!("{}", crate::help::CONVERT);
                    return Ok(());
                }
                'f' => src_fmt = Some(arg),
                'O' => out_fmt = Some(arg),
                'B' => backing = Some(arg),
                'F' => backing_fmt = Some(arg),
                'c' => compress = true,
                'o' => optstr.push(arg),
                'l' => snapshot = Some(arg),
                'S' => {
                    min_sparse = match num::cvtnum(&arg) {
                        Ok(n) if n % 512 == 0 && n <= 16 << 20 => n,
                        Ok(_) => {
                            return Err(Failure::new(
                                "Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to 16777216. Select 0 to disable sparse detection (fully allocates output).",
                            ));
                        }
                        Err(NumError::Range) => {
                            return Err(Failure::new(
                                "Invalid buffer size for sparse output specified. Must be between 0 and 9223372036854775807.",
                            ));
                        }
                        Err(NumError::Invalid) => {
                            return Err(Failure::new(format!(
                                "Invalid buffer size for sparse output specified: '{arg}'."
                            )));
                        }
                    }
                }
                'p' => progress = true,
                't' => cache = arg,
                'T' => src_cache = arg,
                'q' => quiet = true,
                'n' => no_create = true,
                'm' => {
                    parallel = match num::strtol(&arg) {
                        Ok(n) if (1..=MAX_COROUTINES).contains(&n) => n as usize,
                        Ok(_) | Err(NumError::Range) => {
                            return Err(Failure::new(format!(
                                "Invalid number of coroutines specified. Must be between 1 and {MAX_COROUTINES}."
                            )));
                        }
                        Err(NumError::Invalid) => {
                            return Err(Failure::new(format!(
                                "Invalid number of coroutines specified: '{arg}'."
                            )));
                        }
                    }
                }
                'W' => oob = true,
                'U' => force_share = true,
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
                'C' => copy_range = true,
                _ => {}
            },
        }
    }
    if quiet {
        progress = false;
    }
    if skip_broken && !bitmaps {
        return Err(Failure::new(
            "Use of --skip-broken-bitmaps requires --bitmaps",
        ));
    }
    if target_is_zero && !no_create {
        return Err(Failure::new("--target-is-zero requires use of -n flag"));
    }
    if image_opts && src_fmt.is_some() {
        return Err(Failure::new(
            "--image-opts and --format are mutually exclusive",
        ));
    }
    let joined = optstr.join(",");
    let opts = if optstr.is_empty() {
        Vec::new()
    } else {
        target::split_opts(&joined)
            .ok_or_else(|| Failure::new(format!("Invalid option list: {joined}")))?
    };
    let wants_help = opts.iter().any(|(k, _)| k == "help" || k == "?");
    let fmt = out_fmt.clone().unwrap_or_else(|| "raw".into());
    if wants_help {
        let with_file = p.args.len() >= 2;
        let text = match (fmt.as_str(), with_file) {
            ("raw", true) => target::RAW_OPTION_HELP,
            ("raw", false) => target::RAW_FORMAT_HELP,
            ("qcow2", true) => crate::help::QCOW2_OPTION_HELP,
            ("qcow2", false) => crate::help::QCOW2_FORMAT_HELP,
            _ => {
                return Err(Failure::new(format!(
                    "Option help for format '{fmt}' is not supported by blockd-img yet"
                )));
            }
        };
        print!("{text}");
        return Ok(());
    }
    if p.args.len() < 2 {
        return Err(Failure::new("Must specify image file name"));
    }
    if no_create && !opts.is_empty() {
        return Err(Failure::new(
            "-o has no effect when skipping image creation",
        ));
    }
    if target_image_opts && !no_create {
        return Err(Failure::new("--target-image-opts requires use of -n flag"));
    }
    if target_image_opts && out_fmt.is_some() {
        return Err(Failure::new(
            "--target-image-opts and -O are mutually exclusive",
        ));
    }
    let src_cache = Cache::parse(&src_cache)
        .ok_or_else(|| Failure::new(format!("Invalid source cache option: {src_cache}")))?;
    let (out_name, src_names) = p.args.split_last().expect("two arguments");

    // Sources, opened read-only and concatenated.
    let mut sources = Vec::new();
    let mut total = 0u64;
    for name in src_names {
        let req = OpenRequest {
            name,
            image_opts,
            format: src_fmt.as_deref(),
            cache: src_cache,
            // Reads from the page cache complete inside io_uring_enter, on the loop's own
            // thread; on the thread pool (qemu-img's default engine) they overlap with the
            // target's writes. O_DIRECT reads are truly asynchronous on io_uring.
            aio: (!src_cache.direct).then_some("threads"),
            read_only: true,
            force_share,
            warn_probe: false,
        };
        let opened = image::open(&req).map_err(Failure::new)?;
        let blk = BlockBackend::new(
            &opened._graph,
            "",
            &opened.node,
            Perm::CONSISTENT_READ,
            if force_share {
                Perm::ALL
            } else {
                Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED
            },
        )
        .map_err(|e| Failure::new(format!("Could not open '{name}': {e}")))?;
        let len = opened.node.length();
        sources.push(Source {
            node: opened.node.clone(),
            blk,
            start: total,
            len,
            _opened: opened,
        });
        total = total.saturating_add(len);
    }
    if snapshot.is_some() {
        let fmt = sources[0].node.driver().format_name();
        return Err(Failure::new(if fmt == "qcow2" {
            "Loading internal snapshots (-l) is not supported by blockd-img yet".to_string()
        } else {
            format!(
                "Failed to load snapshot: Block format '{fmt}' used by device '' does not support temporarily loading internal snapshots"
            )
        }));
    }
    if bitmaps {
        return Err(Failure::new(
            if sources[0].node.driver().format_name() == "qcow2" {
                "Copying bitmaps (--bitmaps) is not supported by blockd-img yet"
            } else {
                "Source lacks bitmap support"
            },
        ));
    }

    // The target format and its creation options.
    if !target_image_opts && !crate::help::KNOWN_FORMATS.contains(&fmt.as_str()) {
        return Err(Failure::new(format!("Unknown file format '{fmt}'")));
    }
    if compress && !target_image_opts && !supports_compression(&fmt) {
        return Err(Failure::new(
            "Compression not supported for this file format",
        ));
    }
    if !no_create {
        if fmt != "raw" && !target::can_create(&fmt) {
            return Err(Failure::new(format!(
                "{out_name}: creating '{fmt}' images is not supported by blockd-img yet"
            )));
        }
        target::check_unlocked(out_name)
            .map_err(|e| Failure::new(format!("{out_name}: error while converting {fmt}: {e}")))?;
        if fmt == "qcow2" && backing.is_some() && backing_fmt.is_none() {
            return Err(Failure::new(
                "Use of backing file requires explicit backing format",
            ));
        }
        if fmt == "qcow2" {
            let c = target::qcow2_options(total, &opts, backing.as_deref(), backing_fmt.as_deref())
                .map_err(Failure::new)?;
            target::create_qcow2(out_name, &c).map_err(|e| {
                Failure::new(format!("{out_name}: error while converting qcow2: {e}"))
            })?;
        } else {
            let raw_opts = target::raw_options(&opts).map_err(Failure::new)?;
            if backing.is_some() {
                return Err(Failure::new(
                    "Backing file not supported for file format 'raw'",
                ));
            }
            if backing_fmt.is_some() {
                return Err(Failure::new(
                    "Backing file format not supported for file format 'raw'",
                ));
            }
            target::create_raw(out_name, total, &raw_opts).map_err(|e| {
                Failure::new(format!("{out_name}: error while converting raw: {e}"))
            })?;
        }
    }
    let cache = Cache::parse(&cache)
        .ok_or_else(|| Failure::new(format!("Invalid cache option: {cache}")))?;
    let treq = OpenRequest {
        name: out_name,
        image_opts: target_image_opts,
        format: if target_image_opts {
            None
        } else {
            Some(fmt.as_str())
        },
        cache,
        aio: None,
        read_only: false,
        force_share: false,
        warn_probe: false,
    };
    let topened = image::open_ext(&treq, true).map_err(Failure::new)?;
    let dst = BlockBackend::new(
        &topened._graph,
        "",
        &topened.node,
        Perm::CONSISTENT_READ | Perm::WRITE,
        Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
    )
    .map_err(|e| Failure::new(format!("Could not open '{out_name}': {e}")))?;
    if no_create && dst.length() < total {
        return Err(Failure::new("output file is smaller than input file"));
    }
    if compress && !supports_compression(topened.node.driver().format_name()) {
        return Err(Failure::new(
            "Compression not supported for this file format",
        ));
    }
    let cluster = topened
        .node
        .driver()
        .cluster_size()
        .filter(|&c| c > 0 && c <= CHUNK && CHUNK.is_multiple_of(c))
        .unwrap_or(65536);
    let params = Params {
        parallel,
        min_sparse,
        compress,
        oob_writes: oob,
        order: if oob || compress {
            Order::Strict
        } else if order_free(&topened.node) {
            Order::Free
        } else if !no_create && backing.is_none() && fmt == "qcow2" {
            Order::Allocation
        } else {
            Order::Strict
        },
        // A target on a backing file does not read as zeroes.
        target_zero: (!no_create && backing.is_none()) || target_is_zero,
        top_only: !no_create && backing.is_some(),
        salvage,
        copy_range: copy_range && !compress,
        rate,
        writethrough: cache.writethrough,
    };
    let prog = Progress::new(progress, 1.0);
    let job = Rc::new(Job::new(sources, dst, total, cluster, params, prog));
    let r = blockd_aio::block_on(copy(job.clone()))
        .map_err(|e| Failure::new(format!("cannot run the event loop: {}", e.context)))?;
    r.map_err(|e| {
        if e == REPORTED {
            Failure::reported()
        } else {
            Failure::new(e)
        }
    })
}

/// How in-order writes keep their order. Only completions (and so errors) are taken in
/// order whatever the mode; the modes differ in when a write may start, which is what keeps
/// the target's thread fed with the next write instead of waiting for this process's turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Order {
    /// A write starts once the previous one has finished (qemu-img's way).
    Strict,
    /// Writes start at once: the result does not depend on their order (a raw file).
    Free,
    /// A write starts once the previous one has taken its host clusters (a new qcow2 image):
    /// the host layout is that of strict order while the data writes overlap.
    Allocation,
}

/// Whether the result of writes to `node` is the same whatever order they run in (they never
/// overlap): a raw format over a file, where no write allocates metadata.
fn order_free(node: &Node) -> bool {
    node.driver().format_name() == "raw"
        && node
            .child("file")
            .is_some_and(|f| matches!(f.driver().format_name(), "file" | "host_device"))
}

fn supports_compression(fmt: &str) -> bool {
    matches!(fmt, "qcow2" | "qcow")
}

struct Source {
    node: Arc<Node>,
    blk: BlockBackend,
    /// Offset of this source in the concatenation.
    start: u64,
    len: u64,
    _opened: image::Opened,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Read it and write what is not zero.
    Data,
    /// Reads as zeroes: nothing to read.
    Zero,
    /// Left to the target's backing file (`-B`): nothing to read or write.
    Backing,
}

#[derive(Debug, Clone, Copy)]
struct Chunk {
    /// Offset in the concatenation (= in the target).
    off: u64,
    len: u64,
    src: usize,
    kind: Kind,
}

/// A waiter list for tasks of one thread (the copy's claim lock and in-order writes).
#[derive(Default)]
struct Waiters(RefCell<Vec<Waker>>);

impl Waiters {
    fn wake_all(&self) {
        for w in self.0.borrow_mut().drain(..) {
            w.wake();
        }
    }
}

struct Job {
    sources: Vec<Source>,
    dst: BlockBackend,
    total: u64,
    cluster: u64,
    p: Params,
    progress: Progress,
    /// Next offset to claim.
    pos: Cell<u64>,
    /// The status of the source extent around `pos`: (end, kind).
    status: Cell<Option<(u64, Kind)>>,
    /// A worker is asking for block status (claims wait for it).
    claiming: Cell<bool>,
    claim_waiters: Waiters,
    /// Next offset to write (or to finish writing) when writes are in order.
    wr_next: Cell<u64>,
    wr_waiters: Waiters,
    /// [`Order::Allocation`]: next offset that may start writing.
    alloc_next: Cell<u64>,
    alloc_waiters: Waiters,
    error: RefCell<Option<String>>,
    /// Progress accounting in sectors: counted chunks done so far and their total.
    done_sectors: Cell<u64>,
    counted_sectors: Cell<u64>,
    started: Instant,
}

impl Job {
    fn new(
        sources: Vec<Source>,
        dst: BlockBackend,
        total: u64,
        cluster: u64,
        p: Params,
        progress: Progress,
    ) -> Job {
        Job {
            sources,
            dst,
            total,
            cluster,
            p,
            progress,
            pos: Cell::new(0),
            status: Cell::new(None),
            claiming: Cell::new(false),
            claim_waiters: Waiters::default(),
            wr_next: Cell::new(0),
            wr_waiters: Waiters::default(),
            alloc_next: Cell::new(0),
            alloc_waiters: Waiters::default(),
            error: RefCell::new(None),
            done_sectors: Cell::new(0),
            counted_sectors: Cell::new(0),
            started: Instant::now(),
        }
    }

    fn failed(&self) -> bool {
        self.error.borrow().is_some()
    }

    fn fail(&self, msg: String) {
        let mut e = self.error.borrow_mut();
        if e.is_none() {
            *e = Some(msg);
        }
        drop(e);
        self.claim_waiters.wake_all();
        self.wr_waiters.wake_all();
        self.alloc_waiters.wake_all();
    }

    /// Whether a chunk of this kind counts for the progress figure (qemu-img counts what it
    /// has to write).
    fn counts(&self, kind: Kind) -> bool {
        kind == Kind::Data || (kind == Kind::Zero && self.p.min_sparse == 0)
    }

    /// The kind and end of the source extent at `pos` (in the concatenation).
    async fn classify(&self, pos: u64) -> io::Result<(u64, Kind, usize)> {
        let src = self
            .sources
            .iter()
            .rposition(|s| s.start <= pos && (pos < s.start + s.len || s.len == 0))
            .unwrap_or(0);
        let s = &self.sources[src];
        let local = pos - s.start;
        let depth = if self.p.top_only { 0 } else { u32::MAX };
        let e = status_above(&s.node, local, s.len - local, depth).await?;
        let kind = if self.p.top_only && !e.present {
            Kind::Backing
        } else if e.zero {
            Kind::Zero
        } else {
            Kind::Data
        };
        Ok((pos + e.len, kind, src))
    }

    /// The next chunk, in order; `None` when everything is claimed or the copy failed.
    async fn claim(&self) -> Result<Option<Chunk>, String> {
        loop {
            if self.failed() {
                return Ok(None);
            }
            if !self.claiming.get() {
                break;
            }
            poll_fn(|cx| {
                if self.claiming.get() && !self.failed() {
                    self.claim_waiters.0.borrow_mut().push(cx.waker().clone());
                    Poll::Pending
                } else {
                    Poll::Ready(())
                }
            })
            .await;
        }
        self.claiming.set(true);
        let r = self.claim_locked().await;
        self.claiming.set(false);
        self.claim_waiters.wake_all();
        r
    }

    async fn claim_locked(&self) -> Result<Option<Chunk>, String> {
        let pos = self.pos.get();
        if pos >= self.total {
            return Ok(None);
        }
        let chunk = self.chunk_at(pos).await?;
        self.pos.set(pos + chunk.len);
        if self.counts(chunk.kind) {
            self.done_sectors
                .set(self.done_sectors.get() + chunk.len.div_ceil(512));
            let total = self.counted_sectors.get();
            if total > 0 {
                self.progress
                    .set(100.0 * self.done_sectors.get() as f64 / total as f64);
            }
        }
        Ok(Some(chunk))
    }

    /// The chunk starting at `pos`: one block status extent, at most [`CHUNK`] long, within one
    /// source; with `-c` exactly one target cluster (data if any part of it is).
    async fn chunk_at(&self, pos: u64) -> Result<Chunk, String> {
        let (end, kind, src) = self.status_at(pos).await?;
        let s = &self.sources[src];
        let src_end = s.start + s.len;
        let mut end = end.min(src_end).min(pos + CHUNK).max(pos + 1);
        let mut kind = kind;
        if self.p.compress {
            // One whole target cluster, across source boundaries if need be.
            let cl_end = ((pos / self.cluster + 1) * self.cluster).min(self.total);
            // A cluster of one kind stays that kind; a mixed one is read whole (the source
            // reads what its backing chain holds) and written as data.
            let mut at = end;
            while at < cl_end && kind != Kind::Data {
                let (e, k, _) = self.status_at(at).await?;
                if k != kind {
                    kind = Kind::Data;
                }
                at = e.max(at + 1);
            }
            end = cl_end;
        }
        Ok(Chunk {
            off: pos,
            len: end - pos,
            src,
            kind,
        })
    }

    /// Block status at `pos`, reusing the last answer while it covers `pos`.
    async fn status_at(&self, pos: u64) -> Result<(u64, Kind, usize), String> {
        if let Some((end, kind)) = self.status.get()
            && pos < end
        {
            let src = self
                .sources
                .iter()
                .rposition(|s| s.start <= pos)
                .unwrap_or(0);
            let src_end = self.sources[src].start + self.sources[src].len;
            if end <= src_end {
                return Ok((end, kind, src));
            }
        }
        let (end, kind, src) = self.classify(pos).await.map_err(|e| {
            format!(
                "error while reading block status at offset {pos}: {}",
                blockd_block::strerror(&e)
            )
        })?;
        self.status.set(Some((end, kind)));
        Ok((end, kind, src))
    }

    /// Count what the progress figure measures (a pass over the block status, as qemu-img).
    async fn count_for_progress(&self) -> Result<(), String> {
        let mut pos = 0;
        let mut counted = 0u64;
        while pos < self.total {
            let c = self.chunk_at(pos).await?;
            if self.counts(c.kind) {
                counted += c.len.div_ceil(512);
            }
            pos += c.len;
        }
        self.counted_sectors.set(counted);
        self.status.set(None);
        Ok(())
    }

    /// Wait for the turn of the write at `off` (writes in order without `-W`).
    async fn wait_turn(&self, off: u64) {
        if self.p.oob_writes {
            return;
        }
        poll_fn(|cx| {
            if self.wr_next.get() == off || self.failed() {
                Poll::Ready(())
            } else {
                self.wr_waiters.0.borrow_mut().push(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }

    /// [`Order::Allocation`]: wait until the chunks before `off` have their host clusters.
    async fn wait_alloc_turn(&self, off: u64) {
        poll_fn(|cx| {
            if self.alloc_next.get() == off || self.failed() {
                Poll::Ready(())
            } else {
                self.alloc_waiters.0.borrow_mut().push(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }

    /// [`Order::Allocation`]: the chunk has its host clusters (or is written): the next one
    /// may start.
    fn end_alloc_turn(&self, c: &Chunk) {
        if self.alloc_next.get() == c.off {
            self.alloc_next.set(c.off + c.len);
            self.alloc_waiters.wake_all();
        }
    }

    fn end_turn(&self, c: &Chunk) {
        if !self.p.oob_writes {
            self.wr_next.set(c.off + c.len);
            self.wr_waiters.wake_all();
        }
    }

    /// Sleep as long as `-r` asks before moving `len` more bytes.
    async fn throttle(&self, done_before: u64) {
        if self.p.rate == 0 {
            return;
        }
        let due = Duration::from_secs_f64(done_before as f64 / self.p.rate as f64);
        let elapsed = self.started.elapsed();
        if due > elapsed {
            blockd_aio::sleep(due - elapsed).await;
        }
    }
}

async fn copy(job: Rc<Job>) -> Result<(), String> {
    job.progress.start();
    if job.progress_enabled() {
        job.count_for_progress().await?;
    }
    let workers: Vec<_> = (0..job.p.parallel)
        .map(|_| {
            let j = job.clone();
            blockd_aio::spawn(async move {
                // Each request that fails reports itself, as each of qemu-img's coroutines does.
                if let Err(e) = worker(&j).await {
                    eprintln!("qemu-img: {e}");
                    j.fail(e);
                }
            })
        })
        .collect();
    for w in workers {
        w.await;
    }
    if job.failed() {
        return Err(REPORTED.into());
    }
    job.dst
        .flush()
        .await
        .map_err(|e| format!("error while flushing: {}", blockd_block::strerror(&e)))?;
    job.progress.finish();
    Ok(())
}

impl Job {
    fn progress_enabled(&self) -> bool {
        self.progress.enabled
    }
}

async fn worker(job: &Job) -> Result<(), String> {
    let mut buf = Some(IoBuf::new(CHUNK as usize, 4096));
    let wflags = if job.p.writethrough {
        ReqFlags::FUA
    } else {
        ReqFlags::NONE
    };
    while let Some(c) = job.claim().await? {
        job.throttle(c.off).await;
        let data = match c.kind {
            Kind::Data => {
                read_chunk(job, &c, &mut buf).await?;
                true
            }
            Kind::Zero | Kind::Backing => false,
        };
        match job.p.order {
            Order::Strict => job.wait_turn(c.off).await,
            Order::Allocation => job.wait_alloc_turn(c.off).await,
            Order::Free => {}
        }
        if job.failed() {
            return Ok(());
        }
        let r = if job.p.order == Order::Allocation {
            // The write's last cluster taken (it is in flight, or the write is done) means
            // every cluster the chunk allocates is: the next chunk may start.
            let runs = (data && split_runs(job)).then(|| data_runs(job, &c, &buf));
            let last = last_written(job, &c, runs.as_deref());
            let node = job.dst.root();
            let allocated =
                || last.is_none_or(|l| blockd_qcow2::alloc_order::cluster_in_flight(&node, l));
            let write = write_chunk(job, &c, data, &mut buf, wflags, runs);
            let r = on_allocated(write, allocated, || job.end_alloc_turn(&c)).await;
            job.end_alloc_turn(&c);
            r
        } else {
            write_chunk(job, &c, data, &mut buf, wflags, None).await
        };
        if job.p.order != Order::Strict {
            // Complete in order: a failure is reported only when every earlier write
            // succeeded, as when each write waits for the previous one.
            job.wait_turn(c.off).await;
            if job.failed() {
                return Ok(());
            }
        }
        job.end_turn(&c);
        r?;
    }
    Ok(())
}

async fn write_chunk(
    job: &Job,
    c: &Chunk,
    data: bool,
    buf: &mut Option<IoBuf>,
    flags: ReqFlags,
    runs: Option<Runs>,
) -> Result<(), String> {
    if data {
        write_data(job, c, buf, flags, runs).await
    } else if c.kind == Kind::Zero {
        write_zero(job, c, buf, flags).await
    } else {
        Ok(())
    }
}

/// Run `fut`; call `then` once, as soon as `allocated` holds after one of its polls (or when
/// it finishes). Allocation happens inside a poll of the write, so no poll misses it.
async fn on_allocated<F: Future>(
    fut: F,
    allocated: impl Fn() -> bool,
    then: impl Fn(),
) -> F::Output {
    let mut fut = pin!(fut);
    let mut told = false;
    poll_fn(|cx| {
        let r = fut.as_mut().poll(cx);
        if !told && (r.is_ready() || allocated()) {
            told = true;
            then();
        }
        r
    })
    .await
}

/// The target offset of the last byte the write of chunk `c` stores (None: it stores
/// nothing), following the choices of [`write_chunk`]; `runs` are those of a data chunk
/// written in runs ([`split_runs`]).
fn last_written(job: &Job, c: &Chunk, runs: Option<&[(bool, usize, usize)]>) -> Option<u64> {
    let whole = Some(c.off + c.len - 1);
    match c.kind {
        Kind::Backing => None,
        Kind::Zero if job.p.min_sparse == 0 && !job.p.compress => whole,
        Kind::Zero => None,
        Kind::Data => match runs {
            Some(runs) => runs
                .iter()
                .rev()
                .find(|r| r.0)
                .map(|&(_, at, n)| c.off + (at + n) as u64 - 1),
            None => whole,
        },
    }
}

async fn read_chunk(job: &Job, c: &Chunk, buf: &mut Option<IoBuf>) -> Result<(), String> {
    let mut b = buf.take().expect("worker buffer");
    b.set_len(c.len as usize);
    let s = &job.sources[c.src];
    let r = if c.off + c.len <= s.start + s.len {
        // The usual case: the chunk lies in one source, read straight into the buffer.
        let (r, back) = s.blk.read(c.off - s.start, b).await;
        b = back;
        r.map_err(|e| (c.off, e))
    } else {
        read_spanning(job, c, &mut b).await
    };
    if let Err((at, e)) = r {
        if !job.p.salvage {
            *buf = Some(b);
            return Err(format!(
                "error while reading at byte {at}: {}",
                blockd_block::strerror(&e)
            ));
        }
        salvage(job, c, &mut b).await;
    }
    *buf = Some(b);
    Ok(())
}

/// Read a chunk that spans sources (compressed clusters of concatenated images), piece by
/// piece through a bounce buffer.
async fn read_spanning(job: &Job, c: &Chunk, b: &mut IoBuf) -> Result<(), (u64, io::Error)> {
    let mut at = c.off;
    let end = c.off + c.len;
    while at < end {
        let Some(s) = job
            .sources
            .iter()
            .find(|s| s.start <= at && at < s.start + s.len)
        else {
            break;
        };
        let n = (s.start + s.len).min(end) - at;
        let piece = IoBuf::new(n as usize, 4096);
        let (r, piece) = s.blk.read(at - s.start, piece).await;
        r.map_err(|e| (at, e))?;
        let o = (at - c.off) as usize;
        b.as_mut_slice()[o..o + n as usize].copy_from_slice(piece.as_slice());
        at += n;
    }
    Ok(())
}

/// `--salvage`: read sector by sector; unreadable sectors become zeroes, with a warning.
async fn salvage(job: &Job, c: &Chunk, b: &mut IoBuf) {
    let mut one = IoBuf::new(512, 512);
    let mut at = 0u64;
    while at < c.len {
        let n = 512.min(c.len - at) as usize;
        let pos = c.off + at;
        let src = job
            .sources
            .iter()
            .find(|s| s.start <= pos && pos < s.start + s.len);
        let o = at as usize;
        match src {
            Some(s) => {
                let n = n.min((s.start + s.len - pos) as usize);
                one.set_len(n);
                let (r, back) = s.blk.read(pos - s.start, one).await;
                one = back;
                match r {
                    Ok(()) => b.as_mut_slice()[o..o + n].copy_from_slice(one.as_slice()),
                    Err(e) => {
                        eprintln!(
                            "qemu-img: warning: error while reading offset {pos}: {}",
                            blockd_block::strerror(&e)
                        );
                        b.as_mut_slice()[o..o + n].fill(0);
                    }
                }
                at += n as u64;
            }
            None => {
                b.as_mut_slice()[o..o + n].fill(0);
                at += n as u64;
            }
        }
    }
}

fn write_err(off: u64, e: &io::Error) -> String {
    format!(
        "error while writing at byte {off}: {}",
        blockd_block::strerror(e)
    )
}

/// Write the `len` bytes at `start` of `buf` to `off` of the target (moving them to the front
/// of the buffer when they are not there).
async fn write_part(
    job: &Job,
    buf: &mut Option<IoBuf>,
    start: usize,
    len: usize,
    off: u64,
    flags: ReqFlags,
) -> Result<(), String> {
    let mut b = buf.take().expect("worker buffer");
    let full = b.len();
    if start > 0 {
        b.as_mut_slice().copy_within(start..start + len, 0);
    }
    b.set_len(len);
    let (r, mut b) = job.dst.write(off, b, flags).await;
    b.set_len(full);
    *buf = Some(b);
    r.map_err(|e| write_err(off, &e))
}

async fn zero_range(job: &Job, off: u64, len: u64, flags: ReqFlags) -> Result<(), String> {
    if job.p.target_zero {
        return Ok(());
    }
    job.dst
        .write_zeroes(off, len, flags | ReqFlags::MAY_UNMAP)
        .await
        .map_err(|e| write_err(off, &e))
}

async fn write_zero(
    job: &Job,
    c: &Chunk,
    buf: &mut Option<IoBuf>,
    flags: ReqFlags,
) -> Result<(), String> {
    if job.p.min_sparse == 0 && !job.p.compress {
        // -S 0: allocate every byte of the target.
        if let Some(b) = buf.as_mut() {
            b.set_len(c.len as usize);
            b.as_mut_slice().fill(0);
        }
        return write_part(job, buf, 0, c.len as usize, c.off, flags).await;
    }
    zero_range(job, c.off, c.len, flags).await
}

/// A data chunk's runs of data and of zeroes: (is data, start in the chunk, length).
type Runs = Vec<(bool, usize, usize)>;

/// Whether data chunks are written as runs of data, leaving zero runs sparse (else whole).
fn split_runs(job: &Job) -> bool {
    !job.p.compress && job.p.min_sparse != 0 && !job.p.copy_range
}

/// The runs of a data chunk: zero runs at least `min_sparse` long (scanned in 512-byte
/// sectors) between runs of data.
fn data_runs(job: &Job, c: &Chunk, buf: &Option<IoBuf>) -> Runs {
    let Some(b) = buf.as_ref() else {
        return Vec::new();
    };
    let b = &b.as_slice()[..c.len as usize];
    let min = job.p.min_sparse as usize;
    let mut runs = Vec::new();
    let mut at = 0usize;
    while at < b.len() {
        let (is_data, n) = next_run(b, at, min, c.off);
        runs.push((is_data, at, n));
        at += n;
    }
    runs
}

/// Write a data chunk (`runs`: its [`data_runs`] when already known).
async fn write_data(
    job: &Job,
    c: &Chunk,
    buf: &mut Option<IoBuf>,
    flags: ReqFlags,
    runs: Option<Runs>,
) -> Result<(), String> {
    let len = c.len as usize;
    let all_zero = |buf: &Option<IoBuf>| -> bool {
        buf.as_ref().is_some_and(|b| is_zero(&b.as_slice()[..len]))
    };
    if job.p.compress {
        if all_zero(buf) {
            return zero_range(job, c.off, c.len, flags).await;
        }
        return write_part(job, buf, 0, len, c.off, flags | ReqFlags::WRITE_COMPRESSED).await;
    }
    if !split_runs(job) {
        return write_part(job, buf, 0, len, c.off, flags).await;
    }
    // Moving a run to the front of the buffer to write it leaves the bytes after it as they
    // were: the runs can be found before writing any.
    let runs = runs.unwrap_or_else(|| data_runs(job, c, buf));
    for (is_data, at, n) in runs {
        if is_data {
            write_part(job, buf, at, n, c.off + at as u64, flags).await?;
        } else {
            zero_range(job, c.off + at as u64, n as u64, flags).await?;
        }
    }
    Ok(())
}

/// One run of same-kind 512-byte sectors starting at `at` of a chunk whose first byte goes
/// to target offset `base`: (is data, length). Runs that do not reach the end of the chunk are
/// aligned to 4 KiB of the target as qemu-img aligns them: a data run's end moves up to the
/// boundary (the filesystem block is written anyway), a zero run's end moves down to it, and a
/// zero run too short for that becomes data.
fn sector_run(buf: &[u8], at: usize, base: u64) -> (bool, usize) {
    const SECTOR: usize = 512;
    const PER_BLOCK: u64 = 8;
    let len = buf.len();
    let sector = |i: usize| &buf[i..(i + SECTOR).min(len)];
    let n = (len - at).div_ceil(SECTOR);
    let zero = is_zero(sector(at));
    let mut i = 1;
    while i < n && is_zero(sector(at + i * SECTOR)) == zero {
        i += 1;
    }
    if i == n {
        return (!zero, len - at);
    }
    let tail = ((base + at as u64) / SECTOR as u64 + i as u64) % PER_BLOCK;
    let mut data = !zero;
    if tail != 0 {
        if zero && i as u64 <= tail {
            data = true;
        }
        if data {
            i = (i + (PER_BLOCK - tail) as usize).min(n);
        } else {
            i -= tail as usize;
        }
    }
    (data, (i * SECTOR).min(len - at))
}

/// The run starting at `at`: (is data, length). Zeroes at the start are a hole whatever their
/// length; after data, zero runs shorter than `min` bytes stay part of the data, and zeroes
/// ending the chunk are a hole.
fn next_run(buf: &[u8], at: usize, min: usize, base: u64) -> (bool, usize) {
    let min = min.min(buf.len() - at);
    let (data, first) = sector_run(buf, at, base);
    if !data {
        return (false, first);
    }
    let mut used = first;
    let mut checked = first;
    while at + checked < buf.len() {
        let (data, n) = sector_run(buf, at + checked, base);
        checked += n;
        if data {
            used = checked;
        } else if n >= min {
            break;
        }
    }
    (true, used)
}

#[cfg(test)]
mod tests {
    use super::next_run;

    #[test]
    fn runs() {
        let mut b = vec![0u8; 8192];
        assert_eq!(next_run(&b, 0, 4096, 0), (false, 8192));
        b[0] = 1;
        // Data ends are aligned up to 4 KiB; the rest is a hole.
        assert_eq!(next_run(&b, 0, 4096, 0), (true, 4096));
        assert_eq!(next_run(&b, 4096, 4096, 0), (false, 4096));
        b[4096] = 1;
        // 3.5 KiB of zeroes between two data sectors are too short to skip.
        assert_eq!(next_run(&b, 0, 4096, 0), (true, 8192));
        assert_eq!(next_run(&b, 0, 512, 0), (true, 8192));
        // Zero runs end on a 4 KiB boundary of the target (or become data when too short).
        assert_eq!(next_run(&b[1024..], 0, 4096, 1024), (false, 3072));
        assert_eq!(next_run(&b[1024..], 0, 4096, 3584), (false, 512));
        assert_eq!(next_run(&b[3584..], 0, 4096, 0), (true, 4096));
        assert_eq!(next_run(&b[..6144], 0, 4096, 0), (true, 6144));
    }
}
