//! `blockd-io`: qemu-io's command line on blockd's block layer.

use std::process::ExitCode;

use blockd_io::command::{AioMode, CacheMode, DiscardMode};
use blockd_io::exec::{Executor, Flow, Input, OpenSpec};
use blockd_io::format::PROMPT;

const USAGE: &str = "Usage: qemu-io [OPTIONS]... [-c STRING]... [file]
QEMU Disk exerciser

  --object OBJECTDEF   define an object such as 'secret' for
                       passwords and/or encryption keys
  --image-opts         treat file as option string
  -c, --cmd STRING     execute command with its arguments
                       from the given string
  -f, --format FMT     specifies the block driver to use
  -r, --read-only      export read-only
  -s, --snapshot       use snapshot file
  -n, --nocache        disable host cache, short for -t none
  -C, --copy-on-read   enable copy-on-read
  -m, --misalign       misalign allocations for O_DIRECT
  -k, --native-aio     use kernel AIO implementation
                       (Linux only, prefer use of -i)
  -i, --aio=MODE       use AIO mode (threads, native or io_uring)
  -t, --cache=MODE     use the given cache mode for the image
  -d, --discard=MODE   use the given discard mode for the image
  -T, --trace [[enable=]<pattern>][,events=<file>][,file=<file>]
                       specify tracing options
                       see qemu-img(1) man page for full description
  -U, --force-share    force shared permissions
  -h, --help           display this help and exit
  -V, --version        output version information and exit

See 'qemu-io -c help' for information on available commands.

See <https://qemu.org/contribute/report-a-bug> for how to report bugs.
More information on the QEMU project at <https://qemu.org>.
";

const VERSION: &str = "qemu-io version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)
Copyright (c) 2003-2025 Fabrice Bellard and the QEMU Project developers
";

/// Short options taking an argument.
const SHORT_WITH_ARG: &str = "cftdiT";
const SHORT_FLAGS: &str = "hVrsnCmkU";

/// (long name, short equivalent or a private code, takes an argument)
const LONG: &[(&str, char, bool)] = &[
    ("help", 'h', false),
    ("version", 'V', false),
    ("cmd", 'c', true),
    ("format", 'f', true),
    ("read-only", 'r', false),
    ("snapshot", 's', false),
    ("nocache", 'n', false),
    ("copy-on-read", 'C', false),
    ("misalign", 'm', false),
    ("native-aio", 'k', false),
    ("discard", 'd', true),
    ("cache", 't', true),
    ("aio", 'i', true),
    ("trace", 'T', true),
    ("force-share", 'U', false),
    ("object", 'O', true),
    ("image-opts", 'I', false),
];

enum Parsed {
    Opt(char, Option<String>),
    Err(String),
}

/// GNU getopt_long with argument permutation: options, then the positionals.
fn getopt(args: &[String]) -> (Vec<Parsed>, Vec<String>) {
    let mut opts = Vec::new();
    let mut pos = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        i += 1;
        if a == "--" {
            pos.extend(args[i..].iter().cloned());
            break;
        }
        if let Some(long) = a.strip_prefix("--") {
            let (name, inline) = match long.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (long, None),
            };
            let exact = LONG.iter().find(|l| l.0 == name);
            let matches: Vec<_> = LONG.iter().filter(|l| l.0.starts_with(name)).collect();
            let found = match (exact, matches.len()) {
                (Some(l), _) => l,
                (None, 1) => matches[0],
                (None, 0) => {
                    opts.push(Parsed::Err(format!("unrecognized option '--{name}'")));
                    continue;
                }
                (None, _) => {
                    let names: Vec<String> =
                        matches.iter().map(|l| format!("'--{}'", l.0)).collect();
                    opts.push(Parsed::Err(format!(
                        "option '--{name}' is ambiguous; possibilities: {}",
                        names.join(" ")
                    )));
                    continue;
                }
            };
            if found.2 {
                let v = match inline {
                    Some(v) => Some(v),
                    None if i < args.len() => {
                        i += 1;
                        Some(args[i - 1].clone())
                    }
                    None => None,
                };
                match v {
                    Some(v) => opts.push(Parsed::Opt(found.1, Some(v))),
                    None => opts.push(Parsed::Err(format!(
                        "option '--{}' requires an argument",
                        found.0
                    ))),
                }
            } else if inline.is_some() {
                opts.push(Parsed::Err(format!(
                    "option '--{}' doesn't allow an argument",
                    found.0
                )));
            } else {
                opts.push(Parsed::Opt(found.1, None));
            }
            continue;
        }
        if a.len() > 1 && a.starts_with('-') {
            let chars: Vec<char> = a[1..].chars().collect();
            let mut j = 0;
            while j < chars.len() {
                let c = chars[j];
                j += 1;
                if SHORT_WITH_ARG.contains(c) {
                    let rest: String = chars[j..].iter().collect();
                    if !rest.is_empty() {
                        opts.push(Parsed::Opt(c, Some(rest)));
                    } else if i < args.len() {
                        opts.push(Parsed::Opt(c, Some(args[i].clone())));
                        i += 1;
                    } else {
                        opts.push(Parsed::Err(format!("option requires an argument -- '{c}'")));
                    }
                    break;
                } else if SHORT_FLAGS.contains(c) {
                    opts.push(Parsed::Opt(c, None));
                } else {
                    opts.push(Parsed::Err(format!("invalid option -- '{c}'")));
                }
            }
            continue;
        }
        pos.push(a.clone());
    }
    (opts, pos)
}

