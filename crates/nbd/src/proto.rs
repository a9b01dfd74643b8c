//! NBD wire formats (doc/proto.md): magics, handshake and option messages, request and reply
//! headers (compact, structured, extended), flags, error codes and meta-context names.
//!
//! Everything here is plain data and byte slices: parsing checks every length against the bytes
//! present and against the protocol's limits before anything is allocated, so a hostile peer can
//! make a parse fail, never panic or allocate gigabytes.

use std::io;

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

/// Handshake flags (server).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

/// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub const REP_ERR_POLICY: u32 = 0x8000_0002;
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
pub const REP_ERR_PLATFORM: u32 = 0x8000_0004;
pub const REP_ERR_TLS_REQD: u32 = 0x8000_0005;
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
pub const REP_ERR_SHUTDOWN: u32 = 0x8000_0007;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = 0x8000_0008;
pub const REP_ERR_TOO_BIG: u32 = 0x8000_0009;
pub const REP_ERR_EXT_HEADER_REQD: u32 = 0x8000_000a;

/// Info types.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags.
pub const TF_HAS_FLAGS: u16 = 1 << 0;
pub const TF_READ_ONLY: u16 = 1 << 1;
pub const TF_SEND_FLUSH: u16 = 1 << 2;
pub const TF_SEND_FUA: u16 = 1 << 3;
pub const TF_ROTATIONAL: u16 = 1 << 4;
pub const TF_SEND_TRIM: u16 = 1 << 5;
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TF_SEND_DF: u16 = 1 << 7;
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TF_SEND_CACHE: u16 = 1 << 10;
pub const TF_SEND_FAST_ZERO: u16 = 1 << 11;
pub const TF_BLOCK_STATUS_PAYLOAD: u16 = 1 << 12;

/// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

/// Reply flags and chunk types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
pub const REPLY_TYPE_ERROR: u16 = 0x8001;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = 0x8002;

/// Block status flags of `base:allocation`.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

/// Meta context names.
pub const CTX_BASE_ALLOCATION: &str = "base:allocation";
pub const CTX_ALLOCATION_DEPTH: &str = "qemu:allocation-depth";

/// Error values on the wire.
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// Longest string (name, description, context, message) the protocol allows.
pub const MAX_STRING: usize = 4096;
/// Largest payload we send or accept (reads and writes); the spec's recommended minimum.
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Largest option payload we read; bigger ones are refused with `ERR_TOO_BIG` and the
/// connection is dropped (reading gigabytes of option data is the CVE-2017-15119 DoS).
pub const MAX_OPTION_LEN: u32 = 256 << 10;

pub const OPTION_HEADER_LEN: usize = 16;
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
pub const COMPACT_REQUEST_LEN: usize = 28;
pub const EXTENDED_REQUEST_LEN: usize = 32;
pub const SIMPLE_REPLY_LEN: usize = 16;
pub const STRUCTURED_REPLY_LEN: usize = 20;
pub const EXTENDED_REPLY_LEN: usize = 32;

/// A protocol violation found while parsing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtoError(pub String);

impl std::fmt::Display for ProtoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ProtoError {}

impl From<ProtoError> for io::Error {
    fn from(e: ProtoError) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e.0)
    }
}

fn err<T>(msg: impl Into<String>) -> Result<T, ProtoError> {
    Err(ProtoError(msg.into()))
}

/// A cursor over received bytes; every read is bounds-checked.
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader { buf, pos: 0 }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        if n > self.remaining() {
            return err(format!(
                "message truncated: need {n} bytes, {} left",
                self.remaining()
            ));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    pub fn u16(&mut self) -> Result<u16, ProtoError> {
        Ok(u16::from_be_bytes(self.bytes(2)?.try_into().expect("2")))
    }

    pub fn u32(&mut self) -> Result<u32, ProtoError> {
        Ok(u32::from_be_bytes(self.bytes(4)?.try_into().expect("4")))
    }

    pub fn u64(&mut self) -> Result<u64, ProtoError> {
        Ok(u64::from_be_bytes(self.bytes(8)?.try_into().expect("8")))
    }

    /// A string of `n` bytes, at most [`MAX_STRING`], valid UTF-8.
    pub fn string(&mut self, n: usize) -> Result<String, ProtoError> {
        if n > MAX_STRING {
            return err(format!("string of {n} bytes exceeds {MAX_STRING}"));
        }
        let b = self.bytes(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| ProtoError("string is not UTF-8".into()))
    }

    /// The rest of the buffer.
    pub fn rest(&mut self) -> &'a [u8] {
        let s = &self.buf[self.pos..];
        self.pos = self.buf.len();
        s
    }
}

