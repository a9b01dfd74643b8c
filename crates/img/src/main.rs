//! `blockd-img`: qemu-img's `create -f raw`, `info` and `bench` on blockd's block layer, with
//! qemu-img's command lines, output lines, error messages and exit codes (messages keep the
//! `qemu-img` prefix so golden outputs and scripts match).

#![forbid(unsafe_code)]

mod amend;
mod bench;
mod bitmap;
mod check;
mod commit;
mod compare;
mod convert;
mod create;
mod dd;
mod getopt;
mod help;
mod image;
mod info;
mod map;
mod measure;
mod num;
mod progress;
mod rebase;
mod resize;
mod snapshot;
mod status;
mod target;

use std::process::ExitCode;

/// A failure: the message (without the `qemu-img: ` prefix, possibly several lines), and
/// whether the "Try ... --help" hint follows it.
pub struct Failure {
    pub msg: String,
    pub hint: Option<&'static str>,
}

impl Failure {
    pub fn new(msg: impl Into<String>) -> Failure {
        Failure {
            msg: msg.into(),
            hint: None,
        }
    }
    pub fn usage(msg: impl Into<String>, cmd: &'static str) -> Failure {
        Failure {
            msg: msg.into(),
            hint: Some(cmd),
        }
    }
    /// A failure whose messages were printed already (exit code 1, nothing more to say).
    pub fn reported() -> Failure {
        Failure {
            msg: "\0".into(),
            hint: None,
        }
    }
    /// A getopt error: printed as is (it carries its own `qemu-img CMD:` prefix).
    pub fn getopt(msg: String, cmd: &'static str) -> Failure {
        Failure {
            msg: format!("\0{msg}"),
            hint: Some(cmd),
        }
    }
}

/// argv[0] as invoked: qemu-img names itself so in getopt errors and "Try ..." hints.
pub fn prog() -> String {
    std::env::args().next().unwrap_or_else(|| "qemu-img".into())
}

pub type CmdResult = Result<(), Failure>;

fn report(f: Failure) -> ExitCode {
    if f.msg == "\0" && f.hint.is_none() {
        return ExitCode::from(1);
    }
    let mut out = String::new();
    match f.msg.strip_prefix('\0') {
        Some(raw) => out.push_str(raw),
        None => {
            out.push_str("qemu-img: ");
            out.push_str(&f.msg);
        }
    }
    out.push('\n');
    if let Some(cmd) = f.hint {
        if cmd.is_empty() {
            out.push_str(&format!("Try '{} --help' for more info\n", prog()));
        } else {
            out.push_str(&format!("Try '{} {cmd} --help' for more info\n", prog()));
        }
    }
    eprint!("{out}");
    ExitCode::from(1)
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = argv.first() else {
        return report(Failure::usage("Not enough arguments", ""));
    };
    let rest = &argv[1..];
    let r = match cmd.as_str() {
        "-h" | "--help" => {
            print!("{}", help::MAIN);
            Ok(())
        }
        "-V" | "--version" => {
            print!("{}", help::VERSION);
            Ok(())
        }
        "create" => create::run(rest),
        "info" => info::run(rest),
        "bench" => bench::run(rest),
        "check" => check::run(rest),
        "snapshot" => snapshot::run(rest),
        "convert" => convert::run(rest),
        "map" => map::run(rest),
        "compare" => compare::run(rest),
        "resize" => resize::run(rest),
        "dd" => dd::run(rest),
        "measure" => measure::run(rest),
        "rebase" => rebase::run(rest),
        "commit" => commit::run(rest),
        "amend" => amend::run(rest),
        "bitmap" => bitmap::run(rest),
        other => Err(Failure::usage(format!("Command not found: {other}"), "")),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => report(f),
    }
}