/// Option errors are glibc getopt's: prefixed with argv[0] as typed.
fn usage_error(msg: Option<&str>) -> ExitCode {
    print!("{USAGE}");
    if let Some(m) = msg {
        let argv0 = std::env::args().next().unwrap_or_else(|| "qemu-io".into());
        eprintln!("{argv0}: {m}");
    }
    ExitCode::FAILURE
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (opts, pos) = getopt(&args);
    let mut spec = OpenSpec::default();
    let mut cmds = Vec::new();
    let mut format_given = false;
    let mut native = false;
    for o in opts {
        let (c, v) = match o {
            Parsed::Err(m) => return usage_error(Some(&m)),
            Parsed::Opt(c, v) => (c, v.unwrap_or_default()),
        };
        match c {
            'h' => {
                print!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            'V' => {
                print!("{VERSION}");
                return ExitCode::SUCCESS;
            }
            'c' => cmds.push(v),
            'f' => {
                spec.format = Some(v);
                format_given = true;
            }
            'r' => spec.read_only = true,
            's' => spec.snapshot = true,
            'n' => spec.cache = Some(CacheMode::None),
            'C' | 'm' => {}
            'k' => native = true,
            'd' => match DiscardMode::parse(&v) {
                Some(d) => spec.discard = Some(d),
                None => {
                    eprintln!("qemu-io: Invalid discard option: {v}");
                    return ExitCode::FAILURE;
                }
            },
            't' => match CacheMode::parse(&v) {
                Some(m) => spec.cache = Some(m),
                None => {
                    eprintln!("qemu-io: Invalid cache option: {v}");
                    return ExitCode::FAILURE;
                }
            },
            'i' => match AioMode::parse(&v) {
                Some(a) => spec.aio = Some(a),
                None => {
                    eprintln!("qemu-io: Invalid aio option: {v}");
                    return ExitCode::FAILURE;
                }
            },
            'T' => {}
            'U' => spec.force_share = true,
            'I' => spec.image_opts = true,
            'O' => {
                let ty = v.split(',').next().unwrap_or("");
                let ty = ty.strip_prefix("qom-type=").unwrap_or(ty);
                if ty != "secret" {
                    eprintln!("qemu-io: Parameter 'qom-type' does not accept value '{ty}'");
                    return ExitCode::FAILURE;
                }
            }
            _ => unreachable!("getopt only yields known options"),
        }
    }
    if native && spec.aio.is_none() {
        spec.aio = Some(AioMode::Native);
    }
    if pos.len() > 1 {
        return usage_error(None);
    }
    if spec.image_opts && format_given {
        eprintln!("qemu-io: --image-opts and -f are mutually exclusive");
        return ExitCode::FAILURE;
    }
    spec.path = pos.into_iter().next();

    let result = blockd_aio::block_on(async move {
        let mut ex = Executor::new();
        if spec.path.is_some() && !ex.open(&spec) {
            ex.out.flush();
            return false;
        }
        if !cmds.is_empty() {
            for c in &cmds {
                if ex.run_line(c).await == Flow::Quit {
                    break;
                }
            }
        } else {
            let input = Input::new();
            loop {
                ex.out.out(PROMPT);
                ex.out.flush();
                let Some(line) = input.next_line(&mut ex).await else {
                    break;
                };
                if ex.run_line(&line).await == Flow::Quit {
                    break;
                }
            }
        }
        ex.finish().await;
        !ex.failed
    });
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("qemu-io: {e}");
            ExitCode::FAILURE
        }
    }
}
