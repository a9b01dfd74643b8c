//! `blockdev-backup` and `drive-backup`, as commands and as transaction actions (the job
//! itself is blockd-jobs' `backup.rs`). Prepare checks the arguments in QEMU's order with its
//! messages, creates (drive-backup) and opens the target, inserts the copy-before-write filter
//! and creates the job in state `created`, in the transaction's job group when
//! `completion-mode=grouped`; commit starts it; abort cancels it (created → aborting →
//! concluded → null, as QEMU) and closes a target opened here.
//!
//! `x-perf` is QEMU's optional tuning: `max-chunk` limits the job's copy unit (checked as
//! QEMU checks it), `min-cluster-size` raises the cluster size; `use-copy-range` and
//! `max-workers` are validated and otherwise have no effect (blockd copies one chunk at a time
//! per job). With `bitmap` (a dirty bitmap of the source): `sync=bitmap|incremental` copy
//! only its clusters; the bitmap is frozen while the job runs (new writes go to a successor)
//! and `bitmap-mode` (on-success, never, always) says what it holds afterwards.
//! `discard-source` discards on the source what is on the target (nodes opened with
//! `discard=unmap` only, as QEMU).

use std::rc::Rc;
use std::sync::Arc;

use blockd_block::Node;
use blockd_block::dirty_bitmap::{CheckFlags, DirtyBitmap};
use blockd_jobs::backup::{BackupParams, BackupSync, new_backup};
use blockd_jobs::{GraphHost, Job, JobDriver, JobSpec, LocalFuture};
use blockd_qmp::QmpError;
use blockd_qmp::schema::{ObjectDef, Type, member, optional};
use serde_json::{Map, Value, json};

use crate::jobs::parse_on_error;
use crate::snapshot::{lookup, s};
use crate::state::Daemon;
use crate::transaction::{Action, TxnCtx};

fn obj(members: Vec<blockd_qmp::Member>) -> ObjectDef {
    ObjectDef {
        members,
        ..Default::default()
    }
}

fn on_error() -> Type {
    Type::enumeration(&["report", "ignore", "enospc", "stop", "auto"])
}

/// BackupCommon's members.
fn common_members() -> Vec<blockd_qmp::Member> {
    vec![
        optional("job-id", Type::Str),
        member("device", Type::Str),
        member(
            "sync",
            Type::enumeration(&["top", "full", "none", "incremental", "bitmap"]),
        ),
        optional("speed", Type::Int),
        optional("bitmap", Type::Str),
        optional(
            "bitmap-mode",
            Type::enumeration(&["on-success", "never", "always"]),
        ),
        optional("compress", Type::Bool),
        optional("on-source-error", on_error()),
        optional("on-target-error", on_error()),
        optional("auto-finalize", Type::Bool),
        optional("auto-dismiss", Type::Bool),
        optional("filter-node-name", Type::Str),
        optional("discard-source", Type::Bool),
        optional(
            "x-perf",
            Type::object(vec![
                optional("use-copy-range", Type::Bool),
                optional("max-workers", Type::Int),
                optional("max-chunk", Type::Int),
                optional("min-cluster-size", Type::Size),
            ]),
        ),
    ]
}

fn blockdev_backup_args() -> ObjectDef {
    let mut m = common_members();
    m.push(member("target", Type::Str));
    obj(m)
}

fn drive_backup_args() -> ObjectDef {
    let mut m = common_members();
    m.push(member("target", Type::Str));
    m.push(optional("format", Type::Str));
    m.push(optional(
        "mode",
        Type::enumeration(&["existing", "absolute-paths"]),
    ));
    obj(m)
}

pub fn action_args() -> Vec<(&'static str, ObjectDef)> {
    vec![
        ("blockdev-backup", blockdev_backup_args()),
        ("drive-backup", drive_backup_args()),
    ]
}

pub fn make_action(kind: &str, data: &Map<String, Value>) -> Option<Box<dyn Action>> {
    let drive = match kind {
        "blockdev-backup" => false,
        "drive-backup" => true,
        _ => return None,
    };
    Some(Box::new(BackupAction {
        args: data.clone(),
        drive,
        job: None,
        opened_target: None,
        filter: None,
    }))
}

pub fn register(server: &Rc<blockd_qmp::Server>, d: &Rc<Daemon>) {
    for (name, def) in action_args() {
        let dd = d.clone();
        server.register(name, def, Type::object(vec![]), move |a| {
            let d = dd.clone();
            Box::pin(async move {
                let action = make_action(name, &a).expect("registered kind");
                crate::transaction::run_one(&d, action).await
            })
        });
    }
}

