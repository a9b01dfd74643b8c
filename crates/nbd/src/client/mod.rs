//! The NBD client: the handshake (blocking, with a deadline: it runs inside a synchronous driver
//! open or on the blocking pool when reconnecting), export listing for `blockd-nbd -L`, and the
//! `nbd` block driver (`driver.rs`) over a ring-driven connection (`conn.rs`).

mod conn;
pub mod driver;

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use crate::proto::{self, InfoRequest, MetaContextRequest, OptionHeader, OptionReplyHeader};

pub use driver::register;

/// Where the server is (QEMU's SocketAddress, `inet` or `unix`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Inet { host: String, port: String },
    Unix(PathBuf),
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Inet { host, port } => write!(f, "{host}:{port}"),
            Address::Unix(p) => write!(f, "{}", p.display()),
        }
    }
}

/// Longest option reply payload the client accepts.
const MAX_OPTION_REPLY: u32 = 64 << 10;

/// A blocking stream with a deadline for every read and write.
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn connect(addr: &Address, timeout: Duration) -> io::Result<Stream> {
        let s = match addr {
            Address::Inet { host, port } => {
                let port: u16 = port.parse().map_err(|_| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("invalid port '{port}'"),
                    )
                })?;
                let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
                let mut found = None;
                for a in (host.as_str(), port).to_socket_addrs()? {
                    match TcpStream::connect_timeout(&a, timeout) {
                        Ok(s) => {
                            found = Some(s);
                            break;
                        }
                        Err(e) => last = e,
                    }
                }
                let s = found.ok_or(last)?;
                s.set_nodelay(true)?;
                Stream::Tcp(s)
            }
            Address::Unix(p) => Stream::Unix(UnixStream::connect(p)?),
        };
        s.set_timeout(Some(timeout))?;
        Ok(s)
    }

    fn set_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Stream::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
        }
    }

    fn read_exact(&mut self, b: &mut [u8]) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.read_exact(b),
            Stream::Unix(s) => s.read_exact(b),
        }
    }

    fn write_all(&mut self, b: &[u8]) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.write_all(b),
            Stream::Unix(s) => s.write_all(b),
        }
    }

    fn into_fd(self) -> io::Result<OwnedFd> {
        self.set_timeout(None)?;
        Ok(match self {
            Stream::Tcp(s) => OwnedFd::from(s),
            Stream::Unix(s) => OwnedFd::from(s),
        })
    }

    fn read_vec(&mut self, n: usize) -> io::Result<Vec<u8>> {
        let mut v = vec![0u8; n];
        self.read_exact(&mut v)?;
        Ok(v)
    }
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// The result of a successful handshake.
#[derive(Debug)]
pub struct Negotiated {
    pub fd: OwnedFd,
    pub size: u64,
    pub flags: u16,
    pub structured: bool,
    pub extended: bool,
    /// Context id of `base:allocation`, if the server has it.
    pub base_ctx: Option<u32>,
    pub min_block: u32,
    pub max_block: u32,
}

struct Handshake {
    s: Stream,
    no_zeroes: bool,
}

impl Handshake {
    fn start(addr: &Address, timeout: Duration) -> io::Result<Handshake> {
        let mut s = Stream::connect(addr, timeout)?;
        let mut b = [0u8; 18];
        s.read_exact(&mut b[..16])?;
        let mut r = proto::Reader::new(&b[..16]);
        if r.u64()? != proto::NBDMAGIC {
            return Err(bad("server did not send the NBD magic"));
        }
        let second = r.u64()?;
        if second != proto::IHAVEOPT {
            return Err(bad(
                "server uses the oldstyle protocol, which is not supported",
            ));
        }
        s.read_exact(&mut b[16..18])?;
        let hflags = u16::from_be_bytes([b[16], b[17]]);
        if hflags & proto::FLAG_FIXED_NEWSTYLE == 0 {
            return Err(bad("server does not support fixed newstyle"));
        }
        let no_zeroes = hflags & proto::FLAG_NO_ZEROES != 0;
        let mut cflags = proto::FLAG_C_FIXED_NEWSTYLE;
        if no_zeroes {
            cflags |= proto::FLAG_C_NO_ZEROES;
        }
        s.write_all(&cflags.to_be_bytes())?;
        Ok(Handshake { s, no_zeroes })
    }

