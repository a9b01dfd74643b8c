//! Block jobs over QMP: query-jobs, query-block-jobs, the job-* verbs, the legacy block-job-*
//! verbs, block-stream, and the job events. The jobs themselves (state machine, coordinator,
//! stream) are blockd-jobs'; this is argument handling and QEMU's error texts.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use blockd_block::{Graph, Node};
use blockd_jobs::stream::{StreamParams, new_stream};
use blockd_jobs::{GraphHost, Job, JobCtx, JobDriver, JobManager, JobSpec, OnError};
use blockd_qmp::error::ErrorClass;
use blockd_qmp::schema::{ObjectDef, Type, member, optional};
use blockd_qmp::{QmpError, Server};
use serde_json::{Map, Value, json};

use crate::state::Daemon;

type R = Result<Value, QmpError>;

impl GraphHost for Daemon {
    fn graph(&self) -> &RefCell<Graph> {
        &self.graph
    }
    fn graph_changed(&self) {
        self.prune();
    }
}

fn obj(members: Vec<blockd_qmp::Member>) -> ObjectDef {
    ObjectDef {
        members,
        ..Default::default()
    }
}

fn s<'a>(a: &'a Map<String, Value>, k: &str) -> Option<&'a str> {
    a.get(k).and_then(Value::as_str)
}

fn b(a: &Map<String, Value>, k: &str) -> Option<bool> {
    a.get(k).and_then(Value::as_bool)
}

/// `job-*`: any job by id.
fn find_job(m: &JobManager, a: &Map<String, Value>) -> Result<Rc<Job>, QmpError> {
    let id = s(a, "id").unwrap_or_default();
    m.get(id).ok_or_else(|| QmpError::generic("Job not found"))
}

/// `block-job-*`: block jobs only, by `device` (or `id` for finalize/dismiss).
fn find_block_job(m: &JobManager, id: &str) -> Result<Rc<Job>, QmpError> {
    m.get(id)
        .filter(|j| j.is_block_job())
        .ok_or_else(|| QmpError {
            class: ErrorClass::DeviceNotActive,
            desc: format!("Block job '{id}' not found"),
        })
}

fn done(r: Result<(), String>) -> R {
    r.map(|_| json!({})).map_err(Into::into)
}

fn job_event_data() -> ObjectDef {
    obj(vec![
        member("type", Type::Str),
        member("device", Type::Str),
        member("len", Type::Int),
        member("offset", Type::Int),
        member("speed", Type::Int),
    ])
}

thread_local! {
    /// The main context's job manager, for shutdown.
    static MANAGER: RefCell<Option<Rc<JobManager>>> = const { RefCell::new(None) };
}

/// At `quit` or a termination signal, after the exports closed and before the nodes are
/// drained and closed: every job is cancelled with QEMU's events (see
/// `JobManager::cancel_all`).
pub async fn shutdown() {
    if let Some(m) = MANAGER.with(|m| m.borrow().clone()) {
        m.cancel_all().await;
    }
}

/// The main context's job manager (for commands outside this module that start jobs or
/// check QEMU's op blockers: transactions, snapshots, backup).
pub fn manager() -> Option<Rc<JobManager>> {
    MANAGER.with(|m| m.borrow().clone())
}

