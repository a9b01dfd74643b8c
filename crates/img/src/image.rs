//! Opening an image the way qemu-img does: a file name with an optional format (probed when
//! absent), or a complete specification with `--image-opts`; cache mode and AIO engine from
//! `-t` / `-i`; the error texts of qemu-img ("Could not open 'F': ...").

use std::io::Read;
use std::sync::Arc;

use blockd_block::{Graph, Node, OpenFlags};
use serde_json::{Map, Value};

/// qemu's cache modes (`-t`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cache {
    pub direct: bool,
    pub no_flush: bool,
    /// writethrough: every write is made durable (FUA).
    pub writethrough: bool,
}

impl Cache {
    pub const WRITEBACK: Cache = Cache {
        direct: false,
        no_flush: false,
        writethrough: false,
    };

    pub fn parse(s: &str) -> Option<Cache> {
        let (direct, no_flush, writethrough) = match s {
            "writeback" => (false, false, false),
            "none" | "off" => (true, false, false),
            "writethrough" => (false, false, true),
            "directsync" => (true, false, true),
            "unsafe" => (false, true, false),
            _ => return None,
        };
        Some(Cache {
            direct,
            no_flush,
            writethrough,
        })
    }
}

pub struct OpenRequest<'a> {
    /// The file name, or the specification with `--image-opts`.
    pub name: &'a str,
    pub image_opts: bool,
    pub format: Option<&'a str>,
    pub cache: Cache,
    pub aio: Option<&'a str>,
    pub read_only: bool,
    pub force_share: bool,
    /// Print the probing warning when the format was guessed (qemu-img bench -w does).
    pub warn_probe: bool,
}

/// Formats QEMU has that blockd does not (yet): opening them says so instead of "Unknown driver".
const QEMU_ONLY_FORMATS: &[&str] = &[
    "qcow2",
    "qcow",
    "qed",
    "vmdk",
    "vdi",
    "vpc",
    "vhdx",
    "luks",
    "parallels",
    "bochs",
    "cloop",
    "dmg",
    "vvfat",
    "nbd",
    "blkdebug",
    "throttle",
    "copy-on-read",
    "quorum",
];

/// The first 2 KiB of a file (fewer when it is shorter): what format probes look at.
fn read_header(name: &str) -> std::io::Result<Vec<u8>> {
    let mut f = std::fs::File::open(name)?;
    let mut buf = vec![0u8; 2048];
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(n);
    Ok(buf)
}

/// Formats QEMU recognises by their magic that blockd has no driver for: probing them as raw
/// would silently show the container bytes, so they are refused by name instead.
fn foreign_format(header: &[u8]) -> Option<&'static str> {
    let be32 = |o: usize| {
        header
            .get(o..o + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    };
    if header.starts_with(b"QFI\xfb") {
        return Some(if be32(4) == Some(1) { "qcow" } else { "qcow2" });
    }
    const MAGICS: &[(&[u8], &str)] = &[
        (b"QED\0", "qed"),
        (b"KDMV", "vmdk"),
        (b"COWD", "vmdk"),
        (b"conectix", "vpc"),
        (b"vhdxfile", "vhdx"),
        (b"LUKS\xba\xbe", "luks"),
        (b"WithoutFreeSpace", "parallels"),
        (b"WithouFreSpacExt", "parallels"),
    ];
    if let Some((_, f)) = MAGICS.iter().find(|(m, _)| header.starts_with(m)) {
        return Some(f);
    }
    // VDI: the signature sits after the 64-byte text banner.
    if header.get(64..68) == Some(&[0x7f, 0x10, 0xda, 0xbe][..]) {
        return Some("vdi");
    }
    None
}

/// Put `aio` into every file-protocol node of the options.
fn set_aio(m: &mut Map<String, Value>, aio: &str) {
    let is_file = matches!(
        m.get("driver").and_then(Value::as_str),
        Some("file" | "host_device")
    );
    if is_file && !m.contains_key("aio") {
        m.insert("aio".into(), Value::String(aio.into()));
    }
    if let Some(Value::Object(f)) = m.get_mut("file") {
        set_aio(f, aio);
    }
}

