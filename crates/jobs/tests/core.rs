//! The job core driven by test workers on a main context: event sequences of each path
//! (success, cancel in each phase, pause/resume, READY + complete, auto-finalize/-dismiss off,
//! error policies, transactions) and the verb refusals.

use std::cell::RefCell;
use std::io;
use std::rc::Rc;
use std::time::{Duration, Instant};

use blockd_jobs::{
    ErrorAction, JobCtx, JobDriver, JobManager, JobSpec, JobStatus, OnError, Txn, Worker,
};
use serde_json::Value;

type Log = Rc<RefCell<Vec<String>>>;

fn manager() -> (Rc<JobManager>, Log) {
    let log: Log = Rc::new(RefCell::new(Vec::new()));
    let l = log.clone();
    let m = JobManager::new(Box::new(move |name, data: Value| {
        let s = match name {
            "JOB_STATUS_CHANGE" => data["status"].as_str().unwrap().to_string(),
            "BLOCK_JOB_COMPLETED" if data.get("error").is_some() => {
                format!("COMPLETED({})", data["error"].as_str().unwrap())
            }
            "BLOCK_JOB_ERROR" => format!("ERROR({})", data["action"].as_str().unwrap()),
            other => other.trim_start_matches("BLOCK_JOB_").to_string(),
        };
        l.borrow_mut().push(format!(
            "{}:{s}",
            data.get("id")
                .or(data.get("device"))
                .unwrap()
                .as_str()
                .unwrap()
        ));
    }));
    (m, log)
}

struct TestDriver {
    ready: bool,
    prepare_fails: bool,
    log: Log,
}

impl JobDriver for TestDriver {
    fn job_type(&self) -> &'static str {
        "stream"
    }
    fn can_complete(&self) -> bool {
        self.ready
    }
    fn prepare(&self) -> blockd_jobs::LocalFuture<'_, Result<(), String>> {
        let fail = self.prepare_fails;
        Box::pin(async move {
            if fail {
                Err("prepare failed".to_string())
            } else {
                Ok(())
            }
        })
    }
    fn commit(&self) {
        self.log.borrow_mut().push("commit".into());
    }
    fn abort(&self) {
        self.log.borrow_mut().push("abort".into());
    }
}

/// A worker doing `steps` steps of 1 ms with pause points; READY after the steps when `ready`
/// (then waits for complete/cancel); fails at step `fail_at` with the policy `on_error`.
fn worker(steps: u64, ready: bool, fail_at: Option<u64>, on_error: OnError) -> Worker {
    Box::new(move |ctx: JobCtx| {
        Box::pin(async move {
            ctx.set_total(steps);
            let mut failed_once = false;
            let mut i = 0;
            while i < steps {
                if ctx.is_cancelled() {
                    return Ok(());
                }
                if Some(i) == fail_at && !failed_once {
                    failed_once = true;
                    let e = io::Error::from_raw_os_error(libc::EIO);
                    match ctx.error_action(on_error, true, &e) {
                        ErrorAction::Report => return Err("Input/output error".into()),
                        ErrorAction::Ignore => {}
                        ErrorAction::Stop => {
                            ctx.pause_point().await;
                            continue;
                        }
                    }
                }
                ctx.add_progress(1);
                ctx.rate_limit(1).await;
                ctx.sleep(Duration::from_millis(1)).await;
                i += 1;
            }
            if ready {
                ctx.set_ready();
                ctx.wait_for_request(Duration::from_millis(5)).await;
            }
            Ok(())
        })
    })
}

struct Opts {
    steps: u64,
    ready: bool,
    fail_at: Option<u64>,
    on_error: OnError,
    auto_finalize: bool,
    auto_dismiss: bool,
    prepare_fails: bool,
    speed: u64,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            steps: 20,
            ready: false,
            fail_at: None,
            on_error: OnError::Report,
            auto_finalize: true,
            auto_dismiss: true,
            prepare_fails: false,
            speed: 0,
        }
    }
}

