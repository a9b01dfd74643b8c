//! blockd-nbd: qemu-nbd's command line on blockd's block layer and NBD server.
//!
//! Opens one image with `blockd_drivers::graph()`, exports it over TCP, a unix socket or a
//! socket passed by systemd, and serves until the last client leaves (or forever with
//! `--persistent`, or until SIGTERM/SIGINT). `-L` lists the exports of another server.

use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use blockd_block::{OpenFlags, Perm};
use blockd_nbd::server::{BitmapSpec, ListenAddr, export_bitmaps};
use blockd_nbd::{DetectZeroes, ExportConfig, NbdServer, ServerConfig};
use serde_json::{Map, Value};

const PROG: &str = "blockd-nbd";

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("{PROG}: {msg}");
    ExitCode::FAILURE
}

#[derive(Default)]
struct Args {
    port: Option<String>,
    bind: Option<String>,
    socket: Option<PathBuf>,
    shared: Option<usize>,
    persistent: bool,
    export_name: Option<String>,
    description: Option<String>,
    handshake_limit: Option<u64>,
    offset: Option<u64>,
    allocation_depth: bool,
    bitmaps: Vec<String>,
    list: bool,
    fork: bool,
    pid_file: Option<PathBuf>,
    format: Option<String>,
    read_only: bool,
    cache: Option<String>,
    aio: Option<String>,
    discard: Option<String>,
    detect_zeroes: Option<String>,
    image_opts: bool,
    objects: Vec<String>,
    snapshot: bool,
    load_snapshot: Option<String>,
    connect: Option<String>,
    files: Vec<String>,
}

/// Long options: (name, short, takes an argument).
const LONG: &[(&str, char, bool)] = &[
    ("port", 'p', true),
    ("bind", 'b', true),
    ("socket", 'k', true),
    ("shared", 'e', true),
    ("persistent", 't', false),
    ("export-name", 'x', true),
    ("description", 'D', true),
    ("handshake-limit", '\u{1}', true),
    ("offset", 'o', true),
    ("allocation-depth", 'A', false),
    ("bitmap", 'B', true),
    ("list", 'L', false),
    ("fork", '\u{2}', false),
    ("pid-file", '\u{3}', true),
    ("format", 'f', true),
    ("read-only", 'r', false),
    ("nocache", 'n', false),
    ("cache", '\u{4}', true),
    ("aio", '\u{5}', true),
    ("discard", '\u{6}', true),
    ("detect-zeroes", '\u{7}', true),
    ("help", 'h', false),
    ("version", 'V', false),
    ("verbose", 'v', false),
    ("snapshot", 's', false),
    ("load-snapshot", 'l', true),
    ("connect", 'c', true),
    ("disconnect", 'd', false),
    ("object", '\u{8}', true),
    ("tls-creds", '\u{9}', true),
    ("tls-authz", '\u{a}', true),
    ("tls-hostname", '\u{b}', true),
    ("image-opts", '\u{c}', false),
    ("trace", 'T', true),
];

enum Parsed {
    Run(Box<Args>),
    Exit(ExitCode),
}

