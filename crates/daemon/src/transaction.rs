//! QMP `transaction`: several block operations that happen all together or not at all.
//!
//! Each action goes through QEMU's phases: `prepare` (everything that can fail, the graph
//! change included, inside a drained section of the nodes it touches that lasts until `clean`),
//! then, once every action prepared, `commit` of all; on the first failure `abort` of every
//! action prepared so far (the failing one included, which undoes whatever part it did), in
//! reverse order; `clean` of all at the end either way. Everything runs on the main context;
//! the graph is borrowed only for synchronous steps and no drain is awaited while a borrow or
//! any lock is held (DESIGN.md rules 4 and 6). A standalone command such as
//! `blockdev-snapshot-sync` is a transaction of one action, as in QEMU.
//!
//! `properties.completion-mode=grouped` ties the jobs the actions start (backups) into one
//! job transaction (`blockd_jobs::Txn`): they finalize or abort together. QEMU refuses it when
//! any other kind of action is part of the transaction.

use std::rc::Rc;

use blockd_jobs::{LocalFuture, Txn};
use blockd_qmp::QmpError;
use blockd_qmp::schema::{ObjectDef, Type, Union, member, optional};
use serde_json::{Map, Value, json};

use crate::state::Daemon;

/// What the actions of one transaction share.
pub struct TxnCtx {
    pub daemon: Rc<Daemon>,
    /// The job transaction of `completion-mode=grouped` (`None`: each job on its own).
    pub job_txn: Option<Rc<Txn>>,
}

/// One action of a transaction (QEMU's TransactionActionDrv).
pub trait Action {
    /// Check and do everything that can fail; what was done is undone by `abort`.
    fn prepare<'a>(&'a mut self, cx: &'a TxnCtx) -> LocalFuture<'a, Result<(), QmpError>>;
    /// Every action prepared: make it final (cannot fail).
    fn commit<'a>(&'a mut self, _cx: &'a TxnCtx) -> LocalFuture<'a, ()> {
        Box::pin(async {})
    }
    /// Undo what `prepare` did (also the part of a failed prepare).
    fn abort<'a>(&'a mut self, _cx: &'a TxnCtx) -> LocalFuture<'a, ()> {
        Box::pin(async {})
    }
    /// At the end, after commit or abort: release drained sections and references.
    fn clean(&mut self, _cx: &TxnCtx) {}
}

/// The `abort` action: always fails (tests of the rollback).
struct AbortAction;

impl Action for AbortAction {
    fn prepare<'a>(&'a mut self, _cx: &'a TxnCtx) -> LocalFuture<'a, Result<(), QmpError>> {
        Box::pin(async { Err(QmpError::generic("Transaction aborted using Abort action")) })
    }
}

/// The kinds of action, in QEMU 10.0's TransactionActionKind order.
const KINDS: &[&str] = &[
    "abort",
    "block-dirty-bitmap-add",
    "block-dirty-bitmap-remove",
    "block-dirty-bitmap-clear",
    "block-dirty-bitmap-enable",
    "block-dirty-bitmap-disable",
    "block-dirty-bitmap-merge",
    "blockdev-backup",
    "blockdev-snapshot",
    "blockdev-snapshot-internal-sync",
    "blockdev-snapshot-sync",
    "drive-backup",
];

/// The action kinds blockd implements, with their argument types (the same as the standalone
/// commands'), so the monitor checks `data` before anything runs.
fn action_args() -> Vec<(&'static str, ObjectDef)> {
    let mut v = vec![("abort", ObjectDef::default())];
    v.extend(crate::snapshot::action_args());
    v.extend(crate::backup::action_args());
    v.extend(crate::bitmaps_txn::action_args());
    v
}

/// Build the action of `kind` from its arguments.
fn make_action(kind: &str, data: Map<String, Value>) -> Result<Box<dyn Action>, QmpError> {
    if kind == "abort" {
        return Ok(Box::new(AbortAction));
    }
    if let Some(a) = crate::snapshot::make_action(kind, &data) {
        return Ok(a);
    }
    if let Some(a) = crate::backup::make_action(kind, &data) {
        return Ok(a);
    }
    if let Some(a) = crate::bitmaps_txn::make_action(kind, &data) {
        return Ok(a);
    }
    Err(QmpError::generic(format!(
        "Transaction action '{kind}' is not supported by blockd yet"
    )))
}

thread_local! {
    /// A transaction is running (main context only).
    static RUNNING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    static TURN: event_listener::Event = const { event_listener::Event::new() };
}

/// One transaction at a time, as in QEMU, where `transaction` does not yield to other
/// commands: two monitors cannot interleave the phases of theirs on the same nodes. Nothing a
/// transaction waits for (drains wait for I/O requests, file creation for the thread pool)
/// needs the turn, so waiting for it cannot deadlock.
struct Turn;

