//! `qemu-img dd`: copy an image (or a part of it) into a new image, with dd's `if= of= bs=
//! count= skip=` operands and qemu-img's semantics: `count` limits the input from its start
//! (before `skip`), the output holds every block (no sparse detection), and skipping past the
//! end is reported but not an error.

use blockd_aio::IoBuf;
use blockd_block::{BlockBackend, Perm, ReqFlags};

use crate::getopt::{self, LongOpt, lo};
use crate::image::{self, Cache, OpenRequest};
use crate::num::{self, NumError};
use crate::target;
use crate::{CmdResult, Failure};

const OPT_IMAGE_OPTS: u32 = 256;
const OPT_OBJECT: u32 = 257;

/// Bytes moved per request (a multiple of `bs`, at least one block).
const CHUNK: u64 = 2 << 20;

const LONG: &[LongOpt] = &[
    lo("help", false, b'h' as u32),
    lo("object", true, OPT_OBJECT),
    lo("image-opts", false, OPT_IMAGE_OPTS),
    lo("force-share", false, b'U' as u32),
    lo("format", true, b'f' as u32),
    lo("output-format", true, b'O' as u32),
];

fn int_operand(v: &str, what: &str) -> Result<u64, Failure> {
    match num::strtol(v) {
        Ok(n) if n >= 0 => Ok(n as u64),
        Ok(_) | Err(NumError::Range) => Err(Failure::new(format!(
            "Invalid {what} specified. Must be between 0 and 9223372036854775807."
        ))),
        Err(NumError::Invalid) => Err(Failure::new(format!("Invalid {what} specified: '{v}'."))),
    }
}

