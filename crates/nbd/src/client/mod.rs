//! The NBD client: the handshake (`handshake.rs`, written once over a [`Transport`]: blocking
//! std sockets with a deadline for the synchronous driver open and `blockd-nbd -L`, the
//! calling thread's ring for reconnects), export listing for `blockd-nbd -L`, and the `nbd`
//! block driver (`driver.rs`) over a ring-driven connection (`conn.rs`).

mod conn;
pub mod driver;
mod handshake;

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use crate::proto::{self, MetaContextRequest};
pub use handshake::Negotiated;
pub(crate) use handshake::negotiate_on_ring;
use handshake::{Handshake, Stream, bad, run_ready};

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

/// Connect and negotiate `export` on blocking sockets (for the synchronous driver open): every
/// read and write has `timeout` as its deadline.
pub fn negotiate(addr: &Address, export: &str, timeout: Duration) -> io::Result<Negotiated> {
    let s = Stream::connect(addr, timeout)?;
    run_ready(async { Handshake::start(s).await?.negotiate(export).await })
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
    let run = async || -> io::Result<String> {
        let mut hs = Handshake::start(Stream::connect(addr, timeout)?).await?;
        hs.send_option(proto::OPT_LIST, &[]).await?;
        let mut names = Vec::new();
        loop {
            let (h, data) = hs.reply(proto::OPT_LIST).await?;
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
                    return Err(io::Error::other(Handshake::<Stream>::error_text(&h, &data)));
                }
                t => return Err(bad(format!("unexpected reply type {t:#x}"))),
            }
        }
        let extended = hs.simple_option(proto::OPT_EXTENDED_HEADERS).await?;
        let structured = extended || hs.simple_option(proto::OPT_STRUCTURED_REPLY).await?;
        let mut out = format!("exports available: {}\n", names.len());
        for name in &names {
            let (size, flags, min, max, desc) = hs.info(proto::OPT_INFO, name).await?;
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
                hs.send_option(proto::OPT_LIST_META_CONTEXT, &req.encode())
                    .await?;
                let mut ctxs = Vec::new();
                loop {
                    let (h, data) = hs.reply(proto::OPT_LIST_META_CONTEXT).await?;
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
        hs.send_option(proto::OPT_ABORT, &[]).await?;
        let _ = hs.reply(proto::OPT_ABORT).await;
        Ok(out)
    };
    run_ready(run()).map_err(|e| format!("Failed to list exports from {addr}: {e}"))
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
