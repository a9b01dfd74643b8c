//! Reopening nodes in use (Graph::reopen_plan / reopen_commit): read-only toggles checked
//! against the users' permissions, all-or-nothing across several nodes, a replaced file child,
//! raw windows, the drain the commit demands, and BLOCK_IO_ERROR from a reporting backend.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use blockd_aio::IoBuf;
use blockd_block::options::parse;
use blockd_block::{BlockBackend, Graph, Node, Perm, ReqFlags, drained_all};
use serde_json::{Map, Value, json};

fn temp_image(tag: &str, size: u64) -> std::path::PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let p = std::env::temp_dir().join(format!(
        "blockd-reopen-{tag}-{}-{}.img",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::File::create(&p).unwrap().set_len(size).unwrap();
    p
}

fn open(g: &mut Graph, opts: &str) -> Arc<Node> {
    g.open(parse(opts).unwrap()).unwrap()
}

fn obj(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => unreachable!(),
    }
}

/// The whole reopen as the daemon runs it: plan, drain, flush, commit.
fn reopen(g: &mut Graph, list: Vec<Value>) -> Result<(), String> {
    let plan = g.reopen_plan(list.into_iter().map(obj).collect())?;
    block_on(async {
        let drain = drained_all(&plan.drain_nodes()).await;
        plan.flush().await?;
        g.reopen_commit(plan, &drain)
    })
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    blockd_aio::block_on(f).expect("not inside an event loop")
}

fn rw() -> Perm {
    Perm::CONSISTENT_READ | Perm::WRITE
}

async fn write(be: &BlockBackend, off: u64, len: usize, b: u8) -> std::io::Result<()> {
    let mut buf = IoBuf::new(len, 4096);
    buf.fill(b);
    be.write(off, buf, ReqFlags::NONE).await.0
}

#[test]
fn read_only_toggle_respects_writers_and_moves_the_fd() {
    let path = temp_image("ro", 1 << 20);
    let p = path.display();
    let mut g = Graph::new();
    let f = open(&mut g, &format!("driver=file,node-name=f,filename={p}"));
    let r = open(&mut g, "driver=raw,node-name=r,file=f");
    let be = BlockBackend::new(&g, "dev", &r, rw(), Perm::ALL).unwrap();
    let e = reopen(
        &mut g,
        vec![json!({"driver": "raw", "node-name": "r", "file": "f", "read-only": true})],
    )
    .unwrap_err();
    assert_eq!(
        e,
        "Read-only block node 'r' cannot support read-write users"
    );
    let e = reopen(
        &mut g,
        vec![json!({"driver": "file", "node-name": "f", "filename": path, "read-only": true})],
    )
    .unwrap_err();
    assert_eq!(
        e,
        "Read-only block node 'f' cannot support read-write users"
    );
    assert!(!r.is_read_only() && !f.is_read_only());
    block_on(write(&be, 0, 4096, 0x11)).unwrap();
    be.detach(&g);

    // no writer left: both read-only at once, the file reopened O_RDONLY
    reopen(
        &mut g,
        vec![
            json!({"driver": "raw", "node-name": "r", "file": "f", "read-only": true}),
            json!({"driver": "file", "node-name": "f", "filename": path, "read-only": true}),
        ],
    )
    .unwrap();
    assert!(r.is_read_only() && f.is_read_only());
    assert_eq!(
        BlockBackend::new(&g, "", &r, rw(), Perm::ALL)
            .err()
            .unwrap(),
        "Block node is read-only"
    );
    // the raw edge no longer asks for write on its file
    let edge = r.children()[0].clone();
    assert!(!edge.perm.contains(Perm::WRITE));

    // and writable again: the data goes through the new descriptor
    reopen(
        &mut g,
        vec![
            json!({"driver": "file", "node-name": "f", "filename": path}),
            json!({"driver": "raw", "node-name": "r", "file": "f"}),
        ],
    )
    .unwrap();
    let be = BlockBackend::new(&g, "", &r, rw(), Perm::ALL).unwrap();
    block_on(write(&be, 8192, 4096, 0x22)).unwrap();
    let data = std::fs::read(&path).unwrap();
    assert!(data[..4096].iter().all(|&b| b == 0x11));
    assert!(data[8192..12288].iter().all(|&b| b == 0x22));
    be.detach(&g);
    let _ = std::fs::remove_file(path);
}

