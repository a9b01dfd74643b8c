//! The client side of the fixed newstyle handshake, written once over a [`Transport`]:
//!
//! * [`Stream`]: blocking std sockets with a deadline on every read and write, for the
//!   synchronous driver open (`Graph::open` cannot wait on the event loop: that would nest
//!   loops) and `blockd-nbd -L`. Its futures never wait, so [`run_ready`] drives them with one
//!   poll and no event loop at all.
//! * [`RingStream`]: the calling thread's ring (connect, send and receive as ring operations),
//!   for reconnects, which happen at request time in the node's context and must not block its
//!   loop.

use std::future::Future;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use blockd_aio::ops;

use crate::client::Address;
use crate::proto::{self, InfoRequest, MetaContextRequest, OptionHeader, OptionReplyHeader};
use crate::sock::{recv_exact, send_slice};

/// Longest option reply payload the client accepts.
const MAX_OPTION_REPLY: u32 = 64 << 10;

pub(crate) fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// A byte stream the handshake talks over.
pub(crate) trait Transport {
    async fn read_exact(&mut self, b: &mut [u8]) -> io::Result<()>;
    async fn write_all(&mut self, b: &[u8]) -> io::Result<()>;
    fn into_fd(self) -> io::Result<OwnedFd>;
}

/// Drive a future whose every step completes at once (one built on [`Stream`]) to its end,
/// without an event loop. A future that does wait is refused, not spun on.
pub(crate) fn run_ready<T>(f: impl Future<Output = io::Result<T>>) -> io::Result<T> {
    let f = pin!(f);
    match f.poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => Err(io::Error::other(
            "internal error: a blocking handshake step tried to wait on an event loop",
        )),
    }
}

/// A blocking stream with a deadline for every read and write.
pub(crate) enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

fn parse_port(port: &str) -> io::Result<u16> {
    port.parse().map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid port '{port}'"),
        )
    })
}

