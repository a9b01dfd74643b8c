//! Formatting a new qcow2 image on an opened, writable `file` node, with qemu-img's layout:
//! header (cluster 0), refcount table (cluster 1), refcount block (cluster 2), L1 table
//! (cluster 3 on), and QEMU's `-o` option names, checks and messages.

use std::sync::Arc;

use blockd_block::Node;
use blockd_block::options::parse_size;

use crate::cache::CacheConfig;
use crate::header::{self, Header};
use crate::image::{Image, pwrite};
use crate::layout::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prealloc {
    Off,
    Metadata,
    Falloc,
    Full,
}

/// QEMU's qcow2 create options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    pub size: Option<u64>,
    /// 2 (`compat=0.10`) or 3 (`compat=1.1`).
    pub version: u32,
    pub backing_file: Option<String>,
    pub backing_fmt: Option<String>,
    pub cluster_size: u64,
    pub preallocation: Prealloc,
    pub lazy_refcounts: bool,
    pub refcount_bits: u64,
    /// 0 zlib, 1 zstd.
    pub compression_type: u8,
    pub extended_l2: bool,
    pub data_file: Option<String>,
    pub data_file_raw: bool,
    /// An enum option with a value QEMU rejects only after printing "Formatting ...".
    deferred_error: Option<String>,
    /// The options as given (key, value as qemu-img prints it), for the "Formatting" line.
    given: Vec<(String, String)>,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: None,
            version: 3,
            backing_file: None,
            backing_fmt: None,
            cluster_size: 65536,
            preallocation: Prealloc::Off,
            lazy_refcounts: false,
            refcount_bits: 16,
            compression_type: 0,
            extended_l2: false,
            data_file: None,
            data_file_raw: false,
            deferred_error: None,
            given: Vec::new(),
        }
    }
}

fn parse_bool(key: &str, v: &str) -> Result<bool, String> {
    match v {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => Err(format!("Parameter '{key}' expects 'on' or 'off'")),
    }
}

fn size_error(key: &str) -> String {
    format!(
        "Parameter '{key}' expects a non-negative number below 2^64\n\
         Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
         and exabytes, respectively."
    )
}

pub(crate) fn parse_number(key: &str, v: &str) -> Result<u64, String> {
    let r = if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        u64::from_str_radix(h, 16)
    } else if v.len() > 1 && v.starts_with('0') {
        u64::from_str_radix(&v[1..], 8)
    } else {
        v.parse()
    };
    r.map_err(|_| format!("Parameter '{key}' expects a number"))
}

impl CreateOptions {
    /// Parse `-o` options (later values replace earlier ones), with qemu-img's messages.
    pub fn from_qemu_opts(opts: &[(String, String)]) -> Result<CreateOptions, String> {
        let mut c = CreateOptions::default();
        for (k, v) in opts {
            let shown = match k.as_str() {
                "size" => {
                    let n = parse_size(v).map_err(|_| size_error("size"))?;
                    c.size = Some(n);
                    n.to_string()
                }
                "compat" => {
                    c.version = match v.as_str() {
                        "0.10" | "v2" => 2,
                        "1.1" | "v3" => 3,
                        _ => {
                            c.deferred_error =
                                Some(format!("Parameter 'version' does not accept value '{v}'"));
                            c.version
                        }
                    };
                    v.clone()
                }
                "backing_file" => {
                    c.backing_file = Some(v.clone());
                    v.clone()
                }
                "backing_fmt" => {
                    c.backing_fmt = Some(v.clone());
                    v.clone()
                }
                "cluster_size" => {
                    let n = parse_size(v).map_err(|_| size_error("cluster_size"))?;
                    c.cluster_size = n;
                    n.to_string()
                }
                "preallocation" => {
                    c.preallocation = match v.as_str() {
                        "off" => Prealloc::Off,
                        "metadata" => Prealloc::Metadata,
                        "falloc" => Prealloc::Falloc,
                        "full" => Prealloc::Full,
                        _ => {
                            c.deferred_error = Some(format!(
                                "Parameter 'preallocation' does not accept value '{v}'"
                            ));
                            c.preallocation
                        }
                    };
                    v.clone()
                }
                "lazy_refcounts" => {
                    c.lazy_refcounts = parse_bool(k, v)?;
                    v.clone()
                }
                "refcount_bits" => {
                    let n = parse_number(k, v)?;
                    c.refcount_bits = n;
                    n.to_string()
                }
                "compression_type" => {
                    c.compression_type = match v.as_str() {
                        "zlib" => 0,
                        "zstd" => 1,
                        _ => {
                            c.deferred_error = Some(format!(
                                "Parameter 'compression-type' does not accept value '{v}'"
                            ));
                            c.compression_type
                        }
                    };
                    v.clone()
                }
                "extended_l2" => {
                    c.extended_l2 = parse_bool(k, v)?;
                    v.clone()
                }
                "data_file" => {
                    c.data_file = Some(v.clone());
                    v.clone()
                }
                "data_file_raw" => {
                    c.data_file_raw = parse_bool(k, v)?;
                    v.clone()
                }
                "encryption" | "encrypt.format" => {
                    return Err("Encrypted qcow2 images are not supported yet".into());
                }
                other => return Err(format!("Invalid parameter '{other}'")),
            };
            c.given.retain(|(gk, _)| gk != k);
            c.given.push((k.clone(), shown));
        }
        Ok(c)
    }