impl Turn {
    async fn take() -> Turn {
        loop {
            if !RUNNING.with(|r| r.replace(true)) {
                return Turn;
            }
            let l = TURN.with(|t| t.listen());
            if !RUNNING.with(|r| r.get()) {
                continue;
            }
            l.await;
        }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        RUNNING.with(|r| r.set(false));
        TURN.with(|t| t.notify(1));
    }
}

/// Run `actions` as one transaction.
pub async fn run(cx: &TxnCtx, actions: Vec<Box<dyn Action>>) -> Result<(), QmpError> {
    let _turn = Turn::take().await;
    let mut prepared: Vec<Box<dyn Action>> = Vec::new();
    let mut failure = None;
    for mut a in actions {
        let r = a.prepare(cx).await;
        // the failing action takes part in the abort (it undoes its own partial work)
        prepared.push(a);
        if let Err(e) = r {
            failure = Some(e);
            break;
        }
    }
    match &failure {
        None => {
            for a in prepared.iter_mut().rev() {
                a.commit(cx).await;
            }
        }
        Some(_) => {
            for a in prepared.iter_mut().rev() {
                a.abort(cx).await;
            }
        }
    }
    for a in prepared.iter_mut().rev() {
        a.clean(cx);
    }
    cx.daemon.prune();
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// A standalone command: a transaction of one action (QEMU's `blockdev_do_action`).
pub async fn run_one(d: &Rc<Daemon>, action: Box<dyn Action>) -> Result<Value, QmpError> {
    let cx = TxnCtx {
        daemon: d.clone(),
        job_txn: None,
    };
    run(&cx, vec![action]).await.map(|_| json!({}))
}

/// The `transaction` command.
async fn transaction(d: Rc<Daemon>, args: Map<String, Value>) -> Result<Value, QmpError> {
    let grouped = args
        .get("properties")
        .and_then(|p| p.get("completion-mode"))
        .and_then(Value::as_str)
        == Some("grouped");
    let list = match args.get("actions") {
        Some(Value::Array(a)) => a.clone(),
        _ => Vec::new(),
    };
    let mut kinds_and_data = Vec::new();
    for item in list {
        let kind = item
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let data = match item.get("data") {
            Some(Value::Object(m)) => m.clone(),
            _ => Map::new(),
        };
        kinds_and_data.push((kind, data));
    }
    if grouped {
        // only backups start jobs that can be grouped
        if let Some((k, _)) = kinds_and_data
            .iter()
            .find(|(k, _)| k != "blockdev-backup" && k != "drive-backup")
        {
            return Err(QmpError::generic(format!(
                "Action '{k}' does not support transaction property completion-mode = grouped"
            )));
        }
    }
    let mut actions = Vec::new();
    for (kind, data) in kinds_and_data {
        actions.push(make_action(&kind, data)?);
    }
    let cx = TxnCtx {
        daemon: d,
        job_txn: grouped.then(Txn::new),
    };
    run(&cx, actions).await.map(|_| json!({}))
}

/// The `transaction` argument type: `actions` (a union on `type` whose variants carry `data`)
/// and `properties`.
fn transaction_args() -> ObjectDef {
    let variants = action_args()
        .into_iter()
        .map(|(kind, def)| {
            (
                kind.to_string(),
                Rc::new(ObjectDef {
                    members: vec![member("data", Type::Object(Rc::new(def)))],
                    ..Default::default()
                }),
            )
        })
        .collect();
    let implemented: Vec<&str> = action_args().iter().map(|(k, _)| *k).collect();
    let kinds: Vec<&str> = KINDS
        .iter()
        .copied()
        .filter(|k| implemented.contains(k))
        .collect();
    let action = ObjectDef {
        members: vec![member("type", Type::enumeration(&kinds))],
        union: Some(Union {
            tag: "type".into(),
            variants,
        }),
        open: false,
    };
    ObjectDef {
        members: vec![
            member("actions", Type::array(Type::Object(Rc::new(action)))),
            optional(
                "properties",
                Type::object(vec![optional(
                    "completion-mode",
                    Type::enumeration(&["individual", "grouped"]),
                )]),
            ),
        ],
        ..Default::default()
    }
}

/// Register `transaction` and the standalone commands of the actions.
pub fn register(server: &Rc<blockd_qmp::Server>, d: &Rc<Daemon>) {
    let dd = d.clone();
    server.register(
        "transaction",
        transaction_args(),
        Type::object(vec![]),
        move |a| Box::pin(transaction(dd.clone(), a)),
    );
    crate::snapshot::register(server, d);
    crate::backup::register(server, d);
}
