//! `qemu-img measure`: the file size a new raw or qcow2 image needs, for a given virtual size or
//! to hold a copy of an existing image.
//!
//! qcow2 figures follow its layout: a header cluster, the L1 table, every L2 table the virtual
//! size needs (metadata is counted as if fully allocated), and refcount blocks plus the
//! refcount table sized for all clusters of a fully allocated image (found by iterating, as the
//! refcount structures count themselves). "required" adds the clusters the source's data
//! touches (block status down its backing chain); "fully allocated" adds every data cluster.

use std::io::Write;

use crate::getopt::{self, LongOpt, lo};
use crate::image::{self, Cache, OpenRequest};
use crate::num::{self, NumError};
use crate::status::status_above;
use crate::target;
use crate::{CmdResult, Failure};

const OPT_OBJECT: u32 = 256;
const OPT_IMAGE_OPTS: u32 = 257;
const OPT_OUTPUT: u32 = 258;
const OPT_SIZE: u32 = 259;

const LONG: &[LongOpt] = &[
    lo("help", false, b'h' as u32),
    lo("image-opts", false, OPT_IMAGE_OPTS),
    lo("object", true, OPT_OBJECT),
    lo("output", true, OPT_OUTPUT),
    lo("size", true, OPT_SIZE),
    lo("force-share", false, b'U' as u32),
    lo("target-format", true, b'O' as u32),
    lo("format", true, b'f' as u32),
    lo("snapshot", true, b'l' as u32),
];

/// The qcow2 layout parameters measure needs.
#[derive(Debug, Clone, Copy)]
pub struct Qcow2Layout {
    pub cluster_size: u64,
    pub refcount_bits: u64,
    pub extended_l2: bool,
}

impl Qcow2Layout {
    /// Clusters of metadata of an image of `size` bytes whose every cluster is allocated.
    pub fn metadata_clusters(&self, size: u64) -> u64 {
        let cs = self.cluster_size;
        let data = size.div_ceil(cs);
        let l2_entry = if self.extended_l2 { 16 } else { 8 };
        let l2_per_table = cs / l2_entry;
        let l2_tables = data.div_ceil(l2_per_table);
        let l1_clusters = (l2_tables * 8).div_ceil(cs);
        let fixed = 1 + l1_clusters + l2_tables;
        let per_block = cs * 8 / self.refcount_bits;
        let (mut blocks, mut table) = (0u64, 0u64);
        loop {
            let total = data + fixed + blocks + table;
            let b = total.div_ceil(per_block);
            let t = (b * 8).div_ceil(cs);
            if b == blocks && t == table {
                break;
            }
            (blocks, table) = (b, t);
        }
        fixed + blocks + table
    }
}

