//! The I/O half of the qemu-io clone: runs parsed [`Command`]s against blockd's block layer.
//!
//! One [`Executor`] lives on the main context (it owns the [`Graph`]); at most one image is open
//! at a time, through one [`BlockBackend`]. Output goes through [`Out`], which reproduces
//! qemu-io's stdio buffering (stdout block-buffered when it is not a terminal, stderr
//! unbuffered, stdout flushed at each interactive prompt).
//!
//! `aio_read`/`aio_write` run as tasks on the context; their output (summary, hexdump, error,
//! pattern mismatch) is produced when the request completes but printed only when qemu-io would
//! process the completion: at `aio_flush`, `close`, exit, or (interactive mode) while waiting for
//! the next input line. Their failures never count towards the exit status.

use std::io::{self, BufRead, IsTerminal, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blockd_aio::{IoBuf, Task};
use blockd_block::options;
use blockd_block::{BlockBackend, Graph, Node, Perm, ReqFlags};
use serde_json::{Map, Value};

use crate::command::{
    AioMode, CacheMode, Command, DiscardCmd, DiscardMode, Message, OpenCmd, PreallocMode, ReadCmd,
    ReopenCmd, Stream, VectoredReadCmd, VectoredWriteCmd, WriteCmd, WriteData, parse_command,
};
use crate::format::{self, Stats, Verb};
use crate::help;

/// Buffer alignment for I/O buffers (enough for O_DIRECT on every device seen).
const BUF_ALIGN: usize = 4096;

/// stdout/stderr with qemu-io's buffering.
pub struct Out {
    stdout: io::BufWriter<io::Stdout>,
    stdout_tty: bool,
    /// collect stdout and stderr text here instead (the monitor's `qemu-io` command)
    captured: Option<String>,
}

impl Default for Out {
    fn default() -> Self {
        Self::new()
    }
}

impl Out {
    pub fn new() -> Out {
        Out {
            stdout: io::BufWriter::with_capacity(4096, io::stdout()),
            stdout_tty: io::stdout().is_terminal(),
            captured: None,
        }
    }
    /// Output that is collected (both streams, in order) for [`Out::take_captured`].
    pub fn capturing() -> Out {
        Out {
            captured: Some(String::new()),
            ..Out::new()
        }
    }
    pub fn take_captured(&mut self) -> String {
        self.captured
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }
    pub fn out(&mut self, s: &str) {
        if let Some(c) = &mut self.captured {
            c.push_str(s);
            return;
        }
        let _ = self.stdout.write_all(s.as_bytes());
        if self.stdout_tty {
            self.flush();
        }
    }
    pub fn err(&mut self, s: &str) {
        if let Some(c) = &mut self.captured {
            c.push_str(s);
            return;
        }
        let mut e = io::stderr().lock();
        let _ = e.write_all(s.as_bytes());
        let _ = e.flush();
    }
    pub fn message(&mut self, m: &Message) {
        match m.stream {
            Stream::Stdout => self.out(&m.text),
            Stream::Stderr => self.err(&m.text),
        }
    }
    pub fn flush(&mut self) {
        let _ = self.stdout.flush();
    }
}

/// How to open an image: the program's command line or an `open` command.
#[derive(Debug, Clone, Default)]
pub struct OpenSpec {
    /// file name, or the whole option string with `image_opts`
    pub path: Option<String>,
    pub image_opts: bool,
    /// `-f`
    pub format: Option<String>,
    /// `-o` option strings (open command)
    pub options: Vec<String>,
    pub read_only: bool,
    pub snapshot: bool,
    pub force_share: bool,
    /// `None`: writeback
    pub cache: Option<CacheMode>,
    pub discard: Option<DiscardMode>,
    pub aio: Option<AioMode>,
}

impl OpenSpec {
    pub fn from_open_cmd(c: &OpenCmd) -> OpenSpec {
        let mut cache = c.cache;
        if c.nocache {
            cache = Some(CacheMode::None);
        }
        let mut aio = c.aio;
        if c.native_aio && aio.is_none() {
            aio = Some(AioMode::Native);
        }
        OpenSpec {
            path: c.path.clone(),
            image_opts: false,
            format: None,
            options: c.options.clone(),
            read_only: c.read_only,
            snapshot: c.snapshot,
            force_share: c.force_share,
            cache,
            discard: c.discard,
            aio,
        }
    }

    fn error_prefix(&self) -> String {
        match (&self.path, self.image_opts) {
            (Some(p), false) => format!("qemu-io: can't open device {p}: "),
            _ => "qemu-io: can't open: ".to_string(),
        }
    }
}

struct OpenImage {
    backend: BlockBackend,
    node: Arc<Node>,
    spec: OpenSpec,
    /// the format was probed: writes to block 0 that look like an image header are refused
    probed: bool,
    read_only: bool,
    /// cache mode with the write cache off (writethrough, directsync): flush after each write
    writethrough: bool,
}

/// A finished aio request: what to print, and when it completed (completions are printed in
/// completion order).
struct AioDone {
    end: Instant,
    text: String,
}

/// Whether the loop goes on after a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Quit,
}