    fn send_option(&mut self, option: u32, data: &[u8]) -> io::Result<()> {
        let mut v = OptionHeader {
            option,
            len: data.len() as u32,
        }
        .encode();
        v.extend_from_slice(data);
        self.s.write_all(&v)
    }

    /// One option reply: header and (bounded) payload.
    fn reply(&mut self, option: u32) -> io::Result<(OptionReplyHeader, Vec<u8>)> {
        let hb = self.s.read_vec(proto::OPTION_REPLY_HEADER_LEN)?;
        let h = OptionReplyHeader::parse(&hb)?;
        if h.option != option {
            return Err(bad(format!(
                "unexpected option {} in reply to {}",
                h.option, option
            )));
        }
        if h.len > MAX_OPTION_REPLY {
            return Err(bad(format!("option reply of {} bytes is too long", h.len)));
        }
        let data = self.s.read_vec(h.len as usize)?;
        Ok((h, data))
    }

    /// Send an option with no data; true if acknowledged.
    fn simple_option(&mut self, option: u32) -> io::Result<bool> {
        self.send_option(option, &[])?;
        let (h, _) = self.reply(option)?;
        if h.reply == proto::REP_ACK {
            return Ok(true);
        }
        if h.is_error() {
            return Ok(false);
        }
        Err(bad(format!("unexpected reply type {:#x}", h.reply)))
    }

    fn error_text(h: &OptionReplyHeader, data: &[u8]) -> String {
        let msg = String::from_utf8_lossy(data);
        let what = match h.reply {
            proto::REP_ERR_UNSUP => "Unsupported",
            proto::REP_ERR_POLICY => "Denied by server",
            proto::REP_ERR_INVALID => "Invalid parameters",
            proto::REP_ERR_PLATFORM => "Not supported on this platform",
            proto::REP_ERR_TLS_REQD => "TLS negotiation required before option",
            proto::REP_ERR_UNKNOWN => "Requested export not available",
            proto::REP_ERR_SHUTDOWN => "Server shutting down",
            proto::REP_ERR_BLOCK_SIZE_REQD => "Server requires INFO_BLOCK_SIZE",
            proto::REP_ERR_TOO_BIG => "Request too big",
            proto::REP_ERR_EXT_HEADER_REQD => "Server requires extended headers",
            _ => "Unknown error",
        };
        if msg.is_empty() {
            what.to_string()
        } else {
            format!("{what}: {msg}")
        }
    }

    /// SET_META_CONTEXT for `base:allocation`: its id if the server has it.
    fn set_meta(&mut self, export: &str) -> io::Result<Option<u32>> {
        let req = MetaContextRequest {
            export: export.to_string(),
            queries: vec![proto::CTX_BASE_ALLOCATION.to_string()],
        };
        self.send_option(proto::OPT_SET_META_CONTEXT, &req.encode())?;
        let mut id = None;
        loop {
            let (h, data) = self.reply(proto::OPT_SET_META_CONTEXT)?;
            match h.reply {
                proto::REP_ACK => return Ok(id),
                proto::REP_META_CONTEXT => {
                    let mut r = proto::Reader::new(&data);
                    let cid = r.u32()?;
                    let name = r.rest();
                    if name == proto::CTX_BASE_ALLOCATION.as_bytes() {
                        id = Some(cid);
                    }
                }
                _ if h.is_error() => return Ok(None),
                t => return Err(bad(format!("unexpected meta context reply {t:#x}"))),
            }
        }
    }