pub fn register(server: &Rc<Server>, d: &Rc<Daemon>) {
    let weak = Rc::downgrade(server);
    let m = JobManager::new(Box::new(move |name, data| {
        if let Some(s) = weak.upgrade() {
            s.emit(name, Some(data));
        }
    }));
    MANAGER.with(|g| *g.borrow_mut() = Some(m.clone()));

    let mm = m.clone();
    server.register(
        "query-jobs",
        ObjectDef::default(),
        Type::array(Type::Any),
        move |_| {
            let v: Vec<Value> = mm.list().iter().map(|j| j.info()).collect();
            Box::pin(async move { Ok(Value::Array(v)) })
        },
    );
    let mm = m.clone();
    server.register(
        "query-block-jobs",
        ObjectDef::default(),
        Type::array(Type::Any),
        move |_| {
            let v: Vec<Value> = mm
                .list()
                .iter()
                .filter(|j| j.is_block_job())
                .map(|j| j.block_info())
                .collect();
            Box::pin(async move { Ok(Value::Array(v)) })
        },
    );

    // job-* verbs
    let id_arg = || obj(vec![member("id", Type::Str)]);
    let empty = || Type::object(vec![]);
    type Verb = fn(&Rc<JobManager>, &Rc<Job>) -> Result<(), String>;
    let sync_verbs: [(&str, Verb); 4] = [
        ("job-pause", |m, j| m.user_pause(j)),
        ("job-resume", |m, j| m.user_resume(j)),
        ("job-cancel", |m, j| m.user_cancel(j, true)),
        ("job-complete", |m, j| m.user_complete(j)),
    ];
    for (name, f) in sync_verbs {
        let mm = m.clone();
        server.register(name, id_arg(), empty(), move |a| {
            let r = find_job(&mm, &a).and_then(|j| done(f(&mm, &j)));
            Box::pin(async move { r })
        });
    }
    let mm = m.clone();
    server.register("job-dismiss", id_arg(), empty(), move |a| {
        let r = find_job(&mm, &a).and_then(|j| done(mm.user_dismiss(&j)));
        Box::pin(async move { r })
    });
    let mm = m.clone();
    server.register("job-finalize", id_arg(), empty(), move |a| {
        let mm = mm.clone();
        Box::pin(async move {
            let j = find_job(&mm, &a)?;
            done(mm.user_finalize(&j).await)
        })
    });

    // legacy block-job-* verbs
    let device_arg = || obj(vec![member("device", Type::Str)]);
    let legacy: [(&str, Verb); 3] = [
        ("block-job-pause", |m, j| m.user_pause(j)),
        ("block-job-resume", |m, j| m.user_resume(j)),
        ("block-job-complete", |m, j| m.user_complete(j)),
    ];
    for (name, f) in legacy {
        let mm = m.clone();
        server.register(name, device_arg(), empty(), move |a| {
            let r = find_block_job(&mm, s(&a, "device").unwrap_or_default())
                .and_then(|j| done(f(&mm, &j)));
            Box::pin(async move { r })
        });
    }
    let mm = m.clone();
    server.register(
        "block-job-cancel",
        obj(vec![
            member("device", Type::Str),
            optional("force", Type::Bool),
        ]),
        empty(),
        move |a| {
            let device = s(&a, "device").unwrap_or_default().to_string();
            let force = b(&a, "force").unwrap_or(false);
            let r = find_block_job(&mm, &device).and_then(|j| {
                if !force && j.is_user_paused() {
                    return Err(QmpError::generic(format!(
                        "The block job for device '{device}' is currently paused"
                    )));
                }
                done(mm.user_cancel(&j, force))
            });
            Box::pin(async move { r })
        },
    );
    let mm = m.clone();
    server.register(
        "block-job-set-speed",
        obj(vec![
            member("device", Type::Str),
            member("speed", Type::Int),
        ]),
        empty(),
        move |a| {
            let speed = a.get("speed").and_then(Value::as_i64).unwrap_or(0);
            let r = find_block_job(&mm, s(&a, "device").unwrap_or_default())
                .and_then(|j| done(mm.set_speed(&j, speed)));
            Box::pin(async move { r })
        },
    );
    let mm = m.clone();
    server.register("block-job-dismiss", id_arg(), empty(), move |a| {
        let r = find_block_job(&mm, s(&a, "id").unwrap_or_default())
            .and_then(|j| done(mm.user_dismiss(&j)));
        Box::pin(async move { r })
    });
    let mm = m.clone();
    server.register("block-job-finalize", id_arg(), empty(), move |a| {
        let mm = mm.clone();
        Box::pin(async move {
            let j = find_block_job(&mm, s(&a, "id").unwrap_or_default())?;
            done(mm.user_finalize(&j).await)
        })
    });

    let mm = m.clone();
    server.register(
        "block-job-change",
        obj(vec![
            member("id", Type::Str),
            member(
                "type",
                Type::enumeration(&[
                    "commit",
                    "stream",
                    "mirror",
                    "backup",
                    "create",
                    "amend",
                    "snapshot-load",
                    "snapshot-save",
                    "snapshot-delete",
                ]),
            ),
            optional(
                "copy-mode",
                Type::enumeration(&["background", "write-blocking"]),
            ),
        ]),
        empty(),
        move |a| {
            let r = find_block_job(&mm, s(&a, "id").unwrap_or_default())
                .and_then(|j| done(mm.change(&j, &a)));
            Box::pin(async move { r })
        },
    );

    let on_error = || Type::enumeration(&["report", "ignore", "enospc", "stop", "auto"]);
    let (dd, mm) = (d.clone(), m.clone());
    server.register(
        "block-stream",
        obj(vec![
            optional("job-id", Type::Str),
            member("device", Type::Str),
            optional("base", Type::Str),
            optional("base-node", Type::Str),
            optional("backing-file", Type::Str),
            optional("backing-mask-protocol", Type::Bool),
            optional("bottom", Type::Str),
            optional("speed", Type::Int),
            optional("on-error", on_error()),
            optional("filter-node-name", Type::Str),
            optional("auto-finalize", Type::Bool),
            optional("auto-dismiss", Type::Bool),
        ]),
        empty(),
        move |a| {
            let (d, m) = (dd.clone(), mm.clone());
            Box::pin(async move { block_stream(&d, &m, &a).await.map(|_| json!({})) })
        },
    );

    let (dd, mm) = (d.clone(), m.clone());
    server.register(
        "block-commit",
        obj(vec![
            optional("job-id", Type::Str),
            member("device", Type::Str),
            optional("base-node", Type::Str),
            optional("base", Type::Str),
            optional("top-node", Type::Str),
            optional("top", Type::Str),
            optional("backing-file", Type::Str),
            optional("backing-mask-protocol", Type::Bool),
            optional("speed", Type::Int),
            optional("on-error", on_error()),
            optional("filter-node-name", Type::Str),
            optional("auto-finalize", Type::Bool),
            optional("auto-dismiss", Type::Bool),
        ]),
        empty(),
        move |a| {
            let (d, m) = (dd.clone(), mm.clone());
            Box::pin(async move { block_commit(&d, &m, &a).await.map(|_| json!({})) })
        },
    );

    let (dd, mm) = (d.clone(), m.clone());
    server.register(
        "blockdev-mirror",
        obj(vec![
            optional("job-id", Type::Str),
            member("device", Type::Str),
            member("target", Type::Str),
            optional("replaces", Type::Str),
            member(
                "sync",
                Type::enumeration(&["top", "full", "none", "incremental", "bitmap"]),
            ),
            optional("speed", Type::Int),
            optional("granularity", Type::Int),
            optional("buf-size", Type::Int),
            optional("on-source-error", on_error()),
            optional("on-target-error", on_error()),
            optional("filter-node-name", Type::Str),
            optional(
                "copy-mode",
                Type::enumeration(&["background", "write-blocking"]),
            ),
            optional("auto-finalize", Type::Bool),
            optional("auto-dismiss", Type::Bool),
        ]),
        empty(),
        move |a| {
            let (d, m) = (dd.clone(), mm.clone());
            Box::pin(async move { blockdev_mirror(&d, &m, &a).await.map(|_| json!({})) })
        },
    );

    let (dd, mm) = (d.clone(), m.clone());
    server.register(
        "drive-mirror",
        obj(vec![
            optional("job-id", Type::Str),
            member("device", Type::Str),
            member("target", Type::Str),
            optional("format", Type::Str),
            optional("node-name", Type::Str),
            optional("replaces", Type::Str),
            member(
                "sync",
                Type::enumeration(&["top", "full", "none", "incremental", "bitmap"]),
            ),
            optional("mode", Type::enumeration(&["existing", "absolute-paths"])),
            optional("speed", Type::Int),
            optional("granularity", Type::Int),
            optional("buf-size", Type::Int),
            optional("on-source-error", on_error()),
            optional("on-target-error", on_error()),
            optional("unmap", Type::Bool),
            optional(
                "copy-mode",
                Type::enumeration(&["background", "write-blocking"]),
            ),
            optional("auto-finalize", Type::Bool),
            optional("auto-dismiss", Type::Bool),
        ]),
        empty(),
        move |a| {
            let (d, m) = (dd.clone(), mm.clone());
            Box::pin(async move { drive_mirror(&d, &m, &a).await.map(|_| json!({})) })
        },
    );

    let (dd, mm) = (d.clone(), m.clone());
    server.register(
        "blockdev-create",
        obj(vec![
            member("job-id", Type::Str),
            member("options", Type::Any),
        ]),
        empty(),
        move |a| {
            let r = blockdev_create(&dd, &mm, &a).map(|_| json!({}));
            Box::pin(async move { r })
        },
    );

    server.register_event(
        "JOB_STATUS_CHANGE",
        obj(vec![
            member("id", Type::Str),
            member(
                "status",
                Type::enumeration(
                    &blockd_jobs::JobStatus::ALL
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>(),
                ),
            ),
        ]),
    );
    server.register_event("BLOCK_JOB_READY", job_event_data());
    server.register_event("BLOCK_JOB_CANCELLED", job_event_data());
    let mut completed = job_event_data();
    completed.members.push(optional("error", Type::Str));
    server.register_event("BLOCK_JOB_COMPLETED", completed);
    server.register_event(
        "BLOCK_JOB_ERROR",
        obj(vec![
            member("device", Type::Str),
            member("operation", Type::enumeration(&["read", "write"])),
            member("action", Type::enumeration(&["ignore", "report", "stop"])),
        ]),
    );
    server.register_event(
        "BLOCK_JOB_PENDING",
        obj(vec![member("type", Type::Str), member("id", Type::Str)]),
    );
}

