//! QMP events: the message with its timestamp, QEMU's one-second rate limit for the events
//! that have one, and a `Send` sink that code on other threads (drivers in iothreads) uses to
//! emit events, which are then delivered by the main context.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::{Rc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use blockd_aio::ContextHandle;
use serde_json::{Map, Value, json};

use crate::server::Server;

/// Events QEMU rate-limits, with the data member that keeps separate limits per source.
const RATE_LIMITED: &[(&str, &str)] = &[
    ("BLOCK_IO_ERROR", "node-name"),
    ("QUORUM_REPORT_BAD", "node-name"),
    ("QUORUM_FAILURE", "reference"),
];
pub const RATE_LIMIT_PERIOD: Duration = Duration::from_secs(1);

/// An event ready to send: name, data and the host time it happened.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub name: String,
    pub data: Option<Value>,
    pub seconds: i64,
    pub microseconds: i64,
}

impl Event {
    pub fn now(name: &str, data: Option<Value>) -> Event {
        let (seconds, microseconds) = match SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(d) => (d.as_secs() as i64, d.subsec_micros() as i64),
            Err(_) => (-1, -1),
        };
        Event {
            name: name.to_string(),
            data,
            seconds,
            microseconds,
        }
    }

    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("event".into(), json!(self.name));
        if let Some(d) = &self.data {
            m.insert("data".into(), d.clone());
        }
        m.insert(
            "timestamp".into(),
            json!({"seconds": self.seconds, "microseconds": self.microseconds}),
        );
        Value::Object(m)
    }
}

/// Per-(event, source) state of the rate limit.
struct Slot {
    /// end of the current period; events before it are held back
    until: Instant,
    /// the latest event held back in this period (sent when the period ends)
    pending: Option<Event>,
}

/// QEMU's rate limiting: the first event of a source goes out at once and opens a one-second
/// period; later events in the period replace each other and the last one goes out when the
/// period ends (which opens the next period).
#[derive(Default)]
pub struct Throttle {
    slots: RefCell<HashMap<(String, String), Slot>>,
}

impl Throttle {
    /// Key of a rate-limited event, `None` for events sent as they come.
    fn key(ev: &Event) -> Option<(String, String)> {
        let (_, member) = RATE_LIMITED.iter().find(|(n, _)| *n == ev.name)?;
        let src = ev
            .data
            .as_ref()
            .and_then(|d| d.get(*member))
            .map(|v| v.to_string())
            .unwrap_or_default();
        Some((ev.name.clone(), src))
    }

    /// Decide for `ev` at `now`: `Ok(ev)` to send now, `Err(Some(deadline))` when a flush must
    /// be scheduled at `deadline`, `Err(None)` when it was merged into a pending one.
    pub fn admit(&self, ev: Event, now: Instant) -> Result<Event, Option<Instant>> {
        let Some(key) = Self::key(&ev) else {
            return Ok(ev);
        };
        let mut slots = self.slots.borrow_mut();
        match slots.get_mut(&key) {
            Some(slot) if now < slot.until => {
                let first_held = slot.pending.is_none();
                slot.pending = Some(ev);
                Err(first_held.then_some(slot.until))
            }
            _ => {
                slots.insert(
                    key,
                    Slot {
                        until: now + RATE_LIMIT_PERIOD,
                        pending: None,
                    },
                );
                Ok(ev)
            }
        }
    }

    /// The period of `key`'s source ended: the held-back event, if any (its sending opens a
    /// new period).
    pub fn period_end(&self, ev_name: &str, src: &str, now: Instant) -> Option<Event> {
        let mut slots = self.slots.borrow_mut();
        let key = (ev_name.to_string(), src.to_string());
        let slot = slots.get_mut(&key)?;
        match slot.pending.take() {
            Some(ev) => {
                slot.until = now + RATE_LIMIT_PERIOD;
                Some(ev)
            }
            None => {
                slots.remove(&key);
                None
            }
        }
    }

    pub(crate) fn source_of(ev: &Event) -> Option<(String, String)> {
        Self::key(ev)
    }
}

thread_local! {
    /// The server of the main context, for events sent from other threads.
    static MAIN_SERVER: RefCell<Weak<Server>> = const { RefCell::new(Weak::new()) };
}

pub(crate) fn set_main_server(s: &Rc<Server>) {
    MAIN_SERVER.with(|m| *m.borrow_mut() = Rc::downgrade(s));
}