/// Big-endian writers onto a byte vector.
pub trait Put {
    fn put_u16(&mut self, v: u16);
    fn put_u32(&mut self, v: u32);
    fn put_u64(&mut self, v: u64);
}

impl Put for Vec<u8> {
    fn put_u16(&mut self, v: u16) {
        self.extend_from_slice(&v.to_be_bytes());
    }
    fn put_u32(&mut self, v: u32) {
        self.extend_from_slice(&v.to_be_bytes());
    }
    fn put_u64(&mut self, v: u64) {
        self.extend_from_slice(&v.to_be_bytes());
    }
}

/// Cut `s` to at most [`MAX_STRING`] bytes on a character boundary (error messages that quote
/// client strings must stay within the limit: CVE-2020-10761).
pub fn clamp_string(s: &str) -> &str {
    if s.len() <= MAX_STRING {
        return s;
    }
    let mut end = MAX_STRING;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

// ---------------------------------------------------------------------------------------------
// Handshake and options

/// The 16-byte option request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

impl OptionHeader {
    pub fn parse(b: &[u8]) -> Result<OptionHeader, ProtoError> {
        let mut r = Reader::new(b);
        let magic = r.u64()?;
        if magic != IHAVEOPT {
            return err(format!("bad option magic {magic:#x}"));
        }
        Ok(OptionHeader {
            option: r.u32()?,
            len: r.u32()?,
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(OPTION_HEADER_LEN);
        v.put_u64(IHAVEOPT);
        v.put_u32(self.option);
        v.put_u32(self.len);
        v
    }
}

/// An option reply header plus its payload, encoded.
pub fn option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(OPTION_REPLY_HEADER_LEN + data.len());
    v.put_u64(OPTION_REPLY_MAGIC);
    v.put_u32(option);
    v.put_u32(reply);
    v.put_u32(data.len() as u32);
    v.extend_from_slice(data);
    v
}

/// The 20-byte option reply header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply: u32,
    pub len: u32,
}

impl OptionReplyHeader {
    pub fn parse(b: &[u8]) -> Result<OptionReplyHeader, ProtoError> {
        let mut r = Reader::new(b);
        let magic = r.u64()?;
        if magic != OPTION_REPLY_MAGIC {
            return err(format!("bad option reply magic {magic:#x}"));
        }
        Ok(OptionReplyHeader {
            option: r.u32()?,
            reply: r.u32()?,
            len: r.u32()?,
        })
    }

    pub fn is_error(&self) -> bool {
        self.reply & 0x8000_0000 != 0
    }
}

/// Data of `NBD_OPT_INFO`/`NBD_OPT_GO`: export name and requested info types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub requests: Vec<u16>,
}

impl InfoRequest {
    pub fn parse(data: &[u8]) -> Result<InfoRequest, ProtoError> {
        let mut r = Reader::new(data);
        let name_len = r.u32()? as usize;
        if name_len > r.remaining().saturating_sub(2) {
            return err("export name length exceeds the option length");
        }
        let name = r.string(name_len)?;
        let n = r.u16()? as usize;
        if n * 2 != r.remaining() {
            return err("number of info requests does not match the option length");
        }
        let requests = (0..n).map(|_| r.u16()).collect::<Result<_, _>>()?;
        Ok(InfoRequest { name, requests })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        v.put_u32(self.name.len() as u32);
        v.extend_from_slice(self.name.as_bytes());
        v.put_u16(self.requests.len() as u16);
        for r in &self.requests {
            v.put_u16(*r);
        }
        v
    }
}

/// Data of `NBD_OPT_LIST_META_CONTEXT`/`NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub export: String,
    pub queries: Vec<String>,
}

