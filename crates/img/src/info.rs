//! `qemu-img info` for raw, file and null-co images: the human text and the JSON of qemu-img
//! (key order, 4-space indentation, empty arrays/objects on two lines).

use std::os::unix::fs::MetadataExt;

use serde_json::{Map, Value};

use crate::getopt::{self, LongOpt};
use crate::image::{self, Cache, OpenRequest};
use crate::{CmdResult, Failure};

const OPT_IMAGE_OPTS: u32 = 256;
const OPT_OUTPUT: u32 = 257;
const OPT_OBJECT: u32 = 258;
const OPT_BACKING_CHAIN: u32 = b'b' as u32;

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
        name: "output",
        has_arg: true,
        code: OPT_OUTPUT,
    },
    LongOpt {
        name: "backing-chain",
        has_arg: false,
        code: OPT_BACKING_CHAIN,
    },
    LongOpt {
        name: "object",
        has_arg: true,
        code: OPT_OBJECT,
    },
    LongOpt {
        name: "image-opts",
        has_arg: false,
        code: OPT_IMAGE_OPTS,
    },
    LongOpt {
        name: "force-share",
        has_arg: false,
        code: b'U' as u32,
    },
];

/// What info reports about one node.
pub struct NodeInfo {
    pub filename: String,
    pub format: String,
    pub virtual_size: u64,
    pub actual_size: u64,
    /// `format-specific` of the file protocol (`{"type": "file", "data": {}}`).
    pub file_specific: bool,
    pub dirty_flag: bool,
    pub children: Vec<(String, NodeInfo)>,
    /// Formats with more to say (qcow2).
    pub extra: Option<FormatExtra>,
}

/// What a qcow2 image adds to info: cluster size, backing file, format-specific data.
pub struct FormatExtra {
    pub cluster_size: u64,
    /// Backing name as stored, as resolved, and its format.
    pub backing: Option<(String, String, Option<String>)>,
    /// `{"type": ..., "data": {...}}` and the human lines of `data`.
    pub specific: Value,
    pub specific_lines: Vec<(String, String)>,
    pub dirty: bool,
    pub snapshots: Vec<blockd_qcow2::image::Snapshot>,
}

/// Civil date and time (UTC) of a Unix time: qemu-img prints snapshot dates in local time,
/// which blockd takes to be UTC.
fn utc(secs: u64) -> (i64, u32, u32, u64, u64, u64) {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d, rem / 3600, rem / 60 % 60, rem % 60)
}

/// qemu-img's "Snapshot list:" table.
pub fn snapshot_table(snaps: &[blockd_qcow2::image::Snapshot]) -> String {
    let mut o = String::from("Snapshot list:\n");
    o += &format!(
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}\n",
        "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
    );
    for sn in snaps {
        let (y, mo, d, h, mi, se) = utc(sn.date_sec as u64);
        let date = format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{se:02}");
        let ms = sn.vm_clock_nsec / 1_000_000;
        let clock = format!(
            "{:04}:{:02}:{:02}.{:03}",
            ms / 3_600_000,
            ms / 60_000 % 60,
            ms / 1000 % 60,
            ms % 1000
        );
        let icount = sn.icount.map(|i| i.to_string()).unwrap_or_default();
        o += &format!(
            "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}\n",
            sn.id,
            sn.name,
            human_size(sn.vm_state_size),
            date,
            clock,
            icount
        );
    }
    o
}