pub fn run(argv: &[String]) -> CmdResult {
    let p = getopt::parse(
        argv,
        ":hf:O:o:l:U",
        LONG,
        &format!("{} measure", crate::prog()),
    )
    .map_err(|e| Failure::getopt(e, "measure"))?;
    let mut fmt: Option<String> = None;
    let mut out_fmt = "raw".to_string();
    let mut optstr: Vec<String> = Vec::new();
    let mut json = false;
    let mut size: Option<u64> = None;
    let mut image_opts = false;
    let mut force_share = false;
    let mut snapshot = false;
    for (code, arg) in p.opts {
        let arg = arg.unwrap_or_default();
        match code {
            OPT_OBJECT => return Err(Failure::new("--object is not supported by blockd-img yet")),
            OPT_IMAGE_OPTS => image_opts = true,
            OPT_OUTPUT => {
                json = match arg.as_str() {
                    "json" => true,
                    "human" => false,
                    _ => {
                        return Err(Failure::usage(
                            format!("--output expects 'human' or 'json' not '{arg}'"),
                            "measure",
                        ));
                    }
                }
            }
            OPT_SIZE => {
                size = Some(num::cvtnum(&arg).map_err(|e| match e {
                    NumError::Invalid => {
                        Failure::new(format!("Invalid image size specified: '{arg}'."))
                    }
                    NumError::Range => Failure::new(
                        "Invalid image size specified. Must be between 0 and 9223372036854775807.",
                    ),
                })?)
            }
            _ => match char::from_u32(code).unwrap_or('\0') {
                'h' => {
                    print!("{}", crate::help::MEASURE);
                    return Ok(());
                }
                'f' => fmt = Some(arg),
                'O' => out_fmt = arg,
                'o' => optstr.push(arg),
                'l' => snapshot = true,
                'U' => force_share = true,
                _ => {}
            },
        }
    }
    if image_opts && fmt.is_some() {
        return Err(Failure::new(
            "--image-opts and --format are mutually exclusive",
        ));
    }
    if p.args.len() > 1 {
        return Err(Failure::new("At most one filename argument is allowed."));
    }
    let filename = p.args.first();
    match (size, filename) {
        (Some(_), Some(_)) => {
            return Err(Failure::new(
                "--size N cannot be used together with a filename.",
            ));
        }
        (None, None) => {
            return Err(Failure::new(
                "Either --size N or one filename must be specified.",
            ));
        }
        _ => {}
    }
    // The source: its virtual size and where its data is.
    let mut source = None;
    if let Some(name) = filename {
        let req = OpenRequest {
            name,
            image_opts,
            format: fmt.as_deref(),
            cache: Cache::WRITEBACK,
            aio: None,
            read_only: true,
            force_share,
            warn_probe: false,
        };
        let opened = image::open(&req).map_err(Failure::new)?;
        if snapshot {
            let f = opened.node.driver().format_name();
            return Err(Failure::new(if f == "qcow2" {
                "Loading internal snapshots (-l) is not supported by blockd-img yet".to_string()
            } else {
                format!(
                    "Failed to load snapshot: Block format '{f}' used by device '' does not support temporarily loading internal snapshots"
                )
            }));
        }
        source = Some(opened);
    }
    if !crate::help::KNOWN_FORMATS.contains(&out_fmt.as_str()) {
        return Err(Failure::new(format!("Unknown file format '{out_fmt}'")));
    }
    let joined = optstr.join(",");
    let opts = if optstr.is_empty() {
        Vec::new()
    } else {
        target::split_opts(&joined)
            .ok_or_else(|| Failure::new(format!("Invalid option list: {joined}")))?
    };
    let virtual_size = match (&source, size) {
        (Some(s), _) => s.node.length(),
        (None, Some(n)) => n,
        (None, None) => unreachable!("checked above"),
    };
    let (required, fully, bitmaps) = match out_fmt.as_str() {
        "raw" => {
            target::raw_options(&opts).map_err(|e| {
                Failure::new(format!(
                    "{e}\nqemu-img: Invalid options for file format 'raw'"
                ))
            })?;
            let n = virtual_size.div_ceil(512) * 512;
            (n, n, None)
        }
        "qcow2" => {
            let c = blockd_qcow2::CreateOptions::from_qemu_opts(&opts).map_err(|e| {
                Failure::new(format!(
                    "{e}\nqemu-img: Invalid options for file format 'qcow2'"
                ))
            })?;
            qcow2_checks(&c, &opts).map_err(Failure::new)?;
            if l1_bytes(c.cluster_size, c.extended_l2, virtual_size) > MAX_L1_BYTES {
                return Err(Failure::new(
                    "The image size is too large (try using a larger cluster size)",
                ));
            }
            let layout = Qcow2Layout {
                cluster_size: c.cluster_size,
                refcount_bits: c.refcount_bits,
                extended_l2: c.extended_l2,
            };
            let vsize = virtual_size.div_ceil(512) * 512;
            let cs = layout.cluster_size;
            let meta = layout.metadata_clusters(vsize) * cs;
            let fully = meta + vsize.div_ceil(cs) * cs;
            let preallocated = matches!(
                c.preallocation,
                blockd_qcow2::create::Prealloc::Falloc | blockd_qcow2::create::Prealloc::Full
            );
            let data = match &source {
                Some(s) if !preallocated => data_bytes(&s.node, cs).map_err(Failure::new)?,
                _ => vsize.div_ceil(cs) * cs,
            };
            let required = if preallocated {
                fully
            } else if source.is_some() {
                meta + data
            } else {
                meta
            };
            // Persistent bitmaps are copied by convert --bitmaps: qcow2 sources report their
            // size (none of the images blockd can read carry bitmaps it would copy).
            let bitmaps = source
                .as_ref()
                .filter(|s| is_qcow2_v3(&s.node))
                .map(|s| bitmaps_size(&s.node))
                .transpose()
                .map_err(Failure::new)?;
            (required, fully, bitmaps)
        }
        other => {
            return Err(Failure::new(format!(
                "Block driver '{other}' does not support size measurement"
            )));
        }
    };
    let mut out = std::io::stdout().lock();
    if json {
        let _ = writeln!(out, "{{");
        if let Some(b) = bitmaps {
            let _ = writeln!(out, "    \"bitmaps\": {b},");
        }
        let _ = writeln!(out, "    \"required\": {required},");
        let _ = writeln!(out, "    \"fully-allocated\": {fully}");
        let _ = writeln!(out, "}}");
    } else {
        let _ = writeln!(out, "required size: {required}");
        let _ = writeln!(out, "fully allocated size: {fully}");
        if let Some(b) = bitmaps {
            let _ = writeln!(out, "bitmaps size: {b}");
        }
    }
    Ok(())
}

