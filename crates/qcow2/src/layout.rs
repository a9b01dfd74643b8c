//! Geometry of an image (cluster, L2, refcount block sizes) and the meaning of L1/L2 entries,
//! including extended L2 subclusters and compressed descriptors.

use crate::header::Header;

pub const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
pub const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
pub const OFLAG_COPIED: u64 = 1 << 63;
pub const OFLAG_COMPRESSED: u64 = 1 << 62;
pub const OFLAG_ZERO: u64 = 1;
pub const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
/// Extended L2 bitmap: all 32 subclusters read as zero.
pub const BITMAP_ALL_ZERO: u64 = 0xffff_ffff << 32;
pub const BITMAP_ALL_ALLOC: u64 = 0xffff_ffff;
pub const SUBCLUSTERS: u64 = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub cluster_bits: u32,
    pub cluster_size: u64,
    /// Entries per L2 table.
    pub l2_entries: u64,
    /// 8, or 16 with extended L2.
    pub l2_entry_bytes: u64,
    pub extended: bool,
    pub refcount_order: u32,
    /// Refcount entries per refcount block.
    pub rc_entries: u64,
    /// Allocation unit of guest data: a subcluster with extended L2, else a cluster.
    pub unit: u64,
    pub version: u32,
    /// Zstd (1) or deflate (0).
    pub compression_type: u8,
    /// Guest data lives in an external data file (incompatible bit 2): every data cluster
    /// sits at its guest offset there, host offset 0 is a valid cluster (with COPIED), and
    /// compressed clusters are invalid.
    pub data_file: bool,
    /// The external data file stays a valid raw image of the guest (autoclear bit 1).
    pub data_file_raw: bool,
}

/// What one guest cluster or subcluster is (QEMU's QCow2SubclusterType).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Reads from the backing file (or zeroes).
    Unallocated,
    /// Extended L2: the cluster has a host offset but this subcluster is unallocated.
    UnallocatedAlloc(u64),
    ZeroPlain,
    /// Reads as zero, host space preallocated at this offset.
    ZeroAlloc(u64),
    /// Data at this host offset.
    Normal(u64),
    /// A compressed cluster: host byte offset and compressed length in bytes (upper bound).
    Compressed {
        offset: u64,
        len: u64,
    },
}

impl Kind {
    /// Host offset, when the kind has one.
    pub fn host(&self) -> Option<u64> {
        match *self {
            Kind::UnallocatedAlloc(h) | Kind::ZeroAlloc(h) | Kind::Normal(h) => Some(h),
            _ => None,
        }
    }

    pub fn reads_zero(&self) -> bool {
        matches!(self, Kind::ZeroPlain | Kind::ZeroAlloc(_))
    }

    pub fn allocated(&self) -> bool {
        !matches!(self, Kind::Unallocated | Kind::UnallocatedAlloc(_))
    }

    /// Whether `next`, `delta` bytes further on, continues this run.
    pub fn continues(&self, next: &Kind, delta: u64) -> bool {
        match (*self, *next) {
            (Kind::Unallocated, Kind::Unallocated) | (Kind::ZeroPlain, Kind::ZeroPlain) => true,
            (Kind::UnallocatedAlloc(a), Kind::UnallocatedAlloc(b))
            | (Kind::ZeroAlloc(a), Kind::ZeroAlloc(b))
            | (Kind::Normal(a), Kind::Normal(b)) => a + delta == b,
            _ => false,
        }
    }
}

impl Geometry {
    pub fn new(h: &Header) -> Geometry {
        let cluster_size = h.cluster_size();
        let l2_entry_bytes = h.l2_entry_size();
        let extended = h.extended_l2();
        Geometry {
            cluster_bits: h.cluster_bits,
            cluster_size,
            l2_entries: cluster_size / l2_entry_bytes,
            l2_entry_bytes,
            extended,
            refcount_order: h.refcount_order,
            rc_entries: (cluster_size * 8) >> h.refcount_order,
            unit: if extended {
                cluster_size / SUBCLUSTERS
            } else {
                cluster_size
            },
            version: h.version,
            compression_type: h.compression_type,
            data_file: h.has_data_file(),
            data_file_raw: h.has_data_file()
                && h.autoclear & crate::header::AUTOCLEAR_DATA_FILE_RAW != 0,
        }
    }

