//! Jobs and their coordinator on the main context (QEMU's job.c): creation, the state
//! machine, user verbs, completion through transactions (every job of a group finalizes or
//! aborts together), `auto-finalize`, `auto-dismiss`, and the QMP events.
//!
//! `Job` and `JobManager` are `!Send`: they live on the main context, the only place where
//! states change and events go out. A job's work runs as a separate task (in the node's
//! context), which reaches its coordinator only through `Control` messages; the coordinator
//! applies them here.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;

use blockd_aio::ContextHandle;
use serde_json::{Value, json};

use crate::control::{Control, JobCtx, Msg};
use crate::status::{JobStatus, Verb};

/// A future on the main context.
pub type LocalFuture<'a, T> = Pin<Box<dyn Future<Output = T> + 'a>>;

/// A job's work: built in the main context, run in the job's context (so the closure is
/// `Send`; the future it makes need not be).
pub type Worker =
    Box<dyn FnOnce(JobCtx) -> Pin<Box<dyn Future<Output = Result<(), String>>>> + Send>;

/// The main-context half of a job type: what happens after the work when the job finishes.
pub trait JobDriver {
    /// QEMU's JobType name ("stream", "commit", "mirror"...).
    fn job_type(&self) -> &'static str;

    /// The nodes the job works on: other jobs cannot start on them while it runs (QEMU's op
    /// blockers).
    fn nodes(&self) -> Vec<Arc<blockd_block::Node>> {
        Vec::new()
    }

    /// `job-complete` is meaningful (jobs that go READY).
    fn can_complete(&self) -> bool {
        false
    }

    /// A cancel without `force` of a READY job finishes it instead (mirror: keep the source).
    fn soft_cancel_when_ready(&self) -> bool {
        false
    }

    /// `block-job-change` with the type-specific options (`type` already matched).
    fn change(&self, _opts: &serde_json::Map<String, Value>) -> Result<(), String> {
        Err("Job type does not support change".into())
    }

    /// Type-specific members of query-block-jobs (mirror: `actively-synced`).
    fn block_info_extra(&self) -> Option<(&'static str, Value)> {
        None
    }

    /// The job's graph change, on success (QEMU's `prepare`); it may fail, which aborts the
    /// whole transaction. Runs in the main context; drains what it changes.
    fn prepare(&self) -> LocalFuture<'_, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }

    /// After every job of the transaction prepared successfully.
    fn commit(&self) {}

    /// The job failed or was cancelled.
    fn abort(&self) {}

    /// Either way, at the end.
    fn clean(&self) {}
}

/// What a new job is made of.
pub struct JobSpec {
    pub id: String,
    pub driver: Rc<dyn JobDriver>,
    pub worker: Worker,
    /// The context the worker runs in (`None`: the main context).
    pub context: Option<ContextHandle>,
    pub speed: u64,
    pub auto_finalize: bool,
    pub auto_dismiss: bool,
    /// A block job: listed by query-block-jobs and reported with the legacy BLOCK_JOB_* events.
    pub block_job: bool,
}

/// A group of jobs that finalize or abort together (QEMU's JobTxn).
#[derive(Default)]
pub struct Txn {
    jobs: RefCell<Vec<Rc<Job>>>,
    aborting: Cell<bool>,
    finalizing: Cell<bool>,
}

impl Txn {
    pub fn new() -> Rc<Txn> {
        Rc::new(Txn::default())
    }

    fn jobs(&self) -> Vec<Rc<Job>> {
        self.jobs.borrow().clone()
    }

    fn remove(&self, job: &Rc<Job>) {
        self.jobs.borrow_mut().retain(|j| !Rc::ptr_eq(j, job));
    }
}

pub struct Job {
    id: String,
    driver: Rc<dyn JobDriver>,
    ctl: Arc<Control>,
    status: Cell<JobStatus>,
    auto_finalize: bool,
    auto_dismiss: bool,
    block_job: bool,
    user_paused: Cell<bool>,
    started: Cell<bool>,
    /// The worker returned (or never started).
    worker_done: Cell<bool>,
    ret: RefCell<Result<(), String>>,
    iostatus: Cell<&'static str>,
    txn: RefCell<Rc<Txn>>,
    pending_worker: RefCell<Option<(Worker, Option<ContextHandle>)>>,
}

impl Job {
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn status(&self) -> JobStatus {
        self.status.get()
    }

