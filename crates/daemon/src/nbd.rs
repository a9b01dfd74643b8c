//! NBD exports through blockd-nbd's QMP glue: `--nbd-server`, `--export type=nbd`, and the
//! commands nbd-server-start/-stop, block-export-add/-del, query-block-exports,
//! nbd-server-add/-remove. Removed exports finish asynchronously; once gone, their backends
//! are detached on the main context and BLOCK_EXPORT_DELETED is sent.

use std::rc::{Rc, Weak};
use std::sync::Arc;

use blockd_nbd::qmp as glue;
use blockd_qmp::schema::{ObjectDef, Type, member, optional};
use blockd_qmp::{ErrorClass, QmpError, Server};
use serde_json::{Map, Value, json};

use crate::state::Daemon;

fn to_qmp(e: glue::QmpError) -> QmpError {
    let class = match e.0.as_str() {
        "CommandNotFound" => ErrorClass::CommandNotFound,
        "DeviceNotFound" => ErrorClass::DeviceNotFound,
        "DeviceNotActive" => ErrorClass::DeviceNotActive,
        _ => ErrorClass::GenericError,
    };
    QmpError { class, desc: e.1 }
}

thread_local! {
    static DAEMON: std::cell::RefCell<Weak<Daemon>> = const { std::cell::RefCell::new(Weak::new()) };
}

/// Detach the backends of exports that are gone and announce them.
fn reap(d: &Daemon) {
    let ids = {
        let mut nbd = d.nbd.borrow_mut();
        let Some(st) = nbd.as_mut() else { return };
        st.reap_deleted(&d.graph.borrow())
    };
    let server = d.server.borrow().clone();
    if let Some(s) = server {
        for id in ids {
            s.emit("BLOCK_EXPORT_DELETED", Some(json!({"id": id})));
        }
    }
}

/// Reap exports that are gone (at exit, without waiting for the callback).
pub fn reap_now(d: &Daemon) {
    reap(d);
}

/// Create the NBD state (not listening yet) on the main context.
pub fn init(d: &Rc<Daemon>) -> Result<(), String> {
    let st = glue::NbdState::new().map_err(|e| format!("NBD: {e}"))?;
    DAEMON.with(|w| *w.borrow_mut() = Rc::downgrade(d));
    let main = blockd_aio::AioContext::current()
        .expect("the main context")
        .handle();
    // called on the main context; the reap runs on its next turn, outside any borrow
    st.on_export_deleted(Arc::new(move |_id: &str| {
        main.schedule_oneshot(|| {
            if let Some(d) = DAEMON.with(|w| w.borrow().upgrade()) {
                reap(&d);
            }
        });
    }));
    *d.nbd.borrow_mut() = Some(st);
    Ok(())
}

fn with_nbd<T>(
    d: &Daemon,
    f: impl FnOnce(&mut glue::NbdState) -> Result<T, glue::QmpError>,
) -> Result<T, QmpError> {
    let mut nbd = d.nbd.borrow_mut();
    let st = nbd
        .as_mut()
        .ok_or_else(|| QmpError::generic("NBD is not available"))?;
    f(st).map_err(to_qmp)
}

pub fn server_start(d: &Daemon, args: &Map<String, Value>) -> Result<Value, QmpError> {
    with_nbd(d, |st| glue::nbd_server_start(st, args))
}

pub fn export_add(d: &Daemon, args: &Map<String, Value>) -> Result<Value, QmpError> {
    let lookup = |id: &str| d.iothreads.borrow().handle(id);
    let r = with_nbd(d, |st| {
        glue::block_export_add(st, &mut d.graph.borrow_mut(), args, &lookup)
    });
    if r.is_ok()
        && let Some(Value::String(id)) = args.get("id")
        && let Some(st) = d.nbd.borrow().as_ref()
        && let Some(e) = st.server().export(id)
    {
        // failed requests of clients are reported as BLOCK_IO_ERROR (action report)
        e.backend().set_error_reporting(true);
    }
    if r.is_ok()
        && let Some(Value::String(t)) = args.get("iothread")
        && let Some(Value::String(n)) = args.get("node-name")
        && let Some(node) = d.node(n)
    {
        // the node's I/O now runs in the export's iothread
        for sub in Daemon::subtree(&node) {
            d.node_ctx
                .borrow_mut()
                .insert(sub.name().to_string(), t.clone());
        }
    }
    r
}

/// `--nbd-server` and `--export` on the command line.
pub fn cli_server(d: &Daemon, arg: &str) -> Result<(), String> {
    let m = glue::parse_nbd_server_option(arg)?;
    server_start(d, &m).map(|_| ()).map_err(|e| e.desc)
}