fn snapshots_json(snaps: &[blockd_qcow2::image::Snapshot], ind: usize) -> String {
    let p1 = " ".repeat(ind + 4);
    let p2 = " ".repeat(ind + 8);
    let items: Vec<String> = snaps
        .iter()
        .map(|sn| {
            let mut f = Vec::new();
            if let Some(i) = sn.icount {
                f.push(format!("{p2}\"icount\": {i}"));
            }
            f.push(format!(
                "{p2}\"vm-clock-nsec\": {}",
                sn.vm_clock_nsec % 1_000_000_000
            ));
            f.push(format!("{p2}\"name\": {}", json_str(&sn.name)));
            f.push(format!("{p2}\"date-sec\": {}", sn.date_sec));
            f.push(format!("{p2}\"date-nsec\": {}", sn.date_nsec));
            f.push(format!(
                "{p2}\"vm-clock-sec\": {}",
                sn.vm_clock_nsec / 1_000_000_000
            ));
            f.push(format!("{p2}\"id\": {}", json_str(&sn.id)));
            f.push(format!("{p2}\"vm-state-size\": {}", sn.vm_state_size));
            format!("{p1}{{\n{}\n{p1}}}", f.join(",\n"))
        })
        .collect();
    format!("[\n{}\n{}]", items.join(",\n"), " ".repeat(ind))
}

fn allocated(filename: &str) -> u64 {
    std::fs::metadata(filename)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

fn round512(n: u64) -> u64 {
    n.div_ceil(512).saturating_mul(512)
}

fn str_of(m: &Map<String, Value>, k: &str) -> Option<String> {
    m.get(k).map(|v| match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    })
}

/// QEMU's name for a null-co node opened from options: `json:{...}` of the options that
/// matter, or `null-co://` when only the driver was given.
fn null_filename(driver: &str, m: &Map<String, Value>) -> String {
    let mut parts = Vec::new();
    for k in ["read-zeroes", "driver", "size"] {
        if let Some(v) = str_of(m, k) {
            parts.push(format!("{}: {}", json_str(k), json_str(&v)));
        }
    }
    if parts.len() <= 1 {
        return format!("{driver}://");
    }
    format!("json:{{{}}}", parts.join(", "))
}

fn describe(
    m: &Map<String, Value>,
    length: u64,
    node: Option<&std::sync::Arc<blockd_block::Node>>,
) -> Result<NodeInfo, String> {
    let driver = str_of(m, "driver").unwrap_or_default();
    match driver.as_str() {
        "qcow2" => {
            let node = node.ok_or("info needs the opened qcow2 node")?;
            let file = match m.get("file") {
                Some(Value::Object(f)) => f.clone(),
                _ => Map::new(),
            };
            let fname = str_of(&file, "filename").unwrap_or_default();
            let child = describe(&file, file_length(&file, length), None)?;
            let h = blockd_qcow2::read_header_file(&fname)?;
            let d = node.driver();
            let backing = h.backing_file.clone().map(|b| {
                let full = blockd_qcow2::driver::resolve_backing(Some(&fname), &b)
                    .unwrap_or_else(|_| b.clone());
                (b, full, h.backing_format.clone())
            });
            Ok(NodeInfo {
                filename: child.filename.clone(),
                format: "qcow2".into(),
                virtual_size: length,
                actual_size: child.actual_size,
                file_specific: false,
                dirty_flag: true,
                children: vec![("file".into(), child)],
                extra: Some(FormatExtra {
                    cluster_size: h.cluster_size(),
                    backing,
                    specific: d.format_specific().unwrap_or(Value::Null),
                    specific_lines: d.info(),
                    dirty: d.is_dirty(),
                    snapshots: blockd_qcow2::read_snapshots_file(&fname)?,
                }),
            })
        }
        "file" | "host_device" => {
            let filename = str_of(m, "filename").unwrap_or_default();
            Ok(NodeInfo {
                actual_size: allocated(&filename),
                filename,
                format: driver.clone(),
                virtual_size: round512(length),
                file_specific: true,
                dirty_flag: true,
                children: Vec::new(),
                extra: None,
            })
        }
        "raw" => {
            let file = match m.get("file") {
                Some(Value::Object(f)) => f.clone(),
                _ => Map::new(),
            };
            let child = describe(&file, file_length(&file, length), None)?;
            Ok(NodeInfo {
                filename: child.filename.clone(),
                format: "raw".into(),
                virtual_size: round512(length),
                actual_size: child.actual_size,
                file_specific: false,
                dirty_flag: true,
                children: vec![("file".into(), child)],
                extra: None,
            })
        }
        "null-co" | "null-aio" => Ok(NodeInfo {
            filename: null_filename(&driver, m),
            format: driver.clone(),
            virtual_size: length,
            actual_size: 0,
            file_specific: false,
            dirty_flag: false,
            children: Vec::new(),
            extra: None,
        }),
        other => Err(format!("info is not implemented for driver '{other}'")),
    }
}