    /// Record a value set outside `-o` (the size argument, `-b`, `-F`), as qemu-img does.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        let mut one = CreateOptions::from_qemu_opts(&[(key.to_string(), value.to_string())])?;
        let (k, shown) = one.given.pop().expect("one option");
        match key {
            "size" => self.size = one.size,
            "backing_file" => self.backing_file = one.backing_file,
            "backing_fmt" => self.backing_fmt = one.backing_fmt,
            _ => return Err(format!("Invalid parameter '{key}'")),
        }
        self.given.retain(|(gk, _)| *gk != k);
        self.given.push((k, shown));
        Ok(())
    }

    /// qemu-img's "Formatting '<file>', fmt=qcow2 ..." line.
    pub fn formatting_line(&self, filename: &str) -> String {
        let get = |k: &str| {
            self.given
                .iter()
                .find(|(gk, _)| gk == k)
                .map(|(_, v)| v.clone())
        };
        let mut s = format!("Formatting '{filename}', fmt=qcow2");
        let mut add = |k: &str, v: Option<String>| {
            if let Some(v) = v {
                s += &format!(" {k}={v}");
            }
        };
        add(
            "cluster_size",
            Some(get("cluster_size").unwrap_or("65536".into())),
        );
        add(
            "extended_l2",
            Some(get("extended_l2").unwrap_or("off".into())),
        );
        add("preallocation", get("preallocation"));
        add(
            "compression_type",
            Some(get("compression_type").unwrap_or("zlib".into())),
        );
        add("size", Some(self.size.unwrap_or(0).to_string()));
        for k in [
            "compat",
            "backing_file",
            "backing_fmt",
            "data_file",
            "data_file_raw",
        ] {
            add(k, get(k));
        }
        add(
            "lazy_refcounts",
            Some(get("lazy_refcounts").unwrap_or("off".into())),
        );
        add("refcount_bits", Some(self.refcount_bits.to_string()));
        s
    }

    /// QEMU's checks of the combination, before anything is written.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(e) = &self.deferred_error {
            return Err(e.clone());
        }
        let cs = self.cluster_size;
        if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
            return Err("Cluster size must be a power of two between 512 and 2048k".into());
        }
        let v3 = "(use version=v3 or greater)";
        if self.version < 3 {
            if self.lazy_refcounts {
                return Err(format!(
                    "Lazy refcounts only supported with compatibility level 1.1 and above {v3}"
                ));
            }
            if self.refcount_bits != 16 {
                return Err(format!(
                    "Different refcount widths than 16 bits require compatibility level 1.1 or above {v3}"
                ));
            }
            if self.extended_l2 {
                return Err(format!(
                    "Extended L2 entries are only supported with compatibility level 1.1 and above {v3}"
                ));
            }
            if self.compression_type != 0 {
                return Err(format!(
                    "Non-zlib compression type is only supported with compatibility level 1.1 and above {v3}"
                ));
            }
        }
        if !self.refcount_bits.is_power_of_two() || self.refcount_bits > 64 {
            return Err("Refcount width must be a power of two and may not exceed 64 bits".into());
        }
        if self.extended_l2 && cs < 16384 {
            return Err(
                "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"
                    .into(),
            );
        }
        if self.backing_fmt.is_some() && self.backing_file.is_none() {
            return Err("Backing format cannot be used without backing file".into());
        }
        if self.data_file.is_some() && self.version < 3 {
            return Err(format!(
                "External data files are only supported with compatibility level 1.1 and above {}",
                "(use version=v3 or greater)"
            ));
        }
        if self.data_file_raw && self.data_file.is_none() {
            return Err("data-file-raw requires data-file".into());
        }
        if self.data_file_raw && self.backing_file.is_some() {
            return Err("Backing file and data-file-raw cannot be used at the same time".into());
        }
        if let Some(b) = &self.backing_file
            && b.len() > header::MAX_BACKING_NAME as usize
        {
            return Err("Backing file name too long".into());
        }
        let size = self.size.unwrap_or(0);
        let l2_cov = cs / if self.extended_l2 { 16 } else { 8 } * cs;
        if size.div_ceil(l2_cov) * 8 > header::MAX_L1_BYTES || size > i64::MAX as u64 {
            return Err("The image size is too large for file format 'qcow2' (try using a larger cluster size)".into());
        }
        if self.preallocation != Prealloc::Off && self.backing_file.is_some() && !self.extended_l2 {
            return Err("Backing file and preallocation can only be used at the same time if extended_l2 is on".into());
        }
        Ok(())
    }

    fn header(&self) -> Header {
        let cluster_bits = self.cluster_size.trailing_zeros();
        let mut h = Header {
            version: self.version,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits,
            // QEMU rounds the virtual size up to whole sectors.
            size: self.size.unwrap_or(0).div_ceil(512) * 512,
            crypt_method: 0,
            l1_size: 0,
            l1_table_offset: 3 * self.cluster_size,
            refcount_table_offset: self.cluster_size,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: self.refcount_bits.trailing_zeros(),
            header_length: if self.version >= 3 {
                header::V3_HEADER_LEN
            } else {
                header::V2_HEADER_LEN
            },
            compression_type: self.compression_type,
            backing_file: self.backing_file.clone(),
            backing_format: self.backing_fmt.clone(),
            // qemu-img 10 writes the feature name table only with clusters of 8 KiB or more.
            feature_table: if self.version >= 3 && self.cluster_size >= 8192 {
                Header::qemu_feature_table()
            } else {
                Vec::new()
            },
            bitmaps: None,
            crypto: None,
            data_file: self.data_file.clone(),
            unknown_extensions: Vec::new(),
        };
        if self.data_file.is_some() {
            h.incompatible |= header::INCOMPAT_DATA_FILE;
            if self.data_file_raw {
                h.autoclear |= header::AUTOCLEAR_DATA_FILE_RAW;
            }
        }
        if self.compression_type != 0 {
            h.incompatible |= header::INCOMPAT_COMPRESSION;
        }
        if self.extended_l2 {
            h.incompatible |= header::INCOMPAT_EXTL2;
        }
        if self.lazy_refcounts {
            h.compatible |= header::COMPAT_LAZY_REFCOUNTS;
        }
        h.l1_size = h.l1_entries_for(h.size) as u32;
        h
    }
}

