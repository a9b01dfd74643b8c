//! The QMP server: a command table, the monitors connected to it, and event delivery.
//!
//! Everything here runs on the main context. Each monitor is three tasks sharing one
//! `Monitor`: a reader (socket → JSON streamer → request queue), a worker (runs the queued
//! requests one at a time, so the replies of a monitor come in request order, as QEMU's do
//! without `oob`) and a writer (output queue → socket). Handlers are async: while one
//! monitor's worker awaits a slow command, other monitors' workers, event delivery and the
//! writers go on.
//!
//! Flow control: the reader stops reading while [`QUEUE_MAX`] requests are queued, and the
//! worker starts no new command while more than [`OUT_MAX`] bytes wait to be sent, so a client
//! that floods commands or never reads its replies costs bounded memory.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::os::fd::{AsRawFd, OwnedFd};
use std::pin::Pin;
use std::rc::{Rc, Weak};
use std::time::Instant;

use blockd_aio::{IoBuf, ops};
use event_listener::Event as Notify;
use serde_json::{Map, Value, json};

use crate::error::QmpError;
use crate::events::{Event, EventSink, Throttle};
use crate::schema::{self, Introspector, ObjectDef, Type};
use crate::streamer::{Item, Streamer};
use crate::writer;

/// Requests queued per monitor before the reader stops reading (QEMU's queue length).
pub const QUEUE_MAX: usize = 8;
/// Unsent output per monitor above which no new command starts.
pub const OUT_MAX: usize = 4 << 20;
const RECV_SIZE: usize = 64 << 10;
const SEND_CHUNK: usize = 1 << 20;

pub type HandlerFuture = Pin<Box<dyn Future<Output = Result<Value, QmpError>>>>;
pub type Handler = Rc<dyn Fn(Map<String, Value>) -> HandlerFuture>;

/// A command of the table.
pub struct CommandDef {
    pub args: Rc<ObjectDef>,
    pub ret: Type,
    handler: Option<Handler>,
}

pub struct Server {
    version: Value,
    commands: RefCell<BTreeMap<String, CommandDef>>,
    events: RefCell<Vec<(String, ObjectDef)>>,
    monitors: RefCell<Vec<Weak<Monitor>>>,
    throttle: Throttle,
    next_monitor: Cell<u64>,
    main: blockd_aio::ContextHandle,
}

struct Monitor {
    id: u64,
    fd: OwnedFd,
    pretty: bool,
    command_mode: Cell<bool>,
    /// the peer closed its side: finish the queue, then close
    eof: Cell<bool>,
    /// nothing more is read, run or sent
    closed: Cell<bool>,
    requests: RefCell<VecDeque<Item>>,
    requests_changed: Notify,
    out: RefCell<Vec<u8>>,
    out_changed: Notify,
    out_sent: Notify,
}

impl Monitor {
    fn push_out(&self, v: &Value) {
        if self.closed.get() {
            return;
        }
        self.out
            .borrow_mut()
            .extend_from_slice(&writer::message(v, self.pretty));
        self.out_changed.notify(usize::MAX);
    }

    fn close(&self) {
        self.closed.set(true);
        self.requests_changed.notify(usize::MAX);
        self.out_changed.notify(usize::MAX);
        self.out_sent.notify(usize::MAX);
    }

    /// Wait until `ready()` holds, re-checking whenever `ev` fires.
    async fn wait(&self, ev: &Notify, ready: impl Fn() -> bool) {
        loop {
            if ready() {
                return;
            }
            let l = ev.listen();
            if ready() {
                return;
            }
            l.await;
        }
    }
}

fn reply(id: Option<Value>, r: Result<Value, QmpError>) -> Value {
    let mut m = Map::new();
    match r {
        Ok(v) => m.insert("return".into(), v),
        Err(e) => m.insert("error".into(), e.to_json()),
    };
    if let Some(id) = id {
        m.insert("id".into(), id);
    }
    Value::Object(m)
}

