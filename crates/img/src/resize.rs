//! `qemu-img resize`: an absolute or relative (`+`/`-`) new size, `--shrink` required to make an
//! image smaller, `--preallocation` of the new area for raw images, and qemu-img's messages.

use std::os::unix::fs::FileExt;

use blockd_block::{BlockBackend, Perm};

use crate::getopt::{self, LongOpt, lo};
use crate::image::{self, Cache, OpenRequest};
use crate::{CmdResult, Failure};

const OPT_OBJECT: u32 = 256;
const OPT_IMAGE_OPTS: u32 = 257;
const OPT_PREALLOC: u32 = 258;
const OPT_SHRINK: u32 = 259;

const LONG: &[LongOpt] = &[
    lo("help", false, b'h' as u32),
    lo("object", true, OPT_OBJECT),
    lo("image-opts", false, OPT_IMAGE_OPTS),
    lo("preallocation", true, OPT_PREALLOC),
    lo("shrink", false, OPT_SHRINK),
    lo("format", true, b'f' as u32),
    lo("quiet", false, b'q' as u32),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Prealloc {
    Off,
    Metadata,
    Falloc,
    Full,
}

pub fn run(argv: &[String]) -> CmdResult {
    // The size is the last argument, taken before option parsing so that "-1M" is a size.
    if argv.len() < 2 {
        let p = getopt::parse(argv, ":f:hq", LONG, &format!("{} resize", crate::prog()))
            .map_err(|e| Failure::getopt(e, "resize"))?;
        if p.opts.iter().any(|(c, _)| *c == b'h' as u32) {
            print!("{}", crate::help::RESIZE);
            return Ok(());
        }
        return Err(Failure::usage(
            "Expecting image file name and size",
            "resize",
        ));
    }
    let (size_arg, rest) = argv.split_last().expect("two arguments");
    let p = getopt::parse(rest, ":f:hq", LONG, &format!("{} resize", crate::prog()))
        .map_err(|e| Failure::getopt(e, "resize"))?;
    let mut fmt: Option<String> = None;
    let mut quiet = false;
    let mut image_opts = false;
    let mut shrink = false;
    let mut prealloc = Prealloc::Off;
    for (code, arg) in p.opts {
        let arg = arg.unwrap_or_default();
        match code {
            OPT_OBJECT => return Err(Failure::new("--object is not supported by blockd-img yet")),
            OPT_IMAGE_OPTS => image_opts = true,
            OPT_SHRINK => shrink = true,
            OPT_PREALLOC => {
                prealloc = match arg.as_str() {
                    "off" => Prealloc::Off,
                    "metadata" => Prealloc::Metadata,
                    "falloc" => Prealloc::Falloc,
                    "full" => Prealloc::Full,
                    _ => {
                        return Err(Failure::new(format!("Invalid preallocation mode '{arg}'")));
                    }
                }
            }
            _ => match char::from_u32(code).unwrap_or('\0') {
                'h' => {
                    print!("{}", crate::help::RESIZE);
                    return Ok(());
                }
                'f' => fmt = Some(arg),
                'q' => quiet = true,
                _ => {}
            },
        }
    }
    if p.args.len() > 1 {
        return Err(Failure::usage(
            "Extra argument(s) in command line",
            "resize",
        ));
    }
    if p.args.is_empty() {
        return Err(Failure::usage(
            "Expecting image file name and size",
            "resize",
        ));
    }
    let (sign, digits) = match size_arg.as_bytes().first() {
        Some(b'+') => (1i128, &size_arg[1..]),
        Some(b'-') => (-1i128, &size_arg[1..]),
        _ => (0, size_arg.as_str()),
    };
    let n = blockd_block::options::parse_size(digits).map_err(|_| {
        Failure::new(
            "Parameter 'size' expects a non-negative number below 2^64\n\
             Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
             and exabytes, respectively.",
        )
    })?;
    if image_opts && fmt.is_some() {
        return Err(Failure::new(
            "--image-opts and --format are mutually exclusive",
        ));
    }
    let name = &p.args[0];
    let req = OpenRequest {
        name,
        image_opts,
        format: fmt.as_deref(),
        cache: Cache::WRITEBACK,
        aio: None,
        read_only: false,
        force_share: false,
        warn_probe: true,
    };
    let opened = image::open(&req).map_err(Failure::new)?;
    let blk = BlockBackend::new(
        &opened._graph,
        "",
        &opened.node,
        Perm::CONSISTENT_READ | Perm::WRITE | Perm::RESIZE,
        Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
    )
    .map_err(|e| Failure::new(format!("Could not open '{name}': {e}")))?;
    let current = blk.length();
    // qemu-img keeps sizes in a signed 64-bit integer: 8E and more wrap negative.
    let as_i64 = |v: u64| v as i64 as i128;
    let new = match sign {
        0 => as_i64(n),
        s => current as i128 + s * as_i64(n),
    };
    if new <= 0 || new > i64::MAX as i128 {
        return Err(Failure::new("New image size must be positive"));
    }
    let new = new as u64;
    if prealloc != Prealloc::Off && new < current {
        return Err(Failure::new(
            "Preallocation can only be used for growing images",
        ));
    }
    if new < current && !shrink {
        return Err(Failure::new(
            "Use the --shrink option to perform a shrink operation.\n\
             qemu-img: warning: Shrinking an image will delete all data beyond the shrunken image's end. Before performing such an operation, make sure there is no important data there.",
        ));
    }
    let format = opened.node.driver().format_name();
    let raw_file = if format == "raw" || format == "file" {
        raw_filename(&opened.options)
    } else {
        None
    };
    match prealloc {
        Prealloc::Off => {}
        Prealloc::Metadata if raw_file.is_some() => {
            return Err(Failure::new("Unsupported preallocation mode: metadata"));
        }
        _ if raw_file.is_none() => {
            return Err(Failure::new(format!(
                "Preallocation while resizing a '{format}' image is not supported by blockd-img yet"
            )));
        }
        _ => {}
    }
    let r = blockd_aio::block_on(blk.truncate(new))
        .map_err(|e| Failure::new(format!("cannot run the event loop: {}", e.context)))?;
    r.map_err(|e| Failure::new(blockd_block::strerror(&e)))?;
    if let Some(path) = raw_file
        && new > current
        && prealloc != Prealloc::Off
    {
        preallocate(&path, current, new, prealloc).map_err(Failure::new)?;
    }
    if !quiet {
        println!("Image resized.");
    }
    Ok(())
}

/// The file of a raw (or bare file) image, from the options it was opened with.
fn raw_filename(options: &serde_json::Map<String, serde_json::Value>) -> Option<String> {
    let file = match options.get("file") {
        Some(serde_json::Value::Object(f)) => f,
        Some(_) => return None,
        None => options,
    };
    file.get("filename")
        .and_then(|v| v.as_str())
        .map(str::to_string)
}

/// Allocate the grown area of a raw file: `falloc` reserves it, `full` writes zeroes.
fn preallocate(path: &str, from: u64, to: u64, mode: Prealloc) -> Result<(), String> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| format!("Could not open '{path}': {}", blockd_block::strerror(&e)))?;
    match mode {
        Prealloc::Falloc => {
            use std::os::fd::AsRawFd;
            let fd = f.as_raw_fd();
            let r = blockd_aio::block_on(async move {
                blockd_aio::ops::fallocate(fd, 0, from, to - from).await
            })
            .map_err(|e| e.context.to_string())?;
            r.map_err(|e| {
                format!(
                    "Could not preallocate new data: {}",
                    blockd_block::strerror(&e)
                )
            })
        }
        Prealloc::Full => {
            let chunk = vec![0u8; 1 << 20];
            let mut off = from;
            while off < to {
                let n = (to - off).min(chunk.len() as u64) as usize;
                f.write_all_at(&chunk[..n], off).map_err(|e| {
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
        Prealloc::Off | Prealloc::Metadata => Ok(()),
    }
}
