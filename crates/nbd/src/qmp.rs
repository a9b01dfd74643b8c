//! QMP glue for the daemon: `nbd-server-start`, `nbd-server-stop`, `block-export-add`
//! (type `nbd`), `block-export-del`, `query-block-exports`, `nbd-server-add`,
//! `nbd-server-remove`, with QEMU's argument names, defaults and error messages; and the
//! parsers of the daemon's `--nbd-server` and `--export type=nbd,...` options.
//!
//! Every function runs on the main context with the graph (`&Graph`/`&mut Graph`). Removed
//! exports finish asynchronously (hard mode waits for clients); [`NbdState::reap_deleted`]
//! detaches their backends and returns the ids to report as `BLOCK_EXPORT_DELETED` — call it
//! from the callback registered with [`NbdState::on_export_deleted`] (or after each command).

use std::collections::BTreeSet;
use std::time::Duration;

use blockd_aio::ContextHandle;
use blockd_block::{Graph, Perm};
use serde_json::{Map, Value, json};

use crate::server::{
    BitmapSpec, DeletedCallback, ExportConfig, ListenAddr, NbdServer, RemoveMode, ServerConfig,
};

/// A QMP error: (class, description).
pub type QmpError = (String, String);
pub type QmpResult = Result<Value, QmpError>;

fn generic(msg: impl Into<String>) -> QmpError {
    ("GenericError".to_string(), msg.into())
}

/// The daemon's NBD state: the server (listening or not) and which exports came from the
/// legacy `nbd-server-add` (removed again by `nbd-server-stop`).
pub struct NbdState {
    server: NbdServer,
    legacy: BTreeSet<String>,
}

impl NbdState {
    /// Create on the main context.
    pub fn new() -> std::io::Result<NbdState> {
        Ok(NbdState {
            server: NbdServer::new(ServerConfig::default())?,
            legacy: BTreeSet::new(),
        })
    }

    pub fn server(&self) -> &NbdServer {
        &self.server
    }

    /// Called on the main context with each export id once it is gone.
    pub fn on_export_deleted(&self, cb: DeletedCallback) {
        self.server.on_export_deleted(cb);
    }

    /// Detach the backends of exports that are gone; their ids, for BLOCK_EXPORT_DELETED.
    pub fn reap_deleted(&mut self, graph: &Graph) -> Vec<String> {
        let ids = self.server.reap_deleted(graph);
        for id in &ids {
            self.legacy.remove(id);
        }
        ids
    }
}

/// Argument reader with QMP's type errors.
struct Args<'a> {
    m: &'a Map<String, Value>,
    allowed: &'a [&'a str],
}

impl<'a> Args<'a> {
    fn new(m: &'a Map<String, Value>, allowed: &'a [&'a str]) -> Result<Args<'a>, QmpError> {
        for k in m.keys() {
            if !allowed.contains(&k.as_str()) {
                return Err(generic(format!("Parameter '{k}' is unexpected")));
            }
        }
        Ok(Args { m, allowed })
    }

    fn str(&self, k: &str) -> Result<Option<String>, QmpError> {
        debug_assert!(self.allowed.contains(&k));
        match self.m.get(k) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(generic(format!(
                "Invalid parameter type for '{k}', expected: string"
            ))),
        }
    }

    fn req_str(&self, k: &str) -> Result<String, QmpError> {
        self.str(k)?
            .ok_or_else(|| generic(format!("Parameter '{k}' is missing")))
    }

    fn bool(&self, k: &str) -> Result<Option<bool>, QmpError> {
        match self.m.get(k) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(generic(format!(
                "Invalid parameter type for '{k}', expected: boolean"
            ))),
        }
    }

    fn u32(&self, k: &str) -> Result<Option<u32>, QmpError> {
        match self.m.get(k) {
            None => Ok(None),
            Some(Value::Number(n)) => n
                .as_u64()
                .and_then(|v| u32::try_from(v).ok())
                .map(Some)
                .ok_or_else(|| generic(format!("Parameter '{k}' expects uint32"))),
            Some(_) => Err(generic(format!(
                "Invalid parameter type for '{k}', expected: integer"
            ))),
        }
    }
}