impl Server {
    /// A server on the calling thread's context (the main context). `version` is the
    /// `query-version` object, also sent in the greeting.
    pub fn new(version: Value) -> Rc<Server> {
        let ctx = blockd_aio::AioContext::current_or_new().expect("an event loop for QMP");
        let s = Rc::new(Server {
            version,
            commands: RefCell::new(BTreeMap::new()),
            events: RefCell::new(Vec::new()),
            monitors: RefCell::new(Vec::new()),
            throttle: Throttle::default(),
            next_monitor: Cell::new(1),
            main: ctx.handle(),
        });
        crate::events::set_main_server(&s);
        crate::events::set_global_sink(s.event_sink());
        s.add_builtins();
        s
    }

    fn add_builtins(self: &Rc<Self>) {
        // qmp_capabilities is run by the dispatcher (it changes the monitor's mode).
        let caps = ObjectDef {
            members: vec![schema::optional(
                "enable",
                Type::array(Type::enumeration(&["oob"])),
            )],
            ..Default::default()
        };
        self.commands.borrow_mut().insert(
            "qmp_capabilities".into(),
            CommandDef {
                args: Rc::new(caps),
                ret: Type::object(vec![]),
                handler: None,
            },
        );
        let v = self.version.clone();
        self.register(
            "query-version",
            ObjectDef::default(),
            version_type(),
            move |_| {
                let v = v.clone();
                Box::pin(async move { Ok(v) })
            },
        );
        let me = Rc::downgrade(self);
        self.register(
            "query-commands",
            ObjectDef::default(),
            Type::array(Type::object(vec![schema::member("name", Type::Str)])),
            move |_| {
                let names: Vec<Value> = me
                    .upgrade()
                    .map(|s| s.command_names())
                    .unwrap_or_default()
                    .into_iter()
                    .map(|n| json!({"name": n}))
                    .collect();
                Box::pin(async move { Ok(Value::Array(names)) })
            },
        );
        let me = Rc::downgrade(self);
        self.register(
            "query-qmp-schema",
            ObjectDef::default(),
            Type::array(Type::Any),
            move |_| {
                let s = me.upgrade().map(|s| s.schema()).unwrap_or(Value::Null);
                Box::pin(async move { Ok(s) })
            },
        );
    }

    /// Add a command. Its arguments are checked against `args` before `handler` runs.
    pub fn register<F>(&self, name: &str, args: ObjectDef, ret: Type, handler: F)
    where
        F: Fn(Map<String, Value>) -> HandlerFuture + 'static,
    {
        self.commands.borrow_mut().insert(
            name.to_string(),
            CommandDef {
                args: Rc::new(args),
                ret,
                handler: Some(Rc::new(handler)),
            },
        );
    }

    /// Declare an event (for `query-qmp-schema`).
    pub fn register_event(&self, name: &str, data: ObjectDef) {
        self.events.borrow_mut().push((name.to_string(), data));
    }

    pub fn command_names(&self) -> Vec<String> {
        self.commands.borrow().keys().cloned().collect()
    }

    pub fn version(&self) -> &Value {
        &self.version
    }

    /// `query-qmp-schema`: the commands and events of this server.
    pub fn schema(&self) -> Value {
        let mut i = Introspector::default();
        for (name, c) in self.commands.borrow().iter() {
            i.command(name, &c.args, &c.ret);
        }
        for (name, d) in self.events.borrow().iter() {
            i.event(name, d);
        }
        i.finish()
    }

    /// A sink other threads can emit events through.
    pub fn event_sink(&self) -> EventSink {
        EventSink::new(self.main.clone())
    }

    /// Send an event to every monitor in command mode (rate-limited events may be held back
    /// and sent at the end of their period).
    pub fn emit(self: &Rc<Self>, name: &str, data: Option<Value>) {
        self.emit_event(Event::now(name, data));
    }

    pub(crate) fn emit_event(self: &Rc<Self>, ev: Event) {
        match self.throttle.admit(ev.clone(), Instant::now()) {
            Ok(ev) => self.broadcast(&ev),
            Err(None) => {}
            Err(Some(deadline)) => {
                let Some((name, src)) = Throttle::source_of(&ev) else {
                    return;
                };
                let me = Rc::downgrade(self);
                blockd_aio::spawn(async move {
                    let mut deadline = deadline;
                    loop {
                        blockd_aio::sleep_until(deadline).await;
                        let Some(s) = me.upgrade() else { return };
                        match s.throttle.period_end(&name, &src, Instant::now()) {
                            Some(ev) => {
                                s.broadcast(&ev);
                                deadline = Instant::now() + crate::events::RATE_LIMIT_PERIOD;
                            }
                            None => return,
                        }
                    }
                })
                .detach();
            }
        }
    }