pub fn cli_export(d: &Daemon, arg: &str) -> Result<(), String> {
    let first = blockd_block::options::split_list(arg)
        .into_iter()
        .next()
        .unwrap_or_default();
    let text = if !arg.trim_start().starts_with('{') && !first.contains('=') {
        format!("type={arg}")
    } else {
        arg.to_string()
    };
    let m = glue::parse_export_option(&text)?;
    export_add(d, &m).map(|_| ()).map_err(|e| e.desc)
}

/// At exit: stop listening and remove every export (hard).
pub fn shutdown(d: &Daemon) {
    let _ = with_nbd(d, |st| {
        let ids: Vec<String> = glue::query_block_exports(st)?
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|e| e["id"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        for id in ids {
            let mut a = Map::new();
            a.insert("id".into(), json!(id));
            a.insert("mode".into(), json!("hard"));
            let _ = glue::block_export_del(st, &a);
        }
        let _ = glue::nbd_server_stop(st, &Map::new());
        Ok(())
    });
    reap(d);
}

fn obj(members: Vec<blockd_qmp::Member>) -> ObjectDef {
    ObjectDef {
        members,
        ..Default::default()
    }
}

pub fn register(server: &Rc<Server>, d: &Rc<Daemon>) {
    let empty = || Type::object(vec![]);
    let mode = || Type::enumeration(&["safe", "hard"]);
    let addr = Type::Object(Rc::new(ObjectDef {
        open: true,
        ..Default::default()
    }));
    let dd = d.clone();
    server.register(
        "nbd-server-start",
        obj(vec![
            member("addr", addr),
            optional("tls-creds", Type::Str),
            optional("tls-authz", Type::Str),
            optional("max-connections", Type::Int),
            optional("handshake-max-seconds", Type::Int),
        ]),
        empty(),
        move |a| {
            let r = server_start(&dd, &a);
            Box::pin(async move { r })
        },
    );
    let dd = d.clone();
    server.register("nbd-server-stop", ObjectDef::default(), empty(), move |a| {
        let r = with_nbd(&dd, |st| glue::nbd_server_stop(st, &a));
        Box::pin(async move { r })
    });
    let dd = d.clone();
    server.register(
        "block-export-add",
        obj(vec![
            member("type", Type::enumeration(&["nbd"])),
            member("id", Type::Str),
            member("node-name", Type::Str),
            optional("writable", Type::Bool),
            optional("writethrough", Type::Bool),
            optional("iothread", Type::Str),
            optional("fixed-iothread", Type::Bool),
            optional("name", Type::Str),
            optional("description", Type::Str),
            optional("bitmaps", Type::array(Type::Any)),
            optional("allocation-depth", Type::Bool),
            optional("multi-conn", Type::enumeration(&["on", "off", "auto"])),
        ]),
        empty(),
        move |a| {
            let r = export_add(&dd, &a);
            Box::pin(async move { r })
        },
    );
    let dd = d.clone();
    server.register(
        "block-export-del",
        obj(vec![member("id", Type::Str), optional("mode", mode())]),
        empty(),
        move |a| {
            let r = with_nbd(&dd, |st| glue::block_export_del(st, &a));
            Box::pin(async move { r })
        },
    );
    let dd = d.clone();
    server.register(
        "query-block-exports",
        ObjectDef::default(),
        Type::array(Type::object(vec![
            member("type", Type::enumeration(&["nbd"])),
            member("id", Type::Str),
            member("node-name", Type::Str),
            member("shutting-down", Type::Bool),
        ])),
        move |_| {
            let r = with_nbd(&dd, |st| glue::query_block_exports(st));
            Box::pin(async move { r })
        },
    );
    let dd = d.clone();
    server.register(
        "nbd-server-add",
        obj(vec![
            member("device", Type::Str),
            optional("name", Type::Str),
            optional("description", Type::Str),
            optional("writable", Type::Bool),
            optional("bitmap", Type::Str),
        ]),
        empty(),
        move |a| {
            let r = with_nbd(&dd, |st| {
                glue::nbd_server_add(st, &mut dd.graph.borrow_mut(), &a)
            });
            Box::pin(async move { r })
        },
    );
    let dd = d.clone();
    server.register(
        "nbd-server-remove",
        obj(vec![member("name", Type::Str), optional("mode", mode())]),
        empty(),
        move |a| {
            let r = with_nbd(&dd, |st| glue::nbd_server_remove(st, &a));
            Box::pin(async move { r })
        },
    );
    server.register_event("BLOCK_EXPORT_DELETED", obj(vec![member("id", Type::Str)]));
}