fn lookup(d: &Daemon, name: &str) -> Result<Arc<Node>, QmpError> {
    d.node(name)
        .ok_or_else(|| QmpError::generic(format!("Cannot find device='' nor node-name='{name}'")))
}

/// The file name a chain member is known by (the name `base` refers to).
fn node_filename(n: &Arc<Node>) -> Option<String> {
    n.driver()
        .filename()
        .or_else(|| n.child("file").and_then(|f| f.driver().filename()))
}

async fn block_stream(
    d: &Rc<Daemon>,
    m: &Rc<JobManager>,
    a: &Map<String, Value>,
) -> Result<(), QmpError> {
    let (base, base_node, bottom) = (s(a, "base"), s(a, "base-node"), s(a, "bottom"));
    if base.is_some() && base_node.is_some() {
        return Err("'base' and 'base-node' cannot be specified at the same time".into());
    }
    if base.is_some() && bottom.is_some() {
        return Err("'base' and 'bottom' cannot be specified at the same time".into());
    }
    if bottom.is_some() && base_node.is_some() {
        return Err("'bottom' and 'base-node' cannot be specified at the same time".into());
    }
    let device = s(a, "device").unwrap_or_default();
    let top = d.node(device).ok_or_else(|| {
        QmpError::generic(format!(
            "Cannot find device='{device}' nor node-name='{device}'"
        ))
    })?;
    let mut base_bs = None;
    if let Some(name) = base {
        let mut cur = top.child("backing");
        while let Some(n) = cur {
            if node_filename(&n).as_deref() == Some(name) {
                base_bs = Some(n);
                break;
            }
            cur = n.child("backing");
        }
        if base_bs.is_none() {
            return Err(format!("Can't find '{name}' in the backing chain").into());
        }
    }
    if let Some(name) = base_node {
        let n = lookup(d, name)?;
        if Arc::ptr_eq(&n, &top) || blockd_jobs::stream::intermediates(&top, Some(&n)).is_err() {
            return Err(format!("Node '{name}' is not a backing image of '{device}'").into());
        }
        base_bs = Some(n);
    }
    if let Some(name) = bottom {
        let n = lookup(d, name)?;
        if n.driver().is_filter() {
            return Err(
                format!("Node '{name}' is a filter, use a non-filter node as 'bottom'").into(),
            );
        }
        let in_chain = Arc::ptr_eq(&n, &top)
            || blockd_jobs::stream::intermediates(&top, None)
                .map(|c| c.iter().any(|x| Arc::ptr_eq(x, &n)))
                .unwrap_or(false);
        if !in_chain {
            return Err(format!("Node '{name}' is not in a chain starting from '{device}'").into());
        }
        base_bs = n.child("backing");
    }
    if a.contains_key("backing-file") && base_bs.is_none() && bottom.is_none() {
        return Err("backing file specified, but streaming the entire chain".into());
    }
    let on_error = match s(a, "on-error") {
        None | Some("auto") => OnError::Report,
        Some(v) => OnError::parse(v)?,
    };
    let speed = a.get("speed").and_then(Value::as_i64).unwrap_or(0);
    let mut chain = vec![top.clone()];
    chain.extend(
        blockd_jobs::stream::intermediates(&top, base_bs.as_ref()).map_err(QmpError::generic)?,
    );
    m.check_not_blocked(&chain)?;
    // Without job-id the device name is the id; the storage daemon's nodes have none.
    let id = s(a, "job-id").unwrap_or_default().to_string();
    m.check_new_id(&id)?;
    let context = d.node_context(top.name()).map(|(_, h)| h);
    let host: Rc<dyn GraphHost> = d.clone();
    let (driver, worker) = new_stream(
        &host,
        StreamParams {
            top,
            base: base_bs,
            backing: backing_name(a),
            on_error,
            filter_name: s(a, "filter-node-name").map(str::to_string),
        },
    )
    .await?;
    let job = m.create(
        JobSpec {
            id,
            driver: driver as Rc<dyn JobDriver>,
            worker,
            context,
            speed: speed.max(0) as u64,
            auto_finalize: b(a, "auto-finalize").unwrap_or(true),
            auto_dismiss: b(a, "auto-dismiss").unwrap_or(true),
            block_job: true,
        },
        None,
    )?;
    if speed < 0 {
        // QEMU sets the speed after creating the job, which then fails early
        m.discard(&job);
        return Err("Parameter 'speed' expects a non-negative value".into());
    }
    m.start(&job);
    Ok(())
}

