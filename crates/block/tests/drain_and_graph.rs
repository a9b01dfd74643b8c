//! Drain and graph changes under load (issue: the block layer).
//!
//! 8 writers on two iothreads hammer one node through BlockBackends while the main context
//! (1) drains it 1000 times, checking inside every drained section that nothing is in flight
//! and no request starts, and (2) inserts and removes a filter above it 1000 times. Every write
//! must succeed and land.

use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use blockd_aio::{IoBuf, IoThread, PollParams, block_on};
use blockd_block::driver::{BlockDriver, BlockStatus, BufResult, IoFuture, ReqFlags};
use blockd_block::{BlockBackend, Child, Graph, Node, Perm, drained};

const BLOCK: usize = 4096;
const WRITERS: u64 = 8;
const BLOCKS_PER_WRITER: u64 = 64;

/// A pass-through filter that counts requests entering the layers below the backends.
struct Counting {
    active: Arc<AtomicUsize>,
    started: Arc<AtomicU64>,
}

impl Counting {
    fn child(node: &Node) -> Arc<Node> {
        node.child("file").expect("filter child")
    }
}

struct Active(Arc<AtomicUsize>);
impl Drop for Active {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl BlockDriver for Counting {
    fn format_name(&self) -> &'static str {
        "counting"
    }
    fn is_filter(&self) -> bool {
        true
    }
    fn read<'a>(&'a self, node: &'a Node, off: u64, buf: IoBuf) -> IoFuture<'a, BufResult> {
        Box::pin(async move {
            self.started.fetch_add(1, Ordering::SeqCst);
            self.active.fetch_add(1, Ordering::SeqCst);
            let _a = Active(self.active.clone());
            let c = Self::child(node);
            c.driver().read(&c, off, buf).await
        })
    }
    fn write<'a>(
        &'a self,
        node: &'a Node,
        off: u64,
        buf: IoBuf,
        f: ReqFlags,
    ) -> IoFuture<'a, BufResult> {
        Box::pin(async move {
            self.started.fetch_add(1, Ordering::SeqCst);
            self.active.fetch_add(1, Ordering::SeqCst);
            let _a = Active(self.active.clone());
            let c = Self::child(node);
            c.driver().write(&c, off, buf, f).await
        })
    }
    fn flush<'a>(&'a self, node: &'a Node) -> IoFuture<'a, std::io::Result<()>> {
        Box::pin(async move {
            let c = Self::child(node);
            c.driver().flush(&c).await
        })
    }
    fn discard<'a>(&'a self, node: &'a Node, o: u64, l: u64) -> IoFuture<'a, std::io::Result<()>> {
        Box::pin(async move {
            let c = Self::child(node);
            c.driver().discard(&c, o, l).await
        })
    }
    fn write_zeroes<'a>(
        &'a self,
        node: &'a Node,
        o: u64,
        l: u64,
        f: ReqFlags,
    ) -> IoFuture<'a, std::io::Result<()>> {
        Box::pin(async move {
            let c = Self::child(node);
            c.driver().write_zeroes(&c, o, l, f).await
        })
    }
    fn block_status<'a>(
        &'a self,
        node: &'a Node,
        o: u64,
        l: u64,
    ) -> IoFuture<'a, std::io::Result<BlockStatus>> {
        Box::pin(async move {
            let c = Self::child(node);
            c.driver().block_status(&c, o, l).await
        })
    }
    fn truncate<'a>(&'a self, _n: &'a Node, _l: u64) -> IoFuture<'a, std::io::Result<u64>> {
        Box::pin(async { Err(blockd_block::driver::not_supported()) })
    }
}

fn temp_image(tag: &str, size: u64) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("blockd-block-{tag}-{}.img", std::process::id()));
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(size).unwrap();
    p
}

struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<blockd_aio::RemoteTask<u64>>,
    _threads: Vec<IoThread>,
}