struct BackupAction {
    args: Map<String, Value>,
    drive: bool,
    job: Option<Rc<Job>>,
    /// drive-backup's target, opened here (closed again on failure).
    opened_target: Option<Arc<Node>>,
    /// The job's copy-before-write filter (gone again after an abort).
    filter: Option<String>,
}

/// QEMU's `backup_cleanup_sync_bitmap`: after a success (or always with `always`, never with
/// `never`) the bitmap takes its successor's bits (the writes since the job started);
/// otherwise the successor merges back into it. A failure with `always` keeps the clusters
/// the job did not copy dirty.
fn bitmap_end(
    d: &Rc<Daemon>,
    source: &Arc<Node>,
    bm: Arc<DirtyBitmap>,
    mode: String,
    cluster: u64,
) -> blockd_jobs::backup::OnEnd {
    let d = Rc::downgrade(d);
    let list = source.dirty_bitmaps().clone();
    Box::new(move |ok, bcs| {
        let Some(d) = d.upgrade() else { return };
        let g = d.graph.borrow();
        let sync = (ok || mode == "always") && mode != "never";
        let r = if sync {
            list.abdicate(&g, &bm)
        } else {
            list.reclaim(&g, &bm)
        };
        if let Err(e) = r {
            tracing::error!("backup: bitmap: {e}");
            return;
        }
        if !ok && mode == "always" {
            let left = bcs.to_copy();
            let mut c = 0;
            while let Some(i) = left.next_set(c) {
                bm.set_range(i * cluster, cluster);
                c = i + 1;
            }
        }
    })
}

impl BackupAction {
    /// drive-backup: create (or find) and open the target.
    async fn open_drive_target(
        &mut self,
        d: &Rc<Daemon>,
        source: &Arc<Node>,
        sync: &mut BackupSync,
    ) -> Result<Arc<Node>, QmpError> {
        let a = &self.args;
        let path = s(a, "target").unwrap_or_default().to_string();
        let existing = s(a, "mode") == Some("existing");
        let fmt = match s(a, "format") {
            Some(f) => f.to_string(),
            None if existing => crate::image_files::probe_format(d, &path)?,
            None => source.driver().format_name().to_string(),
        };
        // the layer below the target: the source's backing (top), the source (none)
        let below = match *sync {
            BackupSync::Top => match source.child("backing") {
                Some(b) => Some(b),
                None => {
                    *sync = BackupSync::Full;
                    None
                }
            },
            BackupSync::None => Some(source.clone()),
            BackupSync::Full => None,
        };
        if !existing {
            let opts = below.as_ref().map_or_else(Vec::new, |b| {
                crate::image_files::backing_opts(
                    &crate::block::filename(d, b),
                    b.driver().format_name(),
                )
            });
            crate::image_files::create_image(&path, &fmt, source.length(), &opts).await?;
        }
        let mut o = Map::new();
        o.insert("driver".into(), fmt.clone().into());
        o.insert("file".into(), json!({"driver": "file", "filename": path}));
        if fmt != "raw" {
            o.insert(
                "backing".into(),
                below.as_ref().map_or(Value::Null, |b| b.name().into()),
            );
        }
        let target = d.graph.borrow_mut().open(o.clone())?;
        d.record_options(&target, &o);
        self.opened_target = Some(target.clone());
        Ok(target)
    }

