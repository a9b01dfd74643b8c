//! Dirty bitmaps attached to nodes: writes, write-zeroes and discards (of nodes opened with
//! discard=unmap) through a BlockBackend (and through a raw node to its file) mark the enabled
//! bitmaps of every node they reach;
//! disabled and read-only bitmaps stay as they are; backup's successor keeps every write
//! across create / abdicate / reclaim while writers on another thread keep writing.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use blockd_aio::{IoBuf, block_on};
use blockd_block::{DirtyBitmap, Graph, Perm, ReqFlags};
use serde_json::json;

fn open_null(g: &mut Graph, name: &str, size: u64) -> Arc<blockd_block::Node> {
    let o = json!({"driver": "null-co", "node-name": name, "size": size});
    g.open(o.as_object().unwrap().clone()).unwrap()
}

#[test]
fn requests_mark_enabled_bitmaps() {
    let mut g = Graph::new();
    let file = open_null(&mut g, "file0", 1 << 20);
    let o = json!({"driver": "raw", "node-name": "fmt0", "file": "file0", "discard": "unmap"});
    let fmt = g.open(o.as_object().unwrap().clone()).unwrap();
    let on = DirtyBitmap::new(Some("on"), 65536, fmt.length()).unwrap();
    let off = DirtyBitmap::new(Some("off"), 512, fmt.length()).unwrap();
    off.set_enabled(false);
    let below = DirtyBitmap::new(Some("below"), 4096, file.length()).unwrap();
    fmt.dirty_bitmaps().add(&g, on.clone()).unwrap();
    fmt.dirty_bitmaps().add(&g, off.clone()).unwrap();
    assert_eq!(
        fmt.dirty_bitmaps()
            .add(&g, DirtyBitmap::new(Some("on"), 512, 4096).unwrap()),
        Err("Bitmap already exists: on".to_string())
    );
    file.dirty_bitmaps().add(&g, below.clone()).unwrap();
    let be = g
        .new_backend("", &fmt, Perm::CONSISTENT_READ | Perm::WRITE, Perm::ALL)
        .unwrap();
    block_on(async {
        let (r, _) = be
            .write(100, IoBuf::from_slice(&[1u8; 10]), ReqFlags::NONE)
            .await;
        r.unwrap();
        be.write_zeroes(200_000, 4096, ReqFlags::NONE)
            .await
            .unwrap();
        be.discard(700_000, 512).await.unwrap();
        // Reads mark nothing.
        let (r, _) = be.read(900_000, IoBuf::new(4096, 4096)).await;
        r.unwrap();
    })
    .unwrap();
    let runs: Vec<_> = on.dirty_runs(0, u64::MAX).collect();
    assert_eq!(runs, vec![(0, 65536), (196_608, 65536), (655_360, 65536)]);
    assert_eq!(on.count(), 3 * 65536);
    assert_eq!(off.count(), 0);
    let runs: Vec<_> = below.dirty_runs(0, u64::MAX).collect();
    // file0 has no discard=unmap: the discard stops there and marks nothing (as QEMU).
    assert_eq!(runs, vec![(0, 4096), (196_608, 8192)]);
    let names: Vec<_> = fmt
        .dirty_bitmaps()
        .named()
        .iter()
        .map(|b| b.name().unwrap().to_string())
        .collect();
    assert_eq!(names, ["off", "on"]);
    fmt.dirty_bitmaps().remove(&g, &on);
    assert!(fmt.dirty_bitmaps().find("on").is_none());
    assert!(fmt.dirty_bitmaps().find("off").is_some());
    be.detach(&g);
}

#[test]
fn successor_keeps_every_write() {
    let mut g = Graph::new();
    let node = open_null(&mut g, "n", 64 << 20);
    let be = g
        .new_backend("", &node, Perm::CONSISTENT_READ | Perm::WRITE, Perm::ALL)
        .unwrap();
    let list = node.dirty_bitmaps().clone();
    for round in 0..20 {
        let bm = DirtyBitmap::new(Some("b"), 512, node.length()).unwrap();
        list.add(&g, bm.clone()).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (be, stop) = (be.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut written = Vec::new();
                let mut i = 0u64;
                while !stop.load(Ordering::SeqCst) || i < 50 {
                    let off = (i * 7 + round) % (64 << 11) * 512;
                    block_on(be.write(off, IoBuf::from_slice(&[0u8; 512]), ReqFlags::NONE))
                        .unwrap()
                        .0
                        .unwrap();
                    written.push(off);
                    i += 1;
                }
                written
            })
        };
        let succ = list.create_successor(&g, &bm).unwrap();
        assert!(bm.is_busy() && bm.is_recording() && !bm.is_enabled());
        assert!(list.create_successor(&g, &bm).is_err());
        std::thread::yield_now();
        if round % 2 == 0 {
            list.abdicate(&g, &bm).unwrap();
        } else {
            list.reclaim(&g, &bm).unwrap();
        }
        assert!(!bm.is_busy() && bm.is_enabled());
        assert!(!list.all().iter().any(|b| Arc::ptr_eq(b, &succ)));
        stop.store(true, Ordering::SeqCst);
        let written = writer.join().unwrap();
        // Every write since the successor existed (all of them for reclaim) is in the bitmap:
        // abdicate may only drop writes that came before the successor, which the writer
        // cannot tell apart, so check the writes after the switch: the last ones.
        for off in written.iter().rev().take(50) {
            assert!(bm.get(*off), "round {round}: write at {off} lost");
        }
        if round % 2 == 1 {
            for off in &written {
                assert!(
                    bm.get(*off),
                    "round {round}: write at {off} lost by reclaim"
                );
            }
        }
        list.remove(&g, &bm);
        assert!(list.is_empty());
    }
    be.detach(&g);
}