/// What `info` needs to know about how the image was opened.
pub struct Opened {
    /// Keeps the graph (the registry of the nodes) alive as long as the image is used.
    pub _graph: Graph,
    pub node: Arc<Node>,
    /// The options the node was opened with (after defaults were filled in).
    pub options: Map<String, Value>,
}

pub fn open(req: &OpenRequest) -> Result<Opened, String> {
    open_ext(req, false)
}

/// [`open`] with `discard=unmap` (qemu-img opens convert and dd targets so: zero runs become
/// holes).
pub fn open_ext(req: &OpenRequest, discard_unmap: bool) -> Result<Opened, String> {
    let name = req.name;
    let wrap = |e: String| format!("Could not open '{name}': {e}");
    let mut graph = blockd_drivers::graph();
    let mut options = if req.image_opts {
        if !name.contains('=') && !name.trim_start().starts_with('{') {
            return Err(wrap(format!(
                "Cannot find device='{name}' nor node-name='{name}'"
            )));
        }
        let mut m = blockd_block::options::parse(name).map_err(wrap)?;
        // A `file` child given without a driver is a file (QEMU probes the protocol).
        if let Some(Value::Object(f)) = m.get_mut("file")
            && !f.contains_key("driver")
        {
            f.insert("driver".into(), Value::String("file".into()));
        }
        m
    } else {
        let fmt = match req.format {
            Some(f) => f.to_string(),
            None => {
                let header = read_header(name).map_err(|e| {
                    wrap(format!(
                        "Could not open '{name}': {}",
                        blockd_block::strerror(&e)
                    ))
                })?;
                match graph.probe_format(&header, name) {
                    "raw" => {
                        if let Some(f) = foreign_format(&header) {
                            return Err(wrap(format!(
                                "Block format '{f}' is not supported by blockd-img yet"
                            )));
                        }
                        if req.warn_probe {
                            eprint!(
                                "WARNING: Image format was not specified for '{name}' and probing guessed raw.\n         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n         Specify the 'raw' format explicitly to remove the restrictions.\n"
                            );
                        }
                        "raw".to_string()
                    }
                    f => f.to_string(),
                }
            }
        };
        let file = || {
            let mut f = Map::new();
            f.insert("driver".into(), Value::String("file".into()));
            f.insert("filename".into(), Value::String(name.into()));
            f
        };
        match fmt.as_str() {
            "raw" => {
                let mut m = Map::new();
                m.insert("driver".into(), Value::String("raw".into()));
                m.insert("file".into(), Value::Object(file()));
                m
            }
            "file" => file(),
            f if graph.driver_names().contains(&f) => {
                let mut m = Map::new();
                m.insert("driver".into(), Value::String(f.into()));
                m.insert("file".into(), Value::Object(file()));
                m
            }
            "qcow2" => {
                // No qcow2 driver registered: still tell a non-qcow2 file apart, as QEMU does.
                return Err(wrap(match read_header(name) {
                    Err(e) => format!("Could not open '{name}': {}", blockd_block::strerror(&e)),
                    Ok(h) if !h.starts_with(b"QFI\xfb") => "Image is not in qcow2 format".into(),
                    Ok(_) => "Block format 'qcow2' is not supported by blockd-img yet".into(),
                }));
            }
            f if QEMU_ONLY_FORMATS.contains(&f) => {
                return Err(wrap(format!(
                    "Block format '{f}' is not supported by blockd-img yet"
                )));
            }
            f => return Err(wrap(format!("Unknown driver '{f}'"))),
        }
    };
    if let Some(aio) = req.aio {
        set_aio(&mut options, aio);
    }
    if req.force_share && !req.read_only {
        return Err(wrap(
            "force-share=on can only be used with read-only images".into(),
        ));
    }
    let flags = OpenFlags {
        read_only: req.read_only,
        cache_direct: req.cache.direct,
        no_flush: req.cache.no_flush,
        force_share: req.force_share,
        discard_unmap,
    };
    let node = graph.open_with(options.clone(), flags).map_err(wrap)?;
    Ok(Opened {
        _graph: graph,
        node,
        options,
    })
}
