//! The qcow2 header (cluster 0): fixed fields, header extensions, and every range check QEMU
//! makes before trusting a field (plus a few of our own for tables outside the file).
//!
//! Parsing never allocates more than the header cluster it is given, never panics on any
//! input, and reports problems with QEMU's wording where QEMU has one.

use std::fmt::Write as _;

pub const MAGIC: u32 = 0x5146_49fb;
pub const MIN_CLUSTER_BITS: u32 = 9;
pub const MAX_CLUSTER_BITS: u32 = 21;
/// QEMU's limit on the active L1 table (bytes).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// QEMU's limit on the refcount table (bytes).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
pub const MAX_SNAPSHOTS: u32 = 65536;
/// Host offsets are 56 bits wide in L1/L2 entries.
pub const MAX_HOST_OFFSET: u64 = 1 << 56;
pub const MAX_BACKING_NAME: u32 = 1023;
pub const V2_HEADER_LEN: u32 = 72;
pub const V3_MIN_HEADER_LEN: u32 = 104;
/// What QEMU 10 writes.
pub const V3_HEADER_LEN: u32 = 112;

pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
pub const INCOMPAT_KNOWN: u64 = 0x1f;
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;
pub const AUTOCLEAR_KNOWN: u64 = 0x3;

pub const EXT_END: u32 = 0;
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
pub const EXT_BITMAPS: u32 = 0x2385_2875;
pub const EXT_CRYPTO: u32 = 0x0537_be77;
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// The names QEMU writes into the feature name table, in its order.
pub const FEATURE_NAMES: &[(u8, u8, &str)] = &[
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
];

/// One feature name table entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    /// 0 incompatible, 1 compatible, 2 autoclear.
    pub kind: u8,
    pub bit: u8,
    pub name: String,
}

