//! `qemu-img create -f raw`: option parsing, the `Formatting ...` line, preallocation
//! (off, falloc, full) and qemu-img's errors.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;

use crate::getopt::{self, LongOpt};
use crate::num::{self, NumError};
use crate::{CmdResult, Failure};

const OPT_OBJECT: u32 = 256;

const LONG: &[LongOpt] = &[
    LongOpt {
        name: "help",
        has_arg: false,
        code: b'h' as u32,
    },
    LongOpt {
        name: "quiet",
        has_arg: false,
        code: b'q' as u32,
    },
    LongOpt {
        name: "format",
        has_arg: true,
        code: b'f' as u32,
    },
    LongOpt {
        name: "options",
        has_arg: true,
        code: b'o' as u32,
    },
    LongOpt {
        name: "backing",
        has_arg: true,
        code: b'b' as u32,
    },
    LongOpt {
        name: "backing-format",
        has_arg: true,
        code: b'F' as u32,
    },
    LongOpt {
        name: "backing-unsafe",
        has_arg: false,
        code: b'u' as u32,
    },
    LongOpt {
        name: "object",
        has_arg: true,
        code: OPT_OBJECT,
    },
];

const RAW_OPTION_HELP: &str = "\
Supported options:
  extent_size_hint=<size> - Extent size hint for the image file, 0 to disable
  nocow=<bool (on/off)>  - Turn off copy-on-write (valid only on btrfs)
  preallocation=<str>    - Preallocation mode (allowed values: off, falloc, full)
  size=<size>            - Virtual disk size
";

const RAW_FORMAT_HELP: &str = "\
Supported raw options:
  size=<size>            - Virtual disk size

The protocol level may support further options.
Specify the target filename to include those options.
";

/// Split an option list (`a=b,c=d`, `,,` escapes a comma). `None` when it is malformed.
fn split_opts(s: &str) -> Option<Vec<(String, String)>> {
    let items = blockd_block::options::split_list(s);
    let mut out = Vec::new();
    for it in items {
        if it.is_empty() {
            return None;
        }
        match it.split_once('=') {
            Some((k, v)) => out.push((k.to_string(), v.to_string())),
            // A bare word is "help" or a boolean set to on.
            None => out.push((
                it.clone(),
                if it == "help" || it == "?" {
                    String::new()
                } else {
                    "on".into()
                },
            )),
        }
    }
    Some(out)
}

fn size_param_error() -> String {
    "Parameter 'size' expects a non-negative number below 2^64\n\
     Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
     and exabytes, respectively."
        .to_string()
}

