//! `qemu-img compare`: whether two images read the same, walking both with block status (zero
//! extents on both sides are not read) and reading the rest in chunks of at most 2 MiB. Exit
//! codes as qemu-img: 0 identical, 1 different, 2 error (usage errors are 1).

use std::io::Write;
use std::sync::Arc;

use blockd_aio::IoBuf;
use blockd_block::{BlockBackend, Node, Perm};

use crate::getopt::{self, LongOpt, lo};
use crate::image::{self, Cache, OpenRequest};
use crate::progress::Progress;
use crate::status::{is_zero, status_above};
use crate::{CmdResult, Failure};

const CHUNK: u64 = 2 << 20;
const SECTOR: usize = 512;

const OPT_OBJECT: u32 = 256;
const OPT_IMAGE_OPTS: u32 = 257;

const LONG: &[LongOpt] = &[
    lo("help", false, b'h' as u32),
    lo("quiet", false, b'q' as u32),
    lo("progress", false, b'p' as u32),
    lo("a-format", true, b'f' as u32),
    lo("b-format", true, b'F' as u32),
    lo("image-opts", false, OPT_IMAGE_OPTS),
    lo("strict", false, b's' as u32),
    lo("cache", true, b'T' as u32),
    lo("force-share", false, b'U' as u32),
    lo("object", true, OPT_OBJECT),
];

/// The outcome that is not an error.
enum Verdict {
    Identical,
    Different,
}

/// An error of compare: exit code 2 (qemu-img's), unlike usage errors.
struct Error(String);

pub fn run(argv: &[String]) -> CmdResult {
    let p = getopt::parse(
        argv,
        ":hf:F:T:pqsU",
        LONG,
        &format!("{} compare", crate::prog()),
    )
    .map_err(|e| Failure::getopt(e, "compare"))?;
    let mut fmt1: Option<String> = None;
    let mut fmt2: Option<String> = None;
    let mut cache = "writeback".to_string();
    let mut progress = false;
    let mut quiet = false;
    let mut strict = false;
    let mut force_share = false;
    let mut image_opts = false;
    for (code, arg) in p.opts {
        let arg = arg.unwrap_or_default();
        match code {
            OPT_IMAGE_OPTS => image_opts = true,
            OPT_OBJECT => exit2("--object is not supported by blockd-img yet"),
            _ => match char::from_u32(code).unwrap_or('\0') {
                'h' => {
                    print!("{}", crate::help::COMPARE);
                    return Ok(());
                }
                'f' => fmt1 = Some(arg),
                'F' => fmt2 = Some(arg),
                'T' => cache = arg,
                'p' => progress = true,
                'q' => quiet = true,
                's' => strict = true,
                'U' => force_share = true,
                _ => {}
            },
        }
    }
    if quiet {
        progress = false;
    }
    let prog = Progress::new(progress, 2.0);
    // qemu-img ends the progress line however compare ends (also on errors after this point).
    let r = compare(
        &p.args,
        &mut Opts {
            fmt1,
            fmt2,
            cache,
            quiet,
            strict,
            force_share,
            image_opts,
            prog: &prog,
        },
    );
    if !matches!(r, Err(Stage::Usage(_))) {
        prog.end_line();
    }
    match r {
        Ok(Verdict::Identical) => Ok(()),
        Ok(Verdict::Different) => std::process::exit(1),
        Err(Stage::Usage(f)) => Err(f),
        Err(Stage::Failed(Error(msg))) => exit2(msg),
    }
}

/// An error with exit code 2.
fn exit2(msg: impl Into<String>) -> ! {
    let msg = msg.into();
    let _ = std::io::stdout().flush();
    eprintln!("qemu-img: {msg}");
    std::process::exit(2);
}

enum Stage {
    Usage(Failure),
    Failed(Error),
}

struct Opts<'a> {
    fmt1: Option<String>,
    fmt2: Option<String>,
    cache: String,
    quiet: bool,
    strict: bool,
    force_share: bool,
    image_opts: bool,
    prog: &'a Progress,
}

fn compare(args: &[String], o: &mut Opts) -> Result<Verdict, Stage> {
    if args.len() != 2 {
        return Err(Stage::Usage(Failure::usage(
            "Expecting two image file names",
            "compare",
        )));
    }
    let fail = |m: String| Stage::Failed(Error(m));
    if o.image_opts && (o.fmt1.is_some() || o.fmt2.is_some()) {
        return Err(fail(
            "--image-opts and --format are mutually exclusive".into(),
        ));
    }
    let cache = Cache::parse(&o.cache)
        .ok_or_else(|| fail(format!("Invalid source cache option: {}", o.cache)))?;
    let open = |name: &str, fmt: Option<&str>| -> Result<(image::Opened, BlockBackend), Stage> {
        let req = OpenRequest {
            name,
            image_opts: o.image_opts,
            format: fmt,
            cache,
            aio: None,
            read_only: true,
            force_share: o.force_share,
            warn_probe: false,
        };
        let opened = image::open(&req).map_err(fail)?;
        let shared = if o.force_share {
            Perm::ALL
        } else {
            Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED
        };
        let blk = BlockBackend::new(
            &opened._graph,
            "",
            &opened.node,
            Perm::CONSISTENT_READ,
            shared,
        )
        .map_err(|e| fail(format!("Could not open '{name}': {e}")))?;
        Ok((opened, blk))
    };
    let (a, blk_a) = open(&args[0], o.fmt1.as_deref())?;
    let (b, blk_b) = open(&args[1], o.fmt2.as_deref())?;
    let walk = Walk {
        a: Side {
            node: a.node.clone(),
            blk: blk_a,
            name: args[0].clone(),
        },
        b: Side {
            node: b.node.clone(),
            blk: blk_b,
            name: args[1].clone(),
        },
        quiet: o.quiet,
        strict: o.strict,
        prog: o.prog,
    };
    o.prog.start();
    let r = blockd_aio::block_on(walk.run())
        .map_err(|e| fail(format!("cannot run the event loop: {}", e.context)))?;
    r.map_err(|Error(m)| fail(m))
}