/// QEMU 10's BlockdevDriver enum (qemu-storage-daemon's build).
const QEMU_DRIVERS: &[&str] = &[
    "blkdebug",
    "blklogwrites",
    "blkreplay",
    "blkverify",
    "bochs",
    "cloop",
    "compress",
    "copy-before-write",
    "copy-on-read",
    "dmg",
    "file",
    "ftp",
    "ftps",
    "gluster",
    "host_cdrom",
    "host_device",
    "http",
    "https",
    "iscsi",
    "luks",
    "nbd",
    "nfs",
    "null-aio",
    "null-co",
    "nvme",
    "parallels",
    "preallocate",
    "qcow",
    "qcow2",
    "qed",
    "quorum",
    "raw",
    "rbd",
    "replication",
    "snapshot-access",
    "ssh",
    "throttle",
    "vdi",
    "vhdx",
    "vmdk",
    "vpc",
    "vvfat",
];

/// The `create` job of blockdev-create (no graph change; not a block job).
struct CreateJob;

impl JobDriver for CreateJob {
    fn job_type(&self) -> &'static str {
        "create"
    }
}

fn unexpected(o: &Map<String, Value>, known: &[&str]) -> Result<(), QmpError> {
    match o.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(format!("Parameter '{k}' is unexpected").into()),
        None => Ok(()),
    }
}

fn size_arg(o: &Map<String, Value>) -> Result<u64, QmpError> {
    match o.get("size") {
        None => Err("Parameter 'size' is missing".into()),
        Some(v) => v
            .as_u64()
            .ok_or_else(|| "Invalid parameter type for 'size', expected: integer".into()),
    }
}

/// A plain file of `size` bytes (QEMU's file create: created if missing, truncated to 0,
/// then grown with the preallocation asked for).
fn create_file(path: &str, size: u64, prealloc: &str) -> Result<(), String> {
    use std::io::Write;
    let f = crate::image_files::create_empty(path)?;
    let resize =
        |e: std::io::Error| format!("Could not resize file: {}", blockd_block::strerror(&e));
    match prealloc {
        "off" => f.set_len(size).map_err(resize),
        "full" => {
            let zeroes = vec![0u8; 1 << 20];
            let mut w = std::io::BufWriter::new(&f);
            let mut left = size;
            while left > 0 {
                let n = left.min(zeroes.len() as u64) as usize;
                w.write_all(&zeroes[..n]).map_err(resize)?;
                left -= n as u64;
            }
            w.flush().map_err(resize)
        }
        "falloc" => {
            use std::os::fd::AsRawFd;
            let len = i64::try_from(size).map_err(|_| "Could not resize file: File too large")?;
            // SAFETY: posix_fallocate on a descriptor this function owns for its duration.
            let r = unsafe { libc::posix_fallocate(f.as_raw_fd(), 0, len) };
            if r != 0 {
                return Err(format!(
                    "Could not preallocate data for the new file: {}",
                    blockd_block::strerror(&std::io::Error::from_raw_os_error(r))
                ));
            }
            Ok(())
        }
        other => Err(format!("Unsupported preallocation mode '{other}'")),
    }
}