/// Start 8 writers on 2 iothreads, each rewriting its own blocks with increasing sequence
/// numbers (the first 8 bytes of a block hold the writer id and sequence number).
fn start_load(backends: &[BlockBackend]) -> Load {
    let threads: Vec<IoThread> = (0..2)
        .map(|i| IoThread::spawn(&format!("io{i}"), PollParams::iothread_default()).unwrap())
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let be = backends[(w % backends.len() as u64) as usize].clone();
        let stop = stop.clone();
        tasks.push(
            threads[(w % 2) as usize]
                .handle()
                .spawn(move || async move {
                    let mut seq = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        seq += 1;
                        let blk = seq % BLOCKS_PER_WRITER;
                        let off = (w * BLOCKS_PER_WRITER + blk) * BLOCK as u64;
                        let mut buf = IoBuf::new(BLOCK, 4096);
                        buf.fill((w as u8) ^ (seq as u8));
                        buf[..8].copy_from_slice(&(w << 56 | seq).to_le_bytes());
                        let (r, _) = be.write(off, buf, ReqFlags::NONE).await;
                        r.expect("write failed under drain/graph changes");
                    }
                    seq
                }),
        );
    }
    Load {
        stop,
        tasks,
        _threads: threads,
    }
}

fn finish_load(load: Load, backends: &[BlockBackend]) -> Vec<u64> {
    load.stop.store(true, Ordering::Relaxed);
    let tasks = load.tasks;
    let state: Vec<String> = backends
        .iter()
        .map(|b| {
            format!(
                "{}: in_flight {} quiesced {}",
                b.name(),
                b.in_flight(),
                b.is_quiesced()
            )
        })
        .collect();
    block_on(async move {
        let mut out = Vec::new();
        for t in tasks {
            let r = blockd_aio::timeout(Duration::from_secs(20), t)
                .await
                .unwrap_or_else(|_| panic!("writer did not finish; backends: {state:?}"));
            out.push(r.expect("writer task cancelled"));
        }
        out
    })
    .unwrap()
}

/// Every block holds the newest write its writer made there.
fn check_landed(path: &std::path::Path, seqs: &[u64]) {
    let mut data = Vec::new();
    std::fs::File::open(path)
        .unwrap()
        .read_to_end(&mut data)
        .unwrap();
    for (w, &last) in seqs.iter().enumerate() {
        let w = w as u64;
        for blk in 0..BLOCKS_PER_WRITER {
            // The newest sequence number written to this block.
            let Some(seq) = (1..=last).rev().find(|s| s % BLOCKS_PER_WRITER == blk) else {
                continue;
            };
            let off = ((w * BLOCKS_PER_WRITER + blk) as usize) * BLOCK;
            let head = u64::from_le_bytes(data[off..off + 8].try_into().unwrap());
            assert_eq!(
                head,
                w << 56 | seq,
                "writer {w} block {blk}: newest write missing"
            );
            assert!(
                data[off + 8..off + BLOCK]
                    .iter()
                    .all(|&x| x == (w as u8) ^ (seq as u8))
            );
        }
    }
}