fn file_length(file: &Map<String, Value>, fallback: u64) -> u64 {
    str_of(file, "filename")
        .and_then(|f| std::fs::metadata(f).ok())
        .map(|m| m.len())
        .unwrap_or(fallback)
}

/// `qemu-img info`'s human size: the smallest binary unit in which the value is below 1000,
/// printed with `%0.3g`.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1000.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    format!("{} {}", fmt_g3(v), UNITS[i])
}

/// C's `%.3g`.
pub fn fmt_g3(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let e = format!("{v:.2e}");
    let (mant, exp) = e.split_once('e').unwrap_or((&e, "0"));
    let x: i32 = exp.parse().unwrap_or(0);
    let strip = |s: String| -> String {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        }
    };
    if (-4..3).contains(&x) {
        let decimals = (2 - x).max(0) as usize;
        strip(format!("{v:.decimals$}"))
    } else {
        let m = strip(mant.to_string());
        let sign = if x < 0 { '-' } else { '+' };
        format!("{m}e{sign}{:02}", x.abs())
    }
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| format!("\"{s}\""))
}

pub fn human(info: &NodeInfo, image_name: &str) -> String {
    let mut o = String::new();
    o += &format!("image: {image_name}\n");
    o += &format!("file format: {}\n", info.format);
    o += &format!(
        "virtual size: {} ({} bytes)\n",
        human_size(info.virtual_size),
        info.virtual_size
    );
    o += &format!("disk size: {}\n", human_size(info.actual_size));
    if let Some(x) = &info.extra {
        o += &format!("cluster_size: {}\n", x.cluster_size);
        if let Some((b, full, fmt)) = &x.backing {
            if b == full {
                o += &format!("backing file: {b}\n");
            } else {
                o += &format!("backing file: {b} (actual path: {full})\n");
            }
            if let Some(f) = fmt {
                o += &format!("backing file format: {f}\n");
            }
        }
        if !x.snapshots.is_empty() {
            o += &snapshot_table(&x.snapshots);
        }
        if !x.specific_lines.is_empty() {
            o += "Format specific information:\n";
            for (k, v) in &x.specific_lines {
                if v.starts_with('\n') {
                    o += &format!("    {k}:{v}\n");
                } else {
                    o += &format!("    {k}: {v}\n");
                }
            }
        }
    }
    for (name, c) in &info.children {
        o += &format!("Child node '/{name}':\n");
        o += &format!("    filename: {}\n", c.filename);
        o += &format!("    protocol type: {}\n", c.format);
        o += &format!(
            "    file length: {} ({} bytes)\n",
            human_size(c.virtual_size),
            c.virtual_size
        );
        o += &format!("    disk size: {}\n", human_size(c.actual_size));
    }
    o
}