/// blockdev-create options for qcow2, as qemu-img option names for `CreateOptions`.
fn qcow2_create_opts(o: &Map<String, Value>) -> Result<Vec<(String, String)>, QmpError> {
    let mut kv = vec![("size".to_string(), size_arg(o)?.to_string())];
    for (k, v) in o {
        if k == "data-file" {
            // a node reference: the caller resolves it (see `blockdev_create`)
            continue;
        }
        let val = match v {
            Value::String(x) => x.clone(),
            Value::Bool(x) => if *x { "on" } else { "off" }.to_string(),
            Value::Number(n) => n.to_string(),
            _ => return Err(format!("Invalid parameter type for '{k}'").into()),
        };
        let key = match k.as_str() {
            "driver" | "file" | "size" => continue,
            "version" => {
                let compat = match val.as_str() {
                    "v2" => "0.10",
                    "v3" => "1.1",
                    _ => {
                        return Err(
                            format!("Parameter 'version' does not accept value '{val}'").into()
                        );
                    }
                };
                kv.push(("compat".into(), compat.into()));
                continue;
            }
            "backing-file" => "backing_file",
            "backing-fmt" => "backing_fmt",
            "cluster-size" => "cluster_size",
            "preallocation" => "preallocation",
            "lazy-refcounts" => "lazy_refcounts",
            "refcount-bits" => "refcount_bits",
            "compression-type" => "compression_type",
            "extended-l2" => "extended_l2",
            "data-file-raw" => "data_file_raw",
            "encrypt" => {
                return Err(
                    format!("blockdev-create qcow2 '{k}' is not supported by blockd yet").into(),
                );
            }
            _ => return Err(format!("Parameter '{k}' is unexpected").into()),
        };
        kv.push((key.into(), val));
    }
    Ok(kv)
}

/// blockdev-create: a `create` job (manual dismiss, as QEMU) formatting a file or a qcow2
/// image on an existing node.
fn blockdev_create(
    d: &Rc<Daemon>,
    m: &Rc<JobManager>,
    a: &Map<String, Value>,
) -> Result<(), QmpError> {
    let id = s(a, "job-id").unwrap_or_default().to_string();
    let Some(Value::Object(o)) = a.get("options") else {
        return Err("Invalid parameter type for 'options', expected: object".into());
    };
    let worker: blockd_jobs::Worker = match s(o, "driver") {
        Some("file") => {
            unexpected(
                o,
                &[
                    "driver",
                    "filename",
                    "size",
                    "preallocation",
                    "nocow",
                    "extent-size-hint",
                ],
            )?;
            if o.contains_key("nocow") || o.contains_key("extent-size-hint") {
                return Err("blockdev-create file 'nocow'/'extent-size-hint' are not supported by blockd yet".into());
            }
            let path = s(o, "filename")
                .ok_or_else(|| QmpError::generic("Parameter 'filename' is missing"))?
                .to_string();
            let size = size_arg(o)?;
            let prealloc = s(o, "preallocation").unwrap_or("off").to_string();
            Box::new(move |_ctx| Box::pin(async move { create_file(&path, size, &prealloc) }))
        }
        Some("qcow2") => {
            let kv = qcow2_create_opts(o)?;
            // a missing node fails the job (QEMU opens the reference in the job)
            let file = match o.get("file") {
                Some(Value::String(n)) => d
                    .node(n)
                    .ok_or_else(|| format!("Cannot find device='{n}' nor node-name='{n}'")),
                Some(_) => {
                    return Err("blockdev-create qcow2: 'file' must be a node name in blockd (inline options are not supported yet)".into());
                }
                None => return Err("Parameter 'file' is missing".into()),
            };
            // The external data file: a node, whose filename goes into the image's header.
            let data = match o.get("data-file") {
                None => None,
                Some(Value::String(n)) => Some(
                    d.node(n)
                        .ok_or_else(|| format!("Cannot find device='{n}' nor node-name='{n}'")),
                ),
                Some(_) => {
                    return Err("blockdev-create qcow2: 'data-file' must be a node name in blockd (inline options are not supported yet)".into());
                }
            };
            let data_name = match &data {
                Some(Ok(n)) => Some(crate::block::filename(d, n)),
                _ => None,
            };
            // value errors (a bad cluster size...) fail the job, as in QEMU
            Box::new(move |_ctx| {
                Box::pin(async move {
                    let file = file?;
                    let data = data.transpose()?;
                    let mut kv = kv;
                    if let Some(name) = data_name {
                        kv.push(("data_file".into(), name));
                    }
                    let c = blockd_qcow2::CreateOptions::from_qemu_opts(&kv)?;
                    blockd_qcow2::create::create_with_data_file(&file, data.as_ref(), &c).await
                })
            })
        }
        Some(other) if QEMU_DRIVERS.contains(&other) => {
            return Err(
                format!("Driver '{other}' does not support image creation in blockd yet").into(),
            );
        }
        Some(other) => {
            return Err(format!("Parameter 'driver' does not accept value '{other}'").into());
        }
        None => return Err("Parameter 'driver' is missing".into()),
    };
    m.check_new_id(&id)?;
    // QEMU's progress of a create job: 0/1, then 1/1 whatever the outcome
    let worker: blockd_jobs::Worker = Box::new(move |ctx: JobCtx| {
        Box::pin(async move {
            ctx.set_total(1);
            let r = worker(ctx.clone()).await;
            ctx.add_progress(1);
            r
        })
    });
    let job = m.create(
        JobSpec {
            id,
            driver: Rc::new(CreateJob) as Rc<dyn JobDriver>,
            worker,
            context: None,
            speed: 0,
            auto_finalize: true,
            auto_dismiss: false,
            block_job: false,
        },
        None,
    )?;
    m.start(&job);
    Ok(())
}

/// The chain below `top` (backing children), `top` first.
fn chain(top: &Arc<Node>) -> Vec<Arc<Node>> {
    let mut v = vec![top.clone()];
    while let Some(n) = v.last().and_then(|n| n.child("backing")) {
        v.push(n);
    }
    v
}

