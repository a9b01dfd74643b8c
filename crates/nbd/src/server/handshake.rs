//! The fixed-newstyle handshake, server side: greeting, client flags, then options until the
//! client enters transmission (`EXPORT_NAME` or `GO`) or leaves.

use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;

use crate::proto::{self, InfoRequest, MetaContextRequest, OptionHeader, Put};
use crate::server::{ConnSocket, Export, ServerInner};
use crate::sock::{recv_exact, send_slice};

/// What the handshake agreed on.
pub(crate) struct Session {
    pub export: Arc<Export>,
    pub structured: bool,
    pub extended: bool,
    /// Context id of `base:allocation`, if selected.
    pub base_ctx: Option<u32>,
    /// Context id of `qemu:allocation-depth`, if selected.
    pub depth_ctx: Option<u32>,
    /// Context ids and bitmaps of the selected `qemu:dirty-bitmap:NAME` contexts.
    pub bitmap_ctx: Vec<(u32, Arc<blockd_block::DirtyBitmap>)>,
}

pub(crate) const BASE_ID: u32 = 0;
pub(crate) const DEPTH_ID: u32 = 1;
/// Context id of the export's bitmap `i` is `BITMAP_ID0 + i`.
pub(crate) const BITMAP_ID0: u32 = 2;