impl Stream {
    pub(crate) fn connect(addr: &Address, timeout: Duration) -> io::Result<Stream> {
        let s = match addr {
            Address::Inet { host, port } => {
                let port = parse_port(port)?;
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
}

impl Transport for Stream {
    async fn read_exact(&mut self, b: &mut [u8]) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.read_exact(b),
            Stream::Unix(s) => s.read_exact(b),
        }
    }

    async fn write_all(&mut self, b: &[u8]) -> io::Result<()> {
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
}

/// A socket driven by the calling thread's ring. Deadlines are the caller's (the whole
/// exchange runs under `blockd_aio::timeout`).
pub(crate) struct RingStream {
    fd: OwnedFd,
}

fn new_socket(domain: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked before it is owned.
    let fd = unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn set_nodelay(fd: &OwnedFd) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads a live c_int of the size given.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl RingStream {
    pub(crate) async fn connect(addr: &Address) -> io::Result<RingStream> {
        match addr {
            Address::Unix(p) => {
                let fd = new_socket(libc::AF_UNIX)?;
                ops::connect(fd.as_raw_fd(), ops::SockAddr::unix(p)?).await?;
                Ok(RingStream { fd })
            }
            Address::Inet { host, port } => {
                let port = parse_port(port)?;
                let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
                    Ok(ip) => vec![SocketAddr::new(ip, port)],
                    Err(_) => {
                        // Name resolution has no ring operation: the blocking pool does it.
                        let h = host.clone();
                        blockd_aio::blocking::spawn_blocking(move || {
                            (h.as_str(), port)
                                .to_socket_addrs()
                                .map(|a| a.collect::<Vec<_>>())
                        })
                        .await
                        .map_err(|_| io::Error::other("name resolution was cancelled"))??
                    }
                };
                let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
                for a in addrs {
                    let domain = if a.is_ipv4() {
                        libc::AF_INET
                    } else {
                        libc::AF_INET6
                    };
                    let fd = new_socket(domain)?;
                    match ops::connect(fd.as_raw_fd(), ops::SockAddr::inet(a)).await {
                        Ok(()) => {
                            set_nodelay(&fd)?;
                            return Ok(RingStream { fd });
                        }
                        Err(e) => last = e,
                    }
                }
                Err(last)
            }
        }
    }
}

impl Transport for RingStream {
    async fn read_exact(&mut self, b: &mut [u8]) -> io::Result<()> {
        let got = recv_exact(self.fd.as_raw_fd(), b.len()).await?;
        b.copy_from_slice(&got);
        Ok(())
    }

    async fn write_all(&mut self, b: &[u8]) -> io::Result<()> {
        send_slice(self.fd.as_raw_fd(), b).await
    }

    fn into_fd(self) -> io::Result<OwnedFd> {
        Ok(self.fd)
    }
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

pub(crate) struct Handshake<T: Transport> {
    pub(crate) s: T,
    pub(crate) no_zeroes: bool,
}

impl<T: Transport> Handshake<T> {
    pub(crate) async fn start(mut s: T) -> io::Result<Handshake<T>> {
        let mut b = [0u8; 18];
        s.read_exact(&mut b[..16]).await?;
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
        s.read_exact(&mut b[16..18]).await?;
        let hflags = u16::from_be_bytes([b[16], b[17]]);
        if hflags & proto::FLAG_FIXED_NEWSTYLE == 0 {
            return Err(bad("server does not support fixed newstyle"));
        }
        let no_zeroes = hflags & proto::FLAG_NO_ZEROES != 0;
        let mut cflags = proto::FLAG_C_FIXED_NEWSTYLE;
        if no_zeroes {
            cflags |= proto::FLAG_C_NO_ZEROES;
        }
        s.write_all(&cflags.to_be_bytes()).await?;
        Ok(Handshake { s, no_zeroes })
    }

    pub(crate) async fn send_option(&mut self, option: u32, data: &[u8]) -> io::Result<()> {
        let mut v = OptionHeader {
            option,
            len: data.len() as u32,
        }
        .encode();
        v.extend_from_slice(data);
        self.s.write_all(&v).await
    }

    pub(crate) async fn read_vec(&mut self, n: usize) -> io::Result<Vec<u8>> {
        let mut v = vec![0u8; n];
        self.s.read_exact(&mut v).await?;
        Ok(v)
    }

    /// One option reply: header and (bounded) payload.
    pub(crate) async fn reply(&mut self, option: u32) -> io::Result<(OptionReplyHeader, Vec<u8>)> {
        let hb = self.read_vec(proto::OPTION_REPLY_HEADER_LEN).await?;
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
        let data = self.read_vec(h.len as usize).await?;
        Ok((h, data))
    }

    /// Send an option with no data; true if acknowledged.
    pub(crate) async fn simple_option(&mut self, option: u32) -> io::Result<bool> {
        self.send_option(option, &[]).await?;
        let (h, _) = self.reply(option).await?;
        if h.reply == proto::REP_ACK {
            return Ok(true);
        }
        if h.is_error() {
            return Ok(false);
        }
        Err(bad(format!("unexpected reply type {:#x}", h.reply)))
    }

    pub(crate) fn error_text(h: &OptionReplyHeader, data: &[u8]) -> String {
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
    async fn set_meta(&mut self, export: &str) -> io::Result<Option<u32>> {
        let req = MetaContextRequest {
            export: export.to_string(),
            queries: vec![proto::CTX_BASE_ALLOCATION.to_string()],
        };
        self.send_option(proto::OPT_SET_META_CONTEXT, &req.encode())
            .await?;
        let mut id = None;
        loop {
            let (h, data) = self.reply(proto::OPT_SET_META_CONTEXT).await?;
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
    pub(crate) async fn info(
        &mut self,
        option: u32,
        export: &str,
    ) -> io::Result<(u64, u16, u32, u32, Option<String>)> {
        let req = InfoRequest {
            name: export.to_string(),
            requests: vec![proto::INFO_BLOCK_SIZE, proto::INFO_DESCRIPTION],
        };
        self.send_option(option, &req.encode()).await?;
        let mut export_info = None;
        let (mut min, mut max) = (1u32, proto::MAX_PAYLOAD);
        let mut desc = None;
        loop {
            let (h, data) = self.reply(option).await?;
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

    /// Negotiate `export` (extended or structured replies, `base:allocation`, GO) and hand
    /// back the socket in transmission phase.
    pub(crate) async fn negotiate(mut self, export: &str) -> io::Result<Negotiated> {
        let extended = self.simple_option(proto::OPT_EXTENDED_HEADERS).await?;
        let structured = extended || self.simple_option(proto::OPT_STRUCTURED_REPLY).await?;
        let base_ctx = if structured {
            self.set_meta(export).await?
        } else {
            None
        };
        let (size, flags, min_block, max_block) = match self.info(proto::OPT_GO, export).await {
            Ok((size, flags, min, max, _)) => (size, flags, min, max),
            Err(e) if e.to_string().starts_with("Unsupported") && !extended => {
                // An old server: EXPORT_NAME, which cannot report errors.
                self.send_option(proto::OPT_EXPORT_NAME, export.as_bytes())
                    .await?;
                let n = if self.no_zeroes { 10 } else { 134 };
                let b = self.read_vec(n).await?;
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
            fd: self.s.into_fd()?,
            size: size - size % min_block as u64,
            flags,
            structured,
            extended,
            base_ctx,
            min_block,
            max_block,
        })
    }
}

fn check_size(size: u64) -> io::Result<()> {
    // An export over 2^63 bytes would be negative as an offset (CVE-2023-5215).
    if size > i64::MAX as u64 {
        return Err(bad(format!("export size {size} is too large")));
    }
    Ok(())
}

/// Connect and negotiate on the calling thread's ring, all of it within `limit`.
pub(crate) async fn negotiate_on_ring(
    addr: &Address,
    export: &str,
    limit: Duration,
) -> io::Result<Negotiated> {
    let attempt = async {
        let s = RingStream::connect(addr).await?;
        Handshake::start(s).await?.negotiate(export).await
    };
    match blockd_aio::timeout(limit, attempt).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "connection timed out",
        )),
    }
}