pub struct Executor {
    graph: Graph,
    image: Option<OpenImage>,
    pub out: Out,
    pending: Vec<Task<AioDone>>,
    /// some command failed: exit status 1
    pub failed: bool,
}

impl Default for Executor {
    fn default() -> Self {
        Self::new()
    }
}

fn strerror(e: &io::Error) -> String {
    blockd_block::strerror(e)
}

fn errno(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

fn report(stats: &Stats, r: crate::command::Reporting) -> String {
    stats.report(r.csv, r.quiet)
}

/// A read buffer pre-filled with 0xab, as qemu-io's.
fn read_buf(len: u64) -> IoBuf {
    let mut b = IoBuf::new(len as usize, BUF_ALIGN);
    b.as_mut_slice().fill(format::READ_FILL_BYTE);
    b
}

fn pattern_buf(len: u64, pattern: u8) -> IoBuf {
    let mut b = IoBuf::new(len as usize, BUF_ALIGN);
    b.as_mut_slice().fill(pattern);
    b
}

/// Data a probed raw image refuses at offset 0 (it would make the image probe as another format).
fn looks_like_image_header(data: &[u8]) -> bool {
    const MAGICS: &[&[u8]] = &[
        b"QFI\xfb",
        b"QEMU DM",
        b"KDMV",
        b"conectix",
        b"vhdxfile",
        b"QFI\xfe",
    ];
    MAGICS.iter().any(|m| data.starts_with(m))
}

/// Merge `src` into `dst` (dotted option strings given several times: later keys win).
fn merge(dst: &mut Map<String, Value>, src: Map<String, Value>) {
    for (k, v) in src {
        match (dst.get_mut(&k), v) {
            (Some(Value::Object(d)), Value::Object(s)) => merge(d, s),
            (_, v) => {
                dst.insert(k, v);
            }
        }
    }
}

fn is_protocol(driver: Option<&Value>) -> bool {
    matches!(driver.and_then(Value::as_str), Some("file" | "host_device"))
}

/// The options object of the protocol node (`file`/`host_device`), if the map describes one.
fn protocol_opts(map: &mut Map<String, Value>) -> Option<&mut Map<String, Value>> {
    if is_protocol(map.get("driver")) {
        return Some(map);
    }
    match map.get_mut("file") {
        Some(Value::Object(f)) if is_protocol(f.get("driver")) => Some(f),
        _ => None,
    }
}

/// A nested `file` object with a filename but no driver uses the `file` protocol (the graph
/// does the same when opening; it is done here too so `protocol_opts` can find that node and
/// give it the `-i`/`-k` engine).
fn default_protocol(map: &mut Map<String, Value>) {
    if let Some(Value::Object(f)) = map.get_mut("file") {
        if !f.contains_key("driver") && f.contains_key("filename") {
            f.insert("driver".into(), Value::String("file".into()));
        }
        default_protocol(f);
    }
}

impl Executor {
    pub fn new() -> Executor {
        Executor {
            graph: blockd_drivers::graph(),
            image: None,
            out: Out::new(),
            pending: Vec::new(),
            failed: false,
        }
    }

    /// An executor for an image the caller opened and attached `backend` to (the monitor's
    /// `qemu-io` command). Its own graph is empty: commands that open or close images are
    /// refused before they reach it (see `monitor.rs`).
    pub fn with_backend(backend: BlockBackend, node: Arc<Node>, out: Out) -> Executor {
        let read_only = node.is_read_only();
        Executor {
            graph: Graph::new(),
            image: Some(OpenImage {
                backend,
                node,
                spec: OpenSpec::default(),
                probed: false,
                read_only,
                writethrough: false,
            }),
            out,
            pending: Vec::new(),
            failed: false,
        }
    }

    /// Hand back the backend given to [`Executor::with_backend`] (after [`Executor::drain_aio`]).
    pub fn take_backend(&mut self) -> Option<BlockBackend> {
        self.image.take().map(|i| i.backend)
    }

    pub fn has_image(&self) -> bool {
        self.image.is_some()
    }

    /// Open the image `spec` describes. On failure the error (with its `qemu-io: can't open...`
    /// prefix) has been printed and `false` is returned.
    pub fn open(&mut self, spec: &OpenSpec) -> bool {
        match self.try_open(spec) {
            Ok(img) => {
                self.image = Some(img);
                true
            }
            Err(e) => {
                self.out.err(&format!("{}{e}\n", spec.error_prefix()));
                false
            }
        }
    }

    fn try_open(&mut self, spec: &OpenSpec) -> Result<OpenImage, String> {
        let mut map = Map::new();
        let mut probed = false;
        if spec.image_opts {
            let s = spec.path.clone().unwrap_or_default();
            if !s.trim_start().starts_with('{') && !s.contains('=') {
                self.out.err(&format!(
                    "qemu-io: warning: short-form boolean option '{s}' deprecated\nPlease use {s}=on instead\n"
                ));
                return Err("Must specify either driver or file".into());
            }
            map = options::parse(&s)?;
        } else {
            for o in &spec.options {
                merge(&mut map, options::parse(o)?);
            }
            if let Some(f) = &spec.format {
                map.insert("driver".into(), Value::String(f.clone()));
            }
            if let Some(p) = &spec.path {
                if map.contains_key("file") {
                    return Err(
                        "Can't specify 'file' and 'filename' options at the same time".into(),
                    );
                }
                if !map.contains_key("driver") {
                    let fmt = probe(&self.graph, p)?;
                    if fmt == "raw" {
                        self.out.err(&format!(
                            "WARNING: Image format was not specified for '{p}' and probing guessed raw.\n         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n         Specify the 'raw' format explicitly to remove the restrictions.\n"
                        ));
                        probed = true;
                    }
                    map.insert("driver".into(), Value::String(fmt.into()));
                }
                if is_protocol(map.get("driver")) {
                    map.insert("filename".into(), Value::String(p.clone()));
                } else {
                    let mut f = Map::new();
                    f.insert("driver".into(), Value::String("file".into()));
                    f.insert("filename".into(), Value::String(p.clone()));
                    map.insert("file".into(), Value::Object(f));
                }
            } else if !map.contains_key("driver") {
                return Err("Must specify either driver or file".into());
            }
        }
        default_protocol(&mut map);
        if spec.snapshot {
            return Err("snapshot=on (-s) is not supported by blockd yet".into());
        }
        if spec.read_only {
            map.insert("read-only".into(), Value::Bool(true));
        }
        if spec.force_share {
            let ro = spec.read_only
                || map
                    .get("read-only")
                    .is_some_and(|v| matches!(v, Value::Bool(true)) || v.as_str() == Some("on"));
            if !ro {
                return Err("force-share=on can only be used with read-only images".into());
            }
            map.insert("force-share".into(), Value::Bool(true));
        }
        if let Some(c) = spec.cache {
            let direct = matches!(c, CacheMode::None | CacheMode::Directsync);
            let no_flush = c == CacheMode::Unsafe;
            let cache = map
                .entry("cache")
                .or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(cache) = cache {
                cache.entry("direct").or_insert(Value::Bool(direct));
                cache.entry("no-flush").or_insert(Value::Bool(no_flush));
            }
        }
        // qemu-io opens with discard=unmap unless -d says otherwise.
        let discard = match spec.discard {
            Some(DiscardMode::Ignore) => "ignore",
            _ => "unmap",
        };
        map.entry("discard")
            .or_insert(Value::String(discard.into()));
        // (Children inherit `discard` from the node they are opened with.)
        if let (Some(p), Some(a)) = (protocol_opts(&mut map), spec.aio) {
            let a = match a {
                AioMode::Threads => "threads",
                AioMode::Native => "native",
                AioMode::IoUring => "io_uring",
            };
            p.insert("aio".into(), Value::String(a.into()));
        }
        let node = self.graph.open(map)?;
        let read_only = node.is_read_only();
        let perm = if read_only {
            Perm::CONSISTENT_READ
        } else {
            Perm::CONSISTENT_READ | Perm::WRITE | Perm::RESIZE
        };
        let backend = match BlockBackend::new(&self.graph, "", &node, perm, Perm::ALL) {
            Ok(b) => b,
            Err(e) => {
                let _ = self.graph.remove(node.name());
                return Err(e);
            }
        };
        Ok(OpenImage {
            backend,
            node,
            spec: spec.clone(),
            probed,
            read_only,
            writethrough: matches!(
                spec.cache,
                Some(CacheMode::Writethrough | CacheMode::Directsync)
            ),
        })
    }

    /// Print the completions of every aio request (waiting for them), in completion order.
    pub async fn drain_aio(&mut self) {
        let mut done = Vec::new();
        for t in self.pending.drain(..) {
            done.push(t.await);
        }
        done.sort_by_key(|d| d.end);
        for d in done {
            self.out.out(&d.text);
        }
    }

    /// Print the completions of aio requests that have finished, in completion order, without
    /// waiting for the others. qemu-io processes completions whenever a command runs the event
    /// loop (read, write, readv, writev, discard, sleep), before that command's own output.
    async fn reap_now(&mut self) {
        // Let the event loop reap completions that are already in the ring.
        for _ in 0..4 {
            blockd_aio::yield_now().await;
        }
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let mut done = Vec::new();
        let mut i = 0;
        while i < self.pending.len() {
            if let std::task::Poll::Ready(d) =
                std::pin::Pin::new(&mut self.pending[i]).poll(&mut cx)
            {
                drop(self.pending.remove(i));
                done.push(d);
            } else {
                i += 1;
            }
        }
        done.sort_by_key(|d| d.end);
        for d in done {
            self.out.out(&d.text);
        }
    }

    /// Print completions of aio requests that have already finished (without waiting).
    fn reap_finished(&mut self, cx: &mut std::task::Context<'_>) -> bool {
        let mut any = false;
        let mut i = 0;
        while i < self.pending.len() {
            if let std::task::Poll::Ready(d) = std::pin::Pin::new(&mut self.pending[i]).poll(cx) {
                drop(self.pending.remove(i));
                self.out.out(&d.text);
                any = true;
            } else {
                i += 1;
            }
        }
        any
    }

    async fn close_image(&mut self) {
        self.drain_aio().await;
        if let Some(img) = self.image.take() {
            let name = img.node.name().to_string();
            drop(img.node);
            img.backend.detach(&self.graph);
            let _ = self.graph.remove(&name);
        }
    }

    /// Everything to do before the program exits: completions of pending aio requests.
    pub async fn finish(&mut self) {
        self.close_image().await;
        self.out.flush();
    }

    /// Run one command line.
    pub async fn run_line(&mut self, line: &str) -> Flow {
        let cmd = match parse_command(line, self.image.is_some()) {
            Ok(None) => return Flow::Continue,
            Ok(Some(c)) => c,
            Err(e) => {
                for m in &e.messages {
                    self.out.message(m);
                }
                self.failed = true;
                return Flow::Continue;
            }
        };
        if cmd == Command::Quit {
            return Flow::Quit;
        }
        if !self.run(cmd).await {
            self.failed = true;
        }
        Flow::Continue
    }

    fn read_only_error(&mut self) -> bool {
        if self.image.as_ref().is_some_and(|i| i.read_only) {
            self.out.err("qemu-io: Block node is read-only\n");
            true
        } else {
            false
        }
    }

    fn backend(&self) -> BlockBackend {
        self.image
            .as_ref()
            .map(|i| i.backend.clone())
            .expect("the parser checked that an image is open")
    }

    /// Run one parsed command; `false` if it failed.
    async fn run(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Read(c) => self.read(c).await,
            Command::Write(c) => self.write(c).await,
            Command::Readv(c) => self.readv(c).await,
            Command::Writev(c) => self.writev(c).await,
            Command::AioRead(c) => self.aio_read(c).await,
            Command::AioWrite(c) => self.aio_write(c).await,
            Command::AioInvalid { write } => {
                self.out.out(&format::injecting_invalid(write));
                true
            }
            Command::AioFlush => {
                self.drain_aio().await;
                true
            }
            Command::Flush => {
                let b = self.backend();
                match b.flush().await {
                    Ok(()) => true,
                    Err(e) => {
                        self.out.out(&format::io_failed("flush", &strerror(&e)));
                        false
                    }
                }
            }
            Command::Discard(c) => self.discard(c).await,
            Command::Length => {
                let len = self.backend().length();
                self.out.out(&format::length_line(len));
                true
            }
            Command::Info => self.info(),
            Command::Map => self.map().await,
            Command::Alloc { offset, count } => self.alloc(offset, count).await,
            Command::Truncate { size, prealloc } => self.truncate(size, prealloc).await,
            Command::Open(c) => {
                if self.image.is_some() {
                    self.out
                        .err("qemu-io: file open already, try 'help close'\n");
                    return false;
                }
                self.open(&OpenSpec::from_open_cmd(&c))
            }
            Command::Close => {
                self.close_image().await;
                true
            }
            Command::Reopen(c) => self.reopen(c).await,
            Command::Help { topic } => match help::help(topic.as_deref()) {
                Ok(t) => {
                    self.out.out(&t);
                    true
                }
                Err(t) => {
                    self.out.out(&t);
                    false
                }
            },
            Command::Quit => true,
            Command::Sleep { ms } => {
                blockd_aio::sleep(Duration::from_millis(ms)).await;
                self.reap_now().await;
                true
            }
            Command::Sigraise { signal } => {
                // A signal number that does not fit is refused by raise() like any bad number.
                let sig = i32::try_from(signal).unwrap_or(-1);
                // SAFETY: raise() has no memory-safety preconditions.
                let r = unsafe { libc::raise(sig) };
                r == 0
            }
            Command::Abort => std::process::abort(),
            Command::Break { .. } => {
                self.out
                    .out("Could not set breakpoint: Operation not supported\n");
                false
            }
            Command::RemoveBreak { tag } => {
                self.out.out(&format!(
                    "Could not remove breakpoint {tag}: Operation not supported\n"
                ));
                false
            }
            Command::Resume { .. } => {
                self.out
                    .out("Could not resume request: Operation not supported\n");
                false
            }
            Command::WaitBreak { .. } => {
                // qemu-io waits for a request to hit the breakpoint; no breakpoint can exist
                // here (no blkdebug), so it waits forever, as qemu-io does.
                self.out.flush();
                loop {
                    blockd_aio::sleep(Duration::from_secs(3600)).await;
                }
            }
            Command::Zone { name, .. } => {
                let what = name.replacen('_', " ", 1);
                self.out
                    .out(&format!("{what} failed: Operation not supported\n"));
                false
            }
        }
    }

    async fn writethrough_flush(&self, b: &BlockBackend) -> io::Result<()> {
        if self.image.as_ref().is_some_and(|i| i.writethrough) {
            b.flush().await
        } else {
            Ok(())
        }
    }

    /// Start aio requests submitted before a synchronous one, so they reach the kernel first.
    async fn submit_pending(&self) {
        if !self.pending.is_empty() {
            blockd_aio::yield_now().await;
        }
    }

    async fn read(&mut self, c: ReadCmd) -> bool {
        if c.vmstate {
            self.out
                .out(&format::io_failed("read", "Operation not supported"));
            return false;
        }
        let b = self.backend();
        self.submit_pending().await;
        let start = Instant::now();
        let (r, buf) = b.read(c.offset, read_buf(c.len)).await;
        let elapsed = start.elapsed();
        self.reap_now().await;
        if let Err(e) = r {
            self.out.out(&format::io_failed("read", &strerror(&e)));
            return false;
        }
        let mut ok = true;
        if let Some(p) = c.check
            && let Some(m) = format::verify_pattern(c.offset, &buf, p.pattern, p.start, p.len)
        {
            self.out.out(&m);
            ok = false;
        }
        if c.verbose && !c.report.quiet {
            self.out.out(&format::hexdump(c.offset, &buf));
        }
        let stats = Stats {
            verb: Verb::Read,
            done: c.len,
            requested: c.len,
            offset: c.offset,
            ops: 1,
            elapsed,
        };
        self.out.out(&report(&stats, c.report));
        ok
    }

    /// The buffer of a write with a pattern or a source file; `None` after printing an error.
    fn write_buffer(&mut self, data: &WriteData, len: u64) -> Option<IoBuf> {
        match data {
            WriteData::Pattern(p) => Some(pattern_buf(len, *p)),
            WriteData::SourceFile(path) => match std::fs::read(path) {
                Err(e) => {
                    self.out
                        .err(&format::source_file_error(path, &strerror(&e)));
                    None
                }
                Ok(src) if src.is_empty() => {
                    self.out.err(&format::source_file_empty(path));
                    None
                }
                Ok(src) => {
                    let mut b = IoBuf::new(len as usize, BUF_ALIGN);
                    b.as_mut_slice()
                        .copy_from_slice(&format::fill_from_source(&src, len as usize));
                    Some(b)
                }
            },
            WriteData::Zeroes { .. } => None,
        }
    }

    fn header_guard(&self, offset: u64, data: &[u8]) -> bool {
        self.image.as_ref().is_some_and(|i| i.probed) && offset < 512 && {
            let skip = offset as usize;
            skip == 0 && looks_like_image_header(data)
        }
    }

    async fn write(&mut self, c: WriteCmd) -> bool {
        if self.read_only_error() {
            return false;
        }
        if c.vmstate || c.compressed {
            self.out
                .out(&format::io_failed("write", "Operation not supported"));
            return false;
        }
        let b = self.backend();
        let mut flags = if c.fua { ReqFlags::FUA } else { ReqFlags::NONE };
        let start;
        let r = match &c.data {
            WriteData::Zeroes { unmap, no_fallback } => {
                if *unmap {
                    flags = flags | ReqFlags::MAY_UNMAP;
                }
                if *no_fallback {
                    flags = flags | ReqFlags::NO_FALLBACK;
                }
                self.submit_pending().await;
                start = Instant::now();
                zero_write(&b, c.offset, c.len, flags).await
            }
            data => {
                let Some(buf) = self.write_buffer(data, c.len) else {
                    return false;
                };
                if self.header_guard(c.offset, &buf) {
                    self.out
                        .out(&format::io_failed("write", "Operation not permitted"));
                    return false;
                }
                self.submit_pending().await;
                start = Instant::now();
                b.write(c.offset, buf, flags).await.0
            }
        };
        let r = match r {
            Ok(()) => self.writethrough_flush(&b).await,
            e => e,
        };
        let elapsed = start.elapsed();
        self.reap_now().await;
        if let Err(e) = r {
            self.out.out(&format::io_failed("write", &strerror(&e)));
            return false;
        }
        let stats = Stats {
            verb: Verb::Wrote,
            done: c.len,
            requested: c.len,
            offset: c.offset,
            ops: 1,
            elapsed,
        };
        self.out.out(&report(&stats, c.report));
        true
    }

    async fn readv(&mut self, c: VectoredReadCmd) -> bool {
        let b = self.backend();
        self.submit_pending().await;
        let (ok, text) = vectored_read(&b, &c, "readv").await;
        self.reap_now().await;
        self.out.out(&text);
        ok
    }

    async fn writev(&mut self, c: VectoredWriteCmd) -> bool {
        if self.read_only_error() {
            return false;
        }
        let b = self.backend();
        let total = c.total_len();
        let pattern = match c.data {
            WriteData::Pattern(p) => p,
            _ => format::DEFAULT_WRITE_PATTERN,
        };
        let buf = pattern_buf(total, pattern);
        if self.header_guard(c.offset, &buf) {
            self.out
                .out(&format::io_failed("writev", "Operation not permitted"));
            return false;
        }
        self.submit_pending().await;
        let flags = if c.fua { ReqFlags::FUA } else { ReqFlags::NONE };
        let start = Instant::now();
        let r = match b.write(c.offset, buf, flags).await.0 {
            Ok(()) => self.writethrough_flush(&b).await,
            e => e,
        };
        let elapsed = start.elapsed();
        self.reap_now().await;
        if let Err(e) = r {
            self.out.out(&format::io_failed("writev", &strerror(&e)));
            return false;
        }
        let stats = Stats {
            verb: Verb::Wrote,
            done: total,
            requested: total,
            offset: c.offset,
            ops: 1,
            elapsed,
        };
        self.out.out(&report(&stats, c.report));
        true
    }

    /// qemu-io's aio commands run their request until it is submitted before returning: let the
    /// new task reach the ring.
    async fn start_task(&mut self, t: Task<AioDone>) {
        self.pending.push(t);
        for _ in 0..3 {
            blockd_aio::yield_now().await;
        }
    }

    async fn aio_read(&mut self, c: VectoredReadCmd) -> bool {
        let b = self.backend();
        let t = blockd_aio::spawn(async move {
            let (_, text) = vectored_read(&b, &c, "readv").await;
            AioDone {
                end: Instant::now(),
                text,
            }
        });
        self.start_task(t).await;
        true
    }

    async fn aio_write(&mut self, c: VectoredWriteCmd) -> bool {
        if self.read_only_error() {
            return false;
        }
        let b = self.backend();
        let probed_guard = {
            let buf_head = match c.data {
                WriteData::Pattern(p) => [p; 4],
                _ => [0; 4],
            };
            self.header_guard(c.offset, &buf_head)
        };
        let writethrough = self.image.as_ref().is_some_and(|i| i.writethrough);
        let t = blockd_aio::spawn(async move {
            let total = c.total_len();
            let start = Instant::now();
            let r = if probed_guard {
                Err(errno(libc::EPERM))
            } else {
                let mut flags = if c.fua { ReqFlags::FUA } else { ReqFlags::NONE };
                let r = match c.data {
                    WriteData::Zeroes { unmap, .. } => {
                        if unmap {
                            flags = flags | ReqFlags::MAY_UNMAP;
                        }
                        zero_write(&b, c.offset, total, flags).await
                    }
                    WriteData::Pattern(p) => {
                        b.write(c.offset, pattern_buf(total, p), flags).await.0
                    }
                    WriteData::SourceFile(_) => Err(errno(libc::EINVAL)),
                };
                match r {
                    Ok(()) if writethrough => b.flush().await,
                    r => r,
                }
            };
            let elapsed = start.elapsed();
            let text = match r {
                Err(e) => format::io_failed("aio_write", &strerror(&e)),
                Ok(()) => report(
                    &Stats {
                        verb: Verb::Wrote,
                        done: total,
                        requested: total,
                        offset: c.offset,
                        ops: 1,
                        elapsed,
                    },
                    c.report,
                ),
            };
            AioDone {
                end: Instant::now(),
                text,
            }
        });
        self.start_task(t).await;
        true
    }

    async fn discard(&mut self, c: DiscardCmd) -> bool {
        if self.read_only_error() {
            return false;
        }
        let b = self.backend();
        self.submit_pending().await;
        let start = Instant::now();
        let r = b.discard(c.offset, c.len).await;
        let elapsed = start.elapsed();
        self.reap_now().await;
        if let Err(e) = r {
            self.out.out(&format::io_failed("discard", &strerror(&e)));
            return false;
        }
        let stats = Stats {
            verb: Verb::Discard,
            done: c.len,
            requested: c.len,
            offset: c.offset,
            ops: 1,
            elapsed,
        };
        self.out.out(&report(&stats, c.report));
        true
    }

    fn info(&mut self) -> bool {
        let Some(img) = &self.image else {
            return false;
        };
        let node = img.node.clone();
        let driver = node.driver();
        let name = driver.format_name();
        let mut text = format!("format name: {name}\n");
        if !driver.is_format() {
            // qemu-io prints the name of a protocol node twice (observed).
            text.push_str(&format!("format name: {name}\n"));
        }
        // The leaf that answers "get info": raw asks its file.
        let mut leaf = node.clone();
        while let Some(f) = leaf.child("file") {
            leaf = f;
        }
        let ok = !matches!(leaf.driver().format_name(), "null-co" | "null-aio");
        if ok {
            text.push_str(
                &format::info_lines(name, 0, 0)[format!("format name: {name}\n").len()..],
            );
            let extra = driver.info();
            if !extra.is_empty() {
                text.push_str("Format specific information:\n");
                for (k, v) in extra {
                    text.push_str(&format!("    {k}: {v}\n"));
                }
            }
        }
        self.out.out(&text);
        ok
    }

    async fn map(&mut self) -> bool {
        let b = self.backend();
        let len = b.length();
        let mut off = 0;
        let mut run: Option<(u64, u64, bool)> = None;
        let mut text = String::new();
        while off < len {
            let s = match b.block_status(off, len - off).await {
                Ok(s) => s,
                Err(e) => {
                    self.out.out(&text);
                    self.out.out(&format!(
                        "Failed to get allocation status: {}\n",
                        strerror(&e)
                    ));
                    return false;
                }
            };
            let n = s.len.clamp(1, len - off);
            run = match run {
                Some((o, l, a)) if a == s.allocated => Some((o, l + n, a)),
                Some((o, l, a)) => {
                    text.push_str(&format::map_line(o, l, a));
                    Some((off, n, s.allocated))
                }
                None => Some((off, n, s.allocated)),
            };
            off += n;
        }
        if let Some((o, l, a)) = run {
            text.push_str(&format::map_line(o, l, a));
        }
        self.out.out(&text);
        true
    }

    async fn alloc(&mut self, offset: u64, count: u64) -> bool {
        let b = self.backend();
        let len = b.length();
        let count = count.min(len.saturating_sub(offset));
        let mut allocated = 0;
        let mut off = offset;
        while off < offset + count {
            match b.block_status(off, offset + count - off).await {
                Ok(s) => {
                    let n = s.len.clamp(1, offset + count - off);
                    if s.allocated {
                        allocated += n;
                    }
                    off += n;
                }
                Err(e) => {
                    self.out
                        .out(&format!("allocation status error: {}\n", strerror(&e)));
                    return false;
                }
            }
        }
        self.out.out(&format::alloc_line(offset, allocated, count));
        true
    }

    async fn truncate(&mut self, size: u64, prealloc: PreallocMode) -> bool {
        if self.read_only_error() {
            return false;
        }
        if prealloc == PreallocMode::Metadata {
            self.out
                .err("qemu-io: Unsupported preallocation mode: metadata\n");
            return false;
        }
        let b = self.backend();
        let old = b.length();
        let r = b.truncate(size).await;
        let r = match r {
            // The block layer has no preallocation modes yet: allocate the new tail with
            // write-zeroes (fallocate), which is what falloc/full amount to for a raw file.
            Ok(_) if prealloc != PreallocMode::Off && size > old => {
                b.write_zeroes(old, b.length().min(size) - old, ReqFlags::NONE)
                    .await
            }
            Ok(_) => Ok(()),
            Err(e) => Err(e),
        };
        if let Err(e) = r {
            self.out.err(&format!("qemu-io: {}\n", strerror(&e)));
            return false;
        }
        true
    }

    async fn reopen(&mut self, c: ReopenCmd) -> bool {
        let Some(img) = &self.image else {
            return false;
        };
        let mut spec = img.spec.clone();
        if let Some(k) = c.options.iter().find_map(|o| match options::parse(o) {
            Ok(m) => m.keys().next().cloned(),
            Err(_) => Some(o.clone()),
        }) {
            self.out
                .err(&format!("qemu-io: Cannot change the option '{k}'\n"));
            return false;
        }
        if let Some(ro) = c.read_only {
            spec.read_only = ro;
        }
        if let Some(cache) = c.cache {
            spec.cache = Some(cache);
        }
        let probed = img.probed;
        self.close_image().await;
        if probed && spec.format.is_none() && !spec.image_opts {
            spec.format = Some("raw".into());
        }
        self.try_open_quiet(&spec, probed)
    }

    fn try_open_quiet(&mut self, spec: &OpenSpec, probed: bool) -> bool {
        match self.try_open(spec) {
            Ok(mut img) => {
                img.probed = probed;
                self.image = Some(img);
                true
            }
            Err(e) => {
                self.out.err(&format!("qemu-io: {e}\n"));
                false
            }
        }
    }
}

