//! `qemu-img map`: the image's extents with their block status down the backing chain, merged
//! where nothing but the position changes, as qemu-img's human table (data extents with their
//! host offset and file) or JSON lines.

use std::io::Write;
use std::sync::Arc;

use blockd_block::Node;

use crate::getopt::{self, LongOpt, lo};
use crate::image::{self, Cache, OpenRequest};
use crate::num::{self, NumError};
use crate::status::{Extent, status_above};
use crate::{CmdResult, Failure};

const OPT_OUTPUT: u32 = 256;
const OPT_IMAGE_OPTS: u32 = 257;
const OPT_OBJECT: u32 = 258;
const OPT_START: u32 = 259;
const OPT_MAX_LEN: u32 = 260;

const LONG: &[LongOpt] = &[
    lo("help", false, b'h' as u32),
    lo("format", true, b'f' as u32),
    lo("output", true, OPT_OUTPUT),
    lo("object", true, OPT_OBJECT),
    lo("image-opts", false, OPT_IMAGE_OPTS),
    lo("force-share", false, b'U' as u32),
    lo("start-offset", true, OPT_START),
    lo("max-length", true, OPT_MAX_LEN),
];

/// One merged map entry.
struct Entry {
    start: u64,
    length: u64,
    depth: u32,
    present: bool,
    zero: bool,
    data: bool,
    compressed: bool,
    offset: Option<u64>,
    /// The file holding the data (human output).
    layer: Arc<Node>,
}

impl Entry {
    fn from_extent(start: u64, e: Extent) -> Entry {
        // qcow2 reports data without a host offset for compressed clusters.
        let compressed = e.data && e.offset.is_none() && e.layer.driver().format_name() == "qcow2";
        Entry {
            start,
            length: e.len,
            depth: e.depth,
            present: e.present,
            zero: e.zero,
            data: e.data,
            compressed,
            offset: e.offset,
            layer: e.layer,
        }
    }

    /// `next` continues this entry (same status, contiguous in the same file).
    fn absorbs(&self, next: &Entry) -> bool {
        self.depth == next.depth
            && self.present == next.present
            && self.zero == next.zero
            && self.data == next.data
            && self.compressed == next.compressed
            && Arc::ptr_eq(&self.layer, &next.layer)
            && match (self.offset, next.offset) {
                (None, None) => true,
                (Some(a), Some(b)) => a + self.length == b,
                _ => false,
            }
    }

    fn json(&self) -> String {
        let mut s = format!(
            "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
            self.start,
            self.length,
            self.depth,
            self.present,
            self.zero,
            self.data,
            self.compressed
        );
        if let Some(o) = self.offset {
            s += &format!(", \"offset\": {o}");
        }
        s.push('}');
        s
    }
}

fn hex(n: u64) -> String {
    if n == 0 {
        "0".into()
    } else {
        format!("{n:#x}")
    }
}

fn offset_arg(v: &str, what: &str) -> Result<u64, Failure> {
    num::cvtnum(v).map_err(|e| match e {
        NumError::Invalid => Failure::new(format!("Invalid {what} specified: '{v}'.")),
        NumError::Range => Failure::new(format!(
            "Invalid {what} specified. Must be between 0 and 9223372036854775807."
        )),
    })
}

