//! `qemu-img bitmap`: change the persistent dirty bitmaps of an image. The operations
//! (`--add`, `--remove`, `--clear`, `--enable`, `--disable`, `--merge SOURCE`) run in the order
//! given on BITMAP of FILENAME, opened writable; `--merge` takes SOURCE from the image itself
//! or from `-b SRC_FILENAME` (`-F` its format); `-g` is the granularity of `--add`. The first
//! failing operation stops the rest ("Operation OP on bitmap NAME failed: ..."), what was done
//! before it stays, and the bitmaps are written back when the image closes (qcow2's
//! `bitmaps.rs`), as in qemu-img.

use std::sync::Arc;

use blockd_block::dirty_bitmap::{CheckFlags, default_granularity};
use blockd_block::{DirtyBitmap, Graph, Node};

use crate::getopt::{self, LongOpt, lo};
use crate::image::{self, Cache, OpenRequest};
use crate::{CmdResult, Failure};

const OPT_OBJECT: u32 = 256;
const OPT_IMAGE_OPTS: u32 = 257;
const OPT_ADD: u32 = 258;
const OPT_REMOVE: u32 = 259;
const OPT_CLEAR: u32 = 260;
const OPT_ENABLE: u32 = 261;
const OPT_DISABLE: u32 = 262;
const OPT_MERGE: u32 = 263;

const LONG: &[LongOpt] = &[
    lo("help", false, b'h' as u32),
    lo("object", true, OPT_OBJECT),
    lo("image-opts", false, OPT_IMAGE_OPTS),
    lo("add", false, OPT_ADD),
    lo("remove", false, OPT_REMOVE),
    lo("clear", false, OPT_CLEAR),
    lo("enable", false, OPT_ENABLE),
    lo("disable", false, OPT_DISABLE),
    lo("merge", true, OPT_MERGE),
    lo("granularity", true, b'g' as u32),
    lo("source-file", true, b'b' as u32),
    lo("source-format", true, b'F' as u32),
    lo("format", true, b'f' as u32),
];

const HELP: &str = "\
Usage:
Perform modifications of the persistent bitmap in the image.  Usage:

  qemu-img bitmap ( --merge SOURCE | --add | --remove | --clear |
                --enable | --disable ).. [-f FMT | --image-opts]
        [ -b SRC_FILENAME [-F SOURCE_FMT]] [-g SIZE[KMGTPE]] [--object OBJDEF]
        FILENAME BITMAP

Arguments:
  -h, --help
     print this help and exit
  -f, --format FMT
     specify FILENAME format explicitly
  --image-opts
     indicates that FILENAME is a complete image specification
     instead of a file name (incompatible with --format)
  --add
     creates BITMAP, enables to record future edits
   -g, --granularity SIZE[KMGTPE]
     sets non-default bitmap granularity for --add to this size
  --remove
     removes BITMAP
  --clear
     clears BITMAP
  --enable, --disable
     starts and stops recording future edits to BITMAP
  --merge SRC_FILENAME
     merges contents of SRC_FILENAME bitmap into BITMAP
   -b, --source-file SRC_FILENAME
     select alternative source file for --merge
   -F, --source-format SRC_FMT
     specify format for SRC_FILENAME explicitly

";

#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Add,
    Remove,
    Clear,
    Enable,
    Disable,
    Merge(String),
}

impl Op {
    fn name(&self) -> &'static str {
        match self {
            Op::Add => "add",
            Op::Remove => "remove",
            Op::Clear => "clear",
            Op::Enable => "enable",
            Op::Disable => "disable",
            Op::Merge(_) => "merge",
        }
    }
}

