//! Parsing one qemu-io command line into a typed [`Command`].
//!
//! Check order (observed): command lookup, "no file open", word count,
//! getopt (option values validated as they are met), positional count, then
//! value parsing and cross-option checks. Every rejection is a
//! [`CommandError`] carrying the exact text and stream(s); a rejected
//! command counts as failed (exit status 1).

use crate::getopt::{Getopt, GetoptError};
use crate::help::{self, CommandInfo};
use crate::numbers::{MAX_REQUEST_LEN, SizeError, parse_pattern, parse_size, parse_sleep_ms};

/// Output stream of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// One piece of output; `text` ends with `\n`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub stream: Stream,
    pub text: String,
}

/// A command rejected before doing anything: what to print, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandError {
    pub messages: Vec<Message>,
}

impl CommandError {
    fn stdout(text: impl Into<String>) -> Self {
        CommandError {
            messages: vec![Message {
                stream: Stream::Stdout,
                text: line(text.into()),
            }],
        }
    }
    fn stderr(text: impl Into<String>) -> Self {
        CommandError {
            messages: vec![Message {
                stream: Stream::Stderr,
                text: line(text.into()),
            }],
        }
    }
    fn getopt(typed: &str, info: &CommandInfo, e: GetoptError) -> Self {
        CommandError {
            messages: vec![
                Message {
                    stream: Stream::Stderr,
                    text: line(e.message(typed)),
                },
                Message {
                    stream: Stream::Stdout,
                    text: help::usage(info),
                },
            ],
        }
    }
    fn usage(info: &CommandInfo) -> Self {
        CommandError::stdout(help::usage(info))
    }
    fn size(e: SizeError, arg: &str) -> Self {
        CommandError::stdout(e.message(arg))
    }
    /// Everything this error prints on stdout, concatenated.
    pub fn stdout_text(&self) -> String {
        self.text_of(Stream::Stdout)
    }
    /// Everything this error prints on stderr, concatenated.
    pub fn stderr_text(&self) -> String {
        self.text_of(Stream::Stderr)
    }
    fn text_of(&self, s: Stream) -> String {
        self.messages
            .iter()
            .filter(|m| m.stream == s)
            .map(|m| m.text.as_str())
            .collect()
    }
}

fn line(mut s: String) -> String {
    if !s.ends_with('\n') {
        s.push('\n');
    }
    s
}

/// How statistics are reported (`-q` wins over `-C`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Reporting {
    /// `-C`: one machine-readable line
    pub csv: bool,
    /// `-q`: no statistics (and no hexdump)
    pub quiet: bool,
}

/// `read -P pattern [-s off] [-l len]`, resolved against the request length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PatternCheck {
    pub pattern: u8,
    /// start of the checked range, relative to the request offset
    pub start: u64,
    pub len: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadCmd {
    pub offset: u64,
    pub len: u64,
    pub check: Option<PatternCheck>,
    /// `-b`: VM state instead of the disk (offset and len are 512-aligned)
    pub vmstate: bool,
    /// `-v`: hexdump
    pub verbose: bool,
    /// `-r`: register the buffer (no visible effect)
    pub register_buf: bool,
    pub report: Reporting,
}

/// What a write puts on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteData {
    /// `-P` (default 0xcd)
    Pattern(u8),
    /// `-z`, with `-u` (may unmap) and `-n` (no slow fallback)
    Zeroes { unmap: bool, no_fallback: bool },
    /// `-s FILE`: the file's bytes repeated; the executor reads it (errors:
    /// `format::source_file_error` / `format::source_file_empty`, stderr).
    SourceFile(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteCmd {
    pub offset: u64,
    pub len: u64,
    pub data: WriteData,
    /// `-b`: VM state (offset and len 512-aligned)
    pub vmstate: bool,
    /// `-c`: compressed (offset and len 512-aligned)
    pub compressed: bool,
    /// `-f`: FUA
    pub fua: bool,
    pub register_buf: bool,
    pub report: Reporting,
}

/// `readv` / `aio_read`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VectoredReadCmd {
    pub offset: u64,
    /// one element per iovec buffer
    pub lens: Vec<u64>,
    /// `-P`: verify the whole request
    pub pattern: Option<u8>,
    pub verbose: bool,
    pub register_buf: bool,
    pub report: Reporting,
}

impl VectoredReadCmd {
    pub fn total_len(&self) -> u64 {
        self.lens.iter().sum()
    }
}

/// `writev` / `aio_write`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VectoredWriteCmd {
    pub offset: u64,
    pub lens: Vec<u64>,
    /// `Pattern` (default 0xcd) or, for `aio_write -z`, `Zeroes` (a single
    /// length; `aio_write -z -P` is accepted and means zeroes).
    pub data: WriteData,
    pub fua: bool,
    pub register_buf: bool,
    pub report: Reporting,
}

impl VectoredWriteCmd {
    pub fn total_len(&self) -> u64 {
        self.lens.iter().sum()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscardCmd {
    pub offset: u64,
    pub len: u64,
    pub report: Reporting,
}

/// `-t` / `-c` cache modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheMode {
    /// `none` or `off`
    None,
    Writeback,
    Writethrough,
    Unsafe,
    Directsync,
}

impl CacheMode {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "none" | "off" => CacheMode::None,
            "writeback" => CacheMode::Writeback,
            "writethrough" => CacheMode::Writethrough,
            "unsafe" => CacheMode::Unsafe,
            "directsync" => CacheMode::Directsync,
            _ => return None,
        })
    }
}

/// `-d` discard modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiscardMode {
    /// `ignore` or `off`
    Ignore,
    /// `unmap` or `on`
    Unmap,
}

impl DiscardMode {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "ignore" | "off" => Some(DiscardMode::Ignore),
            "unmap" | "on" => Some(DiscardMode::Unmap),
            _ => None,
        }
    }
}

/// `-i` AIO modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AioMode {
    Threads,
    Native,
    IoUring,
}

impl AioMode {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "threads" => Some(AioMode::Threads),
            "native" => Some(AioMode::Native),
            "io_uring" => Some(AioMode::IoUring),
            _ => None,
        }
    }
}

/// `truncate -m` modes. `metadata` parses but the raw driver rejects it
/// (`qemu-io: Unsupported preallocation mode: metadata`, stderr).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PreallocMode {
    #[default]
    Off,
    Metadata,
    Falloc,
    Full,
}

