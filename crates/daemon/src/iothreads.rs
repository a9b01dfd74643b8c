//! `iothread` objects: `--object iothread,...`, `object-add`/`object-del`, `query-iothreads`.

use std::collections::BTreeMap;

use blockd_aio::{ContextHandle, IoThread, PollParams};
use serde_json::{Map, Value, json};

pub struct IoThreadObj {
    thread: IoThread,
    params: PollParams,
    aio_max_batch: u64,
}

#[derive(Default)]
pub struct IoThreads {
    threads: BTreeMap<String, IoThreadObj>,
}

/// An integer property given as a JSON number or (dotted command line) a string.
fn int_prop(m: &mut Map<String, Value>, key: &str) -> Result<Option<u64>, String> {
    match m.remove(key) {
        None => Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .map(Some)
            .ok_or_else(|| format!("Parameter '{key}' expects uint64")),
        Some(Value::String(s)) => s
            .parse::<u64>()
            .map(Some)
            .map_err(|_| format!("Parameter '{key}' expects uint64")),
        Some(_) => Err(format!(
            "Invalid parameter type for '{key}', expected: integer"
        )),
    }
}

/// Check an object id as QEMU does.
fn check_id(id: &str) -> Result<(), String> {
    let ok = id.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c));
    if ok {
        Ok(())
    } else {
        Err("Parameter 'id' expects an identifier".to_string())
    }
}

impl IoThreads {
    /// `object-add` / `--object` with the options as a map (`qom-type` included).
    pub fn add(&mut self, mut m: Map<String, Value>) -> Result<(), String> {
        let qom_type = match m.remove("qom-type") {
            Some(Value::String(s)) => s,
            Some(_) => return Err("Invalid parameter type for 'qom-type', expected: string".into()),
            None => return Err("Parameter 'qom-type' is missing".into()),
        };
        if qom_type != "iothread" {
            return Err(format!(
                "Parameter 'qom-type' does not accept value '{qom_type}'"
            ));
        }
        let id = match m.remove("id") {
            Some(Value::String(s)) => s,
            Some(_) => return Err("Invalid parameter type for 'id', expected: string".into()),
            None => return Err("Parameter 'id' is missing".into()),
        };
        check_id(&id)?;
        let defaults = PollParams::iothread_default();
        let params = PollParams {
            max_ns: int_prop(&mut m, "poll-max-ns")?.unwrap_or(defaults.max_ns),
            grow: int_prop(&mut m, "poll-grow")?.unwrap_or(defaults.grow),
            shrink: int_prop(&mut m, "poll-shrink")?.unwrap_or(defaults.shrink),
        };
        // QEMU's batching limit for Linux AIO submissions; blockd's engines submit a whole
        // turn's requests at once, so only the default (0) is accepted.
        let aio_max_batch = int_prop(&mut m, "aio-max-batch")?.unwrap_or(0);
        if aio_max_batch != 0 {
            return Err("aio-max-batch other than 0 is not supported by blockd yet".into());
        }
        if let Some(k) = m.keys().next() {
            return Err(format!("Parameter '{k}' is unexpected"));
        }
        if self.threads.contains_key(&id) {
            return Err(format!(
                "attempt to add duplicate property '{id}' to object (type 'container')"
            ));
        }
        let thread = IoThread::spawn(&id, params)
            .map_err(|e| format!("Failed to create iothread '{id}': {e}"))?;
        self.threads.insert(
            id,
            IoThreadObj {
                thread,
                params,
                aio_max_batch,
            },
        );
        Ok(())
    }

    pub fn handle(&self, id: &str) -> Option<ContextHandle> {
        self.threads.get(id).map(|t| t.thread.handle().clone())
    }

    pub fn contains(&self, id: &str) -> bool {
        self.threads.contains_key(id)
    }

    /// Remove an iothread; the caller has checked it is unused. The thread is stopped by the
    /// returned value's `stop_async`.
    pub fn remove(&mut self, id: &str) -> Option<IoThread> {
        self.threads.remove(id).map(|t| t.thread)
    }

    pub fn take_all(&mut self) -> Vec<IoThread> {
        std::mem::take(&mut self.threads)
            .into_values()
            .map(|t| t.thread)
            .collect()
    }

    /// What `query-iothreads` needs, without the thread ids (those are awaited).
    pub fn list(&self) -> Vec<(String, ContextHandle, PollParams, u64)> {
        self.threads
            .iter()
            .map(|(id, t)| {
                (
                    id.clone(),
                    t.thread.handle().clone(),
                    t.params,
                    t.aio_max_batch,
                )
            })
            .collect()
    }
}

/// One `query-iothreads` entry.
pub async fn info(id: String, h: ContextHandle, p: PollParams, batch: u64) -> Value {
    // SAFETY: gettid has no preconditions.
    let tid = h
        .call(|| unsafe { libc::gettid() } as i64)
        .await
        .unwrap_or(-1);
    json!({
        "id": id, "thread-id": tid, "poll-max-ns": p.max_ns, "poll-grow": p.grow,
        "poll-shrink": p.shrink, "aio-max-batch": batch,
    })
}