/// Format `file` (opened writable, normally empty) as a qcow2 image. An image with a
/// `data_file` needs [`create_with_data_file`].
pub async fn create(file: &Arc<Node>, opts: &CreateOptions) -> Result<(), String> {
    create_with_data_file(file, None, opts).await
}

/// Format `file` as a qcow2 image whose guest data lives in `data` (opened writable; it is
/// resized to the virtual size) when `opts.data_file` names one, as QEMU's create does. A
/// raw data file gets its guest clusters mapped at once (QEMU's metadata preallocation).
pub async fn create_with_data_file(
    file: &Arc<Node>,
    data: Option<&Arc<Node>>,
    opts: &CreateOptions,
) -> Result<(), String> {
    opts.validate()?;
    let data = match (&opts.data_file, data) {
        (None, _) => None,
        (Some(_), Some(d)) => Some(d),
        (Some(n), None) => {
            return Err(format!(
                "creating the external data file '{n}' is not supported yet by this caller"
            ));
        }
    };
    let h = opts.header();
    let cs = opts.cluster_size;
    let geo = Geometry::new(&h);
    let l1_clusters = (h.l1_size as u64 * 8).div_ceil(cs);
    // The first refcount block at cluster 2, the L1 at cluster 3, further refcount blocks
    // (for a huge L1) after it: where QEMU's allocator puts them.
    let mut blocks = 1u64;
    while blocks * geo.rc_entries < 2 + blocks + l1_clusters {
        blocks += 1;
    }
    if blocks > cs / 8 {
        return Err(
            "The image size is too large for file format 'qcow2' (try using a larger cluster size)"
                .into(),
        );
    }
    let block_at = |b: u64| {
        if b == 0 {
            2 * cs
        } else {
            (3 + l1_clusters + b - 1) * cs
        }
    };
    let mut h = h;
    // An empty image has no L1 table at all (QEMU writes offset 0).
    h.l1_table_offset = if h.l1_size > 0 { 3 * cs } else { 0 };
    let used = 2 + blocks + l1_clusters;
    let io = |e: std::io::Error| {
        format!(
            "Could not write qcow2 header: {}",
            blockd_block::strerror(&e)
        )
    };
    let hdr = h.serialize()?;
    let mut c0 = vec![0u8; cs as usize];
    c0[..hdr.len()].copy_from_slice(&hdr);
    pwrite(file, 0, &c0).await.map_err(io)?;
    let mut table = vec![0u8; cs as usize];
    for b in 0..blocks {
        table[b as usize * 8..b as usize * 8 + 8].copy_from_slice(&block_at(b).to_be_bytes());
    }
    pwrite(file, cs, &table).await.map_err(io)?;
    for b in 0..blocks {
        let mut blk = vec![0u8; cs as usize];
        let lo = b * geo.rc_entries;
        let hi = ((b + 1) * geo.rc_entries).min(used);
        for c in lo..hi {
            set_refcount(&mut blk, geo.refcount_order, c - lo, 1);
        }
        pwrite(file, block_at(b), &blk).await.map_err(io)?;
    }
    if h.l1_size > 0 {
        pwrite(file, h.l1_table_offset, &vec![0u8; h.l1_size as usize * 8])
            .await
            .map_err(io)?;
    }
    let mut prealloc = opts.preallocation;
    if opts.data_file_raw && prealloc == Prealloc::Off {
        prealloc = Prealloc::Metadata;
    }
    if let Some(d) = data
        && d.length() < h.size
    {
        d.driver()
            .truncate(d, h.size)
            .await
            .map_err(|e| format!("Could not resize data file: {}", blockd_block::strerror(&e)))?;
    }
    if prealloc != Prealloc::Off && h.size > 0 {
        preallocate(file, data, &h, prealloc).await.map_err(|e| {
            format!(
                "Could not preallocate metadata: {}",
                blockd_block::strerror(&e)
            )
        })?;
    }
    for f in std::iter::once(file).chain(data) {
        f.driver()
            .flush(f)
            .await
            .map_err(|e| format!("Could not flush: {}", blockd_block::strerror(&e)))?;
    }
    Ok(())
}