pub fn run(argv: &[String]) -> CmdResult {
    let p = getopt::parse(argv, ":hf:O:U", LONG, &format!("{} dd", crate::prog()))
        .map_err(|e| Failure::getopt(e, "dd"))?;
    let mut fmt: Option<String> = None;
    let mut out_fmt = "raw".to_string();
    let mut image_opts = false;
    let mut force_share = false;
    for (code, arg) in p.opts {
        let arg = arg.unwrap_or_default();
        match code {
            OPT_IMAGE_OPTS => image_opts = true,
            OPT_OBJECT => return Err(Failure::new("--object is not supported by blockd-img yet")),
            _ => match char::from_u32(code).unwrap_or('\0') {
                'h' => {
                    print!("{}", crate::help::DD);
                    return Ok(());
                }
                'f' => fmt = Some(arg),
                'O' => out_fmt = arg,
                'U' => force_share = true,
                _ => {}
            },
        }
    }
    let mut input: Option<String> = None;
    let mut output: Option<String> = None;
    let mut bs: u64 = 512;
    let mut count: Option<u64> = None;
    let mut skip: Option<u64> = None;
    for a in &p.args {
        let (k, v) = match a.split_once('=') {
            Some(kv) => kv,
            None => return Err(Failure::new(format!("unrecognized operand {a}"))),
        };
        match k {
            "if" => input = Some(v.to_string()),
            "of" => output = Some(v.to_string()),
            "bs" => {
                bs = match num::cvtnum(v) {
                    Ok(n) if (1..=i32::MAX as u64).contains(&n) => n,
                    Ok(_) | Err(NumError::Range) => {
                        return Err(Failure::new(
                            "Invalid bs specified. Must be between 1 and 2147483647.",
                        ));
                    }
                    Err(NumError::Invalid) => {
                        return Err(Failure::new(format!("Invalid bs specified: '{v}'.")));
                    }
                }
            }
            "count" => count = Some(int_operand(v, "count")?),
            "skip" => skip = Some(int_operand(v, "skip")?),
            _ => return Err(Failure::new(format!("unrecognized operand {k}"))),
        }
    }
    let (Some(input), Some(output)) = (input, output) else {
        return Err(Failure::new("Must specify both input and output files"));
    };
    if image_opts && fmt.is_some() {
        return Err(Failure::new(
            "--image-opts and --format are mutually exclusive",
        ));
    }
    let req = OpenRequest {
        name: &input,
        image_opts,
        format: fmt.as_deref(),
        cache: Cache::WRITEBACK,
        aio: None,
        read_only: true,
        force_share,
        warn_probe: false,
    };
    let src = image::open(&req).map_err(Failure::new)?;
    let src_blk = BlockBackend::new(
        &src._graph,
        "",
        &src.node,
        Perm::CONSISTENT_READ,
        if force_share {
            Perm::ALL
        } else {
            Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED
        },
    )
    .map_err(|e| Failure::new(format!("Could not open '{input}': {e}")))?;
    if !crate::help::KNOWN_FORMATS.contains(&out_fmt.as_str()) {
        return Err(Failure::new("Unknown file format"));
    }
    if !target::can_create(&out_fmt) {
        return Err(Failure::new(format!(
            "{output}: creating '{out_fmt}' images is not supported by blockd-img yet"
        )));
    }
    // qemu-img: `count` limits the input from its start, `skip` then moves into it.
    let mut size = src_blk.length();
    if let Some(c) = count
        && let Some(b) = c.checked_mul(bs)
        && b < size
    {
        size = b;
    }
    let mut in_pos = 0;
    if let Some(s) = skip {
        match s
            .checked_mul(bs)
            .filter(|&o| o <= size && o <= i64::MAX as u64)
        {
            Some(o) => in_pos = o,
            None => {
                eprintln!("qemu-img: {input}: cannot skip to specified offset");
                in_pos = size;
            }
        }
    }
    let out_size = size - in_pos;
    target::check_unlocked(&output)
        .map_err(|e| Failure::new(format!("{output}: error while creating output image: {e}")))?;
    if out_fmt == "qcow2" {
        let c = target::qcow2_options(out_size, &[], None, None).map_err(Failure::new)?;
        target::create_qcow2(&output, &c).map_err(|e| {
            Failure::new(format!("{output}: error while creating output image: {e}"))
        })?;
    } else {
        target::create_raw(&output, out_size, &target::RawOptions::default()).map_err(|e| {
            Failure::new(format!("{output}: error while creating output image: {e}"))
        })?;
    }
    let oreq = OpenRequest {
        name: &output,
        image_opts: false,
        format: Some(&out_fmt),
        cache: Cache::WRITEBACK,
        aio: None,
        read_only: false,
        force_share: false,
        warn_probe: false,
    };
    let dst = image::open(&oreq).map_err(Failure::new)?;
    let dst_blk = BlockBackend::new(
        &dst._graph,
        "",
        &dst.node,
        Perm::CONSISTENT_READ | Perm::WRITE,
        Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
    )
    .map_err(|e| Failure::new(format!("Could not open '{output}': {e}")))?;
    let step = (CHUNK / bs).max(1) * bs;
    let r = blockd_aio::block_on(async {
        let mut buf = Some(IoBuf::new(step as usize, 4096));
        let mut pos = in_pos;
        while pos < size {
            let n = (size - pos).min(step);
            let mut b = buf.take().expect("buffer");
            b.set_len(n as usize);
            let (r, b) = src_blk.read(pos, b).await;
            r.map_err(|e| {
                format!(
                    "error while reading from input image file: {}",
                    blockd_block::strerror(&e)
                )
            })?;
            let (r, b) = dst_blk.write(pos - in_pos, b, ReqFlags::NONE).await;
            r.map_err(|e| {
                format!(
                    "error while writing to output image file: {}",
                    blockd_block::strerror(&e)
                )
            })?;
            buf = Some(b);
            pos += n;
        }
        dst_blk
            .flush()
            .await
            .map_err(|e| format!("error while flushing: {}", blockd_block::strerror(&e)))
    })
    .map_err(|e| Failure::new(format!("cannot run the event loop: {}", e.context)))?;
    r.map_err(Failure::new)
}