struct Side {
    node: Arc<Node>,
    blk: BlockBackend,
    name: String,
}

struct Walk<'a> {
    a: Side,
    b: Side,
    quiet: bool,
    strict: bool,
    prog: &'a Progress,
}

/// Index of the first 512-byte sector where `x` and `y` differ.
fn first_diff(x: &[u8], y: &[u8]) -> Option<usize> {
    x.chunks(SECTOR)
        .zip(y.chunks(SECTOR))
        .position(|(p, q)| p != q)
        .map(|i| i * SECTOR)
}

/// Index of the first 512-byte sector of `x` that is not all zeroes.
fn first_nonzero(x: &[u8]) -> Option<usize> {
    x.chunks(SECTOR)
        .position(|p| !is_zero(p))
        .map(|i| i * SECTOR)
}

impl Walk<'_> {
    fn say(&self, line: &str) {
        if !self.quiet {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    }

    fn mismatch(&self, off: u64) -> Verdict {
        self.say(&format!("Content mismatch at offset {off}!"));
        Verdict::Different
    }

    async fn status(side: &Side, off: u64, end: u64) -> Result<crate::status::Extent, Error> {
        status_above(&side.node, off, end - off, u32::MAX)
            .await
            .map_err(|e| {
                Error(format!(
                    "Sector allocation test failed for {}: {}",
                    side.name,
                    blockd_block::strerror(&e)
                ))
            })
    }

    async fn read(side: &Side, off: u64, buf: IoBuf) -> Result<IoBuf, Error> {
        let (r, buf) = side.blk.read(off, buf).await;
        r.map_err(|e| {
            Error(format!(
                "Error while reading offset {off} of {}: {}",
                side.name,
                blockd_block::strerror(&e)
            ))
        })?;
        Ok(buf)
    }

    fn step(&self, n: u64, total: u64) {
        self.prog.add((n as f32 / total as f32) * 100.0, 100);
    }

    async fn run(&self) -> Result<Verdict, Error> {
        let len_a = self.a.node.length();
        let len_b = self.b.node.length();
        let common = len_a.min(len_b);
        let total = len_a.max(len_b);
        if self.strict && len_a != len_b {
            self.say("Strict mode: Image size mismatch!");
            return Ok(Verdict::Different);
        }
        let mut buf_a = Some(IoBuf::new(CHUNK as usize, 4096));
        let mut buf_b = Some(IoBuf::new(CHUNK as usize, 4096));
        let mut off = 0u64;
        while off < common {
            let sa = Self::status(&self.a, off, common).await?;
            let sb = Self::status(&self.b, off, common).await?;
            // Strict mode compares the status flags, including whether the extent runs to the
            // end of the image (as qemu-img's EOF flag does), not the extent lengths.
            let eof_a = off + sa.len >= len_a;
            let eof_b = off + sb.len >= len_b;
            if self.strict
                && (sa.data != sb.data
                    || sa.zero != sb.zero
                    || sa.present != sb.present
                    || eof_a != eof_b)
            {
                self.say(&format!("Strict mode: Offset {off} block status mismatch!"));
                return Ok(Verdict::Different);
            }
            let mut n = sa.len.min(sb.len);
            if !(sa.zero && sb.zero) {
                n = n.min(CHUNK);
                let mut x = buf_a.take().expect("buffer");
                let mut y = buf_b.take().expect("buffer");
                x.set_len(n as usize);
                y.set_len(n as usize);
                let x = Self::read(&self.a, off, x).await?;
                let y = Self::read(&self.b, off, y).await?;
                let diff = first_diff(x.as_slice(), y.as_slice());
                buf_a = Some(x);
                buf_b = Some(y);
                if let Some(d) = diff {
                    return Ok(self.mismatch(off + d as u64));
                }
            }
            off += n;
            self.step(n, total);
        }
        if len_a != len_b {
            self.say("Warning: Image size mismatch!");
            let longer = if len_a > len_b { &self.a } else { &self.b };
            let mut buf = buf_a.take().expect("buffer");
            while off < total {
                let s = Self::status(longer, off, total).await?;
                let mut n = s.len;
                if !s.zero {
                    n = n.min(CHUNK);
                    buf.set_len(n as usize);
                    buf = Self::read(longer, off, buf).await?;
                    if let Some(d) = first_nonzero(buf.as_slice()) {
                        return Ok(self.mismatch(off + d as u64));
                    }
                }
                off += n;
                self.step(n, total);
            }
        }
        self.say("Images are identical.");
        Ok(Verdict::Identical)
    }
}