fn find_in_chain(chain: &[Arc<Node>], filename: &str) -> Option<Arc<Node>> {
    chain
        .iter()
        .find(|n| node_filename(n).as_deref() == Some(filename))
        .cloned()
}

async fn block_commit(
    d: &Rc<Daemon>,
    m: &Rc<JobManager>,
    a: &Map<String, Value>,
) -> Result<(), QmpError> {
    let device = s(a, "device").unwrap_or_default();
    let bs = d.node(device).ok_or_else(|| QmpError {
        class: ErrorClass::DeviceNotFound,
        desc: format!("Device '{device}' not found"),
    })?;
    // a root node: no node above it (backends, exports, are fine)
    if !d.node_parents(&bs).is_empty() {
        return Err("Need a root block node".into());
    }
    let full = chain(&bs);
    let top = match (s(a, "top"), s(a, "top-node")) {
        (Some(_), Some(_)) => {
            return Err("'top-node' and 'top' are mutually exclusive".into());
        }
        (None, Some(name)) => {
            let n = lookup(d, name)?;
            if !full.iter().any(|x| Arc::ptr_eq(x, &n)) {
                return Err(format!("'{name}' is not in this backing file chain").into());
            }
            n
        }
        (Some(f), None) => find_in_chain(&full, f)
            .ok_or_else(|| QmpError::generic(format!("Top image file {f} not found")))?,
        (None, None) => bs.clone(),
    };
    let below_top = chain(&top);
    let base = match (s(a, "base"), s(a, "base-node")) {
        (Some(_), Some(_)) => {
            return Err("'base-node' and 'base' are mutually exclusive".into());
        }
        (None, Some(name)) => {
            let n = lookup(d, name)?;
            if !below_top.iter().any(|x| Arc::ptr_eq(x, &n)) {
                return Err(format!("'{name}' is not in this backing file chain").into());
            }
            n
        }
        (Some(f), None) => find_in_chain(&below_top[1..], f)
            .ok_or_else(|| QmpError::generic(format!("Can't find '{f}' in the backing chain")))?,
        // the bottom of the chain (`top` itself when it has no backing file)
        (None, None) => below_top.last().cloned().unwrap_or_else(|| top.clone()),
    };
    m.check_not_blocked(
        &full[..full.len().min(
            full.iter()
                .position(|x| Arc::ptr_eq(x, &base))
                .unwrap_or(full.len())
                + 1,
        )],
    )?;
    if Arc::ptr_eq(&top, &base) {
        return Err("cannot commit an image into itself".into());
    }
    if Arc::ptr_eq(&top, &bs) {
        if a.contains_key("backing-file") {
            return Err("'backing-file' specified, but 'top' is the active layer".into());
        }
        return active_commit(d, m, a, top, base).await;
    }
    let on_error = match s(a, "on-error") {
        None | Some("auto") => OnError::Report,
        Some(v) => OnError::parse(v)?,
    };
    let speed = a.get("speed").and_then(Value::as_i64).unwrap_or(0);
    let overlay = full
        .iter()
        .find(|n| n.child("backing").is_some_and(|b| Arc::ptr_eq(&b, &top)))
        .cloned()
        .ok_or_else(|| QmpError::generic("Could not find overlay image"))?;
    let id = s(a, "job-id").unwrap_or_default().to_string();
    m.check_new_id(&id)?;
    let context = d.node_context(top.name()).map(|(_, h)| h);
    let host: Rc<dyn GraphHost> = d.clone();
    let (driver, worker) = blockd_jobs::commit::new_commit(
        &host,
        blockd_jobs::commit::CommitParams {
            overlay,
            top,
            base,
            backing: backing_name(a),
            on_error,
            filter_name: s(a, "filter-node-name").map(str::to_string),
        },
    )
    .await?;
    let job = m.create(
        JobSpec {
            id,
            driver: driver as Rc<dyn JobDriver>,
            worker,
            context,
            speed: speed.max(0) as u64,
            auto_finalize: b(a, "auto-finalize").unwrap_or(true),
            auto_dismiss: b(a, "auto-dismiss").unwrap_or(true),
            block_job: true,
        },
        None,
    )?;
    if speed < 0 {
        // QEMU sets the speed after creating the job, which then fails early
        m.discard(&job);
        return Err("Parameter 'speed' expects a non-negative value".into());
    }
    m.start(&job);
    Ok(())
}

/// `backing-file` and `backing-mask-protocol` of stream and commit.
fn backing_name(a: &Map<String, Value>) -> blockd_jobs::backing::BackingName {
    blockd_jobs::backing::BackingName {
        explicit: s(a, "backing-file").map(str::to_string),
        mask_protocol: b(a, "backing-mask-protocol").unwrap_or(false),
    }
}

/// `on-source-error` / `on-target-error` (`auto` is `report` for jobs).
pub(crate) fn parse_on_error(a: &Map<String, Value>, k: &str) -> Result<OnError, String> {
    match s(a, k) {
        None | Some("auto") => Ok(OnError::Report),
        Some(v) => OnError::parse(v),
    }
}

async fn blockdev_mirror(
    d: &Rc<Daemon>,
    m: &Rc<JobManager>,
    a: &Map<String, Value>,
) -> Result<(), QmpError> {
    let device = s(a, "device").unwrap_or_default();
    let source = d.node(device).ok_or_else(|| {
        QmpError::generic(format!(
            "Cannot find device='{device}' nor node-name='{device}'"
        ))
    })?;
    let tname = s(a, "target").unwrap_or_default();
    let target = d.node(tname).ok_or_else(|| {
        QmpError::generic(format!(
            "Cannot find device='{tname}' nor node-name='{tname}'"
        ))
    })?;
    mirror_common(d, m, a, source, target, None).await
}