    fn broadcast(&self, ev: &Event) {
        let msg = ev.to_json();
        self.monitors.borrow_mut().retain(|w| w.strong_count() > 0);
        for m in self.monitors.borrow().iter().filter_map(Weak::upgrade) {
            if m.command_mode.get() {
                m.push_out(&msg);
            }
        }
    }

    pub fn monitor_count(&self) -> usize {
        self.monitors
            .borrow()
            .iter()
            .filter(|w| w.upgrade().is_some_and(|m| !m.closed.get()))
            .count()
    }

    /// Wait until every monitor has sent what it has queued (for `quit`: the reply goes out
    /// before the daemon exits). Callers bound it with a timeout.
    pub async fn flush(&self) {
        let monitors: Vec<Rc<Monitor>> = self
            .monitors
            .borrow()
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        for m in monitors {
            let m2 = m.clone();
            m.wait(&m.out_sent, move || {
                m2.closed.get() || m2.out.borrow().is_empty()
            })
            .await;
        }
    }

    /// Serve a connected socket as a monitor (greeting first). Returns at once; the monitor
    /// runs as tasks on the current (main) context until the peer goes away.
    pub fn serve(self: &Rc<Self>, fd: OwnedFd, pretty: bool) {
        let id = self.next_monitor.get();
        self.next_monitor.set(id + 1);
        let mon = Rc::new(Monitor {
            id,
            fd,
            pretty,
            command_mode: Cell::new(false),
            eof: Cell::new(false),
            closed: Cell::new(false),
            requests: RefCell::new(VecDeque::new()),
            requests_changed: Notify::new(),
            out: RefCell::new(Vec::new()),
            out_changed: Notify::new(),
            out_sent: Notify::new(),
        });
        tracing::debug!(monitor = id, "monitor connected");
        self.monitors.borrow_mut().push(Rc::downgrade(&mon));
        mon.push_out(&json!({"QMP": {"version": self.version, "capabilities": []}}));
        blockd_aio::spawn(reader(mon.clone())).detach();
        blockd_aio::spawn(worker(self.clone(), mon.clone())).detach();
        blockd_aio::spawn(writer_task(mon)).detach();
    }

    /// Answer one item of the input stream (`None`: nothing to send).
    async fn dispatch(self: &Rc<Self>, mon: &Monitor, item: Item) -> Value {
        let v = match item {
            Item::Error(e) => return reply(None, Err(QmpError::generic(e))),
            Item::Value(v) => v,
        };
        let Value::Object(mut req) = v else {
            return reply(None, Err("QMP input must be a JSON object".into()));
        };
        let id = req.remove("id");
        let mut name = None;
        let mut args = Map::new();
        for (k, v) in req {
            match (k.as_str(), v) {
                ("execute", Value::String(s)) => name = Some(s),
                ("execute", _) => {
                    return reply(
                        id,
                        Err("QMP input member 'execute' must be a string".into()),
                    );
                }
                ("arguments", Value::Object(m)) => args = m,
                ("arguments", _) => {
                    return reply(
                        id,
                        Err("QMP input member 'arguments' must be an object".into()),
                    );
                }
                (k, _) => {
                    return reply(
                        id,
                        Err(format!("QMP input member '{k}' is unexpected").into()),
                    );
                }
            }
        }
        let Some(name) = name else {
            return reply(id, Err("QMP input lacks member 'execute'".into()));
        };
        let negotiation = !mon.command_mode.get();
        if negotiation && name != "qmp_capabilities" {
            return reply(
                id,
                Err(QmpError::command_not_found(
                    "Expecting capabilities negotiation with 'qmp_capabilities'",
                )),
            );
        }
        let (args_def, handler) = match self.commands.borrow().get(&name) {
            Some(c) => (c.args.clone(), c.handler.clone()),
            None => {
                return reply(
                    id,
                    Err(QmpError::command_not_found(format!(
                        "The command {name} has not been found"
                    ))),
                );
            }
        };
        if let Err(e) = schema::check_object(&args_def, &args, "") {
            return reply(id, Err(e.into()));
        }
        // (QEMU checks qmp_capabilities' arguments before refusing it in command mode)
        if !negotiation && name == "qmp_capabilities" {
            return reply(
                id,
                Err(QmpError::command_not_found(
                    "Capabilities negotiation is already complete, command ignored",
                )),
            );
        }
        let Some(handler) = handler else {
            // qmp_capabilities: no capability is offered, so none can be enabled.
            if let Some(Value::Array(caps)) = args.get("enable")
                && let Some(c) = caps.first().and_then(Value::as_str)
            {
                return reply(id, Err(format!("Capability '{c}' not available").into()));
            }
            mon.command_mode.set(true);
            return reply(id, Ok(json!({})));
        };
        tracing::debug!(monitor = mon.id, command = %name, "execute");
        let r = handler(args).await;
        reply(id, r)
    }
}