/// Bytes of whole target clusters the image's data touches (qemu-img walks block status down
/// the chain; zero extents need nothing, a data extent counts every cluster it touches).
fn data_bytes(node: &std::sync::Arc<blockd_block::Node>, cs: u64) -> Result<u64, String> {
    let len = node.length();
    blockd_aio::block_on(async {
        let mut total = 0u64;
        let mut off = 0u64;
        while off < len {
            let e = status_above(node, off, len - off, u32::MAX)
                .await
                .map_err(|e| blockd_block::strerror(&e))?;
            let mut n = e.len;
            if !e.zero && e.data && e.present {
                // Up to the end of the cluster the extent ends in.
                let end = (off + n).div_ceil(cs) * cs;
                n = end - off;
                total += off % cs + n;
            }
            off += n;
        }
        Ok(total)
    })
    .map_err(|e| format!("cannot run the event loop: {}", e.context))?
}

/// The checks qemu-img measure makes of qcow2 options (fewer than create makes).
fn qcow2_checks(c: &blockd_qcow2::CreateOptions, opts: &[(String, String)]) -> Result<(), String> {
    let cs = c.cluster_size;
    if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
        return Err("Cluster size must be a power of two between 512 and 2048k".into());
    }
    if c.extended_l2 && cs < 16384 {
        return Err(
            "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"
                .into(),
        );
    }
    let last = |k: &str| opts.iter().rev().find(|(key, _)| key == k).map(|(_, v)| v);
    if let Some(v) = last("compat")
        && !matches!(v.as_str(), "0.10" | "v2" | "1.1" | "v3")
    {
        return Err(format!("Invalid compatibility level: '{v}'"));
    }
    if let Some(v) = last("preallocation")
        && !matches!(v.as_str(), "off" | "metadata" | "falloc" | "full")
    {
        return Err(format!("invalid parameter value: {v}"));
    }
    let rb = c.refcount_bits;
    if !rb.is_power_of_two() || rb > 64 {
        return Err("Refcount width must be a power of two and may not exceed 64 bits".into());
    }
    Ok(())
}

/// qemu-img's limit on the L1 table (32 MiB).
const MAX_L1_BYTES: u64 = 32 << 20;

/// Bytes of the L1 table of an image of `size` bytes (valid cluster sizes only; others are
/// refused by the option checks).
fn l1_bytes(cluster_size: u64, extended_l2: bool, size: u64) -> u64 {
    if !cluster_size.is_power_of_two() || !(512..=2 << 20).contains(&cluster_size) {
        return 0;
    }
    let per_l2 = cluster_size / if extended_l2 { 16 } else { 8 };
    size.div_ceil(cluster_size).div_ceil(per_l2) * 8
}

/// A qcow2 version 3 image (the version that can carry persistent bitmaps).
fn is_qcow2_v3(node: &blockd_block::Node) -> bool {
    node.driver().format_name() == "qcow2"
        && node
            .driver()
            .format_specific()
            .and_then(|v| {
                v.get("data")
                    .and_then(|d| d.get("compat"))
                    .and_then(|c| c.as_str().map(|c| c != "0.10"))
            })
            .unwrap_or(false)
}

/// The size persistent bitmaps of a qcow2 source would take: none is supported yet, so an
/// image that has some is refused rather than measured wrongly.
fn bitmaps_size(node: &blockd_block::Node) -> Result<u64, String> {
    let has_bitmaps = node
        .driver()
        .format_specific()
        .and_then(|v| v.get("data").and_then(|d| d.get("bitmaps")).cloned())
        .and_then(|b| b.as_array().map(|a| !a.is_empty()))
        .unwrap_or(false);
    if has_bitmaps {
        return Err(
            "Measuring images with persistent bitmaps is not supported by blockd-img yet".into(),
        );
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::Qcow2Layout;

    #[test]
    fn metadata_sizes_match_qemu() {
        let l = |cluster_size, refcount_bits, extended_l2| Qcow2Layout {
            cluster_size,
            refcount_bits,
            extended_l2,
        };
        // Figures printed by qemu-img measure 10.0.2.
        assert_eq!(l(65536, 16, false).metadata_clusters(1 << 30), 6);
        assert_eq!(l(65536, 16, false).metadata_clusters(0), 3);
        assert_eq!(l(4096, 16, false).metadata_clusters(1 << 30), 644);
        assert_eq!(l(65536, 16, true).metadata_clusters(1 << 30), 8);
        assert_eq!(l(2 << 20, 16, false).metadata_clusters(10 << 40), 29);
        assert_eq!(l(512, 64, false).metadata_clusters(1 << 30), 67635);
    }
}