    pub fn job_type(&self) -> &'static str {
        self.driver.job_type()
    }

    pub fn is_block_job(&self) -> bool {
        self.block_job
    }

    pub fn progress(&self) -> (u64, u64) {
        self.ctl.progress()
    }

    pub fn speed(&self) -> u64 {
        self.ctl.speed()
    }

    /// Paused by the user (or by an error with `stop`), as opposed to an internal pause.
    pub fn is_user_paused(&self) -> bool {
        self.user_paused.get()
    }

    pub fn error(&self) -> Option<String> {
        self.ret.borrow().as_ref().err().cloned()
    }

    /// QEMU's JobInfo (query-jobs).
    pub fn info(&self) -> Value {
        let (cur, total) = self.progress();
        let mut v = json!({
            "id": self.id,
            "type": self.job_type(),
            "status": self.status().as_str(),
            "current-progress": cur,
            "total-progress": total,
        });
        if let Some(e) = self.error() {
            v["error"] = json!(e);
        }
        v
    }

    /// QEMU's BlockJobInfo (query-block-jobs).
    pub fn block_info(&self) -> Value {
        let (cur, total) = self.progress();
        let s = self.status();
        let mut v = json!({
            "type": self.job_type(),
            "device": self.id,
            "len": total,
            "offset": cur,
            "busy": self.ctl.busy(),
            "paused": self.user_paused.get() || self.ctl.worker_paused(),
            "speed": self.speed(),
            "io-status": self.iostatus.get(),
            "ready": matches!(s, JobStatus::Ready | JobStatus::Standby),
            "status": s.as_str(),
            "auto-finalize": self.auto_finalize,
            "auto-dismiss": self.auto_dismiss,
        });
        if let Some(e) = self.error() {
            v["error"] = json!(e);
        }
        if let Some((k, x)) = self.driver.block_info_extra() {
            v[k] = x;
        }
        v
    }

    fn block_event_data(&self) -> Value {
        let (cur, total) = self.progress();
        json!({
            "type": self.job_type(),
            "device": self.id,
            "len": total,
            "offset": cur,
            "speed": self.speed(),
        })
    }
}

/// Where events go (the daemon's QMP server).
pub type Emitter = Box<dyn Fn(&str, Value)>;

/// Every job of the daemon.
pub struct JobManager {
    jobs: RefCell<Vec<Rc<Job>>>,
    emit: Emitter,
}

fn id_wellformed(id: &str) -> bool {
    id.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
}

const CANCELED: &str = "Operation canceled";

impl JobManager {
    pub fn new(emit: Emitter) -> Rc<JobManager> {
        Rc::new(JobManager {
            jobs: RefCell::new(Vec::new()),
            emit,
        })
    }

    pub fn get(&self, id: &str) -> Option<Rc<Job>> {
        self.jobs.borrow().iter().find(|j| j.id == id).cloned()
    }

    pub fn list(&self) -> Vec<Rc<Job>> {
        self.jobs.borrow().clone()
    }

    /// Is `id` free for a new job? (QEMU's checks, with its messages.)
    pub fn check_new_id(&self, id: &str) -> Result<(), String> {
        if !id_wellformed(id) {
            return Err(format!("Invalid job ID '{id}'"));
        }
        if self.get(id).is_some() {
            return Err(format!("Job ID '{id}' already in use"));
        }
        Ok(())
    }

    /// Refuse to start a job on a node another unfinished job works on, with QEMU's message.
    pub fn check_not_blocked(&self, nodes: &[Arc<blockd_block::Node>]) -> Result<(), String> {
        for j in self.jobs.borrow().iter() {
            if matches!(j.status(), JobStatus::Concluded | JobStatus::Null) {
                continue;
            }
            let used = j.driver.nodes();
            if let Some(n) = nodes
                .iter()
                .find(|n| used.iter().any(|u| Arc::ptr_eq(u, n)))
            {
                return Err(format!(
                    "Node '{}' is busy: block device is in use by block job: {}",
                    n.name(),
                    j.job_type()
                ));
            }
        }
        Ok(())
    }