pub fn run(argv: &[String]) -> CmdResult {
    let p = getopt::parse(
        argv,
        ":F:b:f:ho:qu",
        LONG,
        &format!("{} create", crate::prog()),
    )
    .map_err(|e| Failure::getopt(e, "create"))?;
    let mut fmt = "raw".to_string();
    let mut optstr: Vec<String> = Vec::new();
    let mut quiet = false;
    let mut backing = None;
    let mut backing_fmt: Option<String> = None;
    let mut backing_unsafe = false;
    for (code, arg) in p.opts {
        let arg = arg.unwrap_or_default();
        match char::from_u32(code).unwrap_or('\0') {
            'h' => {
                print!("{}", crate::help::CREATE);
                return Ok(());
            }
            'f' => fmt = arg,
            'o' => optstr.push(arg),
            'q' => quiet = true,
            'b' => backing = Some(arg),
            'F' => backing_fmt = Some(arg),
            'u' => backing_unsafe = true,
            _ if code == OPT_OBJECT => {
                return Err(Failure::new("--object is not supported by blockd-img yet"));
            }
            _ => {}
        }
    }
    let joined = optstr.join(",");
    let opts = if optstr.is_empty() {
        Vec::new()
    } else {
        split_opts(&joined).ok_or_else(|| Failure::new(format!("Invalid option list: {joined}")))?
    };
    let wants_help = opts.iter().any(|(k, _)| k == "help" || k == "?");
    let Some(filename) = p.args.first().cloned() else {
        if wants_help {
            print!("{RAW_FORMAT_HELP}");
            return Ok(());
        }
        return Err(Failure::usage("Expecting image file name", "create"));
    };
    if wants_help {
        print!("{RAW_OPTION_HELP}");
        return Ok(());
    }
    if p.args.len() > 2 {
        return Err(Failure::usage(
            format!("Unexpected argument: {}", p.args[2]),
            "create",
        ));
    }
    let pos_size = match p.args.get(1) {
        None => None,
        Some(s) => Some(num::cvtnum(s).map_err(|e| match e {
            NumError::Invalid => Failure::new(format!("Invalid image size specified: '{s}'.")),
            NumError::Range => Failure::new(
                "Invalid image size specified. Must be between 0 and 9223372036854775807.",
            ),
        })?),
    };
    let ferr = |m: String| Failure::new(format!("{filename}: {m}"));
    if fmt == "qcow2" {
        return create_qcow2(QcowRequest {
            filename: &filename,
            opts: &opts,
            size: pos_size,
            backing: backing.as_deref(),
            backing_fmt: backing_fmt.as_deref(),
            backing_unsafe,
            quiet,
        });
    }
    if fmt != "raw" {
        return Err(ferr(
            if matches!(
                fmt.as_str(),
                "qcow" | "qed" | "vmdk" | "vdi" | "vpc" | "vhdx" | "luks" | "parallels"
            ) {
                format!("blockd-img can only create raw and qcow2 images, not '{fmt}'")
            } else {
                format!("Unknown file format '{fmt}'")
            },
        ));
    }
    // Known options, later values replacing earlier ones.
    let mut size_opt: Option<(u64, String)> = None;
    let mut nocow = None;
    let mut prealloc = None;
    let mut hint = None;
    for (k, v) in &opts {
        match k.as_str() {
            "size" => {
                let n =
                    blockd_block::options::parse_size(v).map_err(|_| ferr(size_param_error()))?;
                size_opt = Some((n, v.clone()));
            }
            "nocow" => nocow = Some(v.clone()),
            "preallocation" => prealloc = Some(v.clone()),
            "extent_size_hint" => {
                let n = blockd_block::options::parse_size(v).map_err(|_| {
                    ferr(
                        "Parameter 'extent_size_hint' expects a non-negative number below 2^64\n\
                         Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
                         and exabytes, respectively."
                            .into(),
                    )
                })?;
                hint = Some(n);
            }
            other => return Err(ferr(format!("Invalid parameter '{other}'"))),
        }
    }
    if backing.is_some() {
        return Err(ferr(
            "Backing file not supported for file format 'raw'".into(),
        ));
    }
    let size = match (size_opt, pos_size) {
        (Some(_), Some(_)) => {
            return Err(ferr("The image size must be specified only once".into()));
        }
        (Some((n, _)), None) => n,
        (None, Some(n)) => n,
        (None, None) => return Err(ferr("Image creation needs a size parameter".into())),
    };
    if size > i64::MAX as u64 {
        return Err(Failure::new(
            "Invalid image size specified. Must be between 0 and 9223372036854775807.",
        ));
    }
    if !quiet {
        let mut line = format!("Formatting '{filename}', fmt=raw size={size}");
        if let Some(v) = &nocow {
            line += &format!(" nocow={v}");
        }
        if let Some(v) = &prealloc {
            line += &format!(" preallocation={v}");
        }
        if let Some(v) = hint {
            line += &format!(" extent_size_hint={v}");
        }
        println!("{line}");
        let _ = std::io::stdout().flush();
    }
    let mode = match prealloc.as_deref() {
        None | Some("off") => Prealloc::Off,
        Some("falloc") => Prealloc::Falloc,
        Some("full") => Prealloc::Full,
        Some("metadata") => Prealloc::Metadata,
        Some(other) => return Err(ferr(format!("invalid parameter value: {other}"))),
    };
    create_file(&filename, size, mode).map_err(ferr)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Prealloc {
    Off,
    Metadata,
    Falloc,
    Full,
}

fn create_file(filename: &str, size: u64, mode: Prealloc) -> Result<(), String> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(filename)
        .map_err(|e| {
            format!(
                "Could not create '{filename}': {}",
                blockd_block::strerror(&e)
            )
        })?;
    if mode == Prealloc::Metadata {
        return Err("Unsupported preallocation mode: metadata".into());
    }
    let len = size
        .div_ceil(512)
        .checked_mul(512)
        .filter(|&l| l <= i64::MAX as u64);
    let Some(len) = len else {
        return Err("Could not resize file: Invalid argument".into());
    };
    match mode {
        Prealloc::Off | Prealloc::Metadata => {
            set_len(&f, len)?;
            // Like qemu-img, allocate the first block (it lets O_DIRECT users probe alignment).
            let first = len.min(4096) as usize;
            if first > 0 {
                use std::os::unix::fs::FileExt;
                f.write_all_at(&vec![0u8; first], 0).map_err(|e| {
                    format!("Could not write zeros: {}", blockd_block::strerror(&e))
                })?;
            }
            Ok(())
        }
        Prealloc::Falloc => {
            set_len(&f, len)?;
            if len > 0 {
                falloc(&f, len)?;
            }
            Ok(())
        }
        Prealloc::Full => {
            set_len(&f, 0)?;
            let chunk = vec![0u8; 1 << 20];
            let mut off = 0u64;
            let mut w = &f;
            while off < len {
                let n = (len - off).min(chunk.len() as u64) as usize;
                w.write_all(&chunk[..n]).map_err(|e| {
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
    }
}

fn set_len(f: &File, len: u64) -> Result<(), String> {
    f.set_len(len).map_err(|e| {
        if e.raw_os_error() == Some(libc::EFBIG) {
            "The image size is too large for file format 'raw'".to_string()
        } else {
            format!("Could not resize file: {}", blockd_block::strerror(&e))
        }
    })
}

/// posix_fallocate through the event loop's fallocate operation (mode 0: allocate).
fn falloc(f: &File, len: u64) -> Result<(), String> {
    let fd = f.as_raw_fd();
    let r = blockd_aio::block_on(async move { blockd_aio::ops::fallocate(fd, 0, 0, len).await })
        .map_err(|e| format!("Could not preallocate data for the new file: {}", e.context))?;
    r.map_err(|e| {
        format!(
            "Could not preallocate new data: {}",
            blockd_block::strerror(&e)
        )
    })
}

struct QcowRequest<'a> {
    filename: &'a str,
    opts: &'a [(String, String)],
    size: Option<u64>,
    backing: Option<&'a str>,
    backing_fmt: Option<&'a str>,
    backing_unsafe: bool,
    quiet: bool,
}

/// A backing name as the new image will resolve it: relative to the image's directory.
fn backing_path(image: &str, name: &str) -> String {
    if name.starts_with('/') {
        return name.to_string();
    }
    match image.rfind('/') {
        Some(i) => format!("{}{name}", &image[..=i]),
        None => name.to_string(),
    }
}

/// `qemu-img create -f qcow2`: options, the backing file's checks (and its size when none is
/// given), the "Formatting" line, then blockd-qcow2's create on the new file.
fn create_qcow2(r: QcowRequest) -> CmdResult {
    let filename = r.filename;
    let ferr = |m: String| Failure::new(format!("{filename}: {m}"));
    let mut o = blockd_qcow2::CreateOptions::from_qemu_opts(r.opts).map_err(ferr)?;
    if o.size.is_some() && r.size.is_some() {
        return Err(ferr("The image size must be specified only once".into()));
    }
    if let Some(n) = r.size {
        o.set("size", &n.to_string()).map_err(ferr)?;
    }
    if let Some(b) = r.backing {
        o.set("backing_file", b).map_err(ferr)?;
    }
    if let Some(f) = r.backing_fmt {
        o.set("backing_fmt", f).map_err(ferr)?;
    }
    if let Some(b) = o.backing_file.clone() {
        if b.is_empty() {
            return Err(ferr("Expected backing file name, got empty string".into()));
        }
        if b == filename {
            return Err(ferr(
                "Error: Trying to create an image with the same filename as the backing file"
                    .into(),
            ));
        }
        let path = backing_path(filename, &b);
        let probed = match &o.backing_fmt {
            Some(f) => Some(f.clone()),
            None => probe_format(&path),
        };
        if o.backing_fmt.is_none() {
            let mut msg = "Backing file specified without backing format".to_string();
            if let Some(f) = &probed {
                msg += &format!("\nDetected format of {f}.");
            }
            return Err(ferr(msg));
        }
        if !r.backing_unsafe || o.size.is_none() {
            let fmt = probed.unwrap_or_else(|| "raw".into());
            let len = backing_length(&path, &fmt)
                .map_err(|e| ferr(format!("{e}\nCould not open backing image.")))?;
            if o.size.is_none() {
                o.set("size", &len.to_string()).map_err(ferr)?;
            }
        }
    }
    let Some(size) = o.size else {
        return Err(ferr("Image creation needs a size parameter".into()));
    };
    if size > i64::MAX as u64 {
        return Err(Failure::new(
            "Invalid image size specified. Must be between 0 and 9223372036854775807.",
        ));
    }
    if !r.quiet {
        println!("{}", o.formatting_line(filename));
        let _ = std::io::stdout().flush();
    }
    o.validate().map_err(ferr)?;
    if let Some(d) = &o.data_file {
        plain_data_file_name(d).map_err(ferr)?;
    }
    create_file(filename, 0, Prealloc::Off).map_err(ferr)?;
    format_qcow2(filename, &o).map_err(ferr)
}

/// Data files are created as plain files: a name with a protocol prefix is refused.
fn plain_data_file_name(name: &str) -> Result<(), String> {
    match name.find(':') {
        Some(colon) if !name[..colon].contains('/') => Err(if name.starts_with("json:") {
            // qemu-img's message (it would go through that protocol's driver).
            "Unknown protocol 'json'".to_string()
        } else {
            format!(
                "blockd-img creates data files only as plain files; '{name}' has a protocol prefix"
            )
        }),
        _ => Ok(()),
    }
}

/// Format the freshly created file `filename` as qcow2 with `o`. Like QEMU's create, this
/// also creates the external data file `o.data_file` (a plain file at the name as given,
/// relative to the current directory) and sizes it to the image.
pub fn format_qcow2(filename: &str, o: &blockd_qcow2::CreateOptions) -> Result<(), String> {
    let mut graph = blockd_drivers::graph();
    let mut open = |name: &str| {
        let mut m = serde_json::Map::new();
        m.insert("driver".into(), "file".into());
        m.insert("filename".into(), name.into());
        graph
            .open(m)
            .map_err(|e| format!("Could not open '{name}': {e}"))
    };
    let file = open(filename)?;
    let data = match &o.data_file {
        None => None,
        Some(name) => {
            plain_data_file_name(name)?;
            // Created as a raw file of the image's size, with the file preallocation the
            // image asks for (what QEMU's create of the data file does).
            let mode = match o.preallocation {
                blockd_qcow2::create::Prealloc::Full => Prealloc::Full,
                blockd_qcow2::create::Prealloc::Falloc => Prealloc::Falloc,
                _ => Prealloc::Off,
            };
            create_file(name, o.size.unwrap_or(0), mode)?;
            Some(open(name)?)
        }
    };
    blockd_aio::block_on(blockd_qcow2::create::create_with_data_file(
        &file,
        data.as_ref(),
        o,
    ))
    .map_err(|e| e.to_string())?
}

fn probe_format(path: &str) -> Option<String> {
    use std::io::Read;
    let mut f = File::open(path).ok()?;
    let mut buf = vec![0u8; 2048];
    let n = f.read(&mut buf).ok()?;
    buf.truncate(n);
    Some(blockd_drivers::graph().probe_format(&buf, path).to_string())
}

/// The virtual size of the backing image (opening it proves it is usable).
fn backing_length(path: &str, fmt: &str) -> Result<u64, String> {
    let mut graph = blockd_drivers::graph();
    let opts = serde_json::json!({
        "driver": fmt,
        "read-only": true,
        "file": {"driver": "file", "filename": path},
    });
    let serde_json::Value::Object(m) = opts else {
        unreachable!()
    };
    let node = graph.open(m).map_err(|e| {
        if e.starts_with("Could not open") {
            e
        } else {
            format!("Could not open '{path}': {e}")
        }
    })?;
    Ok(node.length())
}