impl MetaContextRequest {
    pub fn parse(data: &[u8]) -> Result<MetaContextRequest, ProtoError> {
        let mut r = Reader::new(data);
        let name_len = r.u32()? as usize;
        if name_len > r.remaining() {
            return err("export name length exceeds the option length");
        }
        let export = r.string(name_len)?;
        let n = r.u32()? as usize;
        // Each query needs at least its 4-byte length: bound the count before allocating.
        if n > r.remaining() / 4 {
            return err("number of queries exceeds the option length");
        }
        let mut queries = Vec::with_capacity(n);
        for _ in 0..n {
            let len = r.u32()? as usize;
            if len > r.remaining() {
                return err("query length exceeds the option length");
            }
            queries.push(r.string(len)?);
        }
        if r.remaining() != 0 {
            return err("trailing bytes after the queries");
        }
        Ok(MetaContextRequest { export, queries })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        v.put_u32(self.export.len() as u32);
        v.extend_from_slice(self.export.as_bytes());
        v.put_u32(self.queries.len() as u32);
        for q in &self.queries {
            v.put_u32(q.len() as u32);
            v.extend_from_slice(q.as_bytes());
        }
        v
    }
}

// ---------------------------------------------------------------------------------------------
// Transmission: requests

/// A request in either header form. `len` is the effect length, or the payload length for a
/// WRITE (and any request carrying `CMD_FLAG_PAYLOAD_LEN`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub typ: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u64,
}

impl Request {
    /// Parse a request header: 28 bytes in compact mode, 32 with extended headers. A wrong
    /// magic is an error the caller must answer by dropping the connection.
    pub fn parse(b: &[u8], extended: bool) -> Result<Request, ProtoError> {
        let mut r = Reader::new(b);
        let magic = r.u32()?;
        let want = if extended {
            EXTENDED_REQUEST_MAGIC
        } else {
            REQUEST_MAGIC
        };
        if magic != want {
            return err(format!("bad request magic {magic:#x}"));
        }
        let flags = r.u16()?;
        let typ = r.u16()?;
        let cookie = r.u64()?;
        let offset = r.u64()?;
        let len = if extended { r.u64()? } else { r.u32()? as u64 };
        Ok(Request {
            flags,
            typ,
            cookie,
            offset,
            len,
        })
    }

    pub fn encode(&self, extended: bool) -> Vec<u8> {
        let mut v = Vec::with_capacity(EXTENDED_REQUEST_LEN);
        if extended {
            v.put_u32(EXTENDED_REQUEST_MAGIC);
        } else {
            v.put_u32(REQUEST_MAGIC);
        }
        v.put_u16(self.flags);
        v.put_u16(self.typ);
        v.put_u64(self.cookie);
        v.put_u64(self.offset);
        if extended {
            v.put_u64(self.len);
        } else {
            v.put_u32(self.len as u32);
        }
        v
    }