    /// Create a job in state `created` (paused until `start`), alone in its transaction unless
    /// `txn` is given.
    pub fn create(&self, spec: JobSpec, txn: Option<Rc<Txn>>) -> Result<Rc<Job>, String> {
        self.check_new_id(&spec.id)?;
        let txn = txn.unwrap_or_default();
        let job = Rc::new(Job {
            id: spec.id,
            driver: spec.driver,
            ctl: Control::new(spec.speed),
            status: Cell::new(JobStatus::Undefined),
            auto_finalize: spec.auto_finalize,
            auto_dismiss: spec.auto_dismiss,
            block_job: spec.block_job,
            user_paused: Cell::new(false),
            started: Cell::new(false),
            worker_done: Cell::new(false),
            ret: RefCell::new(Ok(())),
            iostatus: Cell::new("ok"),
            txn: RefCell::new(txn.clone()),
            pending_worker: RefCell::new(Some((spec.worker, spec.context))),
        });
        txn.jobs.borrow_mut().push(job.clone());
        self.jobs.borrow_mut().push(job.clone());
        self.transition(&job, JobStatus::Created);
        Ok(job)
    }

    fn transition(&self, job: &Rc<Job>, to: JobStatus) {
        let from = job.status.get();
        if !from.can_become(to) {
            // A bug, never a crash: keep the state and say so.
            eprintln!(
                "blockd-jobs: job '{}': refused transition {from} -> {to}",
                job.id
            );
            return;
        }
        job.status.set(to);
        if from != to {
            (self.emit)(
                "JOB_STATUS_CHANGE",
                json!({"id": job.id, "status": to.as_str()}),
            );
        }
    }

    /// Start the job's work and its coordinator.
    pub fn start(self: &Rc<Self>, job: &Rc<Job>) {
        let Some((worker, context)) = job.pending_worker.borrow_mut().take() else {
            return;
        };
        job.started.set(true);
        self.transition(job, JobStatus::Running);
        let ctl = job.ctl.clone();
        ctl.set_busy(true);
        let ctx = JobCtx { ctl: ctl.clone() };
        let make = move || async move {
            let r = worker(ctx).await;
            ctl.set_busy(false);
            ctl.send(Msg::Done(r));
        };
        // The worker starts paused (pause_count 1 since creation) and is let go now.
        job.ctl.resume();
        match context {
            Some(h) if !h.is_current() => drop(h.spawn(make)),
            _ => blockd_aio::spawn(make()).detach(),
        }
        let me = self.clone();
        let job = job.clone();
        blockd_aio::spawn(async move {
            loop {
                for m in job.ctl.recv().await {
                    me.handle(&job, m).await;
                }
                if job.worker_done.get() {
                    return;
                }
            }
        })
        .detach();
    }

    async fn handle(self: &Rc<Self>, job: &Rc<Job>, m: Msg) {
        match m {
            Msg::Paused => match job.status() {
                JobStatus::Running => self.transition(job, JobStatus::Paused),
                JobStatus::Ready => self.transition(job, JobStatus::Standby),
                _ => {}
            },
            Msg::Resumed => match job.status() {
                JobStatus::Paused => self.transition(job, JobStatus::Running),
                JobStatus::Standby => self.transition(job, JobStatus::Ready),
                _ => {}
            },
            Msg::Ready => {
                if job.status() == JobStatus::Running {
                    self.transition(job, JobStatus::Ready);
                    if job.block_job {
                        (self.emit)("BLOCK_JOB_READY", job.block_event_data());
                    }
                }
            }
            Msg::Error {
                read,
                action,
                nospace,
            } => {
                if action == crate::control::ErrorAction::Stop {
                    // The pause is the user's to end (job-resume), as in QEMU.
                    job.user_paused.set(true);
                    job.iostatus.set(if nospace { "nospace" } else { "failed" });
                }
                if job.block_job {
                    (self.emit)(
                        "BLOCK_JOB_ERROR",
                        json!({
                            "device": job.id,
                            "operation": if read { "read" } else { "write" },
                            "action": action.as_str(),
                        }),
                    );
                }
            }
            Msg::Done(r) => {
                job.worker_done.set(true);
                *job.ret.borrow_mut() = r;
                self.completed(job).await;
            }
        }
    }

    /// The ret of a job: a cancelled job fails with ECANCELED; a failed job goes `aborting`.
    fn update_rc(&self, job: &Rc<Job>) {
        if job.ret.borrow().is_ok() && job.ctl.is_cancelled() {
            *job.ret.borrow_mut() = Err(CANCELED.to_string());
        }
        if job.ret.borrow().is_err() && job.status() != JobStatus::Aborting {
            self.transition(job, JobStatus::Aborting);
        }
    }

    /// The worker of `job` returned (QEMU's `job_completed`).
    async fn completed(self: &Rc<Self>, job: &Rc<Job>) {
        self.update_rc(job);
        let txn = job.txn.borrow().clone();
        if txn.aborting.get() {
            self.finish_abort(&txn);
        } else if job.ret.borrow().is_err() {
            self.txn_abort(&txn);
        } else {
            self.txn_success(job, &txn).await;
        }
    }

