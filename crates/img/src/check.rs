//! `qemu-img check`: the consistency check of a qcow2 image (blockd-qcow2's `check`), with
//! `-r leaks|all` repair, qemu-img's text and `--output=json` reports, and its exit codes
//! (0 clean, 1 check not completed, 2 corruptions, 3 leaks; 63 when the format has no check).

use std::io::Write;

use blockd_block::Perm;
use blockd_qcow2::{CheckReport, Repair};

use crate::getopt::{self, LongOpt};
use crate::{CmdResult, Failure};

const OPT_OUTPUT: u32 = 256;
const OPT_IMAGE_OPTS: u32 = 257;
const OPT_OBJECT: u32 = 258;

const LONG: &[LongOpt] = &[
    LongOpt {
        name: "help",
        has_arg: false,
        code: b'h' as u32,
    },
    LongOpt {
        name: "format",
        has_arg: true,
        code: b'f' as u32,
    },
    LongOpt {
        name: "repair",
        has_arg: true,
        code: b'r' as u32,
    },
    LongOpt {
        name: "output",
        has_arg: true,
        code: OPT_OUTPUT,
    },
    LongOpt {
        name: "quiet",
        has_arg: false,
        code: b'q' as u32,
    },
    LongOpt {
        name: "force-share",
        has_arg: false,
        code: b'U' as u32,
    },
    LongOpt {
        name: "image-opts",
        has_arg: false,
        code: OPT_IMAGE_OPTS,
    },
    LongOpt {
        name: "object",
        has_arg: true,
        code: OPT_OBJECT,
    },
];

fn exit_now(code: i32) -> ! {
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    std::process::exit(code)
}

fn read_probe(name: &str) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut f = std::fs::File::open(name)?;
    let mut buf = vec![0u8; 2048];
    let n = f.read(&mut buf)?;
    buf.truncate(n);
    Ok(buf)
}

pub fn run(argv: &[String]) -> CmdResult {
    let p = getopt::parse(
        argv,
        ":hf:r:T:qU",
        LONG,
        &format!("{} check", crate::prog()),
    )
    .map_err(|e| Failure::getopt(e, "check"))?;
    let mut format = None;
    let mut repair = Repair::None;
    let mut json = false;
    let mut quiet = false;
    let mut force_share = false;
    for (code, arg) in p.opts {
        let arg = arg.unwrap_or_default();
        match code {
            c if c == b'h' as u32 => {
                print!("{}", crate::help::MAIN);
                return Ok(());
            }
            c if c == b'f' as u32 => format = Some(arg),
            c if c == b'r' as u32 => {
                repair = match arg.as_str() {
                    "leaks" => Repair::Leaks,
                    "all" => Repair::All,
                    _ => {
                        return Err(Failure::usage(
                            format!("--repair (-r) expects 'leaks' or 'all' not '{arg}'"),
                            "check",
                        ));
                    }
                }
            }
            c if c == b'q' as u32 => quiet = true,
            c if c == b'U' as u32 => force_share = true,
            c if c == b'T' as u32 => {}
            OPT_OUTPUT => match arg.as_str() {
                "human" => json = false,
                "json" => json = true,
                other => {
                    return Err(Failure::usage(
                        format!("--output expects 'human' or 'json' not '{other}'"),
                        "check",
                    ));
                }
            },
            OPT_IMAGE_OPTS => {
                return Err(Failure::new(
                    "--image-opts is not supported by blockd-img check yet",
                ));
            }
            OPT_OBJECT => return Err(Failure::new("--object is not supported by blockd-img yet")),
            _ => {}
        }
    }
    if p.args.len() != 1 {
        return Err(Failure::usage("Expecting one image file name", "check"));
    }
    let name = p.args[0].clone();
    let fmt = match format {
        Some(f) => f,
        None => {
            let h = read_probe(&name).map_err(|e| {
                Failure::new(format!(
                    "Could not open '{name}': Could not open '{name}': {}",
                    blockd_block::strerror(&e)
                ))
            })?;
            blockd_drivers::graph().probe_format(&h, &name).to_string()
        }
    };
    if fmt != "qcow2" {
        eprintln!("qemu-img: This image format does not support checks");
        exit_now(63);
    }
    let mut graph = blockd_drivers::graph();
    let mut m = serde_json::Map::new();
    m.insert("driver".into(), "file".into());
    m.insert("filename".into(), name.clone().into());
    m.insert("read-only".into(), (repair == Repair::None).into());
    let file = graph
        .open(m)
        .map_err(|e| Failure::new(format!("Could not open '{name}': {e}")))?;
    // As QEMU's open of the image: its data file settings must hold and the data file must
    // open (the check itself only reads the image's own metadata).
    let data = blockd_qcow2::read_header_file(&name)
        .ok()
        .map(|h| blockd_qcow2::driver::data_file_path(&h))
        .transpose()
        .map_err(|e| Failure::new(format!("Could not open '{name}': {e}")))?
        .flatten();
    if let Some(path) = data {
        let mut m = serde_json::Map::new();
        m.insert("driver".into(), "file".into());
        m.insert("filename".into(), path.into());
        m.insert("read-only".into(), (repair == Repair::None).into());
        graph
            .open(m)
            .map_err(|e| Failure::new(format!("Could not open '{name}': {e}")))?;
    }
    let mut perm = Perm::CONSISTENT_READ;
    if repair != Repair::None {
        perm = perm | Perm::WRITE;
    }
    let shared = if force_share {
        Perm::ALL
    } else {
        Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED
    };
    let be = graph
        .new_backend("", &file, perm, shared)
        .map_err(|e| Failure::new(format!("Could not open '{name}': {e}")))?;
    let run_check = |r: Repair| -> Result<CheckReport, Failure> {
        blockd_aio::block_on(blockd_qcow2::check(&file, r))
            .map_err(|e| Failure::new(e.to_string()))?
            .map_err(|e| Failure::new(format!("Could not open '{name}': {e}")))
    };
    let first = run_check(repair)?;
    for line in &first.messages {
        eprintln!("{line}");
    }
    if let Some(e) = &first.failed {
        eprintln!("qemu-img: Check failed: {e}");
        exit_now(1);
    }
    let fixed = first.leaks_fixed + first.corruptions_fixed;
    let report = if fixed > 0 {
        // QEMU double-checks the repaired image and reports that, with the fixed counts.
        let mut second = run_check(Repair::None)?;
        // What the double check still finds is reported as QEMU's second pass prints it.
        for line in &second.messages {
            eprintln!("{line}");
        }
        second.leaks_fixed = first.leaks_fixed;
        second.corruptions_fixed = first.corruptions_fixed;
        second.leaks += first.leaks_fixed;
        second.corruptions += first.corruptions_fixed;
        second.check_errors += first.check_errors;
        second
    } else {
        first
    };
    be.detach(&graph);
    if !quiet {
        if json {
            print!("{}", report.to_json(&name));
        } else {
            print!("{}", report.to_text());
        }
    }
    let code = report.exit_code();
    if code != 0 {
        exit_now(code);
    }
    Ok(())
}