impl PreallocMode {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "off" => Some(PreallocMode::Off),
            "metadata" => Some(PreallocMode::Metadata),
            "falloc" => Some(PreallocMode::Falloc),
            "full" => Some(PreallocMode::Full),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            PreallocMode::Off => "off",
            PreallocMode::Metadata => "metadata",
            PreallocMode::Falloc => "falloc",
            PreallocMode::Full => "full",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OpenCmd {
    pub read_only: bool,
    pub snapshot: bool,
    pub copy_on_read: bool,
    /// `-n` (= `-t none`)
    pub nocache: bool,
    /// `-k` (= `-i native`)
    pub native_aio: bool,
    pub force_share: bool,
    pub cache: Option<CacheMode>,
    pub discard: Option<DiscardMode>,
    pub aio: Option<AioMode>,
    /// every `-o` argument, in order (comma-separated key=value lists)
    pub options: Vec<String>,
    pub path: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReopenCmd {
    /// `Some(true)` for `-r`, `Some(false)` for `-w`
    pub read_only: Option<bool>,
    pub cache: Option<CacheMode>,
    pub options: Vec<String>,
}

/// One parsed command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Read(ReadCmd),
    Write(WriteCmd),
    Readv(VectoredReadCmd),
    Writev(VectoredWriteCmd),
    AioRead(VectoredReadCmd),
    AioWrite(VectoredWriteCmd),
    /// `aio_read -i` / `aio_write -i`: print `format::injecting_invalid`,
    /// account an invalid request, submit nothing (command succeeds).
    AioInvalid {
        write: bool,
    },
    AioFlush,
    Flush,
    Discard(DiscardCmd),
    Length,
    Info,
    Map,
    /// `alloc offset [count]` (count defaults to 512)
    Alloc {
        offset: u64,
        count: u64,
    },
    Truncate {
        size: u64,
        prealloc: PreallocMode,
    },
    Open(OpenCmd),
    Close,
    Reopen(ReopenCmd),
    /// `help [topic]`: output from [`help::help`] (an unknown topic fails)
    Help {
        topic: Option<String>,
    },
    Quit,
    Sleep {
        ms: u64,
    },
    Sigraise {
        signal: u64,
    },
    Abort,
    Break {
        event: String,
        tag: String,
    },
    RemoveBreak {
        tag: String,
    },
    Resume {
        tag: String,
    },
    WaitBreak {
        tag: String,
    },
    /// `zone_*` commands, arguments kept as typed (not used by blockd yet)
    Zone {
        name: &'static str,
        args: Vec<String>,
    },
}

/// Commands that work without an open image.
fn works_without_file(name: &str) -> bool {
    matches!(
        name,
        "help" | "quit" | "sleep" | "sigraise" | "abort" | "open"
    )
}

/// (min, max) word counts after the command name, options included;
/// `None` max = unlimited.
fn word_limits(name: &str) -> (usize, Option<usize>) {
    match name {
        "abort" | "aio_flush" | "close" | "flush" | "info" | "length" | "map" => (0, Some(0)),
        "aio_read" | "aio_write" | "discard" | "read" | "readv" | "write" | "writev" => (2, None),
        "alloc" => (1, Some(2)),
        "break" | "zone_close" | "zone_finish" | "zone_open" | "zone_report" | "zone_reset" => {
            (2, Some(2))
        }
        "help" => (0, Some(1)),
        "open" => (1, None),
        "remove_break" | "resume" | "sigraise" | "sleep" | "wait_break" => (1, Some(1)),
        "truncate" => (1, Some(3)),
        "zone_append" => (3, Some(4)),
        _ => (0, None), // quit, reopen
    }
}

fn count_error(typed: &str, n: usize, min: usize, max: Option<usize>) -> CommandError {
    let expected = match max {
        None => format!("at least {min} arguments"),
        Some(max) if max == min => format!("{min} arguments"),
        Some(max) => format!("between {min} and {max} arguments"),
    };
    CommandError::stderr(format!(
        "bad argument count {n} to {typed}, expected {expected}"
    ))
}

/// Split a line the way qemu-io does: on ASCII spaces only, no quoting.
pub fn split_words(line: &str) -> Vec<String> {
    line.split(' ')
        .filter(|w| !w.is_empty())
        .map(String::from)
        .collect()
}

/// Parse one command line. `file_open` says whether an image is open
/// (commands needing one fail with `no file open, try 'help open'`).
/// A blank line gives `Ok(None)` (nothing happens, not a failure).
pub fn parse_command(line: &str, file_open: bool) -> Result<Option<Command>, CommandError> {
    let line = line.strip_suffix('\n').unwrap_or(line);
    let words = split_words(line);
    let Some((typed, args)) = words.split_first() else {
        return Ok(None);
    };
    let Some(info) = help::lookup(typed) else {
        return Err(CommandError::stderr(format!(
            "command \"{typed}\" not found"
        )));
    };
    if !file_open && !works_without_file(info.name) {
        return Err(CommandError::stderr("no file open, try 'help open'"));
    }
    let (min, max) = word_limits(info.name);
    if args.len() < min || max.is_some_and(|m| args.len() > m) {
        return Err(count_error(typed, args.len(), min, max));
    }
    let p = Parser { typed, info, args };
    p.parse().map(Some)
}

struct Parser<'a> {
    typed: &'a str,
    info: &'static CommandInfo,
    args: &'a [String],
}

fn size(arg: &str) -> Result<u64, CommandError> {
    parse_size(arg).map_err(|e| CommandError::size(e, arg))
}

fn pattern(arg: &str) -> Result<u8, CommandError> {
    parse_pattern(arg).map_err(CommandError::stdout)
}

