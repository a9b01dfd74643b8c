//! `qemu-img amend`: change format options of an existing image (qcow2: compat, lazy_refcounts,
//! refcount_bits, size), with qemu-img's command line, checks, messages and progress output.

use std::sync::atomic::Ordering;

use blockd_block::{BlockBackend, Perm};
use blockd_qcow2::amend::{AMEND_HELP, AmendOptions};

use crate::getopt::{self, LongOpt, lo};
use crate::image::{self, Cache, OpenRequest};
use crate::progress::Progress;
use crate::{CmdResult, Failure};

const OPT_OBJECT: u32 = 256;
const OPT_IMAGE_OPTS: u32 = 257;
const OPT_FORCE: u32 = 258;

const LONG: &[LongOpt] = &[
    lo("help", false, b'h' as u32),
    lo("quiet", false, b'q' as u32),
    lo("progress", false, b'p' as u32),
    lo("format", true, b'f' as u32),
    lo("options", true, b'o' as u32),
    lo("cache", true, b't' as u32),
    lo("object", true, OPT_OBJECT),
    lo("image-opts", false, OPT_IMAGE_OPTS),
    lo("force", false, OPT_FORCE),
];

/// `a=b,c` pairs (`,,` escapes a comma; a bare word is `on`, or a help request).
fn split(s: &str) -> Vec<(String, String)> {
    blockd_block::options::split_list(s)
        .into_iter()
        .filter(|it| !it.is_empty())
        .map(|it| match it.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (it.clone(), "on".into()),
        })
        .collect()
}

fn has_help(pairs: &[(String, String)]) -> bool {
    pairs.iter().any(|(k, _)| k == "help" || k == "?")
}

fn print_help(fmt: &str) -> CmdResult {
    if fmt == "qcow2" {
        print!("{AMEND_HELP}");
        Ok(())
    } else {
        Err(Failure::new(format!(
            "Format driver '{fmt}' does not support option amendment"
        )))
    }
}

pub fn run(argv: &[String]) -> CmdResult {
    let p = getopt::parse(
        argv,
        ":ho:f:t:pq",
        LONG,
        &format!("{} amend", crate::prog()),
    )
    .map_err(|e| Failure::getopt(e, "amend"))?;
    let mut fmt: Option<String> = None;
    let mut options: Option<String> = None;
    let mut cache = "writeback".to_string();
    let mut progress = false;
    let mut quiet = false;
    let mut image_opts = false;
    for (code, arg) in p.opts {
        let arg = arg.unwrap_or_default();
        match code {
            OPT_OBJECT => return Err(Failure::new("--object is not supported by blockd-img yet")),
            OPT_IMAGE_OPTS => image_opts = true,
            // Only encryption key changes need it; qcow2 without encryption has none.
            OPT_FORCE => {}
            _ => match char::from_u32(code).unwrap_or('\0') {
                'h' => {
                    print!("{}", crate::help::AMEND);
                    return Ok(());
                }
                'o' => {
                    options = Some(match options {
                        Some(o) => format!("{o},{arg}"),
                        None => arg,
                    })
                }
                'f' => fmt = Some(arg),
                't' => cache = arg,
                'p' => progress = true,
                'q' => quiet = true,
                _ => {}
            },
        }
    }
    let Some(options) = options else {
        return Err(Failure::usage("Must specify options (-o)", "amend"));
    };
    let pairs = split(&options);
    if let Some(f) = &fmt
        && has_help(&pairs)
    {
        return print_help(f);
    }
    if p.args.len() != 1 {
        return Err(Failure::new("Expecting one image file name"));
    }
    let name = &p.args[0];
    let cache_mode = Cache::parse(&cache)
        .ok_or_else(|| Failure::new(format!("Invalid cache option: {cache}")))?;
    if image_opts && fmt.is_some() {
        return Err(Failure::new(
            "--image-opts and --format are mutually exclusive",
        ));
    }
    let req = OpenRequest {
        name,
        image_opts,
        format: fmt.as_deref(),
        cache: cache_mode,
        aio: None,
        read_only: false,
        force_share: false,
        warn_probe: true,
    };
    let opened = image::open(&req).map_err(Failure::new)?;
    let node = opened.node.clone();
    let format = node.driver().format_name();
    if has_help(&pairs) {
        return print_help(format);
    }
    let Some(q) = blockd_qcow2::backing_name::qcow2_of(&node) else {
        return Err(Failure::new(format!(
            "Format driver '{format}' does not support option amendment"
        )));
    };
    let opts = AmendOptions::parse(&pairs).map_err(Failure::new)?;
    let prog = Progress::new(progress && !quiet, 1.0);
    prog.start();
    let r = apply(&opened, q, &opts);
    prog.set(100.0);
    prog.finish();
    r.map_err(Failure::new)
}

fn apply(
    opened: &image::Opened,
    q: &blockd_qcow2::Qcow2,
    opts: &AmendOptions,
) -> Result<(), String> {
    let header = q.image.header();
    opts.validate(&header)?;
    let node = &opened.node;
    let be = BlockBackend::new(
        &opened._graph,
        "",
        node,
        Perm::CONSISTENT_READ | Perm::WRITE | Perm::RESIZE,
        Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
    )?;
    if let Some(size) = opts.size
        && size != be.length()
    {
        run_loop(be.truncate(size))?.map_err(|e| blockd_block::strerror(&e))?;
    }
    // Cached metadata on disk: the rest works on the file below the image.
    run_loop(be.flush())?.map_err(|e| blockd_block::strerror(&e))?;
    // Lazy refcounts: everything written and the dirty bit cleared before the file is changed.
    run_loop(q.image.mark_clean())?.map_err(|e| blockd_block::strerror(&e))?;
    let file = node.child("file").ok_or("The image has no file child")?;
    let r = run_loop(blockd_qcow2::amend::amend(
        &file,
        opts,
        header.backing_file.is_some(),
    ))?;
    // The open image's tables may be stale now: it must not write anything when closed.
    q.image.read_only.store(true, Ordering::Release);
    be.detach(&opened._graph);
    r
}

fn run_loop<T>(f: impl std::future::Future<Output = T>) -> Result<T, String> {
    blockd_aio::block_on(f).map_err(|e| format!("cannot run the event loop: {}", e.context))
}