fn json_node(info: &NodeInfo, ind: usize, o: &mut String) {
    let p = " ".repeat(ind);
    let p1 = " ".repeat(ind + 4);
    *o += "{\n";
    *o += &format!("{p1}\"children\": [\n");
    for (i, (name, c)) in info.children.iter().enumerate() {
        let p2 = " ".repeat(ind + 8);
        let p3 = " ".repeat(ind + 12);
        *o += &format!("{p2}{{\n{p3}\"name\": {},\n{p3}\"info\": ", json_str(name));
        json_node(c, ind + 12, o);
        *o += &format!("\n{p2}}}");
        *o += if i + 1 < info.children.len() {
            ",\n"
        } else {
            "\n"
        };
    }
    *o += &format!("{p1}],\n");
    let x = info.extra.as_ref();
    if let Some((_, _, Some(f))) = x.and_then(|x| x.backing.as_ref()) {
        *o += &format!("{p1}\"backing-filename-format\": {},\n", json_str(f));
    }
    if let Some(x) = x
        && !x.snapshots.is_empty()
    {
        *o += &format!(
            "{p1}\"snapshots\": {},\n",
            snapshots_json(&x.snapshots, ind + 4)
        );
    }
    *o += &format!("{p1}\"virtual-size\": {},\n", info.virtual_size);
    *o += &format!("{p1}\"filename\": {},\n", json_str(&info.filename));
    if let Some(x) = x {
        *o += &format!("{p1}\"cluster-size\": {},\n", x.cluster_size);
    }
    *o += &format!("{p1}\"format\": {},\n", json_str(&info.format));
    *o += &format!("{p1}\"actual-size\": {}", info.actual_size);
    if let Some(x) = x {
        *o += &format!(
            ",\n{p1}\"format-specific\": {}",
            json_value(&x.specific, ind + 4)
        );
        if let Some((b, full, _)) = &x.backing {
            *o += &format!(",\n{p1}\"full-backing-filename\": {}", json_str(full));
            *o += &format!(",\n{p1}\"backing-filename\": {}", json_str(b));
        }
        *o += &format!(",\n{p1}\"dirty-flag\": {}\n{p}}}", x.dirty);
        return;
    }
    if info.file_specific {
        *o += &format!(
            ",\n{p1}\"format-specific\": {{\n{p1}    \"type\": \"file\",\n{p1}    \"data\": {{\n{p1}    }}\n{p1}}}"
        );
    }
    if info.dirty_flag {
        *o += &format!(",\n{p1}\"dirty-flag\": false");
    }
    *o += &format!("\n{p}}}");
}

/// A JSON value as QEMU prints it (4-space indentation, object keys in their order).
fn json_value(v: &Value, ind: usize) -> String {
    let p = " ".repeat(ind);
    let p1 = " ".repeat(ind + 4);
    match v {
        Value::Object(m) => {
            // serde_json sorts keys; qemu-img prints these in its own (dictionary) order.
            const ORDER: &[&str] = &[
                "type",
                "data",
                "compat",
                "compression-type",
                "lazy-refcounts",
                "refcount-bits",
                "data-file",
                "data-file-raw",
                "corrupt",
                "extended-l2",
            ];
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort_by_key(|k| ORDER.iter().position(|o| o == k).unwrap_or(ORDER.len()));
            let items: Vec<String> = keys
                .into_iter()
                .map(|k| format!("{p1}{}: {}", json_str(k), json_value(&m[k], ind + 4)))
                .collect();
            if items.is_empty() {
                format!("{{\n{p}}}")
            } else {
                format!("{{\n{}\n{p}}}", items.join(",\n"))
            }
        }
        other => other.to_string(),
    }
}

pub fn json(info: &NodeInfo) -> String {
    let mut o = String::new();
    json_node(info, 0, &mut o);
    o.push('\n');
    o
}