#[test]
fn all_or_nothing_and_options_that_cannot_change() {
    let path = temp_image("atomic", 1 << 20);
    let mut g = Graph::new();
    let n = open(&mut g, "driver=null-co,node-name=n");
    open(
        &mut g,
        &format!(
            "driver=raw,node-name=r,file.driver=file,file.filename={}",
            path.display()
        ),
    );
    // n would become read-only, r's window is invalid: neither changes
    let e = reopen(
        &mut g,
        vec![
            json!({"driver": "null-co", "node-name": "n", "read-only": true}),
            json!({"driver": "raw", "node-name": "r", "offset": 2 << 20}),
        ],
    )
    .unwrap_err();
    assert_eq!(
        e,
        "Offset (2097152) cannot be greater than size of the containing file (1048576)"
    );
    assert!(!n.is_read_only());
    for (opts, option) in [
        (
            json!({"driver": "null-co", "node-name": "n", "size": 4096}),
            "size",
        ),
        (json!({"driver": "raw", "node-name": "n"}), "driver"),
        (
            json!({"driver": "null-co", "node-name": "n", "force-share": true}),
            "force-share",
        ),
    ] {
        assert_eq!(
            reopen(&mut g, vec![opts]).unwrap_err(),
            format!("Cannot change the option '{option}'")
        );
    }
    assert_eq!(
        reopen(
            &mut g,
            vec![json!({"driver": "null-co", "node-name": "zz"})]
        )
        .unwrap_err(),
        "Failed to find node with node-name='zz'"
    );
    // raw windows and back to the whole file (left-out options go back to their defaults)
    let r = g.node("r").unwrap();
    reopen(
        &mut g,
        vec![json!({"driver": "raw", "node-name": "r", "offset": 4096, "size": 8192})],
    )
    .unwrap();
    assert_eq!(r.length(), 8192);
    reopen(&mut g, vec![json!({"driver": "raw", "node-name": "r"})]).unwrap();
    assert_eq!(r.length(), 1 << 20);
    // the implicit file child was reopened with it (read-only inherited)
    reopen(
        &mut g,
        vec![json!({"driver": "raw", "node-name": "r", "read-only": true})],
    )
    .unwrap();
    assert!(r.child("file").unwrap().is_read_only());
    let _ = std::fs::remove_file(path);
}

#[test]
fn replacing_the_file_child_and_cycles() {
    let a = temp_image("a", 1 << 20);
    let b = temp_image("b", 1 << 20);
    let mut g = Graph::new();
    let fa = open(
        &mut g,
        &format!("driver=file,node-name=fa,filename={}", a.display()),
    );
    let fb = open(
        &mut g,
        &format!("driver=file,node-name=fb,filename={}", b.display()),
    );
    let r = open(&mut g, "driver=raw,node-name=r,file=fa");
    let be = BlockBackend::new(&g, "", &r, rw(), Perm::ALL).unwrap();
    assert_eq!(
        reopen(
            &mut g,
            vec![json!({"driver": "raw", "node-name": "r", "file": "r"})]
        )
        .unwrap_err(),
        "Making 'r' a file child of 'r' would create a cycle"
    );
    reopen(
        &mut g,
        vec![json!({"driver": "raw", "node-name": "r", "file": "fb"})],
    )
    .unwrap();
    assert!(Arc::ptr_eq(&r.child("file").unwrap(), &fb));
    assert_eq!(fa.parent_count(), 0);
    assert_eq!(fb.parent_count(), 1);
    block_on(write(&be, 0, 512, 0x33)).unwrap();
    assert_eq!(std::fs::read(&b).unwrap()[0], 0x33);
    assert_eq!(std::fs::read(&a).unwrap()[0], 0);
    // the backend was quiesced by the reopen's drain and runs again
    assert!(!be.is_quiesced());
    be.detach(&g);
    let _ = std::fs::remove_file(a);
    let _ = std::fs::remove_file(b);
}