fn make(
    m: &Rc<JobManager>,
    log: &Log,
    id: &str,
    o: Opts,
    txn: Option<Rc<Txn>>,
) -> Rc<blockd_jobs::Job> {
    m.create(
        JobSpec {
            id: id.into(),
            driver: Rc::new(TestDriver {
                ready: o.ready,
                prepare_fails: o.prepare_fails,
                log: log.clone(),
            }),
            worker: worker(o.steps, o.ready, o.fail_at, o.on_error),
            context: None,
            speed: o.speed,
            auto_finalize: o.auto_finalize,
            auto_dismiss: o.auto_dismiss,
            block_job: true,
        },
        txn,
    )
    .unwrap()
}

async fn wait_for(what: impl Fn() -> bool) {
    let t = Instant::now();
    while !what() {
        assert!(t.elapsed() < Duration::from_secs(10), "timed out");
        blockd_aio::sleep(Duration::from_millis(1)).await;
    }
}

fn run(f: impl AsyncFnOnce()) {
    blockd_aio::block_on(f()).unwrap();
}

fn seq(log: &Log) -> String {
    log.borrow().join(" ")
}

#[test]
fn success_events() {
    run(async || {
        let (m, log) = manager();
        let j = make(&m, &log, "j", Opts::default(), None);
        m.start(&j);
        wait_for(|| m.get("j").is_none()).await;
        assert_eq!(
            seq(&log),
            "j:created j:running j:waiting j:pending commit j:COMPLETED j:concluded j:null"
        );
        assert_eq!(j.progress(), (20, 20));
    });
}

#[test]
fn pause_resume_and_cancel_paused() {
    run(async || {
        let (m, log) = manager();
        let j = make(
            &m,
            &log,
            "j",
            Opts {
                steps: 100_000,
                ..Opts::default()
            },
            None,
        );
        m.start(&j);
        m.user_pause(&j).unwrap();
        assert_eq!(m.user_pause(&j).unwrap_err(), "Job is already paused");
        wait_for(|| j.status() == JobStatus::Paused).await;
        let p = j.progress().0;
        blockd_aio::sleep(Duration::from_millis(20)).await;
        assert_eq!(j.progress().0, p, "a paused job makes no progress");
        assert_eq!(j.block_info()["paused"], true);
        m.user_resume(&j).unwrap();
        assert_eq!(
            m.user_resume(&j).unwrap_err(),
            "Can't resume a job that was not paused"
        );
        wait_for(|| j.status() == JobStatus::Running).await;
        m.user_pause(&j).unwrap();
        wait_for(|| j.status() == JobStatus::Paused).await;
        m.user_cancel(&j, true).unwrap();
        wait_for(|| m.get("j").is_none()).await;
        assert_eq!(
            seq(&log),
            "j:created j:running j:paused j:running j:paused j:running j:aborting abort j:CANCELLED j:concluded j:null"
        );
        assert_eq!(j.error().as_deref(), Some("Operation canceled"));
    });
}

#[test]
fn ready_complete_and_verbs() {
    run(async || {
        let (m, log) = manager();
        let j = make(
            &m,
            &log,
            "j",
            Opts {
                ready: true,
                ..Opts::default()
            },
            None,
        );
        assert_eq!(
            m.user_complete(&j).unwrap_err(),
            "Job 'j' in state 'created' cannot accept command verb 'complete'"
        );
        m.start(&j);
        wait_for(|| j.status() == JobStatus::Ready).await;
        m.user_pause(&j).unwrap();
        wait_for(|| j.status() == JobStatus::Standby).await;
        m.user_resume(&j).unwrap();
        wait_for(|| j.status() == JobStatus::Ready).await;
        m.user_complete(&j).unwrap();
        wait_for(|| m.get("j").is_none()).await;
        assert_eq!(
            seq(&log),
            "j:created j:running j:ready j:READY j:standby j:ready j:waiting j:pending commit j:COMPLETED j:concluded j:null"
        );
    });
}