/// SocketAddress (flat: `{"type": "inet", "host": ..}`) or SocketAddressLegacy
/// (`{"type": "inet", "data": {..}}`).
fn socket_address(v: &Value) -> Result<ListenAddr, QmpError> {
    let Value::Object(m) = v else {
        return Err(generic(
            "Invalid parameter type for 'addr', expected: object",
        ));
    };
    let typ = match m.get("type") {
        Some(Value::String(s)) => s.clone(),
        Some(_) => {
            return Err(generic(
                "Invalid parameter type for 'addr.type', expected: string",
            ));
        }
        None => return Err(generic("Parameter 'addr.type' is missing")),
    };
    let data: Map<String, Value> = match m.get("data") {
        Some(Value::Object(d)) => d.clone(),
        Some(_) => {
            return Err(generic(
                "Invalid parameter type for 'addr.data', expected: object",
            ));
        }
        None => m
            .iter()
            .filter(|(k, _)| *k != "type")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    };
    let get = |k: &str| -> Result<Option<String>, QmpError> {
        match data.get(k) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(Value::Number(n)) if k == "port" => Ok(Some(n.to_string())),
            Some(_) => Err(generic(format!(
                "Invalid parameter type for 'addr.{k}', expected: string"
            ))),
        }
    };
    match typ.as_str() {
        "inet" => {
            let host = get("host")?.ok_or_else(|| generic("Parameter 'addr.host' is missing"))?;
            let port = get("port")?.ok_or_else(|| generic("Parameter 'addr.port' is missing"))?;
            Ok(ListenAddr::Inet { host, port })
        }
        "unix" => {
            let path = get("path")?.ok_or_else(|| generic("Parameter 'addr.path' is missing"))?;
            Ok(ListenAddr::Unix(path.into()))
        }
        "fd" => {
            let s = get("str")?.ok_or_else(|| generic("Parameter 'addr.str' is missing"))?;
            let fd: i32 = s
                .parse()
                .map_err(|_| generic(format!("File descriptor named '{s}' has not been found")))?;
            if fd < 0 {
                return Err(generic(format!(
                    "File descriptor named '{s}' has not been found"
                )));
            }
            // SAFETY: the caller names an inherited descriptor it hands to the server; we take
            // ownership (QEMU's monitor_fd_param with a numeric name).
            let owned =
                unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
            Ok(ListenAddr::Fd(owned))
        }
        "vsock" => Err(generic("vsock addresses are not supported yet")),
        other => Err(generic(format!(
            "Parameter 'addr.type' does not accept value '{other}'"
        ))),
    }
}

/// `nbd-server-start`: addr, tls-creds, tls-authz, max-connections (default 100),
/// handshake-max-seconds (default 10).
pub fn nbd_server_start(st: &mut NbdState, args: &Map<String, Value>) -> QmpResult {
    let a = Args::new(
        args,
        &[
            "addr",
            "tls-creds",
            "tls-authz",
            "max-connections",
            "handshake-max-seconds",
        ],
    )?;
    if st.server.is_listening() {
        return Err(generic("NBD server already running"));
    }
    let addr = socket_address(
        args.get("addr")
            .ok_or_else(|| generic("Parameter 'addr' is missing"))?,
    )?;
    if a.str("tls-creds")?.is_some() || a.str("tls-authz")?.is_some() {
        return Err(generic("TLS for the NBD server is not supported yet"));
    }
    let max = a.u32("max-connections")?.unwrap_or(100);
    let hs = a.u32("handshake-max-seconds")?.unwrap_or(10);
    st.server.set_config(ServerConfig {
        max_connections: max as usize,
        handshake_timeout: Duration::from_secs(hs as u64),
    });
    st.server.listen(addr).map_err(generic)?;
    Ok(json!({}))
}

/// `nbd-server-stop`: close the listener and stray handshakes; remove the exports that
/// `nbd-server-add` created (hard).
pub fn nbd_server_stop(st: &mut NbdState, args: &Map<String, Value>) -> QmpResult {
    Args::new(args, &[])?;
    if !st.server.is_listening() {
        return Err(generic("NBD server not running"));
    }
    st.server.stop_listening();
    for id in st.legacy.clone() {
        let _ = st.server.remove_export(&id, RemoveMode::Hard);
    }
    Ok(json!({}))
}