    /// INFO or GO: (size, flags, min block, max block, description).
    #[allow(clippy::type_complexity)]
    fn info(
        &mut self,
        option: u32,
        export: &str,
    ) -> io::Result<(u64, u16, u32, u32, Option<String>)> {
        let req = InfoRequest {
            name: export.to_string(),
            requests: vec![proto::INFO_BLOCK_SIZE, proto::INFO_DESCRIPTION],
        };
        self.send_option(option, &req.encode())?;
        let mut export_info = None;
        let (mut min, mut max) = (1u32, proto::MAX_PAYLOAD);
        let mut desc = None;
        loop {
            let (h, data) = self.reply(option)?;
            match h.reply {
                proto::REP_ACK => break,
                proto::REP_INFO => {
                    let mut r = proto::Reader::new(&data);
                    match r.u16()? {
                        proto::INFO_EXPORT => {
                            if data.len() != 12 {
                                return Err(bad("NBD_INFO_EXPORT of the wrong length"));
                            }
                            export_info = Some((r.u64()?, r.u16()?));
                        }
                        proto::INFO_BLOCK_SIZE => {
                            if data.len() != 14 {
                                return Err(bad("NBD_INFO_BLOCK_SIZE of the wrong length"));
                            }
                            let mn = r.u32()?;
                            let _pref = r.u32()?;
                            let mx = r.u32()?;
                            if !mn.is_power_of_two() || mn > 64 * 1024 || mx < mn {
                                return Err(bad(format!(
                                    "server block sizes are invalid (min {mn}, max {mx})"
                                )));
                            }
                            min = mn;
                            max = mx;
                        }
                        proto::INFO_DESCRIPTION => {
                            desc = Some(String::from_utf8_lossy(r.rest()).into_owned());
                        }
                        _ => {} // unknown info: ignored, as the spec asks
                    }
                }
                _ if h.is_error() => return Err(io::Error::other(Self::error_text(&h, &data))),
                t => return Err(bad(format!("unexpected reply type {t:#x}"))),
            }
        }
        let (size, flags) = export_info.ok_or_else(|| bad("server sent no NBD_INFO_EXPORT"))?;
        Ok((size, flags, min, max, desc))
    }
}

fn check_size(size: u64) -> io::Result<()> {
    // An export over 2^63 bytes would be negative as an offset (CVE-2023-5215).
    if size > i64::MAX as u64 {
        return Err(bad(format!("export size {size} is too large")));
    }
    Ok(())
}

/// Connect and negotiate `export` (structured or extended replies, `base:allocation`, GO).
pub fn negotiate(addr: &Address, export: &str, timeout: Duration) -> io::Result<Negotiated> {
    let mut hs = Handshake::start(addr, timeout)?;
    let extended = hs.simple_option(proto::OPT_EXTENDED_HEADERS)?;
    let structured = extended || hs.simple_option(proto::OPT_STRUCTURED_REPLY)?;
    let base_ctx = if structured {
        hs.set_meta(export)?
    } else {
        None
    };
    let (size, flags, min_block, max_block) = match hs.info(proto::OPT_GO, export) {
        Ok((size, flags, min, max, _)) => (size, flags, min, max),
        Err(e) if e.to_string().starts_with("Unsupported") && !extended => {
            // An old server: EXPORT_NAME, which cannot report errors.
            hs.send_option(proto::OPT_EXPORT_NAME, export.as_bytes())?;
            let n = if hs.no_zeroes { 10 } else { 134 };
            let b = hs.s.read_vec(n)?;
            let mut r = proto::Reader::new(&b);
            (r.u64()?, r.u16()?, 1, proto::MAX_PAYLOAD)
        }
        Err(e) => return Err(e),
    };
    check_size(size)?;
    if flags & proto::TF_HAS_FLAGS == 0 {
        return Err(bad("server transmission flags lack NBD_FLAG_HAS_FLAGS"));
    }
    Ok(Negotiated {
        fd: hs.s.into_fd()?,
        size: size - size % min_block as u64,
        flags,
        structured,
        extended,
        base_ctx,
        min_block,
        max_block,
    })
}

fn flag_names(f: u16) -> String {
    let names = [
        (proto::TF_READ_ONLY, "readonly"),
        (proto::TF_SEND_FLUSH, "flush"),
        (proto::TF_SEND_FUA, "fua"),
        (proto::TF_ROTATIONAL, "rotational"),
        (proto::TF_SEND_TRIM, "trim"),
        (proto::TF_SEND_WRITE_ZEROES, "zeroes"),
        (proto::TF_SEND_DF, "df"),
        (proto::TF_CAN_MULTI_CONN, "multi"),
        (proto::TF_SEND_CACHE, "cache"),
        (proto::TF_SEND_FAST_ZERO, "fast-zero"),
        (proto::TF_BLOCK_STATUS_PAYLOAD, "block-status-payload"),
    ];
    names
        .iter()
        .filter(|(b, _)| f & b != 0)
        .map(|(_, n)| *n)
        .collect::<Vec<_>>()
        .join(" ")
}