fn drop_conn(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

#[derive(Default)]
struct State {
    fixed: bool,
    no_zeroes: bool,
    structured: bool,
    extended: bool,
    /// Export the selected contexts belong to, and what is selected.
    meta_export: Option<String>,
    base: bool,
    depth: bool,
    /// Indices of the export's bitmaps selected.
    bitmaps: Vec<usize>,
}

/// Run the handshake. `Ok(None)`: the client left cleanly (ABORT or close).
/// The connection joins its export's registry before the final reply goes out, so that from
/// the client's point of view it is never "in the handshake" once it has been told it is in.
pub(crate) async fn negotiate(
    sock: &mut ConnSocket,
    server: &ServerInner,
) -> io::Result<Option<Session>> {
    let fd = sock.raw();
    let mut hello = Vec::with_capacity(18);
    hello.put_u64(proto::NBDMAGIC);
    hello.put_u64(proto::IHAVEOPT);
    hello.put_u16(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES);
    send_slice(fd, &hello).await?;
    let cf = recv_exact(fd, 4).await?;
    let cflags = u32::from_be_bytes(cf[..4].try_into().expect("4"));
    if cflags & !(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES) != 0 {
        return Err(drop_conn(format!("unknown client flags {cflags:#x}")));
    }
    let mut st = State {
        fixed: cflags & proto::FLAG_C_FIXED_NEWSTYLE != 0,
        no_zeroes: cflags & proto::FLAG_C_NO_ZEROES != 0,
        ..State::default()
    };
    loop {
        let hb = match recv_exact(fd, proto::OPTION_HEADER_LEN).await {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        };
        let h = OptionHeader::parse(&hb)?;
        if h.len > proto::MAX_OPTION_LEN {
            // Reading (or skipping) gigabytes of option data is a DoS: refuse and hang up.
            if st.fixed {
                let msg = format!("option length {} too large", h.len);
                reply(fd, h.option, proto::REP_ERR_TOO_BIG, msg.as_bytes()).await?;
            }
            return Err(drop_conn("option too large"));
        }
        let data = recv_exact(fd, h.len as usize).await?;
        if !st.fixed && h.option != proto::OPT_EXPORT_NAME {
            return Err(drop_conn("unsupported option without fixed newstyle"));
        }
        if server.is_shutting_down() && h.option != proto::OPT_ABORT {
            reply(
                fd,
                h.option,
                proto::REP_ERR_SHUTDOWN,
                b"server shutting down",
            )
            .await?;
            continue;
        }
        match h.option {
            proto::OPT_EXPORT_NAME => {
                if st.extended {
                    return Err(drop_conn("NBD_OPT_EXPORT_NAME after extended headers"));
                }
                let name = std::str::from_utf8(&data)
                    .map_err(|_| drop_conn("export name is not UTF-8"))?;
                if name.len() > proto::MAX_STRING {
                    return Err(drop_conn("export name too long"));
                }
                let export = server.find_export(name).filter(|e| sock.attach(e));
                let Some(export) = export else {
                    // No way to report an error here: the protocol says hang up.
                    return Err(drop_conn(format!("export '{name}' not present")));
                };
                let mut v = Vec::with_capacity(134);
                v.put_u64(export.size());
                v.put_u16(export.transmission_flags(st.structured));
                if !st.no_zeroes {
                    v.extend_from_slice(&[0u8; 124]);
                }
                send_slice(fd, &v).await?;
                return Ok(Some(session(&st, export, name)));
            }
            proto::OPT_ABORT => {
                // The client may already be gone: ignore send errors.
                let _ = reply(fd, h.option, proto::REP_ACK, &[]).await;
                return Ok(None);
            }
            proto::OPT_LIST => {
                if !data.is_empty() {
                    invalid(fd, h.option, "NBD_OPT_LIST must not have data").await?;
                    continue;
                }
                for e in server.list_exports() {
                    let mut v = Vec::new();
                    v.put_u32(e.name().len() as u32);
                    v.extend_from_slice(e.name().as_bytes());
                    if let Some(d) = e.description() {
                        v.extend_from_slice(d.as_bytes());
                    }
                    reply(fd, h.option, proto::REP_SERVER, &v).await?;
                }
                reply(fd, h.option, proto::REP_ACK, &[]).await?;
            }
            proto::OPT_STARTTLS => {
                if !data.is_empty() {
                    invalid(fd, h.option, "NBD_OPT_STARTTLS must not have data").await?;
                } else {
                    reply(fd, h.option, proto::REP_ERR_POLICY, b"TLS not configured").await?;
                }
            }
            proto::OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    invalid(fd, h.option, "NBD_OPT_STRUCTURED_REPLY must not have data").await?;
                } else if st.extended {
                    invalid(fd, h.option, "extended headers already negotiated").await?;
                } else {
                    st.structured = true;
                    reply(fd, h.option, proto::REP_ACK, &[]).await?;
                }
            }
            proto::OPT_EXTENDED_HEADERS => {
                if !data.is_empty() {
                    invalid(fd, h.option, "NBD_OPT_EXTENDED_HEADERS must not have data").await?;
                } else {
                    st.extended = true;
                    st.structured = true;
                    reply(fd, h.option, proto::REP_ACK, &[]).await?;
                }
            }
            proto::OPT_INFO | proto::OPT_GO => {
                let req = match InfoRequest::parse(&data) {
                    Ok(r) => r,
                    Err(e) => {
                        invalid(fd, h.option, &e.0).await?;
                        continue;
                    }
                };
                let Some(export) = server.find_export(&req.name) else {
                    let msg = format!("export '{}' not present", req.name);
                    reply(
                        fd,
                        h.option,
                        proto::REP_ERR_UNKNOWN,
                        proto::clamp_string(&msg).as_bytes(),
                    )
                    .await?;
                    continue;
                };
                send_info(fd, h.option, &req, &export, st.structured).await?;
                if h.option == proto::OPT_GO {
                    if !sock.attach(&export) {
                        let msg = format!("export '{}' is being removed", req.name);
                        reply(
                            fd,
                            h.option,
                            proto::REP_ERR_UNKNOWN,
                            proto::clamp_string(&msg).as_bytes(),
                        )
                        .await?;
                        continue;
                    }
                    reply(fd, h.option, proto::REP_ACK, &[]).await?;
                    return Ok(Some(session(&st, export, &req.name)));
                }
                reply(fd, h.option, proto::REP_ACK, &[]).await?;
            }
            proto::OPT_LIST_META_CONTEXT | proto::OPT_SET_META_CONTEXT => {
                let set = h.option == proto::OPT_SET_META_CONTEXT;
                if set {
                    // A SET replaces the selection even when it fails.
                    st.meta_export = None;
                    st.base = false;
                    st.depth = false;
                    st.bitmaps.clear();
                }
                if set && !st.structured {
                    invalid(
                        fd,
                        h.option,
                        "request option 'NBD_OPT_SET_META_CONTEXT' when structured reply is not negotiated",
                    )
                    .await?;
                    continue;
                }
                let req = match MetaContextRequest::parse(&data) {
                    Ok(r) => r,
                    Err(e) => {
                        invalid(fd, h.option, &e.0).await?;
                        continue;
                    }
                };
                let Some(export) = server.find_export(&req.export) else {
                    let msg = format!("export '{}' not present", req.export);
                    reply(
                        fd,
                        h.option,
                        proto::REP_ERR_UNKNOWN,
                        proto::clamp_string(&msg).as_bytes(),
                    )
                    .await?;
                    continue;
                };
                let depth_ok = export.cfg.allocation_depth;
                let (mut base, mut depth) = (false, false);
                let exported = &export.cfg.bitmaps;
                let mut bitmaps: Vec<usize> = Vec::new();
                if req.queries.is_empty() {
                    if !set {
                        base = true;
                        depth = depth_ok;
                        bitmaps = (0..exported.len()).collect();
                    }
                } else {
                    for q in &req.queries {
                        for i in super::dirty::matching(exported, q, !set) {
                            if !bitmaps.contains(&i) {
                                bitmaps.push(i);
                            }
                        }
                    }
                    for q in &req.queries {
                        match q.as_str() {
                            proto::CTX_BASE_ALLOCATION => base = true,
                            "base:" if !set => base = true,
                            "qemu:" if !set => depth |= depth_ok,
                            proto::CTX_ALLOCATION_DEPTH => depth |= depth_ok,
                            _ => {}
                        }
                    }
                }
                let id = |x: u32| if set { x } else { 0 };
                if base {
                    meta_reply(fd, h.option, id(BASE_ID), proto::CTX_BASE_ALLOCATION).await?;
                }
                if depth {
                    meta_reply(fd, h.option, id(DEPTH_ID), proto::CTX_ALLOCATION_DEPTH).await?;
                }
                for &i in &bitmaps {
                    let ctx = &exported[i].context;
                    meta_reply(fd, h.option, id(BITMAP_ID0 + i as u32), ctx).await?;
                }
                reply(fd, h.option, proto::REP_ACK, &[]).await?;
                if set {
                    st.meta_export = Some(req.export.clone());
                    st.base = base;
                    st.depth = depth;
                    st.bitmaps = bitmaps;
                }
            }
            other => {
                let msg = format!("Unsupported option {other}");
                reply(fd, other, proto::REP_ERR_UNSUP, msg.as_bytes()).await?;
            }
        }
    }
}