/// Look up an iothread's context by id (the daemon's `--object iothread` registry).
pub type IothreadLookup<'a> = &'a dyn Fn(&str) -> Option<ContextHandle>;

/// `block-export-add` with `type: nbd`.
pub fn block_export_add(
    st: &mut NbdState,
    graph: &mut Graph,
    args: &Map<String, Value>,
    iothreads: IothreadLookup<'_>,
) -> QmpResult {
    let a = Args::new(
        args,
        &[
            "type",
            "id",
            "node-name",
            "writable",
            "writethrough",
            "iothread",
            "fixed-iothread",
            "name",
            "description",
            "bitmaps",
            "allocation-depth",
            "multi-conn",
        ],
    )?;
    let typ = a.req_str("type")?;
    if typ != "nbd" {
        return Err(generic(format!(
            "Parameter 'type' does not accept value '{typ}'"
        )));
    }
    let id = a.req_str("id")?;
    let node_name = a.req_str("node-name")?;
    let writable = a.bool("writable")?.unwrap_or(false);
    let writethrough = a.bool("writethrough")?.unwrap_or(false);
    let _fixed = a.bool("fixed-iothread")?.unwrap_or(false);
    let name = a.str("name")?.unwrap_or_else(|| node_name.clone());
    let description = a.str("description")?;
    let allocation_depth = a.bool("allocation-depth")?.unwrap_or(false);
    let multi_conn = match a.str("multi-conn")?.as_deref() {
        None | Some("auto") | Some("on") => true,
        Some("off") => false,
        Some(v) => {
            return Err(generic(format!(
                "Parameter 'multi-conn' does not accept value '{v}'"
            )));
        }
    };
    let bitmaps = bitmap_specs(args.get("bitmaps"))?;
    add_export(
        st,
        graph,
        ExportSpec {
            id,
            node_name,
            name,
            description,
            writable,
            writethrough,
            allocation_depth,
            multi_conn,
            iothread: a.str("iothread")?,
            bitmaps,
        },
        iothreads,
    )?;
    Ok(json!({}))
}

struct ExportSpec {
    id: String,
    node_name: String,
    name: String,
    description: Option<String>,
    writable: bool,
    writethrough: bool,
    allocation_depth: bool,
    multi_conn: bool,
    iothread: Option<String>,
    bitmaps: Vec<BitmapSpec>,
}

/// The `bitmaps` list of block-export-add: names, or `{node, name}`.
fn bitmap_specs(v: Option<&Value>) -> Result<Vec<BitmapSpec>, QmpError> {
    let Some(v) = v else {
        return Ok(Vec::new());
    };
    let list = v
        .as_array()
        .ok_or_else(|| generic("Invalid parameter type for 'bitmaps', expected: array"))?;
    let mut out = Vec::new();
    for (i, item) in list.iter().enumerate() {
        let bad = || {
            generic(format!(
                "Invalid parameter type for 'bitmaps[{i}]', expected: string or object"
            ))
        };
        out.push(match item {
            Value::String(s) => BitmapSpec::Name(s.clone()),
            Value::Object(m) => {
                let get = |k: &str| m.get(k).and_then(Value::as_str).map(str::to_string);
                BitmapSpec::Node {
                    node: get("node").ok_or_else(bad)?,
                    name: get("name").ok_or_else(bad)?,
                }
            }
            _ => return Err(bad()),
        });
    }
    Ok(out)
}

