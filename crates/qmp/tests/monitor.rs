//! A server on a real event loop with clients on socket pairs: events reach only monitors in
//! command mode, sent from another thread through an `EventSink`, with QEMU's rate limit;
//! a slow command on one monitor does not hold up another; replies keep request order.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use blockd_aio::AioContext;
use blockd_qmp::{ObjectDef, Server, Type};
use serde_json::{Value, json};

struct Client {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Client {
    fn new(s: UnixStream) -> Client {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Client {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
        }
    }
    fn msg(&mut self) -> Value {
        let mut line = String::new();
        self.r.read_line(&mut line).expect("a message");
        assert!(line.ends_with("\r\n"), "CRLF: {line:?}");
        serde_json::from_str(&line).unwrap()
    }
    fn send(&mut self, s: &str) {
        self.w.write_all(s.as_bytes()).unwrap();
    }
}

#[test]
fn events_rate_limit_and_slow_commands() {
    let ctx = AioContext::new("main").unwrap();
    let result = ctx.block_on(async {
        let server =
            Server::new(json!({"qemu": {"major": 10, "minor": 0, "micro": 2}, "package": "t"}));
        server.register("slow", ObjectDef::default(), Type::Str, |_| {
            Box::pin(async {
                blockd_aio::sleep(Duration::from_millis(2000)).await;
                Ok(json!("slow done"))
            })
        });
        let (a_srv, a_cli) = UnixStream::pair().unwrap();
        let (b_srv, b_cli) = UnixStream::pair().unwrap();
        server.serve(OwnedFd::from(a_srv), false);
        server.serve(OwnedFd::from(b_srv), false);
        let sink = server.event_sink();
        let client = std::thread::spawn(move || {
            let mut a = Client::new(a_cli);
            let mut b = Client::new(b_cli);
            assert_eq!(a.msg()["QMP"]["capabilities"], json!([]));
            b.msg();
            a.send("{\"execute\":\"qmp_capabilities\"}\n");
            assert_eq!(a.msg(), json!({"return": {}}));
            // B is still negotiating: it gets no event
            let t0 = Instant::now();
            for i in 0..3 {
                sink.emit(
                    "BLOCK_IO_ERROR",
                    Some(json!({"node-name": "n", "reason": i})),
                );
            }
            sink.emit("OTHER", None);
            let first = a.msg();
            assert_eq!(first["event"], "BLOCK_IO_ERROR");
            assert_eq!(first["data"]["reason"], 0);
            let ts = &first["timestamp"];
            assert!(ts["seconds"].as_i64().unwrap() > 1_600_000_000);
            assert!(ts["microseconds"].as_i64().unwrap() < 1_000_000);
            // the unlimited event is not held back behind the limited ones
            assert_eq!(a.msg()["event"], "OTHER");
            // the last held-back event comes at the end of the one-second period; the middle
            // one is dropped
            let held = a.msg();
            assert_eq!(held["data"]["reason"], 2);
            assert!(
                t0.elapsed() >= Duration::from_millis(900),
                "{:?}",
                t0.elapsed()
            );
            b.send("{\"execute\":\"qmp_capabilities\",\"id\":\"b1\"}");
            assert_eq!(b.msg(), json!({"return": {}, "id": "b1"}));
            // a slow command on A; B is answered meanwhile; A's replies stay in order
            a.send("{\"execute\":\"slow\",\"id\":1}{\"execute\":\"query-version\",\"id\":2}");
            std::thread::sleep(Duration::from_millis(50));
            let t1 = Instant::now();
            b.send("{\"execute\":\"query-version\",\"id\":\"b2\"}");
            assert_eq!(b.msg()["id"], "b2");
            assert!(
                t1.elapsed() < Duration::from_millis(1500),
                "{:?}",
                t1.elapsed()
            );
            assert_eq!(a.msg(), json!({"return": "slow done", "id": 1}));
            assert_eq!(a.msg()["id"], 2);
            // both monitors in command mode now receive events, also through the global sink
            // drivers use
            let global = blockd_qmp::events::global_sink().expect("set by Server::new");
            global.image_corrupted(&blockd_qmp::ImageCorrupted {
                device: String::new(),
                node_name: Some("q".into()),
                msg: "L1 entry points outside the image".into(),
                offset: Some(65536),
                size: Some(512),
                fatal: true,
            });
            for c in [&mut a, &mut b] {
                let ev = c.msg();
                assert_eq!(ev["event"], "BLOCK_IMAGE_CORRUPTED");
                assert_eq!(ev["data"]["node-name"], "q");
                assert_eq!(ev["data"]["fatal"], true);
            }
            sink.emit("OTHER", Some(json!({"x": 1})));
            assert_eq!(a.msg()["data"], json!({"x": 1}));
            assert_eq!(b.msg()["data"], json!({"x": 1}));
        });
        while !client.is_finished() {
            blockd_aio::sleep(Duration::from_millis(10)).await;
        }
        client.join()
    });
    if let Err(p) = result.unwrap() {
        std::panic::resume_unwind(p);
    }
}