/// The `query-version` return type.
pub fn version_type() -> Type {
    Type::object(vec![
        schema::member(
            "qemu",
            Type::object(vec![
                schema::member("major", Type::Int),
                schema::member("minor", Type::Int),
                schema::member("micro", Type::Int),
            ]),
        ),
        schema::member("package", Type::Str),
    ])
}

async fn reader(mon: Rc<Monitor>) {
    let mut streamer = Streamer::new();
    let mut items = Vec::new();
    let mut buf = IoBuf::new(RECV_SIZE, 64);
    loop {
        {
            let m = mon.clone();
            mon.wait(&mon.requests_changed, move || {
                m.closed.get() || m.requests.borrow().len() < QUEUE_MAX
            })
            .await;
        }
        if mon.closed.get() {
            return;
        }
        buf.set_len(RECV_SIZE);
        let (r, b) = ops::recv(mon.fd.as_raw_fd(), buf, 0).await;
        buf = b;
        match r {
            Ok(0) | Err(_) => {
                tracing::debug!(monitor = mon.id, "monitor input closed");
                mon.eof.set(true);
                mon.requests_changed.notify(usize::MAX);
                return;
            }
            Ok(n) => {
                streamer.feed(&buf.as_slice()[..n], &mut items);
                if !items.is_empty() {
                    mon.requests.borrow_mut().extend(items.drain(..));
                    mon.requests_changed.notify(usize::MAX);
                }
            }
        }
    }
}

async fn worker(server: Rc<Server>, mon: Rc<Monitor>) {
    loop {
        {
            let m = mon.clone();
            mon.wait(&mon.requests_changed, move || {
                m.closed.get() || m.eof.get() || !m.requests.borrow().is_empty()
            })
            .await;
        }
        let item = mon.requests.borrow_mut().pop_front();
        let Some(item) = item else {
            // closed, or the peer is gone and everything it sent was answered
            mon.close();
            return;
        };
        if mon.closed.get() {
            return;
        }
        mon.requests_changed.notify(usize::MAX);
        {
            let m = mon.clone();
            mon.wait(&mon.out_sent, move || {
                m.closed.get() || m.out.borrow().len() <= OUT_MAX
            })
            .await;
        }
        let r = server.dispatch(&mon, item).await;
        mon.push_out(&r);
    }
}

async fn writer_task(mon: Rc<Monitor>) {
    loop {
        {
            let m = mon.clone();
            mon.wait(&mon.out_changed, move || {
                m.closed.get() || !m.out.borrow().is_empty()
            })
            .await;
        }
        let data = std::mem::take(&mut *mon.out.borrow_mut());
        if data.is_empty() {
            // closed with nothing left to send
            tracing::debug!(monitor = mon.id, "monitor closed");
            return;
        }
        let mut off = 0;
        while off < data.len() {
            let end = (off + SEND_CHUNK).min(data.len());
            let (r, _) = ops::send(mon.fd.as_raw_fd(), IoBuf::from_slice(&data[off..end]), 0).await;
            match r {
                Ok(n) => off += n,
                Err(_) => {
                    mon.close();
                    mon.out.borrow_mut().clear();
                    return;
                }
            }
        }
        mon.out_sent.notify(usize::MAX);
    }
}