    async fn do_prepare(&mut self, cx: &TxnCtx) -> Result<(), QmpError> {
        let d = &cx.daemon;
        let a = self.args.clone();
        let m = crate::jobs::manager().ok_or("no job manager")?;
        let device = s(&a, "device");
        let source = lookup(d, device, device)?;
        let mut sync = match s(&a, "sync").unwrap_or_default() {
            "full" => BackupSync::Full,
            "top" => BackupSync::Top,
            "none" => BackupSync::None,
            mode @ ("bitmap" | "incremental") => {
                if s(&a, "bitmap").is_none() {
                    return Err(QmpError::generic(format!(
                        "must provide a valid bitmap name for '{mode}' sync mode"
                    )));
                }
                BackupSync::Full
            }
            other => return Err(QmpError::generic(format!("Invalid sync mode '{other}'"))),
        };
        let target = if self.drive {
            self.open_drive_target(d, &source, &mut sync).await?
        } else {
            let t = s(&a, "target");
            lookup(d, t, t)?
        };
        let sync_name = s(&a, "sync").unwrap_or_default().to_string();
        let bitmap = match s(&a, "bitmap") {
            Some(b) => {
                let bm = source
                    .dirty_bitmaps()
                    .find(b)
                    .ok_or_else(|| QmpError::generic(format!("Bitmap '{b}' could not be found")))?;
                let mode = match s(&a, "bitmap-mode") {
                    Some(m) => m.to_string(),
                    None if sync_name == "incremental" => "on-success".to_string(),
                    None => {
                        return Err("Bitmap sync mode must be given when providing a bitmap".into());
                    }
                };
                bm.check(CheckFlags::ALLOW_RO)
                    .map_err(|e| QmpError::generic(e.message))?;
                if sync_name == "none" {
                    return Err(
                        "sync mode 'none' does not produce meaningful bitmap outputs".into(),
                    );
                }
                if mode == "never" && sync_name != "bitmap" {
                    return Err(QmpError::generic(format!(
                        "Bitmap sync mode 'never' has no meaningful effect when combined with sync mode '{sync_name}'"
                    )));
                }
                Some((bm, mode))
            }
            None => {
                if a.contains_key("bitmap-mode") {
                    return Err("Cannot specify bitmap sync mode without a bitmap".into());
                }
                None
            }
        };
        if sync_name == "incremental"
            && let Some((_, mode)) = &bitmap
            && mode != "on-success"
        {
            return Err(
                "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'".into(),
            );
        }
        if Arc::ptr_eq(&source, &target) {
            return Err("Source and target cannot be the same".into());
        }
        let compress = a.get("compress").and_then(Value::as_bool).unwrap_or(false);
        if compress && target.driver().format_name() != "qcow2" {
            // (QEMU names the target's BlockBackend, which a node does not have)
            return Err("Compression is not supported for this drive ".into());
        }
        m.check_not_blocked(&[target.clone(), source.clone()])?;
        if source.length() != target.length() {
            return Err("Source and target image have different sizes".into());
        }
        let perf = a.get("x-perf").cloned().unwrap_or(json!({}));
        if let Some(w) = perf.get("max-workers").and_then(Value::as_i64)
            && !(1..=i32::MAX as i64).contains(&w)
        {
            return Err("max-workers must be between 1 and 2147483647".into());
        }
        let max_chunk = perf.get("max-chunk").and_then(Value::as_i64).unwrap_or(0);
        if max_chunk < 0 {
            return Err("max-chunk must be zero (which means no limit) or positive".into());
        }
        let filter_name = match s(&a, "filter-node-name") {
            Some(n) => n.to_string(),
            None => format!("backup-top.{}", s(&a, "job-id").unwrap_or_default())
                .chars()
                .take(31)
                .collect(),
        };
        if d.node(&filter_name).is_some() {
            return Err(QmpError::generic(format!(
                "Could not create node: Duplicate nodes with node-name='{filter_name}'"
            )));
        }
        let min_cluster = perf
            .get("min-cluster-size")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        // (the filter's open checks these in QEMU, hence the prefix; above 1 GiB is refused
        // here, qemu-storage-daemon 10.0.2 crashes on such sizes)
        if min_cluster != 0 && !min_cluster.is_power_of_two() {
            return Err(
                "Could not create node: Cannot create block-copy-state: min-cluster-size needs to be a power of 2"
                    .into(),
            );
        }
        if min_cluster > 1 << 30 {
            return Err(
                "Could not create node: Cannot create block-copy-state: min-cluster-size too large"
                    .into(),
            );
        }
        let cluster = blockd_jobs::cbw::cluster_size_for(&target, min_cluster);
        if max_chunk != 0 && (max_chunk as u64) < cluster {
            return Err(QmpError::generic(format!(
                "Required max-chunk ({max_chunk}) is less than backup cluster size ({cluster})"
            )));
        }
        let id = s(&a, "job-id").unwrap_or_default().to_string();
        m.check_new_id(&id)?;
        let speed = a.get("speed").and_then(Value::as_i64).unwrap_or(0);
        if speed < 0 {
            return Err("Parameter 'speed' expects a non-negative value".into());
        }
        // The bitmap is frozen for the job; new writes go to its successor, which replaces
        // or rejoins it at the end by `bitmap-mode`.
        let mut to_copy = None;
        if let Some((bm, mode)) = &bitmap {
            if mode != "never" {
                bm.check(CheckFlags::DEFAULT)
                    .map_err(|e| QmpError::generic(e.message))?;
            }
            if matches!(sync_name.as_str(), "bitmap" | "incremental") {
                let nclusters = source.length().div_ceil(cluster);
                let mut bits = blockd_jobs::cbw::Bits::new(nclusters, false);
                for (off, len) in bm.dirty_runs(0, source.length()) {
                    for c in off / cluster..(off + len).div_ceil(cluster) {
                        bits.set(c, true);
                    }
                }
                to_copy = Some(bits);
            }
            source
                .dirty_bitmaps()
                .create_successor(&d.graph.borrow(), bm)?;
        }
        let host: Rc<dyn GraphHost> = d.clone();
        let made = new_backup(
            &host,
            BackupParams {
                source: source.clone(),
                target,
                filter_name,
                sync,
                compress,
                on_source_error: parse_on_error(&a, "on-source-error")
                    .map_err(QmpError::generic)?,
                on_target_error: parse_on_error(&a, "on-target-error")
                    .map_err(QmpError::generic)?,
                to_copy,
                min_cluster,
                max_chunk: max_chunk as u64,
                discard_source: a.get("discard-source").and_then(Value::as_bool) == Some(true),
            },
        )
        .await;
        let (driver, worker) = match made {
            Ok(v) => v,
            Err(e) => {
                if let Some((bm, _)) = &bitmap {
                    let _ = source.dirty_bitmaps().reclaim(&d.graph.borrow(), bm);
                }
                return Err(e.into());
            }
        };
        if let Some((bm, mode)) = bitmap {
            driver.set_on_end(bitmap_end(d, &source, bm, mode, cluster));
        }
        self.filter = driver.filter_name();
        let context = d.node_context(source.name()).map(|(_, h)| h);
        let job = m.create(
            JobSpec {
                id,
                driver: driver.clone() as Rc<dyn JobDriver>,
                worker,
                context,
                speed: speed as u64,
                auto_finalize: a
                    .get("auto-finalize")
                    .and_then(Value::as_bool)
                    .unwrap_or(true),
                auto_dismiss: a
                    .get("auto-dismiss")
                    .and_then(Value::as_bool)
                    .unwrap_or(true),
                block_job: true,
            },
            cx.job_txn.clone(),
        );
        match job {
            Ok(j) => {
                self.job = Some(j);
                d.prune();
                Ok(())
            }
            Err(e) => {
                // the filter goes again
                driver.abort();
                Err(e.into())
            }
        }
    }
}