#[test]
fn commit_needs_the_drain_of_the_plan() {
    let mut g = Graph::new();
    let n = open(&mut g, "driver=null-co,node-name=n");
    let other = open(&mut g, "driver=null-co,node-name=o");
    let plan = g
        .reopen_plan(vec![obj(
            json!({"driver": "null-co", "node-name": "n", "read-only": true}),
        )])
        .unwrap();
    let e = block_on(async {
        let wrong = drained_all(&[other]).await;
        g.reopen_commit(plan, &wrong)
    })
    .unwrap_err();
    assert_eq!(e, "Node 'n' is not drained for the reopen");
    assert!(!n.is_read_only());
}

#[test]
fn failed_requests_of_a_reporting_backend_send_block_io_error() {
    let got = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = got.clone();
    blockd_block::events::set_sink(Box::new(move |name, data| {
        sink.lock().unwrap().push((name.to_string(), data));
    }));
    // a directory opened as a file: reads fail with EISDIR
    let dir = std::env::temp_dir().join(format!("blockd-reopen-dir-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut g = Graph::new();
    let f = g
        .open(obj(
            json!({"driver": "file", "node-name": "d", "filename": dir,
                         "read-only": true}),
        ))
        .unwrap();
    if f.length() == 0 {
        eprintln!("SKIPPED: the directory's size is 0 on this filesystem");
        return;
    }
    let be = BlockBackend::new(&g, "disk0", &f, Perm::CONSISTENT_READ, Perm::ALL).unwrap();
    let (r, _) = block_on(be.read(0, IoBuf::new(512, 512)));
    assert!(r.is_err());
    assert!(
        got.lock()
            .unwrap()
            .iter()
            .all(|(n, _)| n != "BLOCK_IO_ERROR")
    );
    be.set_error_reporting(true);
    let (r, _) = block_on(be.read(0, IoBuf::new(512, 512)));
    let e = r.unwrap_err();
    let events = got.lock().unwrap();
    let (_, data) = events
        .iter()
        .find(|(n, _)| n == "BLOCK_IO_ERROR")
        .expect("BLOCK_IO_ERROR");
    assert_eq!(
        data,
        &json!({"qom-path": "", "device": "disk0", "node-name": "d", "operation": "read",
                "action": "report", "nospace": false,
                "reason": blockd_block::strerror(&e)})
    );
    let _ = std::fs::remove_dir(dir);
}

#[test]
fn cache_direct_on_and_off_by_reopen() {
    let path = temp_image("direct", 1 << 20);
    let p = path.display();
    let mut g = Graph::new();
    let f = open(&mut g, &format!("driver=file,node-name=f,filename={p}"));
    let r = open(&mut g, "driver=raw,node-name=r,file=f");
    let be = BlockBackend::new(&g, "", &r, rw(), Perm::ALL).unwrap();
    assert_eq!(f.limits().request_alignment, 1);
    let direct = json!({"driver": "file", "node-name": "f", "filename": path,
                        "cache": {"direct": true}});
    if let Err(e) = reopen(&mut g, vec![direct]) {
        eprintln!("SKIPPED: O_DIRECT not available on the temp dir: {e}");
        be.detach(&g);
        return;
    }
    assert!(f.limits().request_alignment >= 512);
    // an unaligned write is bounced through read-modify-write on the O_DIRECT descriptor
    block_on(write(&be, 100, 7, 0x44)).unwrap();
    let data = std::fs::read(&path).unwrap();
    assert!(data[100..107].iter().all(|&b| b == 0x44));
    assert_eq!(data[99], 0);
    // left out: back to the default (buffered)
    reopen(
        &mut g,
        vec![json!({"driver": "file", "node-name": "f", "filename": path})],
    )
    .unwrap();
    assert_eq!(f.limits().request_alignment, 1);
    block_on(write(&be, 1, 1, 0x55)).unwrap();
    assert_eq!(std::fs::read(&path).unwrap()[1], 0x55);
    be.detach(&g);
    let _ = std::fs::remove_file(path);
}

/// A format with a backing child that can reopen (the generic `backing` handling is tested
/// through it; blockd's qcow2 cannot reopen yet).
struct WithBacking;

impl blockd_block::BlockDriver for WithBacking {
    fn format_name(&self) -> &'static str {
        "testfmt"
    }
    fn is_format(&self) -> bool {
        true
    }
    fn supports_backing(&self) -> bool {
        true
    }
    fn read<'a>(
        &'a self,
        _: &'a Node,
        _: u64,
        b: IoBuf,
    ) -> blockd_block::IoFuture<'a, blockd_block::BufResult> {
        Box::pin(async move { (Ok(()), b) })
    }
    fn write<'a>(
        &'a self,
        _: &'a Node,
        _: u64,
        b: IoBuf,
        _: ReqFlags,
    ) -> blockd_block::IoFuture<'a, blockd_block::BufResult> {
        Box::pin(async move { (Ok(()), b) })
    }
    fn flush<'a>(&'a self, _: &'a Node) -> blockd_block::IoFuture<'a, std::io::Result<()>> {
        Box::pin(async { Ok(()) })
    }
    fn discard<'a>(
        &'a self,
        _: &'a Node,
        _: u64,
        _: u64,
    ) -> blockd_block::IoFuture<'a, std::io::Result<()>> {
        Box::pin(async { Ok(()) })
    }
    fn write_zeroes<'a>(
        &'a self,
        _: &'a Node,
        _: u64,
        _: u64,
        _: ReqFlags,
    ) -> blockd_block::IoFuture<'a, std::io::Result<()>> {
        Box::pin(async { Ok(()) })
    }
    fn block_status<'a>(
        &'a self,
        _: &'a Node,
        _: u64,
        _: u64,
    ) -> blockd_block::IoFuture<'a, std::io::Result<blockd_block::BlockStatus>> {
        Box::pin(async { Err(std::io::Error::from_raw_os_error(libc::ENOTSUP)) })
    }
    fn truncate<'a>(
        &'a self,
        _: &'a Node,
        _: u64,
    ) -> blockd_block::IoFuture<'a, std::io::Result<u64>> {
        Box::pin(async { Err(std::io::Error::from_raw_os_error(libc::ENOTSUP)) })
    }
    fn reopen_prepare(
        &self,
        _: &Node,
        _: &mut blockd_block::ReopenRequest<'_>,
    ) -> Result<blockd_block::ReopenPrepared, String> {
        Ok(blockd_block::ReopenPrepared::nothing())
    }
}