pub fn run(argv: &[String]) -> CmdResult {
    let p = getopt::parse(argv, ":hf:bU", LONG, &format!("{} info", crate::prog()))
        .map_err(|e| Failure::getopt(e, "info"))?;
    let mut format = None;
    let mut image_opts = false;
    let mut force_share = false;
    let mut output_json = false;
    let mut backing_chain = false;
    for (code, arg) in p.opts {
        let arg = arg.unwrap_or_default();
        match code {
            c if c == b'h' as u32 => {
                print!("{}", crate::help::INFO);
                return Ok(());
            }
            c if c == b'f' as u32 => format = Some(arg),
            c if c == b'U' as u32 => force_share = true,
            OPT_IMAGE_OPTS => image_opts = true,
            OPT_OUTPUT => match arg.as_str() {
                "human" => output_json = false,
                "json" => output_json = true,
                other => {
                    return Err(Failure::usage(
                        format!("--output expects 'human' or 'json' not '{other}'"),
                        "info",
                    ));
                }
            },
            OPT_BACKING_CHAIN => backing_chain = true,
            OPT_OBJECT => return Err(Failure::new("--object is not supported by blockd-img yet")),
            _ => {}
        }
    }
    if p.args.len() != 1 {
        return Err(Failure::usage("Expecting one image file name", "info"));
    }
    if image_opts && format.is_some() {
        return Err(Failure::new(
            "--image-opts and --format are mutually exclusive",
        ));
    }
    let name = &p.args[0];
    let req = OpenRequest {
        name,
        image_opts,
        format: format.as_deref(),
        cache: Cache::WRITEBACK,
        aio: None,
        read_only: true,
        force_share,
        warn_probe: false,
    };
    // As QEMU's info (BDRV_O_NO_IO): data files named by qcow2 images are not opened.
    let opened =
        blockd_qcow2::driver::without_data_files(|| image::open(&req)).map_err(Failure::new)?;
    let info = describe(&opened.options, opened.node.length(), Some(&opened.node))
        .map_err(Failure::new)?;
    let shown = if image_opts {
        info.filename.clone()
    } else {
        name.clone()
    };
    let mut chain = vec![(shown, info)];
    // --backing-chain: each backing file in turn, opened by its resolved name and format.
    while backing_chain && chain.len() <= 64 {
        let Some((_, full, fmt)) = chain
            .last()
            .and_then(|(_, i)| i.extra.as_ref())
            .and_then(|x| x.backing.clone())
        else {
            break;
        };
        let req = OpenRequest {
            name: &full,
            image_opts: false,
            format: fmt.as_deref(),
            cache: Cache::WRITEBACK,
            aio: None,
            read_only: true,
            force_share,
            warn_probe: false,
        };
        let o =
            blockd_qcow2::driver::without_data_files(|| image::open(&req)).map_err(Failure::new)?;
        let i = describe(&o.options, o.node.length(), Some(&o.node)).map_err(Failure::new)?;
        chain.push((full, i));
        if chain.len() > 64 {
            return Err(Failure::new("Backing chain too long (a loop?)"));
        }
    }
    if output_json && backing_chain {
        let items: Vec<String> = chain
            .iter()
            .map(|(_, i)| {
                let mut o = String::from("    ");
                json_node(i, 4, &mut o);
                o
            })
            .collect();
        println!("[\n{}\n]", items.join(",\n"));
    } else if output_json {
        print!("{}", json(&chain[0].1));
    } else {
        let texts: Vec<String> = chain.iter().map(|(n, i)| human(i, n)).collect();
        print!("{}", texts.join("\n"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes() {
        for (b, s) in [
            (0, "0 B"),
            (512, "512 B"),
            (1024, "1 KiB"),
            (1536, "1.5 KiB"),
            (12800, "12.5 KiB"),
            (512000, "500 KiB"),
            (972800, "950 KiB"),
            (1000448, "977 KiB"),
            (1022976, "999 KiB"),
            (1023488, "1e+03 KiB"),
            (1024000, "0.977 MiB"),
            (1047552, "0.999 MiB"),
            (1048064, "1 MiB"),
            (1572864, "1.5 MiB"),
            (10747904, "10.2 MiB"),
            (105381888, "100 MiB"),
            (123457024, "118 MiB"),
            (1048576000, "0.977 GiB"),
            (1072693248, "0.999 GiB"),
            (1073740800, "1 GiB"),
            (1099511627776, "1 TiB"),
        ] {
            assert_eq!(human_size(b), s, "{b}");
        }
    }
}
