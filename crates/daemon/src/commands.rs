//! The command table: each command with QEMU's argument names and types (checked by the
//! monitor before the handler runs) and its handler. Only what works is registered, so
//! `query-commands` and `query-qmp-schema` tell exactly what the daemon can do.

use std::rc::Rc;

use blockd_qmp::schema::{ObjectDef, Type, Union, member, optional};
use blockd_qmp::{QmpError, Server};
use serde_json::{Map, Value, json};

use crate::block;
use crate::state::Daemon;

fn obj(members: Vec<blockd_qmp::Member>) -> ObjectDef {
    ObjectDef {
        members,
        ..Default::default()
    }
}

fn empty() -> Type {
    Type::object(vec![])
}

fn on_off_auto() -> Type {
    Type::enumeration(&["on", "off", "auto"])
}

/// BlockdevOptions: the common members, and a variant per driver of the graph. The variants
/// of blockd-block's own drivers declare their options; drivers from other crates get an open
/// variant whose options the driver itself checks when opening.
pub fn blockdev_options(drivers: &[&str]) -> ObjectDef {
    let child = Type::Alternate(Rc::new(vec![
        Type::Str,
        Type::Object(Rc::new(ObjectDef {
            open: true,
            ..Default::default()
        })),
    ]));
    let variant = |d: &str| -> ObjectDef {
        match d {
            "file" | "host_device" => obj(vec![
                member("filename", Type::Str),
                optional("aio", Type::enumeration(&["threads", "native", "io_uring"])),
                optional("locking", on_off_auto()),
                optional("aio-max-batch", Type::Int),
                optional("drop-cache", Type::Bool),
            ]),
            "raw" => obj(vec![
                member("file", child.clone()),
                optional("offset", Type::Int),
                optional("size", Type::Int),
            ]),
            "null-co" | "null-aio" => obj(vec![
                optional("size", Type::Int),
                optional("latency-ns", Type::Int),
                optional("read-zeroes", Type::Bool),
            ]),
            "copy-before-write" => obj(vec![
                member("file", child.clone()),
                member("target", child.clone()),
                optional(
                    "bitmap",
                    Type::object(vec![member("node", Type::Str), member("name", Type::Str)]),
                ),
                optional(
                    "on-cbw-error",
                    Type::enumeration(&["break-guest-write", "break-snapshot"]),
                ),
                optional("cbw-timeout", Type::Int),
                optional("min-cluster-size", Type::Size),
            ]),
            "snapshot-access" => obj(vec![member("file", child.clone())]),
            _ => ObjectDef {
                open: true,
                ..Default::default()
            },
        }
    };
    ObjectDef {
        members: vec![
            member("driver", Type::enumeration(drivers)),
            optional("node-name", Type::Str),
            optional("discard", Type::enumeration(&["ignore", "unmap"])),
            optional(
                "cache",
                Type::object(vec![
                    optional("direct", Type::Bool),
                    optional("no-flush", Type::Bool),
                ]),
            ),
            optional("read-only", Type::Bool),
            optional("auto-read-only", Type::Bool),
            optional("force-share", Type::Bool),
            optional("detect-zeroes", Type::enumeration(&["off", "on", "unmap"])),
        ],
        union: Some(Union {
            tag: "driver".into(),
            variants: drivers
                .iter()
                .map(|d| (d.to_string(), Rc::new(variant(d))))
                .collect(),
        }),
        open: false,
    }
}

fn iothread_object() -> ObjectDef {
    ObjectDef {
        members: vec![
            member("qom-type", Type::enumeration(&["iothread"])),
            member("id", Type::Str),
        ],
        union: Some(Union {
            tag: "qom-type".into(),
            variants: vec![(
                "iothread".into(),
                Rc::new(obj(vec![
                    optional("poll-max-ns", Type::Int),
                    optional("poll-grow", Type::Int),
                    optional("poll-shrink", Type::Int),
                    optional("aio-max-batch", Type::Int),
                ])),
            )],
        }),
        open: false,
    }
}

fn ready(r: Result<Value, QmpError>) -> blockd_qmp::HandlerFuture {
    Box::pin(async move { r })
}