fn session(st: &State, export: Arc<Export>, name: &str) -> Session {
    // Contexts selected for another export do not apply.
    let same = st.meta_export.as_deref() == Some(name);
    Session {
        structured: st.structured,
        extended: st.extended,
        base_ctx: (same && st.base).then_some(BASE_ID),
        depth_ctx: (same && st.depth).then_some(DEPTH_ID),
        bitmap_ctx: if same {
            st.bitmaps
                .iter()
                .filter_map(|&i| {
                    let b = export.cfg.bitmaps.get(i)?;
                    Some((BITMAP_ID0 + i as u32, b.bitmap.clone()))
                })
                .collect()
        } else {
            Vec::new()
        },
        export,
    }
}

async fn reply(fd: RawFd, option: u32, typ: u32, data: &[u8]) -> io::Result<()> {
    send_slice(fd, &proto::option_reply(option, typ, data)).await
}

async fn invalid(fd: RawFd, option: u32, msg: &str) -> io::Result<()> {
    reply(
        fd,
        option,
        proto::REP_ERR_INVALID,
        proto::clamp_string(msg).as_bytes(),
    )
    .await
}

async fn meta_reply(fd: RawFd, option: u32, id: u32, name: &str) -> io::Result<()> {
    let mut v = Vec::new();
    v.put_u32(id);
    v.extend_from_slice(name.as_bytes());
    reply(fd, option, proto::REP_META_CONTEXT, &v).await
}

async fn send_info(
    fd: RawFd,
    option: u32,
    req: &InfoRequest,
    export: &Export,
    structured: bool,
) -> io::Result<()> {
    if req.requests.contains(&proto::INFO_NAME) {
        let mut v = Vec::new();
        v.put_u16(proto::INFO_NAME);
        v.extend_from_slice(export.name().as_bytes());
        reply(fd, option, proto::REP_INFO, &v).await?;
    }
    if req.requests.contains(&proto::INFO_DESCRIPTION)
        && let Some(d) = export.description()
    {
        let mut v = Vec::new();
        v.put_u16(proto::INFO_DESCRIPTION);
        v.extend_from_slice(d.as_bytes());
        reply(fd, option, proto::REP_INFO, &v).await?;
    }
    // Block sizes always: the backend handles any alignment (read-modify-write), so the
    // minimum is 1; 4 KiB preferred (or the node's alignment if larger).
    let align = export.backend().root().limits().request_alignment.max(1);
    let mut v = Vec::new();
    v.put_u16(proto::INFO_BLOCK_SIZE);
    v.put_u32(1);
    v.put_u32(align.max(4096).next_power_of_two());
    v.put_u32(proto::MAX_PAYLOAD);
    reply(fd, option, proto::REP_INFO, &v).await?;
    let mut v = Vec::new();
    v.put_u16(proto::INFO_EXPORT);
    v.put_u64(export.size());
    v.put_u16(export.transmission_flags(structured));
    reply(fd, option, proto::REP_INFO, &v).await
}