/// The sync modes blockd mirrors.
fn parse_sync(a: &Map<String, Value>) -> Result<blockd_jobs::mirror::Sync, QmpError> {
    use blockd_jobs::mirror::Sync;
    Ok(match s(a, "sync").unwrap_or_default() {
        "full" => Sync::Full,
        "top" => Sync::Top,
        "none" => Sync::None,
        other => {
            return Err(format!("Sync mode '{other}' not supported").into());
        }
    })
}

/// drive-mirror: the target image is created (mode absolute-paths, the default: the source's
/// size, format and, for sync top/none, its backing file) or opened (mode existing), then
/// mirrored into as by blockdev-mirror.
async fn drive_mirror(
    d: &Rc<Daemon>,
    m: &Rc<JobManager>,
    a: &Map<String, Value>,
) -> Result<(), QmpError> {
    let device = s(a, "device").unwrap_or_default();
    let source = d.node(device).ok_or_else(|| {
        QmpError::generic(format!(
            "Cannot find device='{device}' nor node-name='{device}'"
        ))
    })?;
    // QEMU creates and opens the target (without backing file) before it refuses the sync
    // modes mirror does not have.
    let (sync, refused) = match parse_sync(a) {
        Ok(v) => (v, None),
        Err(e) if matches!(s(a, "sync"), Some("bitmap" | "incremental")) => {
            (blockd_jobs::mirror::Sync::Full, Some(e))
        }
        Err(e) => return Err(e),
    };
    let path = s(a, "target").unwrap_or_default().to_string();
    let existing = s(a, "mode") == Some("existing");
    let fmt = match s(a, "format") {
        Some(f) => f.to_string(),
        None if existing => crate::image_files::probe_format(d, &path)?,
        None if source.driver().is_format() => source.driver().format_name().to_string(),
        None => "raw".to_string(),
    };
    // the layer below the target: none (full), the source's backing (top), the source (none)
    let below = match sync {
        blockd_jobs::mirror::Sync::Full => None,
        blockd_jobs::mirror::Sync::Top => source.child("backing"),
        _ => Some(source.clone()),
    };
    if !existing {
        let opts = below.as_ref().map_or_else(Vec::new, |b| {
            let name = blockd_jobs::backing::node_filename(b).unwrap_or_default();
            crate::image_files::backing_opts(&name, b.driver().format_name())
        });
        crate::image_files::create_image(&path, &fmt, source.length(), &opts).await?;
    }
    let mut o = Map::new();
    o.insert("driver".into(), fmt.clone().into());
    if let Some(n) = s(a, "node-name") {
        o.insert("node-name".into(), n.into());
    }
    o.insert("file".into(), json!({"driver": "file", "filename": path}));
    if fmt != "raw" {
        o.insert(
            "backing".into(),
            below.as_ref().map_or(Value::Null, |b| b.name().into()),
        );
    }
    let target = d.graph.borrow_mut().open(o)?;
    if let Some(e) = refused {
        let _ = d.graph.borrow_mut().remove(target.name());
        d.prune();
        return Err(e);
    }
    // A new image reads as zeroes: a full copy skips what no layer of the source holds
    // (QEMU's zero_target=false).
    let sync = (!existing && matches!(sync, blockd_jobs::mirror::Sync::Full))
        .then(|| blockd_jobs::mirror::Sync::Layers(chain(&source)));
    let r = mirror_common(d, m, a, source, target.clone(), sync).await;
    if r.is_err() {
        let _ = d.graph.borrow_mut().remove(target.name());
        d.prune();
    }
    r
}