fn usage() {
    println!(
        "Usage: {PROG} [OPTIONS] FILE\n  or:  {PROG} -L [OPTIONS]\nblockd Disk Network Block Device Utility\n\n\
  -h, --help                display this help and exit\n\
  -V, --version             output version information and exit\n\
  -p, --port=PORT           port to listen on (default `10809')\n\
  -b, --bind=IFACE          interface to bind to (default `0.0.0.0')\n\
  -k, --socket=PATH         path to the unix socket\n\
  -e, --shared=NUM          device can be shared by NUM clients (default '1')\n\
  -t, --persistent          don't exit on the last connection\n\
  -x, --export-name=NAME    expose export by name (default is empty string)\n\
  -D, --description=TEXT    export a human-readable description\n\
      --handshake-limit=N   limit client's handshake to N seconds (default 10)\n\
  -o, --offset=OFFSET       offset into the image\n\
  -A, --allocation-depth    expose the allocation depth\n\
  -B, --bitmap=NAME         expose a persistent dirty bitmap\n\
  -L, --list                list exports available from another NBD server\n\
      --fork                fork off the server process and exit the parent\n\
                            once the server is running\n\
      --pid-file=PATH       store the server's process ID in the given file\n\
  -f, --format=FORMAT       set image format (raw, qcow2, ...)\n\
  -r, --read-only           export read-only\n\
  -n, --nocache             disable host cache\n\
      --cache=MODE          none, writeback (default), writethrough, directsync, unsafe\n\
      --aio=MODE            set AIO mode (native, io_uring or threads)\n\
      --discard=MODE        set discard mode (ignore, unmap)\n\
      --detect-zeroes=MODE  set detect-zeroes mode (off, on, unmap)\n\
  -s, --snapshot            use FILE as an external snapshot, create a temporary\n\
                            file with backing_file=FILE, redirect the write to\n\
                            the temporary one\n\
      --image-opts          treat FILE as a full set of image options\n\
      --object type,id=ID,...  create an object (no type is supported yet)\n\
  -l, --load-snapshot=SNAPSHOT_PARAM  (not supported yet)\n\
  -c, --connect=DEV         (the kernel nbd client is not supported yet)"
    );
}

fn parse_args(argv: &[String]) -> Result<Parsed, String> {
    let mut a = Args::default();
    let mut i = 0;
    let mut only_files = false;
    while i < argv.len() {
        let arg = &argv[i];
        i += 1;
        if only_files || !arg.starts_with('-') || arg == "-" {
            a.files.push(arg.clone());
            continue;
        }
        if arg == "--" {
            only_files = true;
            continue;
        }
        let mut opts: Vec<(char, Option<String>, String)> = Vec::new();
        if let Some(long) = arg.strip_prefix("--") {
            let (name, val) = match long.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (long, None),
            };
            let hits: Vec<_> = LONG
                .iter()
                .filter(|(n, _, _)| n.starts_with(name))
                .collect();
            let hit = LONG
                .iter()
                .find(|(n, _, _)| *n == name)
                .or(if hits.len() == 1 { Some(hits[0]) } else { None });
            let Some(&(lname, c, takes)) = hit else {
                return Err(format!("unrecognized option '{arg}'"));
            };
            let v = if takes {
                match val {
                    Some(v) => Some(v),
                    None if i < argv.len() => {
                        i += 1;
                        Some(argv[i - 1].clone())
                    }
                    None => return Err(format!("option '--{lname}' requires an argument")),
                }
            } else if val.is_some() {
                return Err(format!("option '--{lname}' doesn't allow an argument"));
            } else {
                None
            };
            opts.push((c, v, format!("--{lname}")));
        } else {
            let chars: Vec<char> = arg[1..].chars().collect();
            let mut j = 0;
            while j < chars.len() {
                let c = chars[j];
                j += 1;
                let Some(&(_, _, takes)) = LONG.iter().find(|(_, s, _)| *s == c) else {
                    return Err(format!("invalid option -- '{c}'"));
                };
                if takes {
                    let rest: String = chars[j..].iter().collect();
                    let v = if !rest.is_empty() {
                        rest
                    } else if i < argv.len() {
                        i += 1;
                        argv[i - 1].clone()
                    } else {
                        return Err(format!("option requires an argument -- '{c}'"));
                    };
                    opts.push((c, Some(v), format!("-{c}")));
                    break;
                }
                opts.push((c, None, format!("-{c}")));
            }
        }
        for (c, v, spelled) in opts {
            let v = v.unwrap_or_default();
            match c {
                'p' => a.port = Some(v),
                'b' => a.bind = Some(v),
                'k' => a.socket = Some(PathBuf::from(v)),
                'e' => {
                    let n: i64 = v
                        .parse()
                        .map_err(|_| format!("Invalid shared device number '{v}'"))?;
                    if n < 0 {
                        return Err(format!("Invalid shared device number '{v}'"));
                    }
                    a.shared = Some(n as usize);
                }
                't' => a.persistent = true,
                'x' => {
                    if v.len() > 4096 {
                        return Err(format!("export name '{v}' too long"));
                    }
                    a.export_name = Some(v)
                }
                'D' => {
                    if v.len() > 4096 {
                        return Err(format!("description '{v}' too long"));
                    }
                    a.description = Some(v)
                }
                '\u{1}' => {
                    a.handshake_limit = Some(
                        v.parse()
                            .map_err(|_| format!("Invalid handshake limit '{v}'"))?,
                    )
                }
                'o' => a.offset = Some(v.parse().map_err(|_| format!("Invalid offset '{v}'"))?),
                'A' => a.allocation_depth = true,
                'B' => a.bitmaps.push(v),
                'L' => a.list = true,
                '\u{2}' => a.fork = true,
                '\u{3}' => a.pid_file = Some(PathBuf::from(v)),
                'f' => a.format = Some(v),
                'r' => a.read_only = true,
                'n' => a.cache = Some("none".into()),
                '\u{4}' => a.cache = Some(v),
                '\u{5}' => a.aio = Some(v),
                '\u{6}' => a.discard = Some(v),
                '\u{7}' => a.detect_zeroes = Some(v),
                '\u{8}' => a.objects.push(v),
                '\u{c}' => a.image_opts = true,
                's' => a.snapshot = true,
                'l' => a.load_snapshot = Some(v),
                'c' => a.connect = Some(v),
                'h' => {
                    usage();
                    return Ok(Parsed::Exit(ExitCode::SUCCESS));
                }
                'V' => {
                    println!("{PROG} {}", env!("CARGO_PKG_VERSION"));
                    return Ok(Parsed::Exit(ExitCode::SUCCESS));
                }
                'v' => {}
                _ => return Err(format!("option '{spelled}' is not supported yet")),
            }
        }
    }
    Ok(Parsed::Run(Box::new(a)))
}