    async fn txn_success(self: &Rc<Self>, job: &Rc<Job>, txn: &Rc<Txn>) {
        self.transition(job, JobStatus::Waiting);
        let jobs = txn.jobs();
        if jobs.iter().any(|j| !j.status().is_completed()) {
            return;
        }
        for j in &jobs {
            self.transition(j, JobStatus::Pending);
            if !j.auto_finalize && j.block_job {
                (self.emit)(
                    "BLOCK_JOB_PENDING",
                    json!({"type": j.job_type(), "id": j.id}),
                );
            }
        }
        if jobs.iter().all(|j| j.auto_finalize) {
            self.do_finalize(txn).await;
        }
    }

    /// Prepare every job of the transaction, then commit them all, or abort them all when one
    /// prepare fails.
    async fn do_finalize(self: &Rc<Self>, txn: &Rc<Txn>) {
        if txn.finalizing.replace(true) {
            return;
        }
        let jobs = txn.jobs();
        for j in &jobs {
            if j.ret.borrow().is_ok()
                && let Err(e) = j.driver.prepare().await
            {
                *j.ret.borrow_mut() = Err(e);
                self.update_rc(j);
                self.txn_abort(txn);
                return;
            }
        }
        for j in &jobs {
            self.finalize_single(j);
        }
    }

    /// Cancel every unfinished job of the transaction; once all have returned, abort them all.
    fn txn_abort(self: &Rc<Self>, txn: &Rc<Txn>) {
        if txn.aborting.replace(true) {
            return;
        }
        for j in txn.jobs() {
            if !j.worker_done.get() {
                self.cancel_async(&j, true);
            }
        }
        self.finish_abort(txn);
    }

    fn finish_abort(self: &Rc<Self>, txn: &Rc<Txn>) {
        let jobs = txn.jobs();
        if jobs.iter().any(|j| j.started.get() && !j.worker_done.get()) {
            return; // the last one to return comes back here
        }
        for j in &jobs {
            if !j.ctl.is_cancelled() && j.ret.borrow().is_ok() {
                j.ctl.cancel(true);
            }
            self.update_rc(j);
            self.finalize_single(j);
        }
    }

    fn finalize_single(self: &Rc<Self>, job: &Rc<Job>) {
        if job.ret.borrow().is_ok() {
            job.driver.commit();
        } else {
            job.driver.abort();
        }
        job.driver.clean();
        if job.started.get() && job.block_job {
            if job.ctl.is_cancelled() {
                (self.emit)("BLOCK_JOB_CANCELLED", job.block_event_data());
            } else {
                let mut data = job.block_event_data();
                if let Some(e) = job.error() {
                    data["error"] = json!(e);
                }
                (self.emit)("BLOCK_JOB_COMPLETED", data);
            }
        }
        job.txn.borrow().remove(job);
        *job.txn.borrow_mut() = Txn::new();
        self.transition(job, JobStatus::Concluded);
        if job.auto_dismiss || !job.started.get() {
            self.do_dismiss(job);
        }
    }

    /// Drop a job that failed while being set up, before it started (QEMU's `job_early_fail`):
    /// `created` → `null`.
    pub fn discard(&self, job: &Rc<Job>) {
        if job.status() != JobStatus::Created {
            return;
        }
        job.pending_worker.borrow_mut().take();
        job.driver.clean();
        job.txn.borrow().remove(job);
        self.do_dismiss(job);
    }

    fn do_dismiss(&self, job: &Rc<Job>) {
        self.transition(job, JobStatus::Null);
        self.jobs.borrow_mut().retain(|j| !Rc::ptr_eq(j, job));
    }

    fn cancel_async(&self, job: &Rc<Job>, force: bool) {
        if job.user_paused.replace(false) {
            job.ctl.resume();
        }
        job.ctl.cancel(force);
    }

    // ---- user verbs ----

    pub fn user_pause(&self, job: &Rc<Job>) -> Result<(), String> {
        Verb::Pause.check(&job.id, job.status())?;
        if job.user_paused.get() {
            return Err("Job is already paused".into());
        }
        job.user_paused.set(true);
        job.ctl.pause();
        Ok(())
    }

    pub fn user_resume(&self, job: &Rc<Job>) -> Result<(), String> {
        Verb::Resume.check(&job.id, job.status())?;
        if !job.user_paused.get() {
            return Err("Can't resume a job that was not paused".into());
        }
        job.iostatus.set("ok");
        job.user_paused.set(false);
        job.ctl.resume();
        Ok(())
    }