fn add_export(
    st: &mut NbdState,
    graph: &mut Graph,
    s: ExportSpec,
    iothreads: IothreadLookup<'_>,
) -> Result<(), QmpError> {
    if !st.server.is_listening() {
        return Err(generic("NBD server not running"));
    }
    if s.name.len() > crate::proto::MAX_STRING {
        return Err(generic(format!(
            "export name '{}' too long",
            crate::proto::clamp_string(&s.name)
        )));
    }
    if s.description
        .as_ref()
        .is_some_and(|d| d.len() > crate::proto::MAX_STRING)
    {
        return Err(generic(format!(
            "description '{}' too long",
            crate::proto::clamp_string(s.description.as_deref().unwrap_or(""))
        )));
    }
    if st.server.export(&s.id).is_some() {
        return Err(generic(format!(
            "Block export id '{}' is already in use",
            s.id
        )));
    }
    if st.server.export_by_name(&s.name).is_some() {
        return Err(generic(format!(
            "NBD server already has export named '{}'",
            s.name
        )));
    }
    let node = graph.node(&s.node_name).ok_or_else(|| {
        generic(format!(
            "Cannot find device='' nor node-name='{}'",
            s.node_name
        ))
    })?;
    let bitmaps = crate::server::export_bitmaps(&node, &s.bitmaps, s.writable, |n| graph.node(n))
        .map_err(generic)?;
    let iothread = match &s.iothread {
        None => None,
        Some(t) => Some(iothreads(t).ok_or_else(|| generic(format!("Cannot find iothread {t}")))?),
    };
    let perm = if s.writable {
        Perm::CONSISTENT_READ | Perm::WRITE
    } else {
        Perm::CONSISTENT_READ
    };
    // As QEMU's NBD exports: the size a client was told must not change under it.
    let backend = graph
        .new_backend("", &node, perm, Perm::ALL.minus(Perm::RESIZE))
        .map_err(generic)?;
    let cfg = ExportConfig {
        id: s.id,
        name: s.name,
        description: s.description,
        backend: backend.clone(),
        writable: s.writable,
        writethrough: s.writethrough,
        allocation_depth: s.allocation_depth,
        bitmaps,
        multi_conn: s.multi_conn,
        iothread,
        detect_zeroes: Default::default(),
    };
    if let Err(e) = st.server.add_export(cfg) {
        backend.detach(graph);
        return Err(generic(e));
    }
    Ok(())
}

fn remove_mode(a: &Args<'_>) -> Result<RemoveMode, QmpError> {
    match a.str("mode")?.as_deref() {
        None | Some("safe") => Ok(RemoveMode::Safe),
        Some("hard") => Ok(RemoveMode::Hard),
        Some(v) => Err(generic(format!(
            "Parameter 'mode' does not accept value '{v}'"
        ))),
    }
}

/// `block-export-del`: id, mode (safe|hard, default safe).
pub fn block_export_del(st: &mut NbdState, args: &Map<String, Value>) -> QmpResult {
    let a = Args::new(args, &["id", "mode"])?;
    let id = a.req_str("id")?;
    let mode = remove_mode(&a)?;
    // QEMU adds the hint "Use mode='hard' to force client disconnect" for humans only.
    st.server
        .remove_export(&id, mode)
        .map(|_| json!({}))
        .map_err(generic)
}

/// `query-block-exports`: `[{type, id, node-name, shutting-down}]`.
pub fn query_block_exports(st: &NbdState) -> QmpResult {
    let v: Vec<Value> = st
        .server
        .exports()
        .iter()
        .map(|e| {
            json!({
                "type": "nbd",
                "id": e.id(),
                "node-name": e.backend().root().name(),
                "shutting-down": e.is_removing(),
            })
        })
        .collect();
    Ok(Value::Array(v))
}

/// Legacy `nbd-server-add`: device, name (default: device), description, writable, bitmap.
pub fn nbd_server_add(
    st: &mut NbdState,
    graph: &mut Graph,
    args: &Map<String, Value>,
) -> QmpResult {
    let a = Args::new(
        args,
        &["device", "name", "description", "writable", "bitmap"],
    )?;
    let device = a.req_str("device")?;
    let name = a.str("name")?.unwrap_or_else(|| device.clone());
    let spec = ExportSpec {
        id: name.clone(),
        node_name: device,
        name: name.clone(),
        description: a.str("description")?,
        writable: a.bool("writable")?.unwrap_or(false),
        writethrough: false,
        allocation_depth: false,
        multi_conn: true,
        iothread: None,
        bitmaps: a.str("bitmap")?.map(BitmapSpec::Name).into_iter().collect(),
    };
    add_export(st, graph, spec, &|_| None)?;
    st.legacy.insert(name);
    Ok(json!({}))
}