/// qemu-nbd's cache modes as (cache.direct, cache.no-flush, writethrough).
fn cache_mode(m: &str) -> Result<(bool, bool, bool), String> {
    match m {
        "none" | "off" => Ok((true, false, false)),
        "writeback" => Ok((false, false, false)),
        // Without a writeback cache every write is durable before it is acknowledged.
        "writethrough" => Ok((false, false, true)),
        "directsync" => Ok((true, false, true)),
        "unsafe" => Ok((false, true, false)),
        _ => Err(format!("Invalid cache mode '{m}'")),
    }
}

fn socket_activation() -> Result<Option<OwnedFd>, String> {
    let Ok(pid) = std::env::var("LISTEN_PID") else {
        return Ok(None);
    };
    let Ok(pid) = pid.parse::<u32>() else {
        return Ok(None);
    };
    if pid != std::process::id() {
        return Ok(None);
    }
    let n: u32 = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or("Unexpected LISTEN_FDS")?;
    if n != 1 {
        return Err(format!(
            "QEMU only supports listening on one socket, but LISTEN_FDS={n}"
        ));
    }
    // SAFETY: systemd's protocol hands us descriptor 3 as ours (LISTEN_PID matched).
    let fd = unsafe { OwnedFd::from_raw_fd(3) };
    // SAFETY: fcntl on the descriptor we now own.
    unsafe {
        libc::fcntl(3, libc::F_SETFD, libc::FD_CLOEXEC);
    }
    Ok(Some(fd))
}