    /// Bytes of payload that follow this header on the wire.
    pub fn payload_len(&self, extended: bool) -> u64 {
        if self.typ == CMD_WRITE || (extended && self.flags & CMD_FLAG_PAYLOAD_LEN != 0) {
            self.len
        } else {
            0
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Transmission: replies

/// Header of a simple reply.
pub fn simple_reply(error: u32, cookie: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// Header of a structured (20 bytes) or extended (32 bytes) reply chunk.
pub fn chunk_header(
    extended: bool,
    flags: u16,
    typ: u16,
    cookie: u64,
    offset: u64,
    len: u64,
) -> Vec<u8> {
    let mut v = Vec::with_capacity(EXTENDED_REPLY_LEN);
    if extended {
        v.put_u32(EXTENDED_REPLY_MAGIC);
        v.put_u16(flags);
        v.put_u16(typ);
        v.put_u64(cookie);
        v.put_u64(offset);
        v.put_u64(len);
    } else {
        v.put_u32(STRUCTURED_REPLY_MAGIC);
        v.put_u16(flags);
        v.put_u16(typ);
        v.put_u64(cookie);
        v.put_u32(len as u32);
    }
    v
}

/// A reply header as a client reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    Simple {
        error: u32,
        cookie: u64,
    },
    Chunk {
        flags: u16,
        typ: u16,
        cookie: u64,
        /// Echoed request offset (extended headers only).
        offset: u64,
        len: u64,
    },
}

impl ReplyHeader {
    /// Length of the header that starts with `magic`, or an error for an unknown magic.
    pub fn len_for_magic(magic: u32) -> Result<usize, ProtoError> {
        match magic {
            SIMPLE_REPLY_MAGIC => Ok(SIMPLE_REPLY_LEN),
            STRUCTURED_REPLY_MAGIC => Ok(STRUCTURED_REPLY_LEN),
            EXTENDED_REPLY_MAGIC => Ok(EXTENDED_REPLY_LEN),
            m => err(format!("bad reply magic {m:#x}")),
        }
    }

    /// Parse a complete header (its length given by [`Self::len_for_magic`]).
    pub fn parse(b: &[u8]) -> Result<ReplyHeader, ProtoError> {
        let mut r = Reader::new(b);
        match r.u32()? {
            SIMPLE_REPLY_MAGIC => Ok(ReplyHeader::Simple {
                error: r.u32()?,
                cookie: r.u64()?,
            }),
            STRUCTURED_REPLY_MAGIC => Ok(ReplyHeader::Chunk {
                flags: r.u16()?,
                typ: r.u16()?,
                cookie: r.u64()?,
                offset: 0,
                len: r.u32()? as u64,
            }),
            EXTENDED_REPLY_MAGIC => Ok(ReplyHeader::Chunk {
                flags: r.u16()?,
                typ: r.u16()?,
                cookie: r.u64()?,
                offset: r.u64()?,
                len: r.u64()?,
            }),
            m => err(format!("bad reply magic {m:#x}")),
        }
    }

    pub fn cookie(&self) -> u64 {
        match *self {
            ReplyHeader::Simple { cookie, .. } | ReplyHeader::Chunk { cookie, .. } => cookie,
        }
    }
}

/// One extent of a block status chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    pub flags: u64,
}

/// Parse a `BLOCK_STATUS` (32-bit) or `BLOCK_STATUS_EXT` (64-bit) chunk payload: the context id
/// and at least one extent, each of non-zero length.
pub fn parse_block_status(payload: &[u8], ext: bool) -> Result<(u32, Vec<Extent>), ProtoError> {
    let mut r = Reader::new(payload);
    let id = r.u32()?;
    let (count, size) = if ext {
        let n = r.u32()? as usize;
        if n == 0 || n.checked_mul(16) != Some(r.remaining()) {
            return err("extent count does not match the chunk length");
        }
        (n, 16)
    } else {
        if r.remaining() == 0 || !r.remaining().is_multiple_of(8) {
            return err("block status chunk length is not 4 + 8k (k >= 1)");
        }
        (r.remaining() / 8, 8)
    };
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let e = if size == 16 {
            Extent {
                len: r.u64()?,
                flags: r.u64()?,
            }
        } else {
            Extent {
                len: r.u32()? as u64,
                flags: r.u32()? as u64,
            }
        };
        if e.len == 0 {
            return err("zero-length extent");
        }
        out.push(e);
    }
    Ok((id, out))
}

// ---------------------------------------------------------------------------------------------
// Errors

/// The NBD error value for an I/O error (unknown ones become EINVAL, as the spec asks).
pub fn errno_to_nbd(e: &io::Error) -> u32 {
    match e.raw_os_error() {
        // (EACCES is not among them: QEMU's server also sends EINVAL for it)
        Some(libc::EPERM) | Some(libc::EROFS) => EPERM,
        Some(libc::EIO) => EIO,
        Some(libc::ENOMEM) => ENOMEM,
        Some(libc::ENOSPC) | Some(libc::EFBIG) | Some(libc::EDQUOT) => ENOSPC,
        Some(libc::EOVERFLOW) => EOVERFLOW,
        Some(libc::ENOTSUP) => ENOTSUP,
        Some(libc::ESHUTDOWN) => ESHUTDOWN,
        Some(libc::EINVAL) => EINVAL,
        None => EIO,
        Some(_) => EINVAL,
    }
}

/// The local error for an NBD error value.
pub fn nbd_to_errno(e: u32) -> io::Error {
    let n = match e {
        EPERM => libc::EPERM,
        EIO => libc::EIO,
        ENOMEM => libc::ENOMEM,
        ENOSPC => libc::ENOSPC,
        EOVERFLOW => libc::EOVERFLOW,
        ENOTSUP => libc::ENOTSUP,
        ESHUTDOWN => libc::ESHUTDOWN,
        _ => libc::EINVAL,
    };
    io::Error::from_raw_os_error(n)
}