#[test]
fn complete_refused_without_ready() {
    run(async || {
        let (m, log) = manager();
        let j = make(
            &m,
            &log,
            "j",
            Opts {
                steps: 100_000,
                ..Opts::default()
            },
            None,
        );
        m.start(&j);
        assert_eq!(
            m.user_complete(&j).unwrap_err(),
            "Job 'j' in state 'running' cannot accept command verb 'complete'"
        );
        assert_eq!(
            m.user_finalize(&j).await.unwrap_err(),
            "Job 'j' in state 'running' cannot accept command verb 'finalize'"
        );
        assert_eq!(
            m.user_dismiss(&j).unwrap_err(),
            "Job 'j' in state 'running' cannot accept command verb 'dismiss'"
        );
        assert_eq!(
            m.set_speed(&j, -1).unwrap_err(),
            "Parameter 'speed' expects a non-negative value"
        );
        assert_eq!(
            m.check_new_id("j").unwrap_err(),
            "Job ID 'j' already in use"
        );
        assert_eq!(m.check_new_id("1x").unwrap_err(), "Invalid job ID '1x'");
        m.user_cancel(&j, true).unwrap();
        wait_for(|| m.get("j").is_none()).await;
    });
}

#[test]
fn manual_finalize_and_dismiss() {
    run(async || {
        let (m, log) = manager();
        let o = Opts {
            auto_finalize: false,
            auto_dismiss: false,
            ..Opts::default()
        };
        let j = make(&m, &log, "j", o, None);
        m.start(&j);
        wait_for(|| j.status() == JobStatus::Pending).await;
        blockd_aio::sleep(Duration::from_millis(10)).await;
        assert_eq!(j.status(), JobStatus::Pending);
        m.user_finalize(&j).await.unwrap();
        assert_eq!(j.status(), JobStatus::Concluded);
        assert_eq!(
            m.user_cancel(&j, true).unwrap_err(),
            "Job 'j' in state 'concluded' cannot accept command verb 'cancel'"
        );
        m.user_dismiss(&j).unwrap();
        assert!(m.get("j").is_none());
        assert_eq!(
            seq(&log),
            "j:created j:running j:waiting j:pending j:PENDING commit j:COMPLETED j:concluded j:null"
        );
    });
}

#[test]
fn cancel_pending() {
    run(async || {
        let (m, log) = manager();
        let o = Opts {
            auto_finalize: false,
            ..Opts::default()
        };
        let j = make(&m, &log, "j", o, None);
        m.start(&j);
        wait_for(|| j.status() == JobStatus::Pending).await;
        m.user_cancel(&j, true).unwrap();
        wait_for(|| m.get("j").is_none()).await;
        assert_eq!(
            seq(&log),
            "j:created j:running j:waiting j:pending j:PENDING j:aborting abort j:CANCELLED j:concluded j:null"
        );
    });
}

#[test]
fn cancel_created() {
    run(async || {
        let (m, log) = manager();
        let j = make(&m, &log, "j", Opts::default(), None);
        m.user_cancel(&j, true).unwrap();
        wait_for(|| m.get("j").is_none()).await;
        // never started: no BLOCK_JOB_CANCELLED
        assert_eq!(seq(&log), "j:created j:aborting abort j:concluded j:null");
    });
}

#[test]
fn error_policies() {
    run(async || {
        let (m, log) = manager();
        let j = make(
            &m,
            &log,
            "r",
            Opts {
                fail_at: Some(3),
                ..Opts::default()
            },
            None,
        );
        m.start(&j);
        wait_for(|| m.get("r").is_none()).await;
        assert_eq!(
            seq(&log),
            "r:created r:running r:ERROR(report) r:aborting abort r:COMPLETED(Input/output error) r:concluded r:null"
        );

        log.borrow_mut().clear();
        let j = make(
            &m,
            &log,
            "i",
            Opts {
                fail_at: Some(3),
                on_error: OnError::Ignore,
                ..Opts::default()
            },
            None,
        );
        m.start(&j);
        wait_for(|| m.get("i").is_none()).await;
        assert!(
            seq(&log).contains("i:ERROR(ignore) i:waiting"),
            "{}",
            seq(&log)
        );

        log.borrow_mut().clear();
        let j = make(
            &m,
            &log,
            "s",
            Opts {
                fail_at: Some(3),
                on_error: OnError::Stop,
                ..Opts::default()
            },
            None,
        );
        m.start(&j);
        wait_for(|| j.status() == JobStatus::Paused).await;
        assert_eq!(j.block_info()["io-status"], "failed");
        m.user_resume(&j).unwrap();
        wait_for(|| m.get("s").is_none()).await;
        assert_eq!(
            seq(&log),
            "s:created s:running s:ERROR(stop) s:paused s:running s:waiting s:pending commit s:COMPLETED s:concluded s:null"
        );
        assert_eq!(j.progress(), (20, 20));
    });
}

