//! qemu-storage-daemon's command line: the options in order, each argument in dotted-keys or
//! JSON spelling, with QEMU's messages for what is wrong.

use blockd_block::options;
use serde_json::{Map, Value};

pub const PROG: &str = "qemu-storage-daemon";

/// One option of the command line, in the order given.
#[derive(Debug, Clone, PartialEq)]
pub enum Opt {
    Blockdev(String),
    Chardev(String),
    Export(String),
    Monitor(String),
    NbdServer(String),
    Object(String),
}

impl Opt {
    pub fn flag(&self) -> &'static str {
        match self {
            Opt::Blockdev(_) => "--blockdev",
            Opt::Chardev(_) => "--chardev",
            Opt::Export(_) => "--export",
            Opt::Monitor(_) => "--monitor",
            Opt::NbdServer(_) => "--nbd-server",
            Opt::Object(_) => "--object",
        }
    }
    pub fn arg(&self) -> &str {
        match self {
            Opt::Blockdev(s)
            | Opt::Chardev(s)
            | Opt::Export(s)
            | Opt::Monitor(s)
            | Opt::NbdServer(s)
            | Opt::Object(s) => s,
        }
    }
}

#[derive(Debug, Default)]
pub struct CmdLine {
    pub opts: Vec<Opt>,
    pub pidfile: Option<String>,
    pub daemonize: bool,
    pub trace: Vec<String>,
    pub help: bool,
    pub version: bool,
}

const LONG: &[(&str, bool)] = &[
    ("help", false),
    ("trace", true),
    ("version", false),
    ("blockdev", true),
    ("chardev", true),
    ("daemonize", false),
    ("export", true),
    ("monitor", true),
    ("nbd-server", true),
    ("object", true),
    ("pidfile", true),
];

/// Parse argv (without the program name). Errors are the whole message line.
/// `argv0` prefixes getopt's own messages, as glibc's getopt does.
pub fn parse(argv0: &str, args: &[String]) -> Result<CmdLine, String> {
    let mut c = CmdLine::default();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        i += 1;
        let (name, inline): (String, Option<String>) = if let Some(long) = a.strip_prefix("--") {
            if long.is_empty() {
                // "--" ends the options; what follows are arguments, and none are taken
                if let Some(extra) = args.get(i) {
                    return Err(format!("{PROG}: {extra}: Unexpected argument"));
                }
                break;
            }
            let (n, v) = match long.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (long, None),
            };
            // getopt_long accepts unambiguous prefixes of long options
            let exact = LONG.iter().find(|(l, _)| *l == n);
            let found = exact.or_else(|| {
                let m: Vec<_> = LONG.iter().filter(|(l, _)| l.starts_with(n)).collect();
                if m.len() == 1 { Some(m[0]) } else { None }
            });
            let Some((lname, has_arg)) = found else {
                return Err(format!("{argv0}: unrecognized option '--{n}'"));
            };
            if !has_arg && v.is_some() {
                return Err(format!(
                    "{argv0}: option '--{lname}' doesn't allow an argument"
                ));
            }
            (lname.to_string(), v)
        } else if let Some(short) = a.strip_prefix('-').filter(|s| !s.is_empty()) {
            let ch = short.chars().next().unwrap_or('?');
            let rest = &short[ch.len_utf8()..];
            let name = match ch {
                'h' => "help",
                'V' => "version",
                'T' => "trace",
                _ => return Err(format!("{argv0}: invalid option -- '{ch}'")),
            };
            if name != "trace" && !rest.is_empty() {
                let bad = rest.chars().next().unwrap_or('?');
                if !matches!(bad, 'h' | 'V' | 'T') {
                    return Err(format!("{argv0}: invalid option -- '{bad}'"));
                }
            }
            let inline = (name == "trace" && !rest.is_empty()).then(|| rest.to_string());
            (name.to_string(), inline)
        } else {
            return Err(format!("{PROG}: {a}: Unexpected argument"));
        };
        let has_arg = LONG.iter().any(|(l, h)| *l == name && *h);
        let value = if has_arg {
            match inline {
                Some(v) => Some(v),
                None => match args.get(i) {
                    Some(v) => {
                        i += 1;
                        Some(v.clone())
                    }
                    None => {
                        return Err(if name == "trace" && a.len() == 2 {
                            format!("{argv0}: option requires an argument -- 'T'")
                        } else {
                            format!("{argv0}: option '--{name}' requires an argument")
                        });
                    }
                },
            }
        } else {
            None
        };
        let v = value.unwrap_or_default();
        match name.as_str() {
            "help" => c.help = true,
            "version" => c.version = true,
            "trace" => c.trace.push(v),
            "daemonize" => c.daemonize = true,
            "pidfile" => c.pidfile = Some(v),
            "blockdev" => c.opts.push(Opt::Blockdev(v)),
            "chardev" => c.opts.push(Opt::Chardev(v)),
            "export" => c.opts.push(Opt::Export(v)),
            "monitor" => c.opts.push(Opt::Monitor(v)),
            "nbd-server" => c.opts.push(Opt::NbdServer(v)),
            "object" => c.opts.push(Opt::Object(v)),
            _ => unreachable!("every long option is handled"),
        }
    }
    Ok(c)
}