/// What makes the unknown file probe as raw; fails like opening it would.
/// The format of the image at `path` by the registered drivers' probes (raw when none
/// claims it).
fn probe(graph: &blockd_block::Graph, path: &str) -> Result<&'static str, String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)
        .map_err(|e| format!("Could not open '{path}': {}", strerror(&e)))?;
    let mut head = vec![0u8; 2048];
    let n = f.read(&mut head).unwrap_or(0);
    head.truncate(n);
    Ok(graph.probe_format(&head, path))
}

async fn zero_write(b: &BlockBackend, offset: u64, len: u64, flags: ReqFlags) -> io::Result<()> {
    b.write_zeroes(offset, len, flags).await
}

/// `readv` and `aio_read`: one read of the whole request; the text to print and success.
async fn vectored_read(b: &BlockBackend, c: &VectoredReadCmd, what: &str) -> (bool, String) {
    let total = c.total_len();
    let start = Instant::now();
    let (r, buf) = b.read(c.offset, read_buf(total)).await;
    let elapsed = start.elapsed();
    if let Err(e) = r {
        return (false, format::io_failed(what, &strerror(&e)));
    }
    let mut text = String::new();
    let mut ok = true;
    if let Some(p) = c.pattern
        && let Some(m) = format::verify_pattern(c.offset, &buf, p, 0, total)
    {
        text.push_str(&m);
        ok = false;
    }
    if c.verbose && !c.report.quiet {
        text.push_str(&format::hexdump(c.offset, &buf));
    }
    let stats = Stats {
        verb: Verb::Read,
        done: total,
        requested: total,
        offset: c.offset,
        ops: 1,
        elapsed,
    };
    text.push_str(&report(&stats, c.report));
    (ok, text)
}