/// Legacy `nbd-server-remove`: name, mode (safe|hard, default safe).
pub fn nbd_server_remove(st: &mut NbdState, args: &Map<String, Value>) -> QmpResult {
    let a = Args::new(args, &["name", "mode"])?;
    let name = a.req_str("name")?;
    let mode = remove_mode(&a)?;
    if !st.server.is_listening() {
        return Err(generic("NBD server not running"));
    }
    let Some(e) = st.server.export_by_name(&name) else {
        return Err(generic(format!("Export '{name}' is not found")));
    };
    let id = e.id().to_string();
    let mut m = Map::new();
    m.insert("id".into(), id.into());
    m.insert(
        "mode".into(),
        if mode == RemoveMode::Hard {
            "hard"
        } else {
            "safe"
        }
        .into(),
    );
    block_export_del(st, &m)
}

/// Turn dotted-key strings into the types QMP expects for the keys of these commands.
fn typed(
    m: Map<String, Value>,
    bools: &[&str],
    ints: &[&str],
) -> Result<Map<String, Value>, String> {
    let mut out = Map::new();
    for (k, v) in m {
        let v = match v {
            Value::String(s) if bools.contains(&k.as_str()) => match s.as_str() {
                "on" | "yes" | "true" | "y" => Value::Bool(true),
                "off" | "no" | "false" | "n" => Value::Bool(false),
                _ => return Err(format!("Parameter '{k}' expects 'on' or 'off'")),
            },
            Value::String(s) if ints.contains(&k.as_str()) => {
                let n: u64 = s
                    .parse()
                    .map_err(|_| format!("Parameter '{k}' expects an integer"))?;
                Value::from(n)
            }
            v => v,
        };
        out.insert(k, v);
    }
    Ok(out)
}

/// Parse the daemon's `--nbd-server addr.type=inet,addr.host=..,addr.port=..,max-connections=..`
/// into `nbd-server-start` arguments.
pub fn parse_nbd_server_option(s: &str) -> Result<Map<String, Value>, String> {
    let m = blockd_block::options::parse(s)?;
    typed(m, &[], &["max-connections", "handshake-max-seconds"])
}

/// Parse the daemon's `--export type=nbd,id=..,node-name=..,...` into `block-export-add`
/// arguments.
pub fn parse_export_option(s: &str) -> Result<Map<String, Value>, String> {
    let m = blockd_block::options::parse(s)?;
    match m.get("type").and_then(|v| v.as_str()) {
        Some("nbd") => {}
        Some(t) => return Err(format!("Export type '{t}' is not supported yet")),
        None => return Err("Parameter 'type' is missing".into()),
    }
    let mut m = typed(
        m,
        &[
            "writable",
            "writethrough",
            "allocation-depth",
            "fixed-iothread",
        ],
        &[],
    )?;
    // bitmaps.0=a,bitmaps.1=b arrive as an object; QMP wants a list.
    if let Some(Value::Object(b)) = m.get("bitmaps").cloned() {
        let mut list: Vec<(usize, Value)> = Vec::new();
        for (k, v) in b {
            let i: usize = k.parse().map_err(|_| "Invalid bitmaps list".to_string())?;
            list.push((i, v));
        }
        list.sort_by_key(|(i, _)| *i);
        m.insert(
            "bitmaps".into(),
            Value::Array(list.into_iter().map(|(_, v)| v).collect()),
        );
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_options() {
        let m = parse_nbd_server_option(
            "addr.type=inet,addr.host=127.0.0.1,addr.port=0,max-connections=5",
        )
        .unwrap();
        assert_eq!(m["addr"]["host"], "127.0.0.1");
        assert_eq!(m["max-connections"], 5);
        let e = parse_export_option("type=nbd,id=e0,node-name=n,writable=on,name=x").unwrap();
        assert_eq!(e["writable"], true);
        assert_eq!(e["id"], "e0");
        assert!(parse_export_option("type=nbd,writable=maybe").is_err());
        assert!(parse_export_option("type=fuse,id=x").is_err());
    }

    #[test]
    fn address_forms() {
        let flat = json!({"type": "unix", "path": "/tmp/x"});
        let legacy = json!({"type": "unix", "data": {"path": "/tmp/x"}});
        for v in [flat, legacy] {
            match socket_address(&v).unwrap() {
                ListenAddr::Unix(p) => assert_eq!(p.to_str(), Some("/tmp/x")),
                _ => panic!("wrong kind"),
            }
        }
        assert!(socket_address(&json!({"type": "inet", "host": "x"})).is_err());
        assert!(socket_address(&json!({"type": "bogus"})).is_err());
    }
}