/// Parse an option argument: JSON when it starts with `{`, otherwise dotted keys where a
/// first item without `=` is the value of `implied` (`null-co,node-name=x` = `driver=null-co,...`).
pub fn parse_arg(s: &str, implied: Option<&str>) -> Result<Map<String, Value>, String> {
    if s.trim_start().starts_with('{') {
        return options::parse(s);
    }
    let mut owned;
    let mut text = s;
    if let Some(key) = implied {
        let first = options::split_list(s)
            .into_iter()
            .next()
            .unwrap_or_default();
        if !first.is_empty() && !first.contains('=') {
            owned = format!("{key}={s}");
            if first == "help" {
                owned = format!("{key}=help");
            }
            text = &owned;
        }
    }
    options::parse(text)
}

pub fn help_text() -> String {
    format!(
        "Usage: {PROG} [options]
QEMU storage daemon (blockd)

  -h, --help             display this help and exit
  -T, --trace [[enable=]<pattern>][,events=<file>][,file=<file>]
                         specify tracing options (patterns match blockd's
                         tracing targets, e.g. 'blockd_qmp*')
  -V, --version          output version information and exit

  --blockdev [driver=]<driver>[,node-name=<N>][,discard=ignore|unmap]
             [,cache.direct=on|off][,cache.no-flush=on|off]
             [,read-only=on|off][,auto-read-only=on|off]
             [,force-share=on|off][,driver specific parameters...]
                         configure a block backend

  --chardev socket,id=<id>,path=<path>,server=on,wait=off
  --chardev socket,id=<id>,host=<host>,port=<port>,server=on,wait=off
  --chardev socket,id=<id>,fd=<fd>
                         configure a character device backend (a listening
                         socket for a monitor)

  --daemonize            daemonize the process, and have the parent exit
                         once startup is complete

  --export [type=]nbd,id=<id>,node-name=<node-name>[,name=<export-name>]
           [,writable=on|off][,bitmap=<name>]
                         export the specified block node over NBD
                         (requires --nbd-server)

  --monitor [chardev=]name[,mode=control][,pretty[=on|off]]
                         configure a QMP monitor

  --nbd-server addr.type=inet,addr.host=<host>,addr.port=<port>
  --nbd-server addr.type=unix,addr.path=<path>
                         start an NBD server for exporting block nodes

  --object help          list object types that can be added
  --object iothread,id=<id>[,poll-max-ns=<n>][,poll-grow=<n>][,poll-shrink=<n>]
                         create an iothread

  --pidfile <path>       write process ID to a file after startup
"
    )
}

pub fn version_text() -> String {
    format!(
        "{PROG} version 10.0.2 (blockd {})\nblockd-storage-daemon speaks qemu-storage-daemon's interfaces.\n",
        env!("CARGO_PKG_VERSION")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn options_in_order_both_spellings() {
        let c = parse(
            PROG,
            &args(&[
                "--blockdev",
                "null-co,node-name=a",
                "--object=iothread,id=io0",
                "--pidfile",
                "/tmp/p",
                "-T",
                "blockd*",
                "--daemonize",
            ]),
        )
        .unwrap();
        assert_eq!(
            c.opts,
            vec![
                Opt::Blockdev("null-co,node-name=a".into()),
                Opt::Object("iothread,id=io0".into())
            ]
        );
        assert_eq!(c.pidfile.as_deref(), Some("/tmp/p"));
        assert!(c.daemonize);
        assert_eq!(c.trace, vec!["blockd*".to_string()]);
        let m = parse_arg("null-co,node-name=a", Some("driver")).unwrap();
        assert_eq!(m["driver"], "null-co");
        let m = parse_arg(r#"{"driver":"null-co","size":1024}"#, Some("driver")).unwrap();
        assert_eq!(m["size"], 1024);
    }

    #[test]
    fn qemu_wording() {
        assert_eq!(
            parse(PROG, &args(&["--foo"])).unwrap_err(),
            "qemu-storage-daemon: unrecognized option '--foo'"
        );
        assert_eq!(
            parse(PROG, &args(&["-x"])).unwrap_err(),
            "qemu-storage-daemon: invalid option -- 'x'"
        );
        assert_eq!(
            parse(PROG, &args(&["extra"])).unwrap_err(),
            "qemu-storage-daemon: extra: Unexpected argument"
        );
        assert_eq!(
            parse(PROG, &args(&["--blockdev"])).unwrap_err(),
            "qemu-storage-daemon: option '--blockdev' requires an argument"
        );
    }
}