/// Lines from stdin for interactive mode.
pub struct Input {
    reader: Arc<Mutex<io::BufReader<io::Stdin>>>,
}

impl Default for Input {
    fn default() -> Self {
        Self::new()
    }
}

impl Input {
    pub fn new() -> Input {
        Input {
            reader: Arc::new(Mutex::new(io::BufReader::new(io::stdin()))),
        }
    }

    /// Whether a line (or EOF) can be read without waiting.
    fn ready(&self) -> bool {
        let r = self.reader.lock().unwrap_or_else(|e| e.into_inner());
        if r.buffer().contains(&b'\n') {
            return true;
        }
        let mut pfd = libc::pollfd {
            fd: 0,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        n != 0
    }

    fn read_line_blocking(reader: &Mutex<io::BufReader<io::Stdin>>) -> Option<String> {
        let mut r = reader.lock().unwrap_or_else(|e| e.into_inner());
        let mut buf = Vec::new();
        match r.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(String::from_utf8_lossy(&buf).into_owned()),
        }
    }

    /// The next line; while waiting, completions of aio requests are printed as they arrive.
    pub async fn next_line(&self, ex: &mut Executor) -> Option<String> {
        if self.ready() || ex.pending.is_empty() {
            return Self::read_line_blocking(&self.reader);
        }
        ex.out.flush();
        let reader = self.reader.clone();
        let mut line =
            blockd_aio::blocking::spawn_blocking(move || Self::read_line_blocking(&reader));
        std::future::poll_fn(|cx| {
            if let std::task::Poll::Ready(l) = std::pin::Pin::new(&mut line).poll(cx) {
                return std::task::Poll::Ready(l.ok().flatten());
            }
            if ex.reap_finished(cx) {
                ex.out.flush();
            }
            std::task::Poll::Pending
        })
        .await
    }
}

use std::future::Future as _;