#[test]
fn txn_waits_for_all_then_commits() {
    run(async || {
        let (m, log) = manager();
        let t = Txn::new();
        let a = make(
            &m,
            &log,
            "a",
            Opts {
                steps: 2,
                ..Opts::default()
            },
            Some(t.clone()),
        );
        let b = make(
            &m,
            &log,
            "b",
            Opts {
                steps: 40,
                ..Opts::default()
            },
            Some(t),
        );
        m.start(&a);
        m.start(&b);
        wait_for(|| m.list().is_empty()).await;
        let s = seq(&log);
        // a waits for b; then both pending, both finalize
        let ia = s.find("a:waiting").unwrap();
        let ib = s.find("b:waiting").unwrap();
        let pa = s.find("a:pending").unwrap();
        assert!(ia < ib && ib < pa, "{s}");
        assert_eq!(s.matches("commit").count(), 2, "{s}");
    });
}

#[test]
fn txn_failure_aborts_all() {
    run(async || {
        let (m, log) = manager();
        let t = Txn::new();
        let a = make(
            &m,
            &log,
            "a",
            Opts {
                steps: 2,
                ..Opts::default()
            },
            Some(t.clone()),
        );
        let b = make(
            &m,
            &log,
            "b",
            Opts {
                steps: 100_000,
                fail_at: None,
                ..Opts::default()
            },
            Some(t.clone()),
        );
        let c = make(
            &m,
            &log,
            "c",
            Opts {
                steps: 10,
                fail_at: Some(5),
                ..Opts::default()
            },
            Some(t),
        );
        m.start(&a);
        m.start(&b);
        m.start(&c);
        wait_for(|| m.list().is_empty()).await;
        let s = seq(&log);
        assert!(!s.contains("commit"), "{s}");
        assert_eq!(s.matches(" abort ").count(), 3, "{s}");
        assert!(s.contains("a:waiting"), "{s}");
        assert!(
            s.contains("a:aborting") && s.contains("b:aborting") && s.contains("c:aborting"),
            "{s}"
        );
        assert!(
            s.contains("a:CANCELLED") && s.contains("b:CANCELLED"),
            "{s}"
        );
        assert!(s.contains("c:COMPLETED(Input/output error)"), "{s}");
    });
}

#[test]
fn prepare_failure_aborts() {
    run(async || {
        let (m, log) = manager();
        let j = make(
            &m,
            &log,
            "j",
            Opts {
                prepare_fails: true,
                ..Opts::default()
            },
            None,
        );
        m.start(&j);
        wait_for(|| m.get("j").is_none()).await;
        assert_eq!(
            seq(&log),
            "j:created j:running j:waiting j:pending j:aborting abort j:COMPLETED(prepare failed) j:concluded j:null"
        );
    });
}

#[test]
fn speed_limits_the_rate() {
    run(async || {
        let (m, log) = manager();
        // 20 steps of 1 "byte" at 100 B/s: the quota is 10 per 100 ms slice, so at least
        // ~100 ms; unlimited it is about 20 ms.
        let j = make(
            &m,
            &log,
            "j",
            Opts {
                speed: 100,
                ..Opts::default()
            },
            None,
        );
        let t = Instant::now();
        m.start(&j);
        wait_for(|| m.get("j").is_none()).await;
        assert!(
            t.elapsed() >= Duration::from_millis(100),
            "{:?}",
            t.elapsed()
        );
        // set-speed on the fly
        let j = make(
            &m,
            &log,
            "k",
            Opts {
                steps: 1000,
                speed: 10,
                ..Opts::default()
            },
            None,
        );
        m.start(&j);
        blockd_aio::sleep(Duration::from_millis(150)).await;
        assert!(j.progress().0 < 10, "{:?}", j.progress());
        m.set_speed(&j, 0).unwrap();
        assert_eq!(j.speed(), 0);
        wait_for(|| m.get("k").is_none()).await;
    });
}