/// The bitmaps extension (kept intact; bitmaps themselves are not interpreted yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapsExt {
    pub nb_bitmaps: u32,
    pub directory_size: u64,
    pub directory_offset: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible: u64,
    pub compatible: u64,
    pub autoclear: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression_type: u8,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    pub feature_table: Vec<FeatureName>,
    pub bitmaps: Option<BitmapsExt>,
    pub crypto: Option<(u64, u64)>,
    pub data_file: Option<String>,
    /// Extensions we do not know, kept so a header rewrite preserves them.
    pub unknown_extensions: Vec<(u32, Vec<u8>)>,
}

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn be64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_be_bytes(a)
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// Guest data lives in an external data file (incompatible bit 2).
    pub fn has_data_file(&self) -> bool {
        self.version >= 3 && self.incompatible & INCOMPAT_DATA_FILE != 0
    }

    /// The data file is kept a valid raw image (autoclear bit 1, with the data file bit).
    pub fn data_file_raw(&self) -> bool {
        self.has_data_file() && self.autoclear & AUTOCLEAR_DATA_FILE_RAW != 0
    }

    pub fn extended_l2(&self) -> bool {
        self.incompatible & INCOMPAT_EXTL2 != 0
    }

    /// Bytes per L2 entry (16 with extended L2).
    pub fn l2_entry_size(&self) -> u64 {
        if self.extended_l2() { 16 } else { 8 }
    }

    /// Guest bytes one L2 table maps.
    pub fn l2_coverage(&self) -> u64 {
        self.cluster_size() / self.l2_entry_size() * self.cluster_size()
    }

    /// L1 entries needed to map `size` guest bytes.
    pub fn l1_entries_for(&self, size: u64) -> u64 {
        size.div_ceil(self.l2_coverage())
    }

    /// How many bytes of the image must be read to parse the header: the whole first cluster
    /// (extensions and the backing name live there), or the file if shorter.
    pub fn needed_len(first: &[u8]) -> Result<u64, String> {
        if first.len() < V2_HEADER_LEN as usize {
            return Err("Could not read qcow2 header: Input/output error (image too short)".into());
        }
        if be32(first, 0) != MAGIC {
            return Err("Image is not in qcow2 format".into());
        }
        let bits = be32(first, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&bits) {
            return Err(format!("Unsupported cluster size: 2^{bits}"));
        }
        Ok(1 << bits)
    }

    /// Parse and validate the header cluster `buf` of an image whose file is `file_len` bytes.
    /// `buf` may be shorter than a cluster when the file is.
    pub fn parse(buf: &[u8], file_len: u64) -> Result<Header, String> {
        let cluster_size = Header::needed_len(buf)?;
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(format!("Unsupported qcow2 version {version}"));
        }
        let mut h = Header {
            version,
            backing_file_offset: be64(buf, 8),
            backing_file_size: be32(buf, 16),
            cluster_bits: be32(buf, 20),
            size: be64(buf, 24),
            crypt_method: be32(buf, 32),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression_type: 0,
            backing_file: None,
            backing_format: None,
            feature_table: Vec::new(),
            bitmaps: None,
            crypto: None,
            data_file: None,
            unknown_extensions: Vec::new(),
        };
        let mut ext_start = V2_HEADER_LEN as u64;
        if version == 3 {
            if buf.len() < V3_MIN_HEADER_LEN as usize {
                return Err("qcow2 header too short".into());
            }
            h.incompatible = be64(buf, 72);
            h.compatible = be64(buf, 80);
            h.autoclear = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            if h.header_length < V3_MIN_HEADER_LEN {
                return Err("qcow2 header too short".into());
            }
            if h.header_length as u64 > cluster_size {
                return Err("qcow2 header exceeds cluster size".into());
            }
            if h.header_length as usize > buf.len() {
                return Err("Could not read unknown qcow2 header fields".into());
            }
            if h.header_length > 104 {
                h.compression_type = buf[104];
            }
            ext_start = h.header_length as u64;
        }
        if h.backing_file_offset > cluster_size {
            return Err("Invalid backing file offset".into());
        }
        // Extensions come before the backing file name (or run to the cluster end).
        let ext_end = if h.backing_file_offset != 0 {
            h.backing_file_offset
        } else {
            cluster_size
        };
        h.read_extensions(buf, ext_start, ext_end)?;

        // Unknown incompatible features: refuse, naming them from the table.
        let unknown = h.incompatible & !INCOMPAT_KNOWN;
        if unknown != 0 {
            return Err(h.unsupported_features(unknown));
        }
        if h.refcount_order > 6 {
            return Err("Reference count entry width too large; may not exceed 64 bits".into());
        }
        if h.version == 2 && h.refcount_order != 4 {
            return Err("Reference count entry width too large; may not exceed 64 bits".into());
        }
        match h.compression_type {
            0 => {
                if h.incompatible & INCOMPAT_COMPRESSION != 0 {
                    return Err(
                        "qcow2: Compression type incompatible feature bit must not be set".into(),
                    );
                }
            }
            1 => {
                if h.incompatible & INCOMPAT_COMPRESSION == 0 {
                    return Err(
                        "qcow2: Compression type incompatible feature bit must be set".into(),
                    );
                }
            }
            t => return Err(format!("qcow2: unknown compression type: {t}")),
        }
        if h.extended_l2() && h.cluster_bits < 14 {
            return Err(format!(
                "Unsupported subcluster size: {}",
                h.cluster_size() / 32
            ));
        }
        match h.crypt_method {
            0 => {}
            1 | 2 => {
                return Err("Encrypted qcow2 images are not supported yet".into());
            }
            m => return Err(format!("Unsupported encryption method: {m}")),
        }
        if h.backing_file_offset != 0 {
            let end = h.backing_file_offset + h.backing_file_size as u64;
            if h.backing_file_size > MAX_BACKING_NAME || end > cluster_size {
                return Err("Backing file name too long".into());
            }
            if end as usize > buf.len() {
                return Err("Could not read backing file name: Input/output error".into());
            }
            let raw = &buf[h.backing_file_offset as usize..end as usize];
            h.backing_file = Some(
                String::from_utf8(raw.to_vec())
                    .map_err(|_| "Could not read backing file name: invalid UTF-8".to_string())?,
            );
        }
        h.validate_tables(file_len)?;
        Ok(h)
    }

    fn read_extensions(&mut self, buf: &[u8], start: u64, end: u64) -> Result<(), String> {
        let mut off = start;
        let mut seen: Vec<u32> = Vec::new();
        while off < end {
            if off + 8 > end || off + 8 > buf.len() as u64 {
                return Err(
                    "qcow2_read_extension: ERROR: pread fail from offset ".to_string()
                        + &off.to_string(),
                );
            }
            let o = off as usize;
            let ty = be32(buf, o);
            let len = be32(buf, o + 4) as u64;
            off += 8;
            if ty == EXT_END {
                return Ok(());
            }
            if len > end - off || off + len > buf.len() as u64 {
                return Err("Header extension too large".into());
            }
            if seen.contains(&ty) {
                return Err(format!("Duplicate header extension 0x{ty:08x}"));
            }
            seen.push(ty);
            let data = &buf[off as usize..(off + len) as usize];
            match ty {
                EXT_BACKING_FORMAT => {
                    if len >= 16 {
                        return Err(format!(
                            "ERROR: ext_backing_format: len={len} too large (>=16)"
                        ));
                    }
                    self.backing_format = Some(String::from_utf8(data.to_vec()).map_err(|_| {
                        "ERROR: ext_backing_format: Could not read format name".to_string()
                    })?);
                }
                EXT_FEATURE_TABLE => {
                    for e in data.chunks_exact(48) {
                        let name_bytes = &e[2..48];
                        let n = name_bytes.iter().position(|&b| b == 0).unwrap_or(46);
                        self.feature_table.push(FeatureName {
                            kind: e[0],
                            bit: e[1],
                            name: String::from_utf8_lossy(&name_bytes[..n]).into_owned(),
                        });
                    }
                }
                EXT_BITMAPS => {
                    if len != 24 {
                        return Err("bitmaps_ext: Invalid extension length".into());
                    }
                    let b = BitmapsExt {
                        nb_bitmaps: be32(data, 0),
                        directory_size: be64(data, 8),
                        directory_offset: be64(data, 16),
                    };
                    if self.autoclear & AUTOCLEAR_BITMAPS != 0 {
                        if b.nb_bitmaps == 0 || b.nb_bitmaps > 65535 {
                            return Err("bitmaps_ext: Image has invalid number of bitmaps".into());
                        }
                        if be32(data, 4) != 0 {
                            return Err("bitmaps_ext: Reserved field is not zero".into());
                        }
                        if b.directory_size > 64 << 20 {
                            return Err("bitmaps_ext: Bitmap directory is too large".into());
                        }
                        if !b.directory_offset.is_multiple_of(1u64 << self.cluster_bits) {
                            return Err("bitmaps_ext: invalid bitmap directory offset".into());
                        }
                    }
                    self.bitmaps = Some(b);
                }
                EXT_CRYPTO => {
                    if len != 16 {
                        return Err("Unable to read CRYPTO header extension".into());
                    }
                    self.crypto = Some((be64(data, 0), be64(data, 8)));
                }
                EXT_DATA_FILE => {
                    self.data_file = Some(String::from_utf8_lossy(data).into_owned());
                }
                _ => self.unknown_extensions.push((ty, data.to_vec())),
            }
            off += len.div_ceil(8) * 8;
        }
        Ok(())
    }

    /// QEMU's "Unsupported qcow2 feature(s): ..." listing names from the feature table, and
    /// "Unknown incompatible feature: <hex>" for bits the table does not name.
    fn unsupported_features(&self, mut mask: u64) -> String {
        let mut list = String::new();
        for f in &self.feature_table {
            if f.kind == 0 && f.bit < 64 && mask & (1 << f.bit) != 0 {
                if !list.is_empty() {
                    list.push_str(", ");
                }
                list.push_str(&f.name);
                mask &= !(1 << f.bit);
            }
        }
        if mask != 0 {
            if !list.is_empty() {
                list.push_str(", ");
            }
            let _ = write!(list, "Unknown incompatible feature: {mask:x}");
        }
        format!("Unsupported qcow2 feature(s): {list}")
    }

    /// Offsets aligned, sizes within QEMU's limits, tables inside the file and clear of the
    /// header cluster.
    fn validate_tables(&self, file_len: u64) -> Result<(), String> {
        let cs = self.cluster_size();
        let table = |name: &str, offset: u64, entries: u64, entry_len: u64, max: u64| {
            let bytes = entries.saturating_mul(entry_len);
            if bytes > max {
                return Err(format!("{name} too large"));
            }
            if entries == 0 {
                return Ok(());
            }
            if !offset.is_multiple_of(cs) || offset == 0 || offset.checked_add(bytes).is_none() {
                return Err(format!("{name} offset invalid"));
            }
            if offset + bytes > file_len {
                return Err(format!("{name} offset invalid (past the end of the file)"));
            }
            Ok(())
        };
        if self.refcount_table_clusters == 0 {
            return Err("Image does not contain a reference count table".into());
        }
        table(
            "Reference count table",
            self.refcount_table_offset,
            self.refcount_table_clusters as u64 * cs,
            1,
            MAX_REFTABLE_BYTES,
        )?;
        if self.nb_snapshots > MAX_SNAPSHOTS {
            return Err("Snapshot table too large".into());
        }
        // Snapshot entries are at least 40 bytes; the table's real length is found when read.
        table(
            "Snapshot table",
            self.snapshots_offset,
            self.nb_snapshots as u64,
            40,
            u64::MAX,
        )?;
        if self.l1_size as u64 > MAX_L1_BYTES / 8 {
            return Err("Active L1 table too large".into());
        }
        if self.size > i64::MAX as u64 {
            return Err("Image is too big".into());
        }
        let needed = self.l1_entries_for(self.size);
        if needed > MAX_L1_BYTES / 8 {
            return Err("Image is too big".into());
        }
        if (self.l1_size as u64) < needed {
            return Err("L1 table is too small".into());
        }
        table(
            "Active L1 table",
            self.l1_table_offset,
            self.l1_size as u64,
            8,
            MAX_L1_BYTES,
        )?;
        Ok(())
    }

    /// The header cluster's bytes as QEMU lays them out: fixed fields, extensions (backing
    /// format, feature table, bitmaps, unknown ones), end marker, then the backing name.
    /// Returns an error when they do not fit in one cluster.
    pub fn serialize(&self) -> Result<Vec<u8>, String> {
        let cs = self.cluster_size() as usize;
        let mut b = vec![0u8; self.header_length as usize];
        let put32 =
            |b: &mut Vec<u8>, o: usize, v: u32| b[o..o + 4].copy_from_slice(&v.to_be_bytes());
        let put64 =
            |b: &mut Vec<u8>, o: usize, v: u64| b[o..o + 8].copy_from_slice(&v.to_be_bytes());
        put32(&mut b, 0, MAGIC);
        put32(&mut b, 4, self.version);
        put32(&mut b, 20, self.cluster_bits);
        put64(&mut b, 24, self.size);
        put32(&mut b, 32, self.crypt_method);
        put32(&mut b, 36, self.l1_size);
        put64(&mut b, 40, self.l1_table_offset);
        put64(&mut b, 48, self.refcount_table_offset);
        put32(&mut b, 56, self.refcount_table_clusters);
        put32(&mut b, 60, self.nb_snapshots);
        put64(&mut b, 64, self.snapshots_offset);
        if self.version >= 3 {
            put64(&mut b, 72, self.incompatible);
            put64(&mut b, 80, self.compatible);
            put64(&mut b, 88, self.autoclear);
            put32(&mut b, 96, self.refcount_order);
            put32(&mut b, 100, self.header_length);
            if self.header_length > 104 {
                b[104] = self.compression_type;
            }
        }
        let ext = |b: &mut Vec<u8>, ty: u32, data: &[u8]| {
            b.extend_from_slice(&ty.to_be_bytes());
            b.extend_from_slice(&(data.len() as u32).to_be_bytes());
            b.extend_from_slice(data);
            b.resize(b.len().div_ceil(8) * 8, 0);
        };
        if let Some(f) = &self.backing_format {
            ext(&mut b, EXT_BACKING_FORMAT, f.as_bytes());
        }
        if let Some((o, l)) = self.crypto {
            let mut d = o.to_be_bytes().to_vec();
            d.extend_from_slice(&l.to_be_bytes());
            ext(&mut b, EXT_CRYPTO, &d);
        }
        if let Some(name) = &self.data_file {
            ext(&mut b, EXT_DATA_FILE, name.as_bytes());
        }
        if let Some(bm) = &self.bitmaps {
            let mut d = Vec::with_capacity(24);
            d.extend_from_slice(&bm.nb_bitmaps.to_be_bytes());
            d.extend_from_slice(&0u32.to_be_bytes());
            d.extend_from_slice(&bm.directory_size.to_be_bytes());
            d.extend_from_slice(&bm.directory_offset.to_be_bytes());
            ext(&mut b, EXT_BITMAPS, &d);
        }
        // The feature table is left out when it would not leave room in the cluster (as
        // QEMU does with 512-byte clusters).
        let rest: usize = self
            .unknown_extensions
            .iter()
            .map(|(_, d)| 8 + d.len().div_ceil(8) * 8)
            .sum::<usize>()
            + 8
            + self.backing_file.as_ref().map_or(0, |n| n.len());
        let table_len = 8 + 48 * self.feature_table.len();
        if self.version >= 3 && !self.feature_table.is_empty() && b.len() + table_len + rest < cs {
            let mut d = Vec::with_capacity(48 * self.feature_table.len());
            for f in &self.feature_table {
                let mut e = [0u8; 48];
                e[0] = f.kind;
                e[1] = f.bit;
                let n = f.name.len().min(46);
                e[2..2 + n].copy_from_slice(&f.name.as_bytes()[..n]);
                d.extend_from_slice(&e);
            }
            ext(&mut b, EXT_FEATURE_TABLE, &d);
        }
        for (ty, data) in &self.unknown_extensions {
            ext(&mut b, *ty, data);
        }
        if self.version >= 3 || self.backing_format.is_some() || !self.unknown_extensions.is_empty()
        {
            ext(&mut b, EXT_END, &[]);
        }
        let mut out = b;
        if let Some(name) = &self.backing_file {
            let off = out.len();
            out.extend_from_slice(name.as_bytes());
            // The name's offset and size are in the fixed part.
            out[8..16].copy_from_slice(&(off as u64).to_be_bytes());
            out[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
        }
        if out.len() > cs {
            return Err("Header extension too large".into());
        }
        Ok(out)
    }

    /// The standard feature name table QEMU writes.
    pub fn qemu_feature_table() -> Vec<FeatureName> {
        FEATURE_NAMES
            .iter()
            .map(|&(kind, bit, name)| FeatureName {
                kind,
                bit,
                name: name.to_string(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal(version: u32) -> Header {
        Header {
            version,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: 16,
            size: 1 << 20,
            crypt_method: 0,
            l1_size: 1,
            l1_table_offset: 3 << 16,
            refcount_table_offset: 1 << 16,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: if version == 3 { 112 } else { 72 },
            compression_type: 0,
            backing_file: Some("base.img".into()),
            backing_format: Some("raw".into()),
            feature_table: if version == 3 {
                Header::qemu_feature_table()
            } else {
                Vec::new()
            },
            bitmaps: None,
            crypto: None,
            data_file: None,
            unknown_extensions: vec![(0x1234_5678, vec![1, 2, 3])],
        }
    }

    #[test]
    fn round_trip() {
        for v in [2, 3] {
            let h = minimal(v);
            let mut bytes = h.serialize().unwrap();
            bytes.resize(1 << 16, 0);
            let mut p = Header::parse(&bytes, 4 << 16).unwrap();
            // The parse fills in the name's position.
            p.backing_file_offset = 0;
            p.backing_file_size = 0;
            assert_eq!(p, h);
        }
    }

    #[test]
    fn garbage_never_panics() {
        let mut seed = 0x1234_5678_9abc_def0u64;
        let base = {
            let mut b = minimal(3).serialize().unwrap();
            b.resize(4096, 0);
            b
        };
        for _ in 0..20000 {
            let mut b = base.clone();
            for _ in 0..4 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let i = (seed % 256) as usize;
                b[i] = (seed >> 32) as u8;
            }
            let cut = (seed >> 40) as usize % 4097;
            let _ = Header::parse(&b[..cut], 1 << 40);
        }
    }

    #[test]
    fn unknown_incompatible_bits_are_named() {
        let mut h = minimal(3);
        h.incompatible = 1 << 5 | 1 << 40;
        h.feature_table.push(FeatureName {
            kind: 0,
            bit: 5,
            name: "future".into(),
        });
        let mut b = h.serialize().unwrap();
        b.resize(1 << 16, 0);
        assert_eq!(
            Header::parse(&b, 4 << 16).unwrap_err(),
            "Unsupported qcow2 feature(s): future, Unknown incompatible feature: 10000000000"
        );
    }
}