/// The sink of the process's QMP server, for code that has no handle on it: a driver that
/// finds an image corrupt (BLOCK_IMAGE_CORRUPTED) or a request failing (BLOCK_IO_ERROR), on
/// any thread. `None` in programs without a monitor (blockd-img, blockd-io).
pub fn global_sink() -> Option<EventSink> {
    GLOBAL_SINK.lock().ok().and_then(|g| g.clone())
}

static GLOBAL_SINK: std::sync::Mutex<Option<EventSink>> = std::sync::Mutex::new(None);

pub(crate) fn set_global_sink(s: EventSink) {
    if let Ok(mut g) = GLOBAL_SINK.lock() {
        *g = Some(s);
    }
}

/// Emit events from any thread; they reach the monitors through the main context.
#[derive(Clone, Debug)]
pub struct EventSink {
    main: ContextHandle,
}

impl EventSink {
    pub(crate) fn new(main: ContextHandle) -> EventSink {
        EventSink { main }
    }

    pub fn emit(&self, name: &str, data: Option<Value>) {
        let ev = Event::now(name, data);
        self.main.schedule_oneshot(move || {
            if let Some(s) = MAIN_SERVER.with(|m| m.borrow().upgrade()) {
                s.emit_event(ev);
            }
        });
    }

    /// BLOCK_IO_ERROR with QEMU's members (rate-limited per node).
    pub fn block_io_error(&self, err: &BlockIoError) {
        self.emit("BLOCK_IO_ERROR", Some(err.to_json()));
    }

    /// BLOCK_IMAGE_CORRUPTED with QEMU's members.
    pub fn image_corrupted(&self, c: &ImageCorrupted) {
        self.emit("BLOCK_IMAGE_CORRUPTED", Some(c.to_json()));
    }
}

/// The data of BLOCK_IO_ERROR.
#[derive(Debug, Clone)]
pub struct BlockIoError {
    pub qom_path: String,
    pub device: String,
    pub node_name: Option<String>,
    /// "read" or "write"
    pub operation: &'static str,
    /// "ignore", "report" or "stop"
    pub action: &'static str,
    pub nospace: bool,
    pub reason: String,
}

impl BlockIoError {
    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "qom-path": self.qom_path, "device": self.device, "operation": self.operation,
            "action": self.action, "nospace": self.nospace, "reason": self.reason,
        });
        if let Some(n) = &self.node_name {
            v["node-name"] = json!(n);
        }
        v
    }
}

/// The data of BLOCK_IMAGE_CORRUPTED.
#[derive(Debug, Clone)]
pub struct ImageCorrupted {
    pub device: String,
    pub node_name: Option<String>,
    pub msg: String,
    pub offset: Option<i64>,
    pub size: Option<i64>,
    pub fatal: bool,
}

impl ImageCorrupted {
    pub fn to_json(&self) -> Value {
        let mut v = json!({"device": self.device, "msg": self.msg, "fatal": self.fatal});
        if let Some(n) = &self.node_name {
            v["node-name"] = json!(n);
        }
        if let Some(o) = self.offset {
            v["offset"] = json!(o);
        }
        if let Some(s) = self.size {
            v["size"] = json!(s);
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io_err(node: &str, n: u64) -> Event {
        Event::now(
            "BLOCK_IO_ERROR",
            Some(json!({"node-name": node, "reason": n.to_string()})),
        )
    }

    #[test]
    fn rate_limit_per_source() {
        let t = Throttle::default();
        let t0 = Instant::now();
        assert!(t.admit(io_err("a", 1), t0).is_ok());
        // another source is independent
        assert!(t.admit(io_err("b", 1), t0).is_ok());
        // held back: the first held one asks for a flush at the end of the period
        assert_eq!(
            t.admit(io_err("a", 2), t0).unwrap_err(),
            Some(t0 + RATE_LIMIT_PERIOD)
        );
        assert_eq!(t.admit(io_err("a", 3), t0).unwrap_err(), None);
        let src = Throttle::source_of(&io_err("a", 0)).unwrap().1;
        let t1 = t0 + RATE_LIMIT_PERIOD;
        let out = t.period_end("BLOCK_IO_ERROR", &src, t1).unwrap();
        assert_eq!(out.data.unwrap()["reason"], "3");
        // a quiet period ends the limit
        assert!(
            t.period_end("BLOCK_IO_ERROR", &src, t1 + RATE_LIMIT_PERIOD)
                .is_none()
        );
        assert!(t.admit(io_err("a", 4), t1 + RATE_LIMIT_PERIOD * 2).is_ok());
        // events without a limit pass
        assert!(t.admit(Event::now("SHUTDOWN", None), t0).is_ok());
    }
}