#[test]
fn backing_child_replaced_detached_and_attached() {
    let mut g = Graph::new();
    let b1 = open(&mut g, "driver=null-co,node-name=b1,read-only=on");
    let b2 = open(&mut g, "driver=null-co,node-name=b2,read-only=on");
    let edge =
        blockd_block::drivers::child_edge("backing", b1.clone(), Perm::CONSISTENT_READ, Perm::ALL);
    let top = g
        .add_node("top", Box::new(WithBacking), vec![edge], 1 << 20)
        .unwrap();
    let t = |extra: Value| {
        let mut m = obj(json!({"driver": "testfmt", "node-name": "top"}));
        m.extend(obj(extra));
        Value::Object(m)
    };
    assert_eq!(
        reopen(&mut g, vec![t(json!({}))]).unwrap_err(),
        "backing is missing for 'top'"
    );
    reopen(&mut g, vec![t(json!({"backing": "b2"}))]).unwrap();
    assert!(Arc::ptr_eq(&top.child("backing").unwrap(), &b2));
    assert_eq!((b1.parent_count(), b2.parent_count()), (0, 1));
    reopen(&mut g, vec![t(json!({"backing": null}))]).unwrap();
    assert!(top.child("backing").is_none());
    assert_eq!(b2.parent_count(), 0);
    // no backing now: leaving it out is fine, and one can be attached again
    reopen(&mut g, vec![t(json!({}))]).unwrap();
    reopen(&mut g, vec![t(json!({"backing": "b1"}))]).unwrap();
    assert!(Arc::ptr_eq(&top.child("backing").unwrap(), &b1));
    assert_eq!(
        reopen(&mut g, vec![t(json!({"backing": "top"}))]).unwrap_err(),
        "Making 'top' a backing child of 'top' would create a cycle"
    );
    // a raw node has no backing
    assert_eq!(
        reopen(
            &mut g,
            vec![
                json!({"driver": "null-co", "node-name": "b2", "read-only": true,
                        "backing": "b1"})
            ]
        )
        .unwrap_err(),
        "Driver 'null-co' of node 'b2' does not support backing files"
    );
}