pub fn register(server: &Rc<Server>, d: &Rc<Daemon>) {
    let drivers: Vec<&str> = d.graph.borrow().driver_names();
    let dd = d.clone();
    server.register("quit", ObjectDef::default(), empty(), move |_| {
        dd.request_quit("host-qmp-quit");
        ready(Ok(json!({})))
    });

    let dd = d.clone();
    server.register(
        "blockdev-add",
        blockdev_options(&drivers),
        empty(),
        move |a| {
            ready(
                block::blockdev_add(&dd, a)
                    .map(|_| json!({}))
                    .map_err(Into::into),
            )
        },
    );
    let dd = d.clone();
    server.register(
        "blockdev-del",
        obj(vec![member("node-name", Type::Str)]),
        empty(),
        move |a| ready(block::blockdev_del(&dd, a)),
    );
    let dd = d.clone();
    server.register(
        "blockdev-reopen",
        obj(vec![member(
            "options",
            Type::array(Type::Object(Rc::new(blockdev_options(&drivers)))),
        )]),
        empty(),
        move |a| {
            let d = dd.clone();
            Box::pin(async move { block::blockdev_reopen(&d, a).await })
        },
    );
    let dd = d.clone();
    server.register(
        "query-named-block-nodes",
        obj(vec![optional("flat", Type::Bool)]),
        Type::array(Type::Any),
        move |a| ready(block::query_named_block_nodes(&dd, a)),
    );
    let dd = d.clone();
    server.register(
        "query-block",
        ObjectDef::default(),
        Type::array(Type::Any),
        move |_| ready(block::query_block(&dd)),
    );
    let dd = d.clone();
    server.register(
        "query-blockstats",
        obj(vec![optional("query-nodes", Type::Bool)]),
        Type::array(Type::Any),
        move |a| ready(block::query_blockstats(&dd, a)),
    );
    let dd = d.clone();
    server.register(
        "x-debug-query-block-graph",
        ObjectDef::default(),
        Type::Any,
        move |_| ready(block::debug_block_graph(&dd)),
    );
    let dd = d.clone();
    server.register(
        "block_resize",
        obj(vec![
            optional("device", Type::Str),
            optional("node-name", Type::Str),
            member("size", Type::Int),
        ]),
        empty(),
        move |a| Box::pin(block::block_resize(dd.clone(), a)),
    );
    let dd = d.clone();
    server.register(
        "x-blockdev-set-iothread",
        obj(vec![
            member("node-name", Type::Str),
            member(
                "iothread",
                Type::Alternate(Rc::new(vec![Type::Str, Type::Null])),
            ),
            optional("force", Type::Bool),
        ]),
        empty(),
        move |a| Box::pin(block::set_iothread(dd.clone(), a)),
    );

    let dd = d.clone();
    server.register("object-add", iothread_object(), empty(), move |a| {
        ready(
            dd.iothreads
                .borrow_mut()
                .add(a)
                .map(|_| json!({}))
                .map_err(Into::into),
        )
    });
    let dd = d.clone();
    server.register(
        "object-del",
        obj(vec![member("id", Type::Str)]),
        empty(),
        move |a| {
            let d = dd.clone();
            Box::pin(async move { object_del(&d, a).await })
        },
    );
    let dd = d.clone();
    server.register(
        "query-iothreads",
        ObjectDef::default(),
        Type::array(Type::object(vec![
            member("id", Type::Str),
            member("thread-id", Type::Int),
            member("poll-max-ns", Type::Int),
            member("poll-grow", Type::Int),
            member("poll-shrink", Type::Int),
            member("aio-max-batch", Type::Int),
        ])),
        move |_| {
            let list = dd.iothreads.borrow().list();
            Box::pin(async move {
                let mut out = Vec::new();
                for (id, h, p, b) in list {
                    out.push(crate::iothreads::info(id, h, p, b).await);
                }
                Ok(Value::Array(out))
            })
        },
    );
    let dd = d.clone();
    server.register(
        "human-monitor-command",
        // (no `cpu-index`: the storage daemon has no CPUs to select)
        obj(vec![member("command-line", Type::Str)]),
        Type::Str,
        move |a| Box::pin(crate::hmp::human_monitor_command(dd.clone(), a)),
    );

    crate::jobs::register(server, d);
    crate::transaction::register(server, d);
    crate::bitmaps::register(server, d);

    // qemu-storage-daemon does not send SHUTDOWN; QEMU's system emulator does, and it tells
    // every other monitor why the daemon is going away.
    server.register_event(
        "SHUTDOWN",
        obj(vec![
            member("guest", Type::Bool),
            member(
                "reason",
                Type::enumeration(&["host-qmp-quit", "host-signal"]),
            ),
        ]),
    );
    server.register_event(
        "BLOCK_IO_ERROR",
        obj(vec![
            member("qom-path", Type::Str),
            member("device", Type::Str),
            optional("node-name", Type::Str),
            member("operation", Type::enumeration(&["read", "write"])),
            member("action", Type::enumeration(&["ignore", "report", "stop"])),
            optional("nospace", Type::Bool),
            member("reason", Type::Str),
        ]),
    );
    server.register_event(
        "BLOCK_IMAGE_CORRUPTED",
        obj(vec![
            member("device", Type::Str),
            optional("node-name", Type::Str),
            member("msg", Type::Str),
            optional("offset", Type::Int),
            optional("size", Type::Int),
            member("fatal", Type::Bool),
        ]),
    );
}

async fn object_del(d: &Daemon, a: Map<String, Value>) -> Result<Value, QmpError> {
    let id = a
        .get("id")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    if !d.iothreads.borrow().contains(&id) {
        return Err(format!("object '{id}' not found").into());
    }
    if d.node_ctx.borrow().values().any(|t| *t == id) {
        return Err(format!("object '{id}' is in use, can not be deleted").into());
    }
    let t = d.iothreads.borrow_mut().remove(&id);
    if let Some(t) = t {
        // work still queued there (a monitor qemu-io command) is cancelled with the thread
        t.stop_async().await;
    }
    Ok(json!({}))
}