pub fn run(argv: &[String]) -> CmdResult {
    let p = getopt::parse(argv, ":f:s:l:hU", LONG, &format!("{} map", crate::prog()))
        .map_err(|e| Failure::getopt(e, "map"))?;
    let mut fmt: Option<String> = None;
    let mut json = false;
    let mut image_opts = false;
    let mut force_share = false;
    let mut start = 0u64;
    let mut max_len: Option<u64> = None;
    for (code, arg) in p.opts {
        let arg = arg.unwrap_or_default();
        match code {
            OPT_OUTPUT => {
                json = match arg.as_str() {
                    "json" => true,
                    "human" => false,
                    _ => {
                        return Err(Failure::usage(
                            format!("--output expects 'human' or 'json' not '{arg}'"),
                            "map",
                        ));
                    }
                }
            }
            OPT_IMAGE_OPTS => image_opts = true,
            OPT_OBJECT => {
                return Err(Failure::new("--object is not supported by blockd-img yet"));
            }
            OPT_START => start = offset_arg(&arg, "start offset")?,
            OPT_MAX_LEN => max_len = Some(offset_arg(&arg, "max length")?),
            _ => match char::from_u32(code).unwrap_or('\0') {
                'h' => {
                    print!("{}", crate::help::MAP);
                    return Ok(());
                }
                'f' => fmt = Some(arg),
                's' => start = offset_arg(&arg, "start offset")?,
                'l' => max_len = Some(offset_arg(&arg, "max length")?),
                'U' => force_share = true,
                _ => {}
            },
        }
    }
    if p.args.len() != 1 {
        return Err(Failure::usage("Expecting one image file name", "map"));
    }
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
        read_only: true,
        force_share,
        warn_probe: false,
    };
    let opened = image::open(&req).map_err(Failure::new)?;
    let top_file = top_filename(&opened.options).unwrap_or_else(|| name.clone());
    let node = opened.node.clone();
    let names = chain_filenames(&node, &top_file);
    let len = node.length();
    let end = match max_len {
        Some(m) => start.saturating_add(m).min(len),
        None => len,
    };
    let mut out = std::io::stdout().lock();
    if !json {
        let _ = writeln!(
            out,
            "{:<16}{:<16}{:<16}File",
            "Offset", "Length", "Mapped to"
        );
    }
    let mut first = true;
    let mut print = |e: &Entry, out: &mut std::io::StdoutLock| -> Result<(), Failure> {
        if json {
            let _ = write!(out, "{}{}", if first { "[" } else { ",\n" }, e.json());
            first = false;
        } else if e.data {
            let Some(off) = e.offset else {
                return Err(Failure::new(
                    "File contains external, encrypted or compressed clusters.",
                ));
            };
            if e.zero {
                // Data that reads as zeroes (a hole in the image file) is not listed.
                return Ok(());
            }
            // A qcow2 layer with an external data file keeps its data there.
            let data_file = e
                .layer
                .child("data-file")
                .and_then(|d| d.driver().filename());
            let file = data_file.unwrap_or_else(|| {
                names
                    .get(e.depth as usize)
                    .cloned()
                    .unwrap_or_else(|| e.layer.name().to_string())
            });
            let _ = writeln!(
                out,
                "{:<16}{:<16}{:<16}{}",
                hex(e.start),
                hex(e.length),
                hex(off),
                file
            );
        }
        Ok(())
    };
    let r = blockd_aio::block_on(async {
        let mut cur: Option<Entry> = None;
        let mut pos = start;
        while pos < end {
            let e = status_above(&node, pos, (end - pos).min(1 << 30), u32::MAX)
                .await
                .map_err(|e| {
                    Failure::new(format!(
                        "Could not read file metadata: {}",
                        blockd_block::strerror(&e)
                    ))
                })?;
            let next = Entry::from_extent(pos, e);
            pos += next.length;
            match cur.as_mut() {
                Some(c) if c.absorbs(&next) => c.length += next.length,
                _ => {
                    if let Some(c) = cur.replace(next) {
                        print(&c, &mut out)?;
                    }
                }
            }
        }
        // An empty range still gives one (empty) entry, as in qemu-img.
        let last = cur.unwrap_or_else(|| Entry {
            start,
            length: 0,
            depth: 0,
            present: false,
            zero: false,
            data: false,
            compressed: false,
            offset: None,
            layer: node.clone(),
        });
        print(&last, &mut out)?;
        Ok::<(), Failure>(())
    })
    .map_err(|e| Failure::new(format!("cannot run the event loop: {}", e.context)))?;
    if json {
        let _ = writeln!(out, "]");
    }
    let _ = out.flush();
    r
}

/// The file name of the image's data file as qemu-img prints it.
fn top_filename(options: &serde_json::Map<String, serde_json::Value>) -> Option<String> {
    let file = match options.get("file") {
        Some(serde_json::Value::Object(f)) => f,
        _ => options,
    };
    file.get("filename")
        .and_then(|v| v.as_str())
        .map(str::to_string)
}

/// The file names of the layers of the chain, top first, as qemu-img prints them: each
/// backing file name (from its qcow2 header) taken relative to the directory of the image that
/// names it.
pub fn chain_filenames(top: &Arc<Node>, top_file: &str) -> Vec<String> {
    let mut names = vec![top_file.to_string()];
    let mut node = top.clone();
    while let Some(b) = crate::status::backing(&node) {
        let parent = names.last().expect("top").clone();
        let Some(name) = qcow2_backing_name(&parent) else {
            break;
        };
        names.push(combine(&parent, &name));
        node = b;
    }
    names
}

/// The backing file name a qcow2 header records (offset at byte 8, length at byte 16).
fn qcow2_backing_name(path: &str) -> Option<String> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).ok()?;
    let mut h = [0u8; 20];
    f.read_exact_at(&mut h, 0).ok()?;
    if &h[0..4] != b"QFI\xfb" {
        return None;
    }
    let off = u64::from_be_bytes(h[8..16].try_into().ok()?);
    let len = u32::from_be_bytes(h[16..20].try_into().ok()?);
    if off == 0 || len == 0 || len > 1023 {
        return None;
    }
    let mut name = vec![0u8; len as usize];
    f.read_exact_at(&mut name, off).ok()?;
    String::from_utf8(name).ok()
}

/// `name` relative to the directory of `base` (unless absolute).
fn combine(base: &str, name: &str) -> String {
    if name.starts_with('/') {
        return name.to_string();
    }
    match base.rfind('/') {
        Some(i) => format!("{}{name}", &base[..=i]),
        None => name.to_string(),
    }
}