fn main() -> ExitCode {
    signals::Signals::block();
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let a = match parse_args(&argv) {
        Ok(Parsed::Run(a)) => a,
        Ok(Parsed::Exit(c)) => return c,
        Err(e) => {
            eprintln!("{PROG}: {e}");
            eprintln!("Try `{PROG} --help' for more information.");
            return ExitCode::FAILURE;
        }
    };
    if a.list {
        return list(&a);
    }
    match a.files.len() {
        0 => return fail("Not enough arguments"),
        1 => {}
        _ => return fail("Too many arguments"),
    }
    for o in &a.objects {
        if let Err(e) = check_object(o) {
            return fail(e);
        }
    }
    if let Some(dev) = &a.connect {
        return fail(connect_device(dev));
    }
    if a.image_opts && a.format.is_some() {
        return fail("--image-opts and -f are mutually exclusive");
    }
    let detect_zeroes = match a.detect_zeroes.as_deref().map(DetectZeroes::parse) {
        None => DetectZeroes::Off,
        Some(Ok(d)) => d,
        Some(Err(e)) => return fail(e),
    };
    if detect_zeroes == DetectZeroes::Unmap && !matches!(a.discard.as_deref(), Some("unmap" | "on"))
    {
        return fail(
            "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap",
        );
    }
    let activation = match socket_activation() {
        Ok(x) => x,
        Err(e) => return fail(e),
    };
    if activation.is_some() && (a.socket.is_some() || a.port.is_some() || a.bind.is_some()) {
        return fail("-p, -b and -k cannot be used with socket activation");
    }
    if a.socket.is_some() && (a.port.is_some() || a.bind.is_some()) {
        return fail("-p and -b cannot be used with -k");
    }
    // Fork before any thread or ring exists; the parent waits for "ready" on a pipe.
    let mut ready_fd: Option<OwnedFd> = None;
    if a.fork {
        let mut p = [0i32; 2];
        // SAFETY: pipe writes two descriptors into the array.
        if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return fail(format!(
                "Failed to create pipe: {}",
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: single-threaded here (no context, no pool threads yet).
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return fail(format!(
                "Failed to fork: {}",
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: both descriptors are ours.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) };
        if pid > 0 {
            drop(w);
            let mut f = std::fs::File::from(r);
            let mut b = [0u8; 1];
            return match f.read(&mut b) {
                Ok(1) => ExitCode::SUCCESS,
                _ => ExitCode::FAILURE,
            };
        }
        drop(r);
        // SAFETY: setsid has no memory effects.
        unsafe {
            libc::setsid();
        }
        ready_fd = Some(w);
    }
    let r = blockd_aio::block_on(serve(*a, activation, ready_fd));
    match r {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => fail(e),
        Err(e) => fail(e),
    }
}

fn image_options(a: &Args, file: &str) -> Result<(Map<String, Value>, OpenFlags), String> {
    let (direct, no_flush, _) = cache_mode(a.cache.as_deref().unwrap_or("writeback"))?;
    let discard_unmap = match a.discard.as_deref() {
        None | Some("ignore") | Some("off") => false,
        Some("unmap") | Some("on") => true,
        Some(d) => return Err(format!("Invalid discard mode `{d}'")),
    };
    let mut proto = Map::new();
    proto.insert("driver".into(), "file".into());
    proto.insert("filename".into(), file.into());
    if let Some(aio) = &a.aio {
        match aio.as_str() {
            "threads" | "native" | "io_uring" => {
                proto.insert("aio".into(), aio.clone().into());
            }
            _ => return Err(format!("Invalid aio mode '{aio}'")),
        }
    }
    let flags = OpenFlags {
        read_only: a.read_only,
        cache_direct: direct,
        no_flush,
        discard_unmap,
        ..OpenFlags::default()
    };
    if a.image_opts {
        // FILE is the whole option set (dotted keys or JSON); cache, aio and discard flags
        // still apply as defaults.
        if a.offset.is_some() {
            return Err("--offset cannot be used with --image-opts".into());
        }
        let m = blockd_block::options::parse(file)?;
        return Ok((m, flags));
    }
    let fmt = match &a.format {
        Some(f) => f.clone(),
        None => {
            let mut header = vec![0u8; 2048];
            let n = std::fs::File::open(file)
                .and_then(|mut f| f.read(&mut header))
                .map_err(|e| {
                    format!(
                        "Failed to blk_new_open '{file}': Could not open '{file}': {}",
                        blockd_block::strerror(&e)
                    )
                })?;
            header.truncate(n);
            blockd_drivers::graph()
                .probe_format(&header, file)
                .to_string()
        }
    };
    let m = if fmt == "file" || fmt == "host_device" {
        // A protocol as the format: export the file itself.
        let mut p = proto;
        p.insert("driver".into(), fmt.into());
        p
    } else {
        let mut m = Map::new();
        m.insert("driver".into(), fmt.into());
        m.insert("file".into(), Value::Object(proto));
        m
    };
    let mut m = m;
    if let Some(off) = a.offset {
        if m.get("driver").and_then(|v| v.as_str()) != Some("raw") {
            return Err("--offset is only supported with raw images".into());
        }
        m.insert("offset".into(), off.to_string().into());
    }
    Ok((m, flags))
}

/// `-s`: a temporary qcow2 overlay over `base` in $TMPDIR (default /var/tmp), as QEMU's
/// snapshot mode: writes land in the overlay, the image is never written. The file is unlinked
/// once open, so it goes away with the process whatever way it ends.
async fn temp_overlay(
    graph: &mut blockd_block::Graph,
    base: &std::sync::Arc<blockd_block::Node>,
    base_file: Option<&str>,
    flags: OpenFlags,
) -> Result<std::sync::Arc<blockd_block::Node>, String> {
    let dir = std::env::var("TMPDIR").unwrap_or_else(|_| "/var/tmp".into());
    let mut template = format!("{dir}/vl.XXXXXX\0").into_bytes();
    // SAFETY: mkstemp rewrites the NUL-terminated template in place and returns a descriptor.
    let fd = unsafe { libc::mkstemp(template.as_mut_ptr().cast()) };
    if fd < 0 {
        return Err(format!(
            "Could not get temporary filename: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: the descriptor mkstemp just returned is ours; closed at once (the file driver
    // opens the path itself).
    drop(unsafe { OwnedFd::from_raw_fd(fd) });
    template.pop();
    let path = String::from_utf8_lossy(&template).into_owned();
    let made = async {
        let file = graph.open_with(
            serde_json::json!({"driver": "file", "filename": path})
                .as_object()
                .cloned()
                .unwrap_or_default(),
            OpenFlags {
                read_only: false,
                ..flags
            },
        )?;
        let backing_file = base_file.map(|f| {
            std::fs::canonicalize(f)
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_else(|_| f.to_string())
        });
        let mut opts = blockd_qcow2::create::CreateOptions::default();
        opts.size = Some(base.length());
        opts.backing_file = backing_file;
        opts.backing_fmt = Some(base.driver().format_name().to_string());
        blockd_qcow2::create::create(&file, &opts).await?;
        let mut m = Map::new();
        m.insert("driver".into(), "qcow2".into());
        m.insert("file".into(), file.name().into());
        m.insert("backing".into(), base.name().into());
        graph.open_with(
            m,
            OpenFlags {
                read_only: false,
                ..flags
            },
        )
    }
    .await;
    let _ = std::fs::remove_file(&path);
    made
}

/// `--object`: QEMU's user-creatable types are known, none is implemented by blockd-nbd.
fn check_object(spec: &str) -> Result<(), String> {
    let m = blockd_block::options::parse(spec).ok();
    let first = spec.split(',').next().unwrap_or("");
    let typ = m
        .as_ref()
        .and_then(|m| m.get("qom-type"))
        .and_then(|v| v.as_str())
        .map(str::to_string)
        .or_else(|| (!first.contains('=')).then(|| first.to_string()))
        .ok_or("Parameter 'qom-type' is missing")?;
    const KNOWN: &[&str] = &[
        "authz-list",
        "authz-listfile",
        "authz-pam",
        "authz-simple",
        "iothread",
        "main-loop",
        "secret",
        "secret_keyring",
        "throttle-group",
        "tls-cipher-suites",
        "tls-creds-anon",
        "tls-creds-psk",
        "tls-creds-x509",
        "memory-backend-file",
        "memory-backend-memfd",
        "memory-backend-ram",
        "rng-builtin",
        "rng-egd",
        "rng-random",
        "cryptodev-backend-builtin",
        "input-linux",
        "filter-buffer",
        "filter-dump",
        "filter-mirror",
        "filter-redirector",
        "filter-replay",
        "filter-rewriter",
        "colo-compare",
        "can-bus",
        "pr-manager-helper",
        "qtest",
        "thread-context",
        "dbus-vmstate",
    ];
    if KNOWN.contains(&typ.as_str()) {
        Err(format!(
            "Object type '{typ}' is not supported by {PROG} yet"
        ))
    } else {
        Err(format!(
            "Parameter 'qom-type' does not accept value '{typ}'"
        ))
    }
}

/// `-c DEV`: the kernel's nbd client. Without the device node the error is QEMU's; with it,
/// blockd-nbd does not drive the kernel client yet.
fn connect_device(dev: &str) -> String {
    match std::fs::OpenOptions::new().read(true).write(true).open(dev) {
        Err(e) => format!("Failed to open {dev}: {}", blockd_block::strerror(&e)),
        Ok(_) => format!("-c {dev}: connecting the kernel nbd client is not supported yet"),
    }
}

async fn serve(a: Args, activation: Option<OwnedFd>, ready: Option<OwnedFd>) -> Result<(), String> {
    let file = a.files[0].clone();
    let (opts, flags) = image_options(&a, &file)?;
    let mut graph = blockd_drivers::graph();
    let node = if a.snapshot {
        // The image is only read (it becomes the overlay's backing file).
        let ro = OpenFlags {
            read_only: true,
            ..flags
        };
        let base = graph
            .open_with(opts, ro)
            .map_err(|e| format!("Failed to blk_new_open '{file}': {e}"))?;
        temp_overlay(
            &mut graph,
            &base,
            (!a.image_opts).then_some(file.as_str()),
            flags,
        )
        .await
        .map_err(|e| format!("Failed to blk_new_open '{file}': {e}"))?
    } else {
        graph
            .open_with(opts, flags)
            .map_err(|e| format!("Failed to blk_new_open '{file}': {e}"))?
    };
    if a.load_snapshot.is_some() {
        return Err(format!(
            "Failed to load snapshot: Block format '{}' used by device '' does not support \
             temporarily loading internal snapshots{}",
            node.driver().format_name(),
            if node.driver().format_name() == "qcow2" {
                " (not implemented by blockd yet)"
            } else {
                ""
            }
        ));
    }
    let writable = !a.read_only;
    let perm = if writable {
        Perm::CONSISTENT_READ | Perm::WRITE
    } else {
        Perm::CONSISTENT_READ
    };
    // qemu-nbd offers them last given first.
    let specs: Vec<BitmapSpec> = a
        .bitmaps
        .iter()
        .rev()
        .cloned()
        .map(BitmapSpec::Name)
        .collect();
    let bitmaps = export_bitmaps(&node, &specs, writable, |n| graph.node(n))?;
    let backend = graph.new_backend("", &node, perm, Perm::ALL)?;
    let shared = a.shared.unwrap_or(1);
    let server = NbdServer::new(ServerConfig {
        max_connections: shared,
        handshake_timeout: Duration::from_secs(a.handshake_limit.unwrap_or(10)),
    })
    .map_err(|e| e.to_string())?;
    server.add_export(ExportConfig {
        id: "export0".into(),
        name: a.export_name.clone().unwrap_or_default(),
        description: a.description.clone(),
        backend,
        writable,
        writethrough: cache_mode(a.cache.as_deref().unwrap_or("writeback"))?.2,
        allocation_depth: a.allocation_depth,
        bitmaps,
        // As qemu-nbd: one client at a time (-e 1) cannot serve several connections.
        multi_conn: shared != 1,
        iothread: None,
        // Checked in main.
        detect_zeroes: a
            .detect_zeroes
            .as_deref()
            .map(DetectZeroes::parse)
            .transpose()?
            .unwrap_or_default(),
    })?;
    let addr = if let Some(fd) = activation {
        ListenAddr::Fd(fd)
    } else if let Some(p) = &a.socket {
        ListenAddr::Unix(p.clone())
    } else {
        ListenAddr::Inet {
            host: a.bind.clone().unwrap_or_else(|| "0.0.0.0".into()),
            port: a.port.clone().unwrap_or_else(|| "10809".into()),
        }
    };
    server.listen(addr)?;
    if let Some(p) = &a.pid_file {
        std::fs::write(p, format!("{}\n", std::process::id()))
            .map_err(|e| format!("Failed to write pid file '{}': {e}", p.display()))?;
    }
    if let Some(w) = ready {
        let mut f = std::fs::File::from(w);
        let _ = std::io::Write::write_all(&mut f, b"1");
        // Detach from the terminal like qemu-nbd: stdio to /dev/null.
        if let Ok(null) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
        {
            use std::os::fd::AsRawFd;
            // SAFETY: dup2 onto the standard descriptors.
            unsafe {
                libc::dup2(null.as_raw_fd(), 0);
                libc::dup2(null.as_raw_fd(), 1);
                libc::dup2(null.as_raw_fd(), 2);
            }
        }
    }
    let signals = signals::Signals::new()?;
    if a.persistent {
        signals.wait().await;
    } else {
        let gone = server.wait_all_clients_gone();
        let sig = signals.wait();
        futures_select(gone, sig).await;
    }
    server.stop_listening();
    if let Some(p) = &a.socket {
        let _ = std::fs::remove_file(p);
    }
    if let Some(p) = &a.pid_file {
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}

/// Wait for whichever of two futures finishes first.
async fn futures_select(a: impl Future<Output = ()>, b: impl Future<Output = ()>) {
    let mut a = std::pin::pin!(a);
    let mut b = std::pin::pin!(b);
    std::future::poll_fn(|cx| {
        if a.as_mut().poll(cx).is_ready() || b.as_mut().poll(cx).is_ready() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await
}

mod signals {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    /// SIGTERM, SIGINT and SIGHUP through a signalfd, awaited on the ring.
    pub struct Signals {
        fd: OwnedFd,
    }

    impl Signals {
        fn set() -> libc::sigset_t {
            // SAFETY: sigset manipulation on a local value.
            unsafe {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, libc::SIGTERM);
                libc::sigaddset(&mut set, libc::SIGINT);
                libc::sigaddset(&mut set, libc::SIGHUP);
                set
            }
        }

        /// Block the signals in this thread before any other exists, so every later thread
        /// inherits the mask and the signals wait in the signalfd.
        pub fn block() {
            let set = Self::set();
            // SAFETY: changes this thread's signal mask only.
            unsafe {
                libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            }
        }

        pub fn new() -> Result<Signals, String> {
            let set = Self::set();
            // SAFETY: creates a new descriptor, checked below.
            unsafe {
                let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
                if fd < 0 {
                    return Err(format!("signalfd: {}", std::io::Error::last_os_error()));
                }
                Ok(Signals {
                    fd: OwnedFd::from_raw_fd(fd),
                })
            }
        }

        pub async fn wait(&self) {
            let _ = blockd_aio::ops::poll_add(self.fd.as_raw_fd(), libc::POLLIN).await;
        }
    }
}

fn list(a: &Args) -> ExitCode {
    let addr = if let Some(p) = &a.socket {
        blockd_nbd::client::Address::Unix(p.clone())
    } else {
        blockd_nbd::client::Address::Inet {
            host: a.bind.clone().unwrap_or_else(|| "localhost".into()),
            port: a.port.clone().unwrap_or_else(|| "10809".into()),
        }
    };
    match blockd_nbd::client::list_exports(&addr, Duration::from_secs(10)) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}