pub fn run(argv: &[String]) -> CmdResult {
    let p = getopt::parse(
        argv,
        ":b:f:F:g:h",
        LONG,
        &format!("{} bitmap", crate::prog()),
    )
    .map_err(|e| Failure::getopt(e, "bitmap"))?;
    let mut ops = Vec::new();
    let mut fmt = None;
    let mut image_opts = false;
    let mut source_file: Option<String> = None;
    let mut source_fmt: Option<String> = None;
    let mut granularity: Option<u64> = None;
    for (code, arg) in p.opts {
        let arg = arg.unwrap_or_default();
        match code {
            OPT_OBJECT => return Err(Failure::new("--object is not supported by blockd-img yet")),
            OPT_IMAGE_OPTS => image_opts = true,
            OPT_ADD => ops.push(Op::Add),
            OPT_REMOVE => ops.push(Op::Remove),
            OPT_CLEAR => ops.push(Op::Clear),
            OPT_ENABLE => ops.push(Op::Enable),
            OPT_DISABLE => ops.push(Op::Disable),
            OPT_MERGE => ops.push(Op::Merge(arg)),
            _ => match char::from_u32(code).unwrap_or('\0') {
                'h' => {
                    print!("{HELP}");
                    return Ok(());
                }
                'f' => fmt = Some(arg),
                'b' => source_file = Some(arg),
                'F' => source_fmt = Some(arg),
                'g' => {
                    granularity = Some(blockd_block::options::parse_size(&arg).map_err(|_| {
                        Failure::new(format!("Invalid granularity specified: '{arg}'."))
                    })?)
                }
                _ => {}
            },
        }
    }
    if ops.is_empty() {
        return Err(Failure::new(
            "Need at least one of --add, --remove, --clear, --enable, --disable, or --merge",
        ));
    }
    if granularity.is_some() && !ops.contains(&Op::Add) {
        return Err(Failure::new("granularity only supported with --add"));
    }
    if source_fmt.is_some() && source_file.is_none() {
        return Err(Failure::new("-F only supported with -b"));
    }
    if source_file.is_some() && !ops.iter().any(|o| matches!(o, Op::Merge(_))) {
        return Err(Failure::new(
            "Merge bitmap source file only supported with --merge",
        ));
    }
    if p.args.len() != 2 {
        return Err(Failure::new("Expecting filename and bitmap name"));
    }
    if image_opts && fmt.is_some() {
        return Err(Failure::new(
            "--image-opts and --format are mutually exclusive",
        ));
    }
    let (filename, bitmap) = (&p.args[0], &p.args[1]);
    let opened = image::open(&OpenRequest {
        name: filename,
        image_opts,
        format: fmt.as_deref(),
        cache: Cache::WRITEBACK,
        aio: None,
        read_only: false,
        force_share: false,
        warn_probe: true,
    })
    .map_err(Failure::new)?;
    let source = match &source_file {
        Some(s) => Some(
            image::open(&OpenRequest {
                name: s,
                image_opts: false,
                format: source_fmt.as_deref(),
                cache: Cache::WRITEBACK,
                aio: None,
                read_only: true,
                force_share: false,
                warn_probe: true,
            })
            .map_err(Failure::new)?,
        ),
        None => None,
    };
    let src_node = source.as_ref().map_or(&opened.node, |s| &s.node);
    for op in &ops {
        let g = &opened._graph;
        apply(
            g,
            &opened.node,
            src_node,
            bitmap,
            op,
            granularity.unwrap_or(0),
        )
        .map_err(|e| {
            Failure::new(format!(
                "Operation {} on bitmap {bitmap} failed: {e}",
                op.name()
            ))
        })?;
    }
    // Closing the images (dropping them) stores the bitmaps.
    drop(source);
    drop(opened);
    Ok(())
}

fn find(node: &Node, name: &str) -> Result<Arc<DirtyBitmap>, String> {
    node.dirty_bitmaps()
        .find(name)
        .ok_or_else(|| format!("Dirty bitmap '{name}' not found"))
}

fn check(b: &DirtyBitmap, f: CheckFlags) -> Result<(), String> {
    b.check(f).map_err(|e| e.message)
}

/// One operation, with the checks `block-dirty-bitmap-*` make (qemu-img runs those commands).
fn apply(
    graph: &Graph,
    node: &Node,
    src_node: &Node,
    name: &str,
    op: &Op,
    granularity: u64,
) -> Result<(), String> {
    let list = node.dirty_bitmaps();
    match op {
        Op::Add => {
            if name.is_empty() {
                return Err("Bitmap name cannot be empty".into());
            }
            let g = if granularity == 0 {
                default_granularity(node.driver().cluster_size())
            } else {
                if granularity < 512 || !granularity.is_power_of_two() || granularity > 1 << 31 {
                    return Err("Granularity must be power of 2 and at least 512".into());
                }
                granularity
            };
            if node.driver().dirty_bitmap_list().is_none() {
                return Err(format!(
                    "Can't store persistent bitmaps to {}: Operation not supported",
                    node.name()
                ));
            }
            if let Some(q) = blockd_qcow2::backing_name::qcow2_of(node) {
                q.can_store_new_bitmap(name, g).map_err(|e| {
                    format!(
                        "Can't make bitmap '{name}' persistent in '{}': {e}",
                        node.name()
                    )
                })?;
            }
            if list.find(name).is_some() {
                return Err(format!("Bitmap already exists: {name}"));
            }
            let b = DirtyBitmap::new(Some(name), g, node.length())?;
            b.set_persistent(true);
            list.add(graph, b)
        }
        Op::Remove => {
            let b = find(node, name)?;
            check(&b, CheckFlags::BUSY | CheckFlags::READONLY)?;
            list.remove(graph, &b);
            Ok(())
        }
        Op::Clear => {
            let b = find(node, name)?;
            check(&b, CheckFlags::DEFAULT)?;
            b.clear();
            Ok(())
        }
        Op::Enable | Op::Disable => {
            let b = find(node, name)?;
            check(&b, CheckFlags::ALLOW_RO)?;
            b.set_enabled(*op == Op::Enable);
            Ok(())
        }
        Op::Merge(src) => {
            let dst = find(node, name)?;
            check(&dst, CheckFlags::DEFAULT)?;
            let s = find(src_node, src)?;
            check(&s, CheckFlags::ALLOW_RO)?;
            dst.merge_from(&s)
        }
    }
}