impl<'a> Parser<'a> {
    fn getopt(&self, spec: &'a str) -> Getopt<'a> {
        Getopt::new(self.args, spec)
    }

    fn opt_err(&self, e: GetoptError) -> CommandError {
        CommandError::getopt(self.typed, self.info, e)
    }

    fn usage(&self) -> CommandError {
        CommandError::usage(self.info)
    }

    fn parse(&self) -> Result<Command, CommandError> {
        let a = self.args;
        Ok(match self.info.name {
            "read" => self.read()?,
            "write" => self.write()?,
            "readv" => self.readv(false)?,
            "aio_read" => self.readv(true)?,
            "writev" => self.writev(false)?,
            "aio_write" => self.writev(true)?,
            "discard" => self.discard()?,
            "truncate" => self.truncate()?,
            "open" => self.open()?,
            "reopen" => self.reopen()?,
            "alloc" => Command::Alloc {
                offset: size(&a[0])?,
                count: match a.get(1) {
                    Some(c) => size(c)?,
                    None => 512,
                },
            },
            "aio_flush" => Command::AioFlush,
            "flush" => Command::Flush,
            "length" => Command::Length,
            "info" => Command::Info,
            "map" => Command::Map,
            "close" => Command::Close,
            "abort" => Command::Abort,
            "quit" => Command::Quit,
            "help" => Command::Help {
                topic: a.first().cloned(),
            },
            "sleep" => Command::Sleep {
                ms: parse_sleep_ms(&a[0]).map_err(CommandError::stdout)?,
            },
            "sigraise" => Command::Sigraise {
                signal: size(&a[0])?,
            },
            "break" => Command::Break {
                event: a[0].clone(),
                tag: a[1].clone(),
            },
            "remove_break" => Command::RemoveBreak { tag: a[0].clone() },
            "resume" => Command::Resume { tag: a[0].clone() },
            "wait_break" => Command::WaitBreak { tag: a[0].clone() },
            name => Command::Zone {
                name,
                args: a.to_vec(),
            },
        })
    }

    fn read(&self) -> Result<Command, CommandError> {
        let mut g = self.getopt("bCl:pP:qrs:v");
        let mut cmd = ReadCmd {
            offset: 0,
            len: 0,
            check: None,
            vmstate: false,
            verbose: false,
            register_buf: false,
            report: Reporting::default(),
        };
        let (mut pat, mut start, mut plen) = (None, None, None);
        while let Some(o) = g.next_opt() {
            match o.map_err(|e| self.opt_err(e))? {
                ('b', _) => cmd.vmstate = true,
                ('C', _) => cmd.report.csv = true,
                ('q', _) => cmd.report.quiet = true,
                ('r', _) => cmd.register_buf = true,
                ('v', _) => cmd.verbose = true,
                ('P', Some(v)) => pat = Some(pattern(v)?),
                ('s', Some(v)) => start = Some(size(v)?),
                ('l', Some(v)) => plen = Some(size(v)?),
                _ => {} // -p: ignored
            }
        }
        let pos = g.positionals();
        if pos.len() != 2 || (pat.is_none() && (start.is_some() || plen.is_some())) {
            return Err(self.usage());
        }
        cmd.offset = size(pos[0])?;
        cmd.len = size(pos[1])?;
        if cmd.len > MAX_REQUEST_LEN {
            return Err(CommandError::stdout(format!(
                "length cannot exceed {MAX_REQUEST_LEN}, given {}",
                pos[1]
            )));
        }
        if let Some(p) = pat {
            let start = start.unwrap_or(0);
            let in_range = start <= cmd.len && plen.is_none_or(|l| l <= cmd.len - start);
            if !in_range {
                return Err(CommandError::stdout(
                    "pattern verification range exceeds end of read data",
                ));
            }
            cmd.check = Some(PatternCheck {
                pattern: p,
                start,
                len: plen.unwrap_or(cmd.len - start),
            });
        }
        if cmd.vmstate {
            sector_aligned(cmd.offset, cmd.len)?;
        }
        Ok(Command::Read(cmd))
    }

    fn write(&self) -> Result<Command, CommandError> {
        let mut g = self.getopt("bcCfnpP:qrs:uz");
        let (mut vmstate, mut compressed, mut fua, mut register_buf) = (false, false, false, false);
        let (mut zero, mut unmap, mut no_fallback) = (false, false, false);
        let mut report = Reporting::default();
        let (mut pat, mut source) = (None, None);
        while let Some(o) = g.next_opt() {
            match o.map_err(|e| self.opt_err(e))? {
                ('b', _) => vmstate = true,
                ('c', _) => compressed = true,
                ('C', _) => report.csv = true,
                ('f', _) => fua = true,
                ('n', _) => no_fallback = true,
                ('q', _) => report.quiet = true,
                ('r', _) => register_buf = true,
                ('u', _) => unmap = true,
                ('z', _) => zero = true,
                ('P', Some(v)) => pat = Some(pattern(v)?),
                ('s', Some(v)) => source = Some(v.to_string()),
                _ => {} // -p: ignored
            }
        }
        let pos = g.positionals();
        if pos.len() != 2 {
            return Err(self.usage());
        }
        if vmstate && zero {
            return Err(CommandError::stdout(
                "-b and -z cannot be specified at the same time",
            ));
        }
        if no_fallback && !zero {
            return Err(CommandError::stdout("-n requires -z to be specified"));
        }
        if unmap && !zero {
            return Err(CommandError::stdout("-u requires -z to be specified"));
        }
        if [zero, pat.is_some(), source.is_some()]
            .iter()
            .filter(|&&x| x)
            .count()
            > 1
        {
            return Err(CommandError::stdout(
                "Only one of -z, -P, and -s can be specified at the same time",
            ));
        }
        let offset = size(pos[0])?;
        let len = size(pos[1])?;
        if len > MAX_REQUEST_LEN && !(zero && no_fallback) {
            return Err(CommandError::stdout(format!(
                "length cannot exceed {MAX_REQUEST_LEN} without -n, given {}",
                pos[1]
            )));
        }
        if vmstate || compressed {
            sector_aligned(offset, len)?;
        }
        let data = if zero {
            WriteData::Zeroes { unmap, no_fallback }
        } else if let Some(path) = source {
            WriteData::SourceFile(path)
        } else {
            WriteData::Pattern(pat.unwrap_or(crate::format::DEFAULT_WRITE_PATTERN))
        };
        Ok(Command::Write(WriteCmd {
            offset,
            len,
            data,
            vmstate,
            compressed,
            fua,
            register_buf,
            report,
        }))
    }

    /// offset + lengths of readv/writev/aio_*, with the per-element and
    /// total limits.
    fn offset_and_lens(&self, pos: &[&str]) -> Result<(u64, Vec<u64>), CommandError> {
        let offset = size(pos[0])?;
        let mut lens = Vec::with_capacity(pos.len() - 1);
        let mut total: u64 = 0;
        for arg in &pos[1..] {
            let len = size(arg)?;
            if len > MAX_REQUEST_LEN {
                return Err(CommandError::stdout(format!(
                    "Argument '{arg}' exceeds maximum size {MAX_REQUEST_LEN}"
                )));
            }
            total += len;
            if total > MAX_REQUEST_LEN {
                return Err(CommandError::stdout(format!(
                    "The total number of bytes exceed the maximum size {MAX_REQUEST_LEN}"
                )));
            }
            lens.push(len);
        }
        Ok((offset, lens))
    }

    fn readv(&self, aio: bool) -> Result<Command, CommandError> {
        let mut g = self.getopt(if aio { "CiP:qrv" } else { "CP:qrv" });
        let mut report = Reporting::default();
        let (mut pat, mut verbose, mut register_buf) = (None, false, false);
        while let Some(o) = g.next_opt() {
            match o.map_err(|e| self.opt_err(e))? {
                ('C', _) => report.csv = true,
                ('q', _) => report.quiet = true,
                ('r', _) => register_buf = true,
                ('v', _) => verbose = true,
                ('i', _) => return Ok(Command::AioInvalid { write: false }),
                ('P', Some(v)) => pat = Some(pattern(v)?),
                _ => {}
            }
        }
        let pos = g.positionals();
        if pos.len() < 2 {
            return Err(self.usage());
        }
        let (offset, lens) = self.offset_and_lens(pos)?;
        let cmd = VectoredReadCmd {
            offset,
            lens,
            pattern: pat,
            verbose,
            register_buf,
            report,
        };
        Ok(if aio {
            Command::AioRead(cmd)
        } else {
            Command::Readv(cmd)
        })
    }

    fn writev(&self, aio: bool) -> Result<Command, CommandError> {
        let mut g = self.getopt(if aio { "CfiP:qruz" } else { "CfP:qr" });
        let mut report = Reporting::default();
        let (mut pat, mut fua, mut register_buf, mut zero, mut unmap) =
            (None, false, false, false, false);
        while let Some(o) = g.next_opt() {
            match o.map_err(|e| self.opt_err(e))? {
                ('C', _) => report.csv = true,
                ('f', _) => fua = true,
                ('q', _) => report.quiet = true,
                ('r', _) => register_buf = true,
                ('u', _) => unmap = true,
                ('z', _) => zero = true,
                ('i', _) => return Ok(Command::AioInvalid { write: true }),
                ('P', Some(v)) => pat = Some(pattern(v)?),
                _ => {}
            }
        }
        let pos = g.positionals();
        if pos.len() < 2 {
            return Err(self.usage());
        }
        if unmap && !zero {
            return Err(CommandError::stdout("-u requires -z to be specified"));
        }
        if zero && pos.len() > 2 {
            return Err(CommandError::stdout(
                "-z supports only a single length parameter",
            ));
        }
        let (offset, lens) = self.offset_and_lens(pos)?;
        let data = if zero {
            WriteData::Zeroes {
                unmap,
                no_fallback: false,
            }
        } else {
            WriteData::Pattern(pat.unwrap_or(crate::format::DEFAULT_WRITE_PATTERN))
        };
        let cmd = VectoredWriteCmd {
            offset,
            lens,
            data,
            fua,
            register_buf,
            report,
        };
        Ok(if aio {
            Command::AioWrite(cmd)
        } else {
            Command::Writev(cmd)
        })
    }

    fn discard(&self) -> Result<Command, CommandError> {
        let mut g = self.getopt("Cq");
        let mut report = Reporting::default();
        while let Some(o) = g.next_opt() {
            match o.map_err(|e| self.opt_err(e))? {
                ('C', _) => report.csv = true,
                _ => report.quiet = true,
            }
        }
        let pos = g.positionals();
        if pos.len() != 2 {
            return Err(self.usage());
        }
        let offset = size(pos[0])?;
        let len = size(pos[1])?;
        if len > MAX_REQUEST_LEN {
            return Err(CommandError::stdout(format!(
                "length cannot exceed {MAX_REQUEST_LEN}, given {}",
                pos[1]
            )));
        }
        Ok(Command::Discard(DiscardCmd {
            offset,
            len,
            report,
        }))
    }

    fn truncate(&self) -> Result<Command, CommandError> {
        let mut g = self.getopt("m:");
        let mut prealloc = PreallocMode::Off;
        while let Some(o) = g.next_opt() {
            if let (_, Some(v)) = o.map_err(|e| self.opt_err(e))? {
                prealloc = PreallocMode::parse(v).ok_or_else(|| {
                    CommandError::stderr(format!("qemu-io: Invalid preallocation mode '{v}'"))
                })?;
            }
        }
        // Quirk: the first positional is parsed (extra ones are ignored), but
        // an error names the first word of the permuted argument list.
        let named = g.permuted_first().unwrap_or("");
        let size = match g.positionals().first() {
            Some(arg) => parse_size(arg).map_err(|e| CommandError::size(e, named))?,
            None => return Err(CommandError::size(SizeError::NonNumeric, named)),
        };
        Ok(Command::Truncate { size, prealloc })
    }

    fn open(&self) -> Result<Command, CommandError> {
        let mut g = self.getopt("snCro:kt:d:i:U");
        let mut cmd = OpenCmd::default();
        while let Some(o) = g.next_opt() {
            match o.map_err(|e| self.opt_err(e))? {
                ('s', _) => cmd.snapshot = true,
                ('n', _) => cmd.nocache = true,
                ('C', _) => cmd.copy_on_read = true,
                ('r', _) => cmd.read_only = true,
                ('k', _) => cmd.native_aio = true,
                ('U', _) => cmd.force_share = true,
                ('o', Some(v)) => cmd.options.push(v.to_string()),
                ('t', Some(v)) => {
                    cmd.cache = Some(CacheMode::parse(v).ok_or_else(|| {
                        CommandError::stderr(format!("qemu-io: Invalid cache option: {v}"))
                    })?)
                }
                ('d', Some(v)) => {
                    cmd.discard = Some(DiscardMode::parse(v).ok_or_else(|| {
                        CommandError::stderr(format!("qemu-io: Invalid discard option: {v}"))
                    })?)
                }
                ('i', Some(v)) => {
                    cmd.aio = Some(AioMode::parse(v).ok_or_else(|| {
                        CommandError::stderr(format!("qemu-io: Invalid aio option: {v}"))
                    })?)
                }
                _ => {}
            }
        }
        match g.positionals() {
            [] => {}
            [path] => cmd.path = Some(path.to_string()),
            _ => return Err(self.usage()),
        }
        Ok(Command::Open(cmd))
    }

    fn reopen(&self) -> Result<Command, CommandError> {
        let mut g = self.getopt("c:o:rw");
        let mut cmd = ReopenCmd::default();
        while let Some(o) = g.next_opt() {
            match o.map_err(|e| self.opt_err(e))? {
                (c @ ('r' | 'w'), _) => {
                    if cmd.read_only.is_some() {
                        return Err(CommandError::stderr(
                            "qemu-io: Only one -r/-w option may be given",
                        ));
                    }
                    cmd.read_only = Some(c == 'r');
                }
                ('c', Some(v)) => {
                    cmd.cache = Some(CacheMode::parse(v).ok_or_else(|| {
                        CommandError::stderr(format!("qemu-io: Invalid cache option: {v}"))
                    })?)
                }
                ('o', Some(v)) => cmd.options.push(v.to_string()),
                _ => {}
            }
        }
        if !g.positionals().is_empty() {
            return Err(self.usage());
        }
        Ok(Command::Reopen(cmd))
    }
}

fn sector_aligned(offset: u64, len: u64) -> Result<(), CommandError> {
    if !offset.is_multiple_of(512) {
        return Err(CommandError::stdout(format!(
            "{offset} is not a sector-aligned value for 'offset'"
        )));
    }
    if !len.is_multiple_of(512) {
        return Err(CommandError::stdout(format!(
            "{len} is not a sector-aligned value for 'count'"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const READ_USAGE: &str = "read [-abCqrv] [-P pattern [-s off] [-l len]] off len -- reads a number of bytes at a specified offset\n";
    const WRITE_USAGE: &str = "write [-bcCfnqruz] [-P pattern | -s source_file] off len -- writes a number of bytes at a specified offset\n";
    const NN: &str = "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- ";

    fn ok(line: &str) -> Command {
        parse_command(line, true)
            .unwrap_or_else(|e| panic!("{line}: {e:?}"))
            .unwrap()
    }

    /// (stdout, stderr) of a rejected command
    fn err(line: &str, file_open: bool) -> (String, String) {
        let e = parse_command(line, file_open).expect_err(line);
        (e.stdout_text(), e.stderr_text())
    }

    fn out(line: &str) -> String {
        let (o, e) = err(line, true);
        assert_eq!(e, "", "{line}");
        o
    }

    fn errout(line: &str) -> String {
        let (o, e) = err(line, true);
        assert_eq!(o, "", "{line}");
        e
    }

    #[test]
    fn blank_and_unknown() {
        assert_eq!(parse_command("", true), Ok(None));
        assert_eq!(parse_command("   ", false), Ok(None));
        assert_eq!(errout("bogus"), "command \"bogus\" not found\n");
        assert_eq!(errout("\tread 0 5"), "command \"\tread\" not found\n");
        assert_eq!(errout("# x"), "command \"#\" not found\n");
        assert_eq!(errout("READ 0 1"), "command \"READ\" not found\n");
        assert_eq!(errout("exit"), "command \"exit\" not found\n");
        assert_eq!(err("bogus", false).1, "command \"bogus\" not found\n");
    }

    #[test]
    fn no_file_open() {
        for line in [
            "read 0 512",
            "read 0",
            "read -x 0 1",
            "close",
            "info",
            "length x",
            "flush",
            "reopen",
            "break",
            "resume x",
            "aio_flush x",
            "map x",
            "read -P",
        ] {
            assert_eq!(
                err(line, false),
                (String::new(), "no file open, try 'help open'\n".into()),
                "{line}"
            );
        }
        for line in [
            "help",
            "quit",
            "sleep 1",
            "sigraise 0",
            "abort",
            "open -o driver=raw raw.img",
        ] {
            assert!(parse_command(line, false).is_ok(), "{line}");
        }
    }

    #[test]
    fn argument_counts() {
        for (line, msg) in [
            (
                "read 0",
                "bad argument count 1 to read, expected at least 2 arguments",
            ),
            (
                "read 0\t5",
                "bad argument count 1 to read, expected at least 2 arguments",
            ),
            (
                "read -P",
                "bad argument count 1 to read, expected at least 2 arguments",
            ),
            (
                "read --help",
                "bad argument count 1 to read, expected at least 2 arguments",
            ),
            (
                "alloc",
                "bad argument count 0 to alloc, expected between 1 and 2 arguments",
            ),
            (
                "alloc 0 1 2",
                "bad argument count 3 to alloc, expected between 1 and 2 arguments",
            ),
            (
                "sleep",
                "bad argument count 0 to sleep, expected 1 arguments",
            ),
            (
                "sleep -- 1",
                "bad argument count 2 to sleep, expected 1 arguments",
            ),
            (
                "length 1",
                "bad argument count 1 to length, expected 0 arguments",
            ),
            (
                "break",
                "bad argument count 0 to break, expected 2 arguments",
            ),
            (
                "break a",
                "bad argument count 1 to break, expected 2 arguments",
            ),
            (
                "open",
                "bad argument count 0 to open, expected at least 1 arguments",
            ),
            (
                "truncate",
                "bad argument count 0 to truncate, expected between 1 and 3 arguments",
            ),
            (
                "truncate a b c d",
                "bad argument count 4 to truncate, expected between 1 and 3 arguments",
            ),
            (
                "truncate -m full -- 6M",
                "bad argument count 4 to truncate, expected between 1 and 3 arguments",
            ),
            (
                "discard 0",
                "bad argument count 1 to discard, expected at least 2 arguments",
            ),
            (
                "aio_flush -x",
                "bad argument count 1 to aio_flush, expected 0 arguments",
            ),
            (
                "aio_read 1",
                "bad argument count 1 to aio_read, expected at least 2 arguments",
            ),
            (
                "aio_write 1",
                "bad argument count 1 to aio_write, expected at least 2 arguments",
            ),
            (
                "readv 0",
                "bad argument count 1 to readv, expected at least 2 arguments",
            ),
            (
                "writev 1k",
                "bad argument count 1 to writev, expected at least 2 arguments",
            ),
            (
                "help read x",
                "bad argument count 2 to help, expected between 0 and 1 arguments",
            ),
            (
                "flush x",
                "bad argument count 1 to flush, expected 0 arguments",
            ),
            (
                "close x",
                "bad argument count 1 to close, expected 0 arguments",
            ),
            ("map x", "bad argument count 1 to map, expected 0 arguments"),
            (
                "info x",
                "bad argument count 1 to info, expected 0 arguments",
            ),
            (
                "resume",
                "bad argument count 0 to resume, expected 1 arguments",
            ),
            (
                "remove_break",
                "bad argument count 0 to remove_break, expected 1 arguments",
            ),
            (
                "wait_break",
                "bad argument count 0 to wait_break, expected 1 arguments",
            ),
            (
                "sigraise",
                "bad argument count 0 to sigraise, expected 1 arguments",
            ),
            (
                "sigraise -- 0",
                "bad argument count 2 to sigraise, expected 1 arguments",
            ),
            ("zrp", "bad argument count 0 to zrp, expected 2 arguments"),
            (
                "zone_append 0",
                "bad argument count 1 to zone_append, expected between 3 and 4 arguments",
            ),
        ] {
            assert_eq!(errout(line), format!("{msg}\n"), "{line}");
        }
        assert_eq!(ok("quit x"), Command::Quit);
        assert_eq!(ok("q"), Command::Quit);
    }

    #[test]
    fn getopt_errors() {
        for (line, msg, usage) in [
            ("read 0 -1", "read: invalid option -- '1'", READ_USAGE),
            ("read -x -y 0 1", "read: invalid option -- 'x'", READ_USAGE),
            ("read -a 0 1", "read: invalid option -- 'a'", READ_USAGE),
            ("read -n 0 1", "read: invalid option -- 'n'", READ_USAGE),
            ("read --x 0 1", "read: invalid option -- '-'", READ_USAGE),
            ("read -? 0 1", "read: invalid option -- '?'", READ_USAGE),
            ("read -: 0 1", "read: invalid option -- ':'", READ_USAGE),
            ("r -x 0 1", "r: invalid option -- 'x'", READ_USAGE),
            ("write -Z 0 1", "write: invalid option -- 'Z'", WRITE_USAGE),
            (
                "readv -z 0 1",
                "readv: invalid option -- 'z'",
                "readv [-Cqrv] [-P pattern] off len [len..] -- reads a number of bytes at a specified offset\n",
            ),
            (
                "writev -z 0 1",
                "writev: invalid option -- 'z'",
                "writev [-Cfqr] [-P pattern] off len [len..] -- writes a number of bytes at a specified offset\n",
            ),
            (
                "aio_write -b 0 1",
                "aio_write: invalid option -- 'b'",
                "aio_write [-Cfiqruz] [-P pattern] off len [len..] -- asynchronously writes a number of bytes\n",
            ),
            (
                "aio_write -n 0 1",
                "aio_write: invalid option -- 'n'",
                "aio_write [-Cfiqruz] [-P pattern] off len [len..] -- asynchronously writes a number of bytes\n",
            ),
            (
                "discard -v 0 1",
                "discard: invalid option -- 'v'",
                "discard [-Cq] off len -- discards a number of bytes at a specified offset\n",
            ),
            (
                "open -x raw.img",
                "open: invalid option -- 'x'",
                "open [-rsCnkU] [-t cache] [-d discard] [-o options] [path] -- open the file specified by path\n",
            ),
            (
                "open -o",
                "open: option requires an argument -- 'o'",
                "open [-rsCnkU] [-t cache] [-d discard] [-o options] [path] -- open the file specified by path\n",
            ),
            (
                "truncate -x",
                "truncate: invalid option -- 'x'",
                "truncate [-m prealloc_mode] off -- truncates the current file at the given offset\n",
            ),
            (
                "truncate -m",
                "truncate: option requires an argument -- 'm'",
                "truncate [-m prealloc_mode] off -- truncates the current file at the given offset\n",
            ),
            (
                "truncate 5M -m",
                "truncate: option requires an argument -- 'm'",
                "truncate [-m prealloc_mode] off -- truncates the current file at the given offset\n",
            ),
            (
                "reopen -x",
                "reopen: invalid option -- 'x'",
                "reopen [(-r|-w)] [-c cache] [-o options] -- reopens an image with new options\n",
            ),
            (
                "reopen -o",
                "reopen: option requires an argument -- 'o'",
                "reopen [(-r|-w)] [-c cache] [-o options] -- reopens an image with new options\n",
            ),
        ] {
            let e = parse_command(line, true).expect_err(line);
            assert_eq!(e.messages[0].stream, Stream::Stderr, "{line}");
            assert_eq!(e.stderr_text(), format!("{msg}\n"), "{line}");
            assert_eq!(e.stdout_text(), usage, "{line}");
        }
    }

    #[test]
    fn positional_count_usage() {
        for line in [
            "read 0 512 512",
            "read -s 0 0 1024",
            "read -l 1 0 1",
            "read - 0 1",
            "r 0 1 2",
            "read -l 1 -s 1 0 1",
            "read -l 1 -s 1 -P 2 0",
        ] {
            assert_eq!(out(line), READ_USAGE, "{line}");
        }
        for line in [
            "write -c 0 1 2",
            "write -P 1 -z 0",
            "write -z 0",
            "write -u 0 1 2",
            "write -P 1 -z 0 1 2",
            "write -s /nonexist 0 1 2",
            "write -z -u 0 1 2",
        ] {
            assert_eq!(out(line), WRITE_USAGE, "{line}");
        }
        assert_eq!(
            out("discard 0 1 2"),
            "discard [-Cq] off len -- discards a number of bytes at a specified offset\n"
        );
        assert_eq!(
            out("d 0 1 2"),
            "discard [-Cq] off len -- discards a number of bytes at a specified offset\n"
        );
        assert_eq!(
            out("open a b"),
            "open [-rsCnkU] [-t cache] [-d discard] [-o options] [path] -- open the file specified by path\n"
        );
        assert_eq!(
            out("reopen x"),
            "reopen [(-r|-w)] [-c cache] [-o options] -- reopens an image with new options\n"
        );
        assert_eq!(
            out("reopen -r x"),
            "reopen [(-r|-w)] [-c cache] [-o options] -- reopens an image with new options\n"
        );
        assert_eq!(
            out("aio_write -u 0"),
            "aio_write [-Cfiqruz] [-P pattern] off len [len..] -- asynchronously writes a number of bytes\n"
        );
    }

    #[test]
    fn number_errors() {
        assert_eq!(out("read 0 1e3"), format!("{NN}1e3\n"));
        assert_eq!(out("read 0 '5'"), format!("{NN}'5'\n"));
        assert_eq!(
            out("read 9223372036854775808 1"),
            "Parsing error: argument too large -- 9223372036854775808\n"
        );
        assert_eq!(
            out("read -- -1 1"),
            "Parsing error: argument too large -- -1\n"
        );
        assert_eq!(
            out("read -- -5 1"),
            "Parsing error: argument too large -- -5\n"
        );
        assert_eq!(
            out("read 0 2147483137"),
            "length cannot exceed 2147483136, given 2147483137\n"
        );
        for g in ["2G", "1T", "0x7fffffff", "1e"] {
            assert_eq!(
                out(&format!("read 0 {g}")),
                format!("length cannot exceed 2147483136, given {g}\n")
            );
        }
        assert_eq!(out("read 0x 2G"), format!("{NN}0x\n"));
        assert_eq!(
            out("write 0 2G"),
            "length cannot exceed 2147483136 without -n, given 2G\n"
        );
        assert_eq!(
            out("write -c 0 2G"),
            "length cannot exceed 2147483136 without -n, given 2G\n"
        );
        assert_eq!(
            out("write -s /nonexist 0 2G"),
            "length cannot exceed 2147483136 without -n, given 2G\n"
        );
        assert_eq!(out("write -s /nonexist 0 x"), format!("{NN}x\n"));
        assert_eq!(
            out("write -z -n 0 8E"),
            "Parsing error: argument too large -- 8E\n"
        );
        assert_eq!(
            out("discard 0 2G"),
            "length cannot exceed 2147483136, given 2G\n"
        );
        assert_eq!(
            out("discard -- 0 8E"),
            "Parsing error: argument too large -- 8E\n"
        );
        assert_eq!(out("readv 0 abc"), format!("{NN}abc\n"));
        assert_eq!(
            out("readv 0 3G"),
            "Argument '3G' exceeds maximum size 2147483136\n"
        );
        assert_eq!(
            out("readv 0 3G x"),
            "Argument '3G' exceeds maximum size 2147483136\n"
        );
        assert_eq!(out("readv x 1 3G"), format!("{NN}x\n"));
        assert_eq!(out("readv 0 1 x"), format!("{NN}x\n"));
        assert_eq!(
            out("readv 0 1G 1G"),
            "The total number of bytes exceed the maximum size 2147483136\n"
        );
        assert_eq!(
            out("readv 0 1G 1G 3G"),
            "The total number of bytes exceed the maximum size 2147483136\n"
        );
        assert_eq!(
            out("aio_read 0 3G"),
            "Argument '3G' exceeds maximum size 2147483136\n"
        );
        assert_eq!(
            out("aio_read 0 1G 1G"),
            "The total number of bytes exceed the maximum size 2147483136\n"
        );
        assert_eq!(out("aio_read 0 x"), format!("{NN}x\n"));
        assert_eq!(out("alloc x"), format!("{NN}x\n"));
        assert_eq!(out("alloc 0 x"), format!("{NN}x\n"));
        assert_eq!(out("alloc -- 1"), format!("{NN}--\n"));
        assert_eq!(out("alloc 8E"), "Parsing error: argument too large -- 8E\n");
        assert_eq!(out("alloc 0 1.5"), format!("{NN}1.5\n"));
        assert_eq!(out("sigraise x"), format!("{NN}x\n"));
        assert_eq!(out("sleep x"), "x is not a valid number\n");
        assert_eq!(out("sleep 1k"), "1k is not a valid number\n");
        assert_eq!(out("sleep -1"), "-1 is not a valid number\n");
        assert_eq!(out("sleep --"), "-- is not a valid number\n");
    }

    #[test]
    fn pattern_options() {
        assert_eq!(
            out("write -z -P 1 0 512"),
            "Only one of -z, -P, and -s can be specified at the same time\n"
        );
        assert_eq!(
            out("write -z -s f 0 1"),
            "Only one of -z, -P, and -s can be specified at the same time\n"
        );
        assert_eq!(
            out("write -P 1 -s f 0 1"),
            "Only one of -z, -P, and -s can be specified at the same time\n"
        );
        assert_eq!(
            out("write -z -P 1 -u 0 x"),
            "Only one of -z, -P, and -s can be specified at the same time\n"
        );
        assert_eq!(
            out("w -u -z -P 1 -s f -n 0 1"),
            "Only one of -z, -P, and -s can be specified at the same time\n"
        );
        assert_eq!(out("write -u 0 512"), "-u requires -z to be specified\n");
        assert_eq!(out("write -u -P 1 0 1"), "-u requires -z to be specified\n");
        assert_eq!(out("write -u -b 0 x"), "-u requires -z to be specified\n");
        assert_eq!(out("write -n 0 512"), "-n requires -z to be specified\n");
        assert_eq!(out("write -u -n 0 1"), "-n requires -z to be specified\n");
        assert_eq!(out("write -n 0 2G"), "-n requires -z to be specified\n");
        assert_eq!(
            out("w -P 1 -s f -n 0 1"),
            "-n requires -z to be specified\n"
        );
        assert_eq!(
            out("write -z -b -P 1 0 1"),
            "-b and -z cannot be specified at the same time\n"
        );
        assert_eq!(
            out("write -z -u -n -b 0 1"),
            "-b and -z cannot be specified at the same time\n"
        );
        assert_eq!(out("aio_write -u 0 1"), "-u requires -z to be specified\n");
        assert_eq!(
            out("aio_write -u x 1 2"),
            "-u requires -z to be specified\n"
        );
        assert_eq!(
            out("aio_write -z 0 1 1"),
            "-z supports only a single length parameter\n"
        );
        assert_eq!(
            out("aio_write -u -z 0 1 2"),
            "-z supports only a single length parameter\n"
        );
        for p in [
            "0x1ff",
            "256",
            "abc",
            "1k",
            "0x",
            "08",
            "999999999999",
            "300",
        ] {
            assert_eq!(
                out(&format!("read -P {p} 0 1")),
                format!("{p} is not a valid pattern byte\n")
            );
        }
        assert_eq!(out("read -Pv 0 1"), "v is not a valid pattern byte\n");
        assert_eq!(out("write -P 300 0 x"), "300 is not a valid pattern byte\n");
        assert_eq!(
            out("write -P 0x -s x 0 1"),
            "0x is not a valid pattern byte\n"
        );
        assert_eq!(out("readv -P 300 0 1"), "300 is not a valid pattern byte\n");
        assert_eq!(
            out("aio_read -P 300 -i 0 1"),
            "300 is not a valid pattern byte\n"
        );
        assert_eq!(out("read -s x -P 0 0 1"), format!("{NN}x\n"));
        assert_eq!(out("read -s x 0 1"), format!("{NN}x\n"));
        assert_eq!(out("read -l 0x -P 0 0 1"), format!("{NN}0x\n"));
        assert_eq!(out("read -P 0 -s -- 0 1"), format!("{NN}--\n"));
        for line in [
            "read -P 0xcd -s 1000 -l 100 0 1024",
            "read -P 0 -l 2G 0 1",
            "read -P 0 -l 2 -s 0 0 1",
            "read -P 0 -l 2 0 1",
            "read -P 0 -s 1 0 0",
            "read -P 1 -s 5 0 1",
            "read -b -P 1 -s 5 1 1",
        ] {
            assert_eq!(
                out(line),
                "pattern verification range exceeds end of read data\n",
                "{line}"
            );
        }
        assert_eq!(
            out("read -P 1 -s 5 0 2G"),
            "length cannot exceed 2147483136, given 2G\n"
        );
        assert_eq!(out("read -P 1 -s 5 0 x"), format!("{NN}x\n"));
    }

    #[test]
    fn alignment() {
        assert_eq!(
            out("read -b 1 512"),
            "1 is not a sector-aligned value for 'offset'\n"
        );
        assert_eq!(
            out("read -b 512 1"),
            "1 is not a sector-aligned value for 'count'\n"
        );
        assert_eq!(
            out("read -b 1 1"),
            "1 is not a sector-aligned value for 'offset'\n"
        );
        assert_eq!(
            out("read -b -C 0 1"),
            "1 is not a sector-aligned value for 'count'\n"
        );
        assert_eq!(
            out("read -b 0 2G"),
            "length cannot exceed 2147483136, given 2G\n"
        );
        assert_eq!(
            out("write -c 1 512"),
            "1 is not a sector-aligned value for 'offset'\n"
        );
        assert_eq!(
            out("write -c 0x1 512"),
            "1 is not a sector-aligned value for 'offset'\n"
        );
        assert_eq!(
            out("write -b 1 0x1"),
            "1 is not a sector-aligned value for 'offset'\n"
        );
        assert_eq!(
            out("write -c -z 0 1"),
            "1 is not a sector-aligned value for 'count'\n"
        );
    }

    #[test]
    fn open_reopen_truncate_errors() {
        assert_eq!(
            errout("open -t bogus a"),
            "qemu-io: Invalid cache option: bogus\n"
        );
        assert_eq!(
            errout("open -t None a"),
            "qemu-io: Invalid cache option: None\n"
        );
        assert_eq!(
            errout("open -d bogus a"),
            "qemu-io: Invalid discard option: bogus\n"
        );
        assert_eq!(
            errout("open -d Unmap a"),
            "qemu-io: Invalid discard option: Unmap\n"
        );
        assert_eq!(
            errout("open -i bogus a"),
            "qemu-io: Invalid aio option: bogus\n"
        );
        assert_eq!(
            errout("open -i IO_URING a"),
            "qemu-io: Invalid aio option: IO_URING\n"
        );
        assert_eq!(
            errout("open -t bogus -d bogus a"),
            "qemu-io: Invalid cache option: bogus\n"
        );
        assert_eq!(
            errout("open -d bogus -t bogus a"),
            "qemu-io: Invalid discard option: bogus\n"
        );
        assert_eq!(
            errout("open -t bogus -x a"),
            "qemu-io: Invalid cache option: bogus\n"
        );
        assert_eq!(
            err("open -x -t bogus a", true).1,
            "open: invalid option -- 'x'\n"
        );
        assert_eq!(
            errout("reopen -r -w"),
            "qemu-io: Only one -r/-w option may be given\n"
        );
        assert_eq!(
            errout("reopen -r -r"),
            "qemu-io: Only one -r/-w option may be given\n"
        );
        assert_eq!(
            errout("reopen -c bogus -r -w"),
            "qemu-io: Invalid cache option: bogus\n"
        );
        assert_eq!(
            errout("reopen -r -w -c bogus"),
            "qemu-io: Only one -r/-w option may be given\n"
        );
        assert_eq!(
            errout("reopen -c none -c bogus"),
            "qemu-io: Invalid cache option: bogus\n"
        );
        assert_eq!(
            errout("truncate -m bogus 3M"),
            "qemu-io: Invalid preallocation mode 'bogus'\n"
        );
        assert_eq!(
            errout("truncate -m OFF 1M"),
            "qemu-io: Invalid preallocation mode 'OFF'\n"
        );
        assert_eq!(
            errout("truncate -m bogus -x"),
            "qemu-io: Invalid preallocation mode 'bogus'\n"
        );
        assert_eq!(out("truncate x"), format!("{NN}x\n"));
        assert_eq!(out("truncate -m full"), format!("{NN}-m\n"));
        assert_eq!(out("truncate -m full x"), format!("{NN}-m\n"));
        assert_eq!(out("truncate x -m full"), format!("{NN}-m\n"));
        assert_eq!(out("truncate -mfull"), format!("{NN}-mfull\n"));
        assert_eq!(out("truncate -- x"), format!("{NN}--\n"));
        assert_eq!(
            out("truncate -- 8E"),
            "Parsing error: argument too large -- --\n"
        );
    }

    #[test]
    fn parsed_values() {
        assert_eq!(
            ok("read -P 0xab -s 0 -l 512 0 1024"),
            Command::Read(ReadCmd {
                offset: 0,
                len: 1024,
                check: Some(PatternCheck {
                    pattern: 0xab,
                    start: 0,
                    len: 512
                }),
                vmstate: false,
                verbose: false,
                register_buf: false,
                report: Reporting::default(),
            })
        );
        let Command::Read(r) = ok("r -qv -P0x10 -s 16 4096 256") else {
            panic!()
        };
        assert_eq!(
            r.check,
            Some(PatternCheck {
                pattern: 0x10,
                start: 16,
                len: 240
            })
        );
        assert!(r.verbose && r.report.quiet && !r.report.csv);
        let Command::Read(r) = ok("read 0 1 -C -p -r") else {
            panic!()
        };
        assert!(r.report.csv && r.register_buf);
        let Command::Read(r) = ok("read -P 0 -s 1 0 1") else {
            panic!()
        };
        assert_eq!(
            r.check,
            Some(PatternCheck {
                pattern: 0,
                start: 1,
                len: 0
            })
        );
        let Command::Read(r) = ok("read 0 -- 1") else {
            panic!()
        };
        assert_eq!((r.offset, r.len), (0, 1));
        let Command::Read(r) = ok("read -- 0 1") else {
            panic!()
        };
        assert_eq!((r.offset, r.len), (0, 1));
        let Command::Read(r) = ok("read 0x100000010 20") else {
            panic!()
        };
        assert_eq!((r.offset, r.len), (0x100000010, 20));
        let Command::Read(r) = ok("read 0 2147483136") else {
            panic!()
        };
        assert_eq!(r.len, MAX_REQUEST_LEN);
        let Command::Read(r) = ok("read 010 8") else {
            panic!()
        };
        assert_eq!(r.offset, 10);

        let Command::Write(w) = ok("write 0 512") else {
            panic!()
        };
        assert_eq!(w.data, WriteData::Pattern(0xcd));
        let Command::Write(w) = ok("w -z -u 4k 4k") else {
            panic!()
        };
        assert_eq!(
            w.data,
            WriteData::Zeroes {
                unmap: true,
                no_fallback: false
            }
        );
        assert_eq!((w.offset, w.len), (4096, 4096));
        let Command::Write(w) = ok("write -s two.bin 0 16") else {
            panic!()
        };
        assert_eq!(w.data, WriteData::SourceFile("two.bin".into()));
        let Command::Write(w) = ok("write -z -n 0 3G") else {
            panic!()
        };
        assert_eq!(w.len, 3 << 30);
        let Command::Write(w) = ok("write -f -c -b -q 0 64k") else {
            panic!()
        };
        assert!(w.fua && w.compressed && w.vmstate && w.report.quiet);
        let Command::Write(w) = ok("write -p 0 0") else {
            panic!()
        };
        assert_eq!(w.len, 0);

        let Command::Writev(v) = ok("writev -P 0x33 512 1k 512 2k") else {
            panic!()
        };
        assert_eq!(
            (v.offset, v.lens.clone(), v.total_len()),
            (512, vec![1024, 512, 2048], 3584)
        );
        assert_eq!(v.data, WriteData::Pattern(0x33));
        let Command::Writev(v) = ok("writev 0 0 0") else {
            panic!()
        };
        assert_eq!(v.total_len(), 0);
        let Command::Readv(v) = ok("readv -v 512 8 8") else {
            panic!()
        };
        assert!(v.verbose);
        assert_eq!(v.total_len(), 16);
        let Command::AioRead(v) = ok("aio_read -P 0x44 -v 0 16") else {
            panic!()
        };
        assert_eq!(v.pattern, Some(0x44));
        let Command::AioWrite(v) = ok("aio_write -z -u -P 5 0 1") else {
            panic!()
        };
        assert_eq!(
            v.data,
            WriteData::Zeroes {
                unmap: true,
                no_fallback: false
            }
        );
        assert_eq!(ok("aio_read -i 0 1"), Command::AioInvalid { write: false });
        assert_eq!(
            ok("aio_read -i -P 300 0 1"),
            Command::AioInvalid { write: false }
        );
        assert_eq!(ok("aio_write -i 0 x"), Command::AioInvalid { write: true });
        assert_eq!(ok("aio_write -i 0"), Command::AioInvalid { write: true });
        assert_eq!(
            ok("aio_write -u -i 0 1"),
            Command::AioInvalid { write: true }
        );

        assert_eq!(
            ok("discard 0 64k"),
            Command::Discard(DiscardCmd {
                offset: 0,
                len: 65536,
                report: Reporting::default()
            })
        );
        assert_eq!(
            ok("alloc 0"),
            Command::Alloc {
                offset: 0,
                count: 512
            }
        );
        assert_eq!(
            ok("a 65535 2"),
            Command::Alloc {
                offset: 65535,
                count: 2
            }
        );
        assert_eq!(
            ok("alloc 0x10 3G"),
            Command::Alloc {
                offset: 16,
                count: 3 << 30
            }
        );
        assert_eq!(
            ok("truncate 1M 2M"),
            Command::Truncate {
                size: 1 << 20,
                prealloc: PreallocMode::Off
            }
        );
        assert_eq!(
            ok("truncate 1M -m full"),
            Command::Truncate {
                size: 1 << 20,
                prealloc: PreallocMode::Full
            }
        );
        assert_eq!(
            ok("truncate -mfull 7M"),
            Command::Truncate {
                size: 7 << 20,
                prealloc: PreallocMode::Full
            }
        );
        assert_eq!(
            ok("t -m metadata 3M"),
            Command::Truncate {
                size: 3 << 20,
                prealloc: PreallocMode::Metadata
            }
        );
        assert_eq!(
            ok("truncate -- 2M"),
            Command::Truncate {
                size: 2 << 20,
                prealloc: PreallocMode::Off
            }
        );
        assert_eq!(
            ok("truncate 8M --"),
            Command::Truncate {
                size: 8 << 20,
                prealloc: PreallocMode::Off
            }
        );
        assert_eq!(
            ok("truncate 5M x"),
            Command::Truncate {
                size: 5 << 20,
                prealloc: PreallocMode::Off
            }
        );
        assert_eq!(
            ok("truncate 1000"),
            Command::Truncate {
                size: 1000,
                prealloc: PreallocMode::Off
            }
        );

        let Command::Open(o) =
            ok("open -r -s -C -n -k -U -t none -d unmap -i threads -o driver=raw raw.img")
        else {
            panic!()
        };
        assert!(
            o.read_only
                && o.snapshot
                && o.copy_on_read
                && o.nocache
                && o.native_aio
                && o.force_share
        );
        assert_eq!(
            (o.cache, o.discard, o.aio),
            (
                Some(CacheMode::None),
                Some(DiscardMode::Unmap),
                Some(AioMode::Threads)
            )
        );
        assert_eq!(o.options, vec!["driver=raw".to_string()]);
        assert_eq!(o.path.as_deref(), Some("raw.img"));
        let Command::Open(o) = ok("o -o driver=raw -o file.filename=raw.img") else {
            panic!()
        };
        assert_eq!(o.options.len(), 2);
        assert_eq!(o.path, None);
        let Command::Open(o) = ok("open -t off -d off -o driver=raw raw.img") else {
            panic!()
        };
        assert_eq!(
            (o.cache, o.discard),
            (Some(CacheMode::None), Some(DiscardMode::Ignore))
        );
        assert_eq!(
            ok("reopen -r"),
            Command::Reopen(ReopenCmd {
                read_only: Some(true),
                cache: None,
                options: vec![]
            })
        );
        assert_eq!(
            ok("reopen -w -c off -o a=1 -o b=2"),
            Command::Reopen(ReopenCmd {
                read_only: Some(false),
                cache: Some(CacheMode::None),
                options: vec!["a=1".into(), "b=2".into()]
            })
        );
        assert_eq!(ok("reopen"), Command::Reopen(ReopenCmd::default()));

        assert_eq!(ok("help"), Command::Help { topic: None });
        assert_eq!(
            ok("? write"),
            Command::Help {
                topic: Some("write".into())
            }
        );
        assert_eq!(ok("sleep 10"), Command::Sleep { ms: 10 });
        assert_eq!(ok("sleep 01000"), Command::Sleep { ms: 512 });
        assert_eq!(ok("sigraise 0x0"), Command::Sigraise { signal: 0 });
        assert_eq!(ok("sigraise 15"), Command::Sigraise { signal: 15 });
        assert_eq!(
            ok("break foo bar"),
            Command::Break {
                event: "foo".into(),
                tag: "bar".into()
            }
        );
        assert_eq!(ok("  length  "), Command::Length);
        assert_eq!(ok("l"), Command::Length);
        assert_eq!(ok("i"), Command::Info);
        assert_eq!(ok("f"), Command::Flush);
        assert_eq!(ok("c"), Command::Close);
        assert_eq!(ok("map"), Command::Map);
        assert_eq!(ok("aio_flush"), Command::AioFlush);
        assert_eq!(ok("abort"), Command::Abort);
        assert_eq!(ok("length\n"), Command::Length);
        assert_eq!(
            ok("zrp 0 x"),
            Command::Zone {
                name: "zone_report",
                args: vec!["0".into(), "x".into()]
            }
        );
    }
}