    /// Whether an L2 entry names a host cluster (with a data file, offset 0 counts when the
    /// entry is COPIED: guest cluster 0 lives at data file offset 0).
    /// A standard entry with the zero flag and offset 0 stays a plain zero cluster even then
    /// (as QEMU classifies it).
    pub fn has_host(&self, e: u64) -> bool {
        if e & OFLAG_COMPRESSED != 0 {
            return false;
        }
        e & L2E_OFFSET_MASK != 0
            || (self.data_file && e & OFLAG_COPIED != 0 && (self.extended || e & OFLAG_ZERO == 0))
    }

    /// Whether the standard L2 entry `e` is a data cluster this image alone owns.
    pub fn owns(&self, e: u64) -> bool {
        e & OFLAG_COPIED != 0 && self.has_host(e)
    }

    pub fn l2_coverage(&self) -> u64 {
        self.l2_entries * self.cluster_size
    }

    /// (L1 index, L2 index) of a guest offset.
    pub fn indices(&self, guest: u64) -> (u64, u64) {
        let c = guest >> self.cluster_bits;
        (c / self.l2_entries, c % self.l2_entries)
    }

    pub fn offset_in_cluster(&self, x: u64) -> u64 {
        x & (self.cluster_size - 1)
    }

    pub fn max_refcount(&self) -> u64 {
        if self.refcount_order == 6 {
            u64::MAX
        } else {
            (1u64 << (1 << self.refcount_order)) - 1
        }
    }

    /// Classify the (sub)cluster of the L2 entry `(e, bitmap)` that holds byte
    /// `in_cluster` of the guest cluster. Errors describe a corrupt entry.
    pub fn classify(&self, e: u64, bitmap: u64, in_cluster: u64) -> Result<Kind, String> {
        if e & OFLAG_COMPRESSED != 0 && self.data_file {
            return Err("Compressed cluster entry found in image with external data file".into());
        }
        if e & OFLAG_COMPRESSED != 0 {
            if self.extended && bitmap != 0 {
                return Err(
                    "Invalid cluster entry found (compressed cluster with subcluster bitmap)"
                        .into(),
                );
            }
            let x = 62 - (self.cluster_bits - 8);
            let offset = e & ((1u64 << x) - 1);
            let sectors = ((e & ((1u64 << 62) - 1)) >> x) + 1;
            if offset >= crate::header::MAX_HOST_OFFSET || offset == 0 {
                return Err("Invalid compressed cluster entry".into());
            }
            let len = sectors * 512 - (offset & 511);
            return Ok(Kind::Compressed { offset, len });
        }
        let host = e & L2E_OFFSET_MASK;
        if host & (self.cluster_size - 1) != 0 {
            return Err(format!("Cluster allocation offset {host:#x} unaligned"));
        }
        let present = self.has_host(e);
        if !self.extended {
            if e & OFLAG_ZERO != 0 {
                if self.version < 3 {
                    return Err("Zero cluster entry found in pre-v3 image".into());
                }
                return Ok(if present {
                    Kind::ZeroAlloc(host)
                } else {
                    Kind::ZeroPlain
                });
            }
            return Ok(if present {
                Kind::Normal(host)
            } else {
                Kind::Unallocated
            });
        }
        let sc = in_cluster / self.unit;
        let alloc = bitmap >> sc & 1 != 0;
        let zero = bitmap >> (32 + sc) & 1 != 0;
        if alloc && zero {
            return Err("Invalid cluster entry found (subcluster both allocated and zero)".into());
        }
        let sub = host + sc * self.unit;
        Ok(match (present, alloc, zero) {
            (_, _, true) if present => Kind::ZeroAlloc(sub),
            (_, _, true) => Kind::ZeroPlain,
            (true, true, _) => Kind::Normal(sub),
            (true, false, _) => Kind::UnallocatedAlloc(sub),
            (false, true, _) => {
                return Err(
                    "Invalid cluster entry found (allocated subcluster without host offset)".into(),
                );
            }
            (false, false, _) => Kind::Unallocated,
        })
    }
}
