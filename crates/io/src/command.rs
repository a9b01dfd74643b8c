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
        if no_fallback && !zero {
            return Err(CommandError::stdout("-n requires -z to be specified"));
        }
        if unmap && !zero {
            return Err(CommandError::stdout("-u requires -z to be specified"));
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
    if offset % 512 != 0 {
        return Err(CommandError::stdout(format!(
            "{offset} is not a sector-aligned value for 'offset'"
        )));
    }
    if len % 512 != 0 {
        return Err(CommandError::stdout(format!(
            "{len} is not a sector-aligned value for 'count'"
        )));
    }
    Ok(())
}