impl Action for BackupAction {
    fn prepare<'a>(&'a mut self, cx: &'a TxnCtx) -> LocalFuture<'a, Result<(), QmpError>> {
        Box::pin(self.do_prepare(cx))
    }

    fn commit<'a>(&'a mut self, _cx: &'a TxnCtx) -> LocalFuture<'a, ()> {
        Box::pin(async move {
            if let (Some(m), Some(j)) = (crate::jobs::manager(), &self.job) {
                m.start(j);
            }
        })
    }

    fn abort<'a>(&'a mut self, cx: &'a TxnCtx) -> LocalFuture<'a, ()> {
        Box::pin(async move {
            if let (Some(m), Some(j)) = (crate::jobs::manager(), self.job.take()) {
                // QEMU's job_cancel_sync: created -> aborting -> concluded -> null
                let _ = m.user_cancel(&j, true);
                for _ in 0..2000 {
                    if j.status() == blockd_jobs::JobStatus::Null {
                        break;
                    }
                    blockd_aio::sleep(std::time::Duration::from_millis(1)).await;
                }
                // the filter (and a target opened here) go in the job's abort, on its own
                // task: the transaction returns once the graph is as before
                for _ in 0..2000 {
                    let d = &cx.daemon;
                    let gone = self
                        .opened_target
                        .as_ref()
                        .is_none_or(|t| d.node(t.name()).is_none())
                        && self.filter.as_ref().is_none_or(|f| d.node(f).is_none());
                    if gone {
                        break;
                    }
                    blockd_aio::sleep(std::time::Duration::from_millis(1)).await;
                }
            } else if let Some(t) = self.opened_target.take() {
                let _ = cx.daemon.graph.borrow_mut().remove(t.name());
            }
        })
    }
}