    pub fn user_cancel(self: &Rc<Self>, job: &Rc<Job>, force: bool) -> Result<(), String> {
        Verb::Cancel.check(&job.id, job.status())?;
        let soft = !force
            && job.driver.soft_cancel_when_ready()
            && matches!(job.status(), JobStatus::Ready | JobStatus::Standby);
        self.cancel_async(job, !soft);
        if !job.started.get() {
            // Never ran: it ends here.
            job.pending_worker.borrow_mut().take();
            job.worker_done.set(true);
            let me = self.clone();
            let job = job.clone();
            blockd_aio::spawn(async move { me.completed(&job).await }).detach();
        } else if job.worker_done.get() {
            // waiting or pending: the transaction aborts
            let txn = job.txn.borrow().clone();
            self.txn_abort(&txn);
        }
        Ok(())
    }

    pub fn user_complete(&self, job: &Rc<Job>) -> Result<(), String> {
        Verb::Complete.check(&job.id, job.status())?;
        if job.ctl.cancel_requested() || !job.driver.can_complete() {
            return Err(format!(
                "The active block job '{}' cannot be completed",
                job.id
            ));
        }
        job.ctl.request_complete();
        Ok(())
    }

    pub async fn user_finalize(self: &Rc<Self>, job: &Rc<Job>) -> Result<(), String> {
        Verb::Finalize.check(&job.id, job.status())?;
        let txn = job.txn.borrow().clone();
        self.do_finalize(&txn).await;
        Ok(())
    }

    pub fn user_dismiss(&self, job: &Rc<Job>) -> Result<(), String> {
        Verb::Dismiss.check(&job.id, job.status())?;
        self.do_dismiss(job);
        Ok(())
    }

    /// `block-job-change`: `opts` holds `type` and the type's options.
    pub fn change(
        &self,
        job: &Rc<Job>,
        opts: &serde_json::Map<String, Value>,
    ) -> Result<(), String> {
        Verb::Change.check(&job.id, job.status())?;
        // As QEMU 10, `type` is not compared with the job's: the options of another type
        // read as the mirror's defaults.
        job.driver.change(opts)
    }

    pub fn set_speed(&self, job: &Rc<Job>, speed: i64) -> Result<(), String> {
        Verb::SetSpeed.check(&job.id, job.status())?;
        if speed < 0 {
            return Err("Parameter 'speed' expects a non-negative value".into());
        }
        job.ctl.set_speed(speed as u64);
        Ok(())
    }

    /// Daemon shutdown, in QEMU's order: the drain of every node pauses the jobs that run
    /// (running -> paused, ready -> standby), then each job is cancelled (force: a READY
    /// mirror does not pivot), which resumes it, and it ends (aborting, BLOCK_JOB_CANCELLED,
    /// concluded, null); jobs already concluded are dismissed. Returns once none is left (or
    /// after a few seconds with the stragglers).
    pub async fn cancel_all(self: &Rc<Self>) {
        use std::time::Duration;
        let wait = |me: Rc<Self>, done: fn(&Job) -> bool| async move {
            for _ in 0..1000 {
                if me.list().iter().all(|j| done(j)) {
                    break;
                }
                blockd_aio::sleep(Duration::from_millis(5)).await;
            }
        };
        let mut paused_here = Vec::new();
        for j in self.list() {
            if matches!(j.status(), JobStatus::Running | JobStatus::Ready)
                && !j.user_paused.get()
                && self.user_pause(&j).is_ok()
            {
                paused_here.push(j.id.clone());
            }
        }
        if !paused_here.is_empty() {
            let ids = paused_here.clone();
            let me = self.clone();
            for _ in 0..1000 {
                let all = me.list().iter().filter(|j| ids.contains(&j.id)).all(|j| {
                    !matches!(j.status(), JobStatus::Running | JobStatus::Ready)
                        || j.worker_done.get()
                });
                if all {
                    break;
                }
                blockd_aio::sleep(Duration::from_millis(5)).await;
            }
        }
        for j in self.list() {
            if Verb::Cancel.allowed_in(j.status()) {
                let _ = self.user_cancel(&j, true);
            }
        }
        wait(self.clone(), |j| {
            matches!(j.status(), JobStatus::Concluded | JobStatus::Null)
        })
        .await;
        for j in self.list() {
            if j.status() == JobStatus::Concluded {
                self.do_dismiss(&j);
            }
        }
    }
}
