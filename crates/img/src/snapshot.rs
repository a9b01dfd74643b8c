//! `qemu-img snapshot`: list (`-l`, the default), create (`-c`), apply (`-a`) and delete
//! (`-d`) internal snapshots of a qcow2 image, with qemu-img's messages and exit codes.

use blockd_block::Perm;

use crate::getopt::{self, LongOpt};
use crate::{CmdResult, Failure};

const OPT_IMAGE_OPTS: u32 = 256;
const OPT_OBJECT: u32 = 257;

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

enum Action {
    List,
    Create(String),
    Apply(String),
    Delete(String),
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
        ":la:c:d:f:hqU",
        LONG,
        &format!("{} snapshot", crate::prog()),
    )
    .map_err(|e| Failure::getopt(e, "snapshot"))?;
    let mut action: Option<Action> = None;
    let mut format = None;
    let mut quiet = false;
    let mut force_share = false;
    for (code, arg) in p.opts {
        let arg = arg.unwrap_or_default();
        let next = match char::from_u32(code).unwrap_or('\0') {
            'h' => {
                print!("{}", crate::help::MAIN);
                return Ok(());
            }
            'f' => {
                format = Some(arg);
                continue;
            }
            'q' => {
                quiet = true;
                continue;
            }
            'U' => {
                force_share = true;
                continue;
            }
            'l' => Action::List,
            'c' => Action::Create(arg),
            'a' => Action::Apply(arg),
            'd' => Action::Delete(arg),
            _ if code == OPT_IMAGE_OPTS => {
                return Err(Failure::new(
                    "--image-opts is not supported by blockd-img snapshot yet",
                ));
            }
            _ if code == OPT_OBJECT => {
                return Err(Failure::new("--object is not supported by blockd-img yet"));
            }
            _ => continue,
        };
        if action.is_some() {
            return Err(Failure::usage(
                "Cannot mix '-l', '-a', '-c', '-d'",
                "snapshot",
            ));
        }
        action = Some(next);
    }
    if p.args.len() != 1 {
        return Err(Failure::usage("Expecting one image file name", "snapshot"));
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
            let f = blockd_drivers::graph().probe_format(&h, &name).to_string();
            if f == "raw" && !matches!(action, Some(Action::List) | None) {
                eprint!(
                    "WARNING: Image format was not specified for '{name}' and probing guessed raw.\n         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n         Specify the 'raw' format explicitly to remove the restrictions.\n"
                );
            }
            f
        }
    };
    let action = action.unwrap_or(Action::List);
    let read_only = matches!(action, Action::List);
    let mut graph = blockd_drivers::graph();
    let mut m = serde_json::Map::new();
    m.insert("driver".into(), "file".into());
    m.insert("filename".into(), name.clone().into());
    m.insert("read-only".into(), read_only.into());
    let file = graph
        .open(m)
        .map_err(|e| Failure::new(format!("Could not open '{name}': {e}")))?;
    let perm = if read_only {
        Perm::CONSISTENT_READ
    } else {
        Perm::CONSISTENT_READ | Perm::WRITE
    };
    let shared = if force_share {
        Perm::ALL
    } else {
        Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED
    };
    let be = graph
        .new_backend("", &file, perm, shared)
        .map_err(|e| Failure::new(format!("Could not open '{name}': {e}")))?;
    let block =
        |f: std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + '_>>| {
            blockd_aio::block_on(f)
                .map_err(|e| Failure::new(e.to_string()))?
                .map_err(Failure::new)
        };
    let r = if fmt != "qcow2" {
        match &action {
            Action::List => Ok(()),
            Action::Create(s) => Err(Failure::new(format!(
                "Could not create snapshot '{s}': Operation not supported"
            ))),
            Action::Apply(s) => Err(Failure::new(format!(
                "Could not apply snapshot '{s}': Failed to load snapshot: Operation not supported"
            ))),
            Action::Delete(s) => Err(Failure::new(format!(
                "Could not delete snapshot '{s}': Operation not supported"
            ))),
        }
    } else {
        match &action {
            Action::List => {
                let snaps = blockd_aio::block_on(blockd_qcow2::snapshot::list(&file))
                    .map_err(|e| Failure::new(e.to_string()))?
                    .map_err(|e| Failure::new(format!("Could not open '{name}': {e}")))?;
                if !snaps.is_empty() && !quiet {
                    print!("{}", crate::info::snapshot_table(&snaps));
                }
                Ok(())
            }
            Action::Create(s) => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default();
                let date = (now.as_secs() as u32, now.subsec_micros() * 1000);
                block(Box::pin(blockd_qcow2::snapshot::create(&file, s, date)))
            }
            Action::Apply(s) => block(Box::pin(blockd_qcow2::snapshot::apply(&file, s))),
            Action::Delete(s) => block(Box::pin(blockd_qcow2::snapshot::delete(&file, s))),
        }
    };
    be.detach(&graph);
    r
}
