//! Export management through the QMP glue (nbd-server-start/stop, block-export-add/del,
//! query-block-exports, nbd-server-add/remove, BLOCK_EXPORT_DELETED), and the seed scenario:
//! hard removal of an export whose iothread serves a busy client, 500 times, without a
//! deadlock, with a clean disconnect and every acknowledged write on disk.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blockd_aio::{ContextHandle, IoThread, PollParams, block_on};
use blockd_block::Graph;
use blockd_nbd::proto;
use blockd_nbd::qmp::{self, NbdState};
use common::{Raw, image, scratch};
use serde_json::{Map, Value, json};

fn args(v: Value) -> Map<String, Value> {
    v.as_object().unwrap().clone()
}

fn open_node(graph: &mut Graph, name: &str, path: &std::path::Path) {
    graph
        .open(args(json!({
            "driver": "raw", "node-name": name,
            "file": {"driver": "file", "filename": path.to_str().unwrap()}
        })))
        .unwrap();
}

/// Let the main context run (accepting, handshakes) until `cond` holds.
fn pump_until(cond: impl Fn() -> bool) {
    block_on(async {
        let t = Instant::now();
        while !cond() {
            assert!(t.elapsed() < Duration::from_secs(20), "timed out");
            blockd_aio::sleep(Duration::from_millis(2)).await;
        }
    })
    .unwrap();
}