async fn mirror_common(
    d: &Rc<Daemon>,
    m: &Rc<JobManager>,
    a: &Map<String, Value>,
    source: Arc<Node>,
    target: Arc<Node>,
    sync_override: Option<blockd_jobs::mirror::Sync>,
) -> Result<(), QmpError> {
    use blockd_jobs::mirror::{MirrorParams, Sync, new_mirror};
    let sync = match s(a, "sync").unwrap_or_default() {
        "full" => Sync::Full,
        "top" => Sync::Top,
        "none" => Sync::None,
        other => {
            // QEMU 10.0's mirror has no bitmap modes (its schema lists them for backup).
            return Err(format!("Sync mode '{other}' not supported").into());
        }
    };
    let sync = sync_override.unwrap_or(sync);
    // blockdev-mirror has no `unmap` (QEMU's schema): it always unmaps.
    let unmap = b(a, "unmap").unwrap_or(true);
    let replaces = match s(a, "replaces") {
        None => None,
        Some(name) => {
            let n = d.node(name).ok_or_else(|| {
                QmpError::generic(format!("Failed to find node with node-name='{name}'"))
            })?;
            // the source itself, or a node under it through filters only
            let mut cur = Some(source.clone());
            let mut ok = false;
            while let Some(c) = cur {
                if Arc::ptr_eq(&c, &n) {
                    ok = true;
                    break;
                }
                cur = if c.driver().is_filter() {
                    c.children().first().map(|ch| ch.node.clone())
                } else {
                    None
                };
            }
            if !ok {
                return Err(format!(
                    "Cannot replace '{name}' by a node mirrored from '{}', because it cannot be guaranteed that doing so would not lead to an abrupt change of visible data",
                    source.name()
                )
                .into());
            }
            if n.length() != target.length() {
                return Err("cannot replace image with a mirror image of different size".into());
            }
            Some(n)
        }
    };
    let granularity = a.get("granularity").and_then(Value::as_i64).unwrap_or(0);
    if granularity != 0 && !(512..=64 << 20).contains(&granularity) {
        return Err("Parameter 'granularity' expects a value in range [512B, 64MB]".into());
    }
    if granularity != 0 && (granularity & (granularity - 1)) != 0 {
        return Err("Parameter 'granularity' expects a power of 2".into());
    }
    let buf_size = a.get("buf-size").and_then(Value::as_i64).unwrap_or(0);
    if buf_size < 0 {
        return Err("Parameter 'buf-size' expects a non-negative value".into());
    }
    let speed = a.get("speed").and_then(Value::as_i64).unwrap_or(0);
    let id = s(a, "job-id").unwrap_or_default().to_string();
    m.check_not_blocked(&[source.clone(), target.clone()])?;
    m.check_new_id(&id)?;
    if speed < 0 {
        return Err("Parameter 'speed' expects a non-negative value".into());
    }
    let filter_name = match s(a, "filter-node-name") {
        Some(n) => n.to_string(),
        // QEMU's implicit node has a generated name; blockd's node names must be valid ones
        None => format!("mirror-top.{id}").chars().take(31).collect(),
    };
    let granularity = if granularity == 0 {
        // QEMU's default: the target's cluster size, at least 4 KiB; 64 KiB without one
        target
            .driver()
            .cluster_size()
            .map_or(65536, |c| c.max(4096))
    } else {
        granularity as u64
    };
    let context = d.node_context(source.name()).map(|(_, h)| h);
    let host: Rc<dyn GraphHost> = d.clone();
    let (driver, worker) = new_mirror(
        &host,
        MirrorParams {
            job_type: "mirror",
            source,
            target,
            filter_name,
            sync,
            granularity,
            buf_size: if buf_size == 0 {
                16 << 20
            } else {
                buf_size as u64
            },
            on_source_error: parse_on_error(a, "on-source-error")?,
            on_target_error: parse_on_error(a, "on-target-error")?,
            write_blocking: s(a, "copy-mode") == Some("write-blocking"),
            replaces,
            unmap,
        },
    )
    .await?;
    start_mirror_job(d, m, a, id, driver, worker, context, speed)
}

/// The commit of the active layer: a mirror from the top into the base of what the layers
/// above the base hold; READY when converged, and `job-complete` moves the top's users to the
/// base.
async fn active_commit(
    d: &Rc<Daemon>,
    m: &Rc<JobManager>,
    a: &Map<String, Value>,
    top: Arc<Node>,
    base: Arc<Node>,
) -> Result<(), QmpError> {
    use blockd_jobs::mirror::{MirrorParams, Sync, new_mirror};
    if a.contains_key("backing-mask-protocol") {
        return Err("block-commit 'backing-mask-protocol' is not supported by blockd yet".into());
    }
    let on_error = match s(a, "on-error") {
        None | Some("auto") => OnError::Report,
        Some(v) => OnError::parse(v)?,
    };
    let speed = a.get("speed").and_then(Value::as_i64).unwrap_or(0);
    let id = s(a, "job-id").unwrap_or_default().to_string();
    m.check_new_id(&id)?;
    if speed < 0 {
        return Err("Parameter 'speed' expects a non-negative value".into());
    }
    let mut layers = vec![top.clone()];
    layers
        .extend(blockd_jobs::stream::intermediates(&top, Some(&base)).map_err(QmpError::generic)?);
    let filter_name = match s(a, "filter-node-name") {
        Some(n) => n.to_string(),
        None => format!("commit-top.{id}").chars().take(31).collect(),
    };
    let context = d.node_context(top.name()).map(|(_, h)| h);
    let host: Rc<dyn GraphHost> = d.clone();
    let granularity = base.driver().cluster_size().map_or(65536, |c| c.max(4096));
    let (driver, worker) = new_mirror(
        &host,
        MirrorParams {
            job_type: "commit",
            source: top,
            target: base,
            filter_name,
            sync: Sync::Layers(layers),
            granularity,
            buf_size: 16 << 20,
            on_source_error: on_error,
            on_target_error: on_error,
            write_blocking: false,
            replaces: None,
            unmap: true,
        },
    )
    .await?;
    start_mirror_job(d, m, a, id, driver, worker, context, speed)
}

#[allow(clippy::too_many_arguments)]
fn start_mirror_job(
    d: &Rc<Daemon>,
    m: &Rc<JobManager>,
    a: &Map<String, Value>,
    id: String,
    driver: Rc<blockd_jobs::mirror::MirrorJob>,
    worker: blockd_jobs::Worker,
    context: Option<blockd_aio::ContextHandle>,
    speed: i64,
) -> Result<(), QmpError> {
    let job = m.create(
        JobSpec {
            id,
            driver: driver.clone() as Rc<dyn JobDriver>,
            worker,
            context,
            speed: speed.max(0) as u64,
            auto_finalize: b(a, "auto-finalize").unwrap_or(true),
            auto_dismiss: b(a, "auto-dismiss").unwrap_or(true),
            block_job: true,
        },
        None,
    );
    let job = match job {
        Ok(j) => j,
        Err(e) => {
            driver.clean();
            driver.abort();
            return Err(e.into());
        }
    };
    m.start(&job);
    d.prune();
    Ok(())
}