/// Name of an option for messages.
pub fn option_name(o: u32) -> String {
    match o {
        OPT_EXPORT_NAME => "NBD_OPT_EXPORT_NAME".into(),
        OPT_ABORT => "NBD_OPT_ABORT".into(),
        OPT_LIST => "NBD_OPT_LIST".into(),
        OPT_STARTTLS => "NBD_OPT_STARTTLS".into(),
        OPT_INFO => "NBD_OPT_INFO".into(),
        OPT_GO => "NBD_OPT_GO".into(),
        OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY".into(),
        OPT_LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT".into(),
        OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT".into(),
        OPT_EXTENDED_HEADERS => "NBD_OPT_EXTENDED_HEADERS".into(),
        o => format!("option {o}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip() {
        let r = Request {
            flags: CMD_FLAG_FUA,
            typ: CMD_WRITE,
            cookie: 0x1122334455667788,
            offset: 4096,
            len: 512,
        };
        for ext in [false, true] {
            let b = r.encode(ext);
            assert_eq!(
                b.len(),
                if ext {
                    EXTENDED_REQUEST_LEN
                } else {
                    COMPACT_REQUEST_LEN
                }
            );
            assert_eq!(Request::parse(&b, ext).unwrap(), r);
            assert!(Request::parse(&b, !ext).is_err(), "magic of the other mode");
        }
        assert!(Request::parse(&[0u8; 10], false).is_err());
    }

    #[test]
    fn info_request_bounds() {
        let ok = InfoRequest {
            name: "disk".into(),
            requests: vec![INFO_BLOCK_SIZE],
        };
        assert_eq!(InfoRequest::parse(&ok.encode()).unwrap(), ok);
        // Name length past the option.
        let mut bad = Vec::new();
        bad.put_u32(0xffff_ffff);
        bad.put_u16(0);
        assert!(InfoRequest::parse(&bad).is_err());
        // Request count past the option.
        let mut bad = Vec::new();
        bad.put_u32(0);
        bad.put_u16(100);
        assert!(InfoRequest::parse(&bad).is_err());
        // Name over 4096 bytes.
        let big = InfoRequest {
            name: "a".repeat(5000),
            requests: vec![],
        };
        assert!(InfoRequest::parse(&big.encode()).is_err());
    }

    #[test]
    fn meta_context_bounds() {
        let ok = MetaContextRequest {
            export: "".into(),
            queries: vec!["base:allocation".into(), "qemu:".into()],
        };
        assert_eq!(MetaContextRequest::parse(&ok.encode()).unwrap(), ok);
        let mut bad = Vec::new();
        bad.put_u32(0);
        bad.put_u32(0x4000_0000); // a billion queries in 8 bytes
        assert!(MetaContextRequest::parse(&bad).is_err());
        let mut bad = Vec::new();
        bad.put_u32(0);
        bad.put_u32(1);
        bad.put_u32(100);
        bad.extend_from_slice(b"short");
        assert!(MetaContextRequest::parse(&bad).is_err());
    }

    #[test]
    fn block_status_parsing() {
        let mut p = Vec::new();
        p.put_u32(1);
        p.put_u32(4096);
        p.put_u32(STATE_HOLE);
        assert_eq!(
            parse_block_status(&p, false).unwrap(),
            (
                1,
                vec![Extent {
                    len: 4096,
                    flags: 1
                }]
            )
        );
        let mut z = Vec::new();
        z.put_u32(1);
        z.put_u32(0);
        z.put_u32(0);
        assert!(parse_block_status(&z, false).is_err(), "zero-length extent");
        assert!(parse_block_status(&p[..4], false).is_err(), "no extents");
        let mut e = Vec::new();
        e.put_u32(1);
        e.put_u32(2);
        e.put_u64(1);
        e.put_u64(0);
        assert!(
            parse_block_status(&e, true).is_err(),
            "count past the chunk"
        );
    }

    #[test]
    fn strings_are_clamped() {
        let s = "é".repeat(3000);
        let c = clamp_string(&s);
        assert!(c.len() <= MAX_STRING);
        assert!(c.len() > MAX_STRING - 2);
    }

    #[test]
    fn reply_headers() {
        let h = chunk_header(true, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 7, 4096, 0);
        assert_eq!(
            ReplyHeader::parse(&h).unwrap(),
            ReplyHeader::Chunk {
                flags: 1,
                typ: 0,
                cookie: 7,
                offset: 4096,
                len: 0
            }
        );
        let s = simple_reply(EIO, 9);
        assert_eq!(
            ReplyHeader::parse(&s).unwrap(),
            ReplyHeader::Simple {
                error: EIO,
                cookie: 9
            }
        );
        assert!(ReplyHeader::len_for_magic(0x12345678).is_err());
    }
}