#[test]
fn qmp_commands() {
    let d = scratch("qmp");
    let img = image(&d, "a.raw", 4 << 20, 0x21);
    let sock = d.join("q.sock");
    let mut graph = Graph::new();
    open_node(&mut graph, "disk0", &img);
    let mut st = NbdState::new().unwrap();
    let deleted = Arc::new(Mutex::new(Vec::<String>::new()));
    let dl = deleted.clone();
    st.on_export_deleted(Arc::new(move |id: &str| {
        dl.lock().unwrap().push(id.to_string())
    }));
    let none: &dyn Fn(&str) -> Option<ContextHandle> = &|_| None;

    let add = args(json!({"type": "nbd", "id": "e0", "node-name": "disk0", "writable": true}));
    let e = qmp::block_export_add(&mut st, &mut graph, &add, none).unwrap_err();
    assert_eq!(e.1, "NBD server not running");
    let e = qmp::nbd_server_stop(&mut st, &Map::new()).unwrap_err();
    assert_eq!(e.1, "NBD server not running");
    let start = args(json!({"addr": {"type": "unix", "data": {"path": sock.to_str().unwrap()}}}));
    qmp::nbd_server_start(&mut st, &start).unwrap();
    let e = qmp::nbd_server_start(&mut st, &start).unwrap_err();
    assert_eq!(
        e,
        ("GenericError".into(), "NBD server already running".into())
    );
    let e = qmp::nbd_server_start(&mut st, &args(json!({"addr": {}, "bogus": 1}))).unwrap_err();
    assert_eq!(e.1, "Parameter 'bogus' is unexpected");

    qmp::block_export_add(&mut st, &mut graph, &add, none).unwrap();
    let e = qmp::block_export_add(&mut st, &mut graph, &add, none).unwrap_err();
    assert_eq!(e.1, "Block export id 'e0' is already in use");
    let dup_name = args(json!({"type": "nbd", "id": "e1", "node-name": "disk0"}));
    let e = qmp::block_export_add(&mut st, &mut graph, &dup_name, none).unwrap_err();
    assert_eq!(e.1, "NBD server already has export named 'disk0'");
    let missing = args(json!({"type": "nbd", "id": "e2", "node-name": "nope"}));
    let e = qmp::block_export_add(&mut st, &mut graph, &missing, none).unwrap_err();
    assert_eq!(e.1, "Cannot find device='' nor node-name='nope'");
    let bad_type = args(
        json!({"type": "nbd", "id": "e3", "node-name": "disk0", "name": "x", "writable": "yes"}),
    );
    let e = qmp::block_export_add(&mut st, &mut graph, &bad_type, none).unwrap_err();
    assert_eq!(
        e.1,
        "Invalid parameter type for 'writable', expected: boolean"
    );
    let bad_io = args(
        json!({"type": "nbd", "id": "e4", "node-name": "disk0", "name": "y", "iothread": "io9"}),
    );
    assert!(qmp::block_export_add(&mut st, &mut graph, &bad_io, none).is_err());
    assert_eq!(
        qmp::query_block_exports(&st).unwrap(),
        json!([{"type": "nbd", "id": "e0", "node-name": "disk0", "shutting-down": false}])
    );

    // A client connects; safe removal is refused, hard removal disconnects it cleanly.
    let sock2 = sock.clone();
    let connected = Arc::new(AtomicBool::new(false));
    let c2 = connected.clone();
    let client = std::thread::spawn(move || {
        let mut c = Raw::fixed(&sock2);
        c.go("disk0", false, false, &[]);
        c2.store(true, Ordering::SeqCst);
        let mut n = 0u64;
        loop {
            let r = proto::Request {
                flags: 0,
                typ: proto::CMD_WRITE,
                cookie: n,
                offset: n * 512 % (1 << 20),
                len: 512,
            };
            let mut v = r.encode(false);
            v.extend_from_slice(&[7u8; 512]);
            if c.s.write_all(&v).is_err() {
                return n; // disconnected while sending
            }
            let mut r = [0u8; 16];
            match c.s.read(&mut r) {
                Ok(0) => return n,
                Ok(16) => n += 1,
                Ok(k) => panic!("partial reply of {k} bytes"),
                Err(e) => panic!("{e}"),
            }
        }
    });
    pump_until(|| connected.load(Ordering::SeqCst));
    let del = args(json!({"id": "e0"}));
    let e = qmp::block_export_del(&mut st, &del).unwrap_err();
    assert_eq!(e.1, "export 'e0' still in use");
    qmp::block_export_del(&mut st, &args(json!({"id": "e0", "mode": "hard"}))).unwrap();
    if let Some(e) = st.server().export("e0") {
        block_on(e.wait_gone()).unwrap();
    }
    let writes = client.join().unwrap();
    assert!(writes > 0);
    pump_until(|| !deleted.lock().unwrap().is_empty());
    assert_eq!(*deleted.lock().unwrap(), ["e0"]);
    assert_eq!(st.reap_deleted(&graph), ["e0"]);
    assert_eq!(qmp::query_block_exports(&st).unwrap(), json!([]));
    let e = qmp::block_export_del(&mut st, &del).unwrap_err();
    assert_eq!(e.1, "Export 'e0' is not found");
    // Legacy commands; nbd-server-stop removes what nbd-server-add made.
    qmp::nbd_server_add(
        &mut st,
        &mut graph,
        &args(json!({"device": "disk0", "name": "legacy"})),
    )
    .unwrap();
    assert_eq!(qmp::query_block_exports(&st).unwrap()[0]["id"], "legacy");
    qmp::nbd_server_remove(&mut st, &args(json!({"name": "legacy"}))).unwrap();
    qmp::nbd_server_add(&mut st, &mut graph, &args(json!({"device": "disk0"}))).unwrap();
    qmp::nbd_server_stop(&mut st, &Map::new()).unwrap();
    pump_until(|| deleted.lock().unwrap().len() == 3);
    assert_eq!(st.reap_deleted(&graph), ["legacy", "disk0"]);
    // Every backend was detached: the node can go.
    graph.remove("disk0").unwrap();
}