/// `blockd-nbd -L`: the text qemu-nbd prints for the server's exports.
pub fn list_exports(addr: &Address, timeout: Duration) -> Result<String, String> {
    let run = || -> io::Result<String> {
        let mut hs = Handshake::start(addr, timeout)?;
        hs.send_option(proto::OPT_LIST, &[])?;
        let mut names = Vec::new();
        loop {
            let (h, data) = hs.reply(proto::OPT_LIST)?;
            match h.reply {
                proto::REP_ACK => break,
                proto::REP_SERVER => {
                    let mut r = proto::Reader::new(&data);
                    let n = r.u32()? as usize;
                    if n > r.remaining() {
                        return Err(bad("export name length exceeds the reply"));
                    }
                    names.push(r.string(n)?);
                }
                _ if h.is_error() => {
                    return Err(io::Error::other(Handshake::error_text(&h, &data)));
                }
                t => return Err(bad(format!("unexpected reply type {t:#x}"))),
            }
        }
        let extended = hs.simple_option(proto::OPT_EXTENDED_HEADERS)?;
        let structured = extended || hs.simple_option(proto::OPT_STRUCTURED_REPLY)?;
        let mut out = format!("exports available: {}\n", names.len());
        for name in &names {
            let (size, flags, min, max, desc) = hs.info(proto::OPT_INFO, name)?;
            out += &format!(" export: '{name}'\n");
            if let Some(d) = desc {
                out += &format!("  description: {d}\n");
            }
            out += &format!("  size:  {size}\n");
            out += &format!("  flags: {flags:#x} ( {} )\n", flag_names(flags));
            out += &format!("  min block: {min}\n");
            out += &format!("  opt block: {}\n", min.max(4096));
            out += &format!("  max block: {max}\n");
            out += &format!(
                "  transaction size: {}\n",
                if extended { "64-bit" } else { "32-bit" }
            );
            if structured {
                let req = MetaContextRequest {
                    export: name.clone(),
                    queries: vec![],
                };
                hs.send_option(proto::OPT_LIST_META_CONTEXT, &req.encode())?;
                let mut ctxs = Vec::new();
                loop {
                    let (h, data) = hs.reply(proto::OPT_LIST_META_CONTEXT)?;
                    match h.reply {
                        proto::REP_ACK => break,
                        proto::REP_META_CONTEXT if data.len() >= 4 => {
                            ctxs.push(String::from_utf8_lossy(&data[4..]).into_owned())
                        }
                        _ => break,
                    }
                }
                out += &format!("  available meta contexts: {}\n", ctxs.len());
                for c in ctxs {
                    out += &format!("   {c}\n");
                }
            }
        }
        hs.send_option(proto::OPT_ABORT, &[])?;
        let _ = hs.reply(proto::OPT_ABORT);
        Ok(out)
    };
    run().map_err(|e| format!("Failed to list exports from {addr}: {e}"))
}

/// Parse an `nbd://host[:port]/export`, `nbd+tcp://...` or `nbd+unix:///export?socket=path` URI.
pub fn parse_uri(uri: &str) -> Result<(Address, String), String> {
    let bad = || format!("Invalid NBD URI '{uri}'");
    let (scheme, rest) = uri.split_once("://").ok_or_else(bad)?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, ""),
    };
    let (path, query) = match path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path, None),
    };
    let export = path.to_string();
    match scheme {
        "nbd" | "nbd+tcp" => {
            if query.is_some() {
                return Err(bad());
            }
            let (host, port) = match authority.rsplit_once(':') {
                Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => {
                    (h.trim_matches(|c| c == '[' || c == ']'), p)
                }
                _ => (authority, "10809"),
            };
            let host = if host.is_empty() { "localhost" } else { host };
            Ok((
                Address::Inet {
                    host: host.into(),
                    port: port.into(),
                },
                export,
            ))
        }
        "nbd+unix" => {
            if !authority.is_empty() {
                return Err(bad());
            }
            let sock = query
                .and_then(|q| q.strip_prefix("socket="))
                .ok_or_else(bad)?;
            Ok((Address::Unix(PathBuf::from(sock)), export))
        }
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        assert_eq!(
            parse_uri("nbd://example.com:1234/disk").unwrap(),
            (
                Address::Inet {
                    host: "example.com".into(),
                    port: "1234".into()
                },
                "disk".into()
            )
        );
        assert_eq!(
            parse_uri("nbd://localhost").unwrap().0,
            Address::Inet {
                host: "localhost".into(),
                port: "10809".into()
            }
        );
        assert_eq!(
            parse_uri("nbd+unix:///x?socket=/tmp/s").unwrap(),
            (Address::Unix("/tmp/s".into()), "x".into())
        );
        assert!(parse_uri("http://x").is_err());
        assert!(parse_uri("nbd+unix:///x").is_err());
    }
}
