//! The six dirty-bitmap actions of `transaction` (`block-dirty-bitmap-add|remove|clear|
//! enable|disable|merge`), on `bitmaps.rs`'s split of each command into a prepare that checks
//! and changes, and an undo value that commits or aborts. Nothing here awaits: bitmap
//! actions change in-memory state in the main context.

use blockd_jobs::LocalFuture;
use blockd_qmp::QmpError;
use blockd_qmp::schema::ObjectDef;
use serde_json::{Map, Value};

use crate::bitmaps::{ACTIONS, BitmapUndo};
use crate::transaction::{Action, TxnCtx};

/// The action kinds and their argument types (the commands' own).
pub fn action_args() -> Vec<(&'static str, ObjectDef)> {
    ACTIONS
        .iter()
        .map(|k| (*k, crate::bitmaps::action_args(k)))
        .collect()
}

pub fn make_action(kind: &str, data: &Map<String, Value>) -> Option<Box<dyn Action>> {
    let kind = ACTIONS.iter().find(|k| **k == kind)?;
    Some(Box::new(BitmapAction {
        kind,
        args: data.clone(),
        undo: None,
    }))
}

struct BitmapAction {
    kind: &'static str,
    args: Map<String, Value>,
    undo: Option<BitmapUndo>,
}

impl Action for BitmapAction {
    fn prepare<'a>(&'a mut self, cx: &'a TxnCtx) -> LocalFuture<'a, Result<(), QmpError>> {
        Box::pin(async move {
            self.undo = Some(crate::bitmaps::prepare(&cx.daemon, self.kind, &self.args)?);
            Ok(())
        })
    }

    fn commit<'a>(&'a mut self, cx: &'a TxnCtx) -> LocalFuture<'a, ()> {
        Box::pin(async move {
            if let Some(u) = self.undo.take() {
                u.commit(&cx.daemon);
            }
        })
    }

    fn abort<'a>(&'a mut self, cx: &'a TxnCtx) -> LocalFuture<'a, ()> {
        Box::pin(async move {
            if let Some(u) = self.undo.take() {
                u.abort(&cx.daemon);
            }
        })
    }
}