fn set_refcount(block: &mut [u8], order: u32, i: u64, v: u64) {
    let w = 1u64 << order;
    if w >= 8 {
        let bytes = (w / 8) as usize;
        let be = v.to_be_bytes();
        block[i as usize * bytes..(i as usize + 1) * bytes].copy_from_slice(&be[8 - bytes..]);
    } else {
        let bit = i * w;
        let mask = ((1u64 << w) - 1) as u8;
        let b = &mut block[(bit / 8) as usize];
        *b = (*b & !(mask << (bit % 8))) | ((v as u8 & mask) << (bit % 8));
    }
}

/// Allocate every guest cluster (metadata), and with falloc/full also the bytes. With a data
/// file each cluster is at its guest offset there (no refcounts), and the bytes go there.
async fn preallocate(
    file: &Arc<Node>,
    data: Option<&Arc<Node>>,
    h: &Header,
    mode: Prealloc,
) -> std::io::Result<()> {
    let cfg = CacheConfig {
        l2_entry_size: h.cluster_size(),
        l2_entries: 16,
        refcount_entries: 16,
        clean_interval: None,
    };
    let img = Image::load(file, h.clone(), cfg, false, true, false)
        .await
        .map_err(std::io::Error::other)?;
    let geo = img.geo;
    let cs = geo.cluster_size;
    let clusters = h.size.div_ceil(cs);
    let mut c = 0;
    let mut end = 0;
    while c < clusters {
        let (l1i, l2i) = geo.indices(c * cs);
        let l2 = img.writable_l2(file, l1i).await?;
        let want = (geo.l2_entries - l2i).min(clusters - c);
        let (host, got) = if data.is_some() {
            (c * cs, want)
        } else {
            img.alloc_clusters(file, want).await?
        };
        let target = data.unwrap_or(file);
        let bytes = got * cs;
        // With a backing file (extended L2 only) the subclusters stay unallocated so the
        // backing file still shows through.
        let bitmap = if geo.extended && h.backing_file.is_none() {
            BITMAP_ALL_ALLOC
        } else {
            0
        };
        let entries: Vec<(u64, u64)> = (0..got)
            .map(|j| ((host + j * cs) | OFLAG_COPIED, bitmap))
            .collect();
        img.set_l2(file, l2, l2i, &entries).await?;
        match mode {
            Prealloc::Full => {
                let zero = vec![0u8; bytes as usize];
                pwrite(target, host, &zero).await?;
            }
            Prealloc::Falloc => {
                blockd_block::io::write_zeroes(target, host, bytes, blockd_block::ReqFlags::NONE)
                    .await?;
            }
            _ => {}
        }
        end = end.max(host + got * cs);
        c += got;
    }
    img.writeback(file).await?;
    // The data file too ends with the last cluster (as QEMU's preallocation leaves it).
    let file = data.unwrap_or(file);
    if file.length() < end {
        // Writing the last sector extends the file (and the node's length) to the end.
        pwrite(file, end - 512, &[0u8; 512]).await?;
    }
    Ok(())
}