#[test]
fn eight_writers_on_two_iothreads_while_main_drains_1000_times() {
    let path = temp_image("drain", WRITERS * BLOCKS_PER_WRITER * BLOCK as u64);
    let active = Arc::new(AtomicUsize::new(0));
    let started = Arc::new(AtomicU64::new(0));
    let mut g = Graph::new();
    let opts = blockd_block::options::parse(&format!(
        "driver=raw,node-name=fmt,file.driver=file,file.node-name=proto,file.filename={}",
        path.display()
    ))
    .unwrap();
    let fmt = g.open(opts).unwrap();
    let counting = g
        .add_node(
            "counter",
            Box::new(Counting {
                active: active.clone(),
                started: started.clone(),
            }),
            vec![Child {
                name: "file".into(),
                node: fmt.clone(),
                perm: Perm::CONSISTENT_READ | Perm::WRITE,
                shared: Perm::ALL,
            }],
            fmt.length(),
        )
        .unwrap();
    let backends: Vec<BlockBackend> = (0..4)
        .map(|i| {
            BlockBackend::new(
                &g,
                &format!("dev{i}"),
                &counting,
                Perm::CONSISTENT_READ | Perm::WRITE,
                Perm::ALL,
            )
            .unwrap()
        })
        .collect();
    let load = start_load(&backends);
    let bes = backends.clone();
    let node = fmt.clone();
    let act = active.clone();
    let st = started.clone();
    block_on(async move {
        for round in 0..1000 {
            // Drain the format node under the filter: parents up to the backends quiesce.
            let guard = drained(&node).await;
            for be in &bes {
                assert_eq!(
                    be.in_flight(),
                    0,
                    "round {round}: request in flight while drained"
                );
                assert!(be.is_quiesced());
            }
            assert_eq!(
                act.load(Ordering::SeqCst),
                0,
                "round {round}: request below the backends"
            );
            let before = st.load(Ordering::SeqCst);
            if round % 50 == 0 {
                blockd_aio::sleep(Duration::from_millis(2)).await;
            } else {
                blockd_aio::yield_now().await;
            }
            assert_eq!(
                st.load(Ordering::SeqCst),
                before,
                "round {round}: request started while drained"
            );
            // Nested drain counts.
            let inner = drained(&node).await;
            drop(inner);
            assert!(bes[0].is_quiesced(), "outer drain still holds");
            drop(guard);
            blockd_aio::sleep(Duration::from_micros(200)).await;
        }
    })
    .unwrap();
    let seqs = finish_load(load, &backends);
    assert!(
        seqs.iter().all(|&s| s > 0),
        "every writer made progress: {seqs:?}"
    );
    for be in backends {
        be.detach(&g);
    }
    check_landed(&path, &seqs);
    let _ = std::fs::remove_file(path);
}

#[test]
fn filter_inserted_and_removed_1000_times_under_load() {
    let path = temp_image("graph", WRITERS * BLOCKS_PER_WRITER * BLOCK as u64);
    let mut g = Graph::new();
    let opts = blockd_block::options::parse(&format!(
        "driver=raw,node-name=fmt,file.driver=file,file.filename={}",
        path.display()
    ))
    .unwrap();
    let fmt = g.open(opts).unwrap();
    let backends: Vec<BlockBackend> = (0..2)
        .map(|i| {
            BlockBackend::new(
                &g,
                &format!("dev{i}"),
                &fmt,
                Perm::CONSISTENT_READ | Perm::WRITE,
                Perm::ALL,
            )
            .unwrap()
        })
        .collect();
    let load = start_load(&backends);
    let started = Arc::new(AtomicU64::new(0));
    let st = started.clone();
    let bes = backends.clone();
    let (g, fmt) = block_on(async move {
        let mut g = g;
        for round in 0..1000 {
            let f = g
                .add_node(
                    "filter",
                    Box::new(Counting {
                        active: Arc::new(AtomicUsize::new(0)),
                        started: st.clone(),
                    }),
                    vec![Child {
                        name: "file".into(),
                        node: fmt.clone(),
                        perm: Perm::CONSISTENT_READ | Perm::WRITE,
                        shared: Perm::ALL,
                    }],
                    fmt.length(),
                )
                .unwrap();
            g.insert_filter_above(&fmt, &f).await.unwrap();
            for be in &bes {
                assert!(
                    Arc::ptr_eq(&be.root(), &f),
                    "round {round}: backend not above the filter"
                );
            }
            blockd_aio::sleep(Duration::from_micros(100)).await;
            g.remove_filter(&f).await.unwrap();
            for be in &bes {
                assert!(
                    Arc::ptr_eq(&be.root(), &fmt),
                    "round {round}: filter not removed"
                );
            }
            assert_eq!(f.parent_count(), 0);
        }
        (g, fmt)
    })
    .unwrap();
    assert!(
        started.load(Ordering::SeqCst) > 0,
        "requests went through the filter"
    );
    let seqs = finish_load(load, &backends);
    for be in backends {
        be.detach(&g);
    }
    assert_eq!(fmt.parent_count(), 0);
    drop(g);
    check_landed(&path, &seqs);
    let _ = std::fs::remove_file(path);
}