#[test]
fn hard_removal_of_busy_iothread_export_500_times() {
    let d = scratch("seed");
    let img = image(&d, "a.raw", 8 << 20, 0);
    let sock = d.join("seed.sock");
    let mut graph = Graph::new();
    open_node(&mut graph, "disk0", &img);
    let io = IoThread::spawn("io0", PollParams::disabled()).unwrap();
    let ioh = io.handle().clone();
    let lookup = move |n: &str| (n == "io0").then(|| ioh.clone());
    let mut st = NbdState::new().unwrap();
    let start = args(json!({"addr": {"type": "unix", "path": sock.to_str().unwrap()}}));
    qmp::nbd_server_start(&mut st, &start).unwrap();
    let file = std::fs::File::open(&img).unwrap();
    let io_tasks = |h: &ContextHandle| {
        block_on(h.call(|| blockd_aio::AioContext::current().unwrap().stats().tasks_run))
            .unwrap()
            .unwrap()
    };
    let tasks_before = io_tasks(io.handle());
    let mut total_acked = 0u64;
    let deleted = Arc::new(AtomicUsize::new(0));
    let dl = deleted.clone();
    st.on_export_deleted(Arc::new(move |_| {
        dl.fetch_add(1, Ordering::SeqCst);
    }));
    for iter in 0..500u32 {
        let add = args(json!({
            "type": "nbd", "id": "busy", "node-name": "disk0",
            "writable": true, "iothread": "io0"
        }));
        qmp::block_export_add(&mut st, &mut graph, &add, &lookup).unwrap();
        let sock2 = sock.clone();
        let acked = Arc::new(AtomicUsize::new(0));
        let a2 = acked.clone();
        let tag = (iter % 251) as u8 + 1;
        // A client that keeps 4 writes in flight until it is disconnected.
        let client = std::thread::spawn(move || {
            let mut c = Raw::fixed(&sock2);
            c.go("disk0", false, false, &[]);
            let mut sent = 0u64;
            let mut done = Vec::new();
            let send = |c: &mut Raw, i: u64| -> bool {
                let r = proto::Request {
                    flags: 0,
                    typ: proto::CMD_WRITE,
                    cookie: i,
                    offset: i * 4096,
                    len: 4096,
                };
                let mut v = r.encode(false);
                v.extend_from_slice(&[tag; 4096]);
                c.s.write_all(&v).is_ok()
            };
            while sent < 4 {
                if !send(&mut c, sent) {
                    break;
                }
                sent += 1;
            }
            loop {
                let mut r = [0u8; 16];
                let mut got = 0;
                while got < 16 {
                    match c.s.read(&mut r[got..]) {
                        Ok(0) => {
                            assert_eq!(got, 0, "disconnect in the middle of a reply");
                            return done;
                        }
                        Ok(k) => got += k,
                        Err(e) => panic!("{e}"),
                    }
                }
                let h = proto::ReplyHeader::parse(&r).unwrap();
                let proto::ReplyHeader::Simple { error, cookie } = h else {
                    panic!()
                };
                assert_eq!(error, 0);
                done.push(cookie);
                a2.fetch_add(1, Ordering::SeqCst);
                if sent < 2048 && send(&mut c, sent) {
                    sent += 1;
                }
            }
        });
        pump_until(|| acked.load(Ordering::SeqCst) >= 1);
        qmp::block_export_del(&mut st, &args(json!({"id": "busy", "mode": "hard"}))).unwrap();
        if let Some(e) = st.server().export("busy") {
            block_on(e.wait_gone()).unwrap();
        }
        let done = client.join().unwrap();
        total_acked += done.len() as u64;
        pump_until(|| deleted.load(Ordering::SeqCst) as u32 > iter);
        assert_eq!(st.reap_deleted(&graph), ["busy"]);
        // Every acknowledged write is in the file.
        let mut b = vec![0u8; 4096];
        for off in done {
            file.read_exact_at(&mut b, off * 4096).unwrap();
            assert!(
                b.iter().all(|&x| x == tag),
                "iteration {iter}: write {off} lost"
            );
        }
    }
    // The connections were served by the iothread: it ran a task per request at least.
    let ran = io_tasks(io.handle()) - tasks_before;
    assert!(
        ran >= total_acked,
        "iothread ran {ran} tasks for {total_acked} writes"
    );
    graph.remove("disk0").unwrap();
    drop(io);
}
