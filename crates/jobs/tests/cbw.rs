//! The copy-before-write state on real files: a guest write through the filter copies the
//! old data of the clusters it touches to the target first (once), the point-in-time view
//! reads old data everywhere, a discarded range of the view is no longer copied, and the
//! backup's own copy fills in the rest so the target equals the source as it was.

use std::sync::Arc;

use blockd_aio::IoBuf;
use blockd_block::{Graph, Node, Perm, ReqFlags};
use blockd_jobs::cbw::{BlockCopy, CopyBeforeWrite, OnCbwError, file_edge, target_edge};
use serde_json::{Map, Value, json};

const LEN: u64 = 1 << 20;
const CL: u64 = 65536;

fn file(path: &std::path::Path, fill: u8) {
    std::fs::write(path, vec![fill; LEN as usize]).unwrap();
}

fn open(g: &mut Graph, name: &str, path: &std::path::Path) -> Arc<Node> {
    let Value::Object(m) =
        json!({"driver": "file", "node-name": name, "filename": path.to_str().unwrap()})
    else {
        unreachable!()
    };
    g.open(m as Map<String, Value>).unwrap()
}

async fn read(n: &Arc<Node>, off: u64, len: u64) -> Vec<u8> {
    let (r, b) = blockd_block::io::aligned_read(n, off, IoBuf::new(len as usize, 4096)).await;
    r.unwrap();
    b.to_vec()
}

#[test]
fn copy_before_write_keeps_the_point_in_time_view() {
    let dir = std::env::temp_dir().join(format!("blockd-cbw-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (sp, tp) = (dir.join("src"), dir.join("tgt"));
    file(&sp, 0x11);
    file(&tp, 0);
    blockd_aio::block_on(async {
        let mut g = Graph::new();
        let src = open(&mut g, "src", &sp);
        let tgt = open(&mut g, "tgt", &tp);
        let bcs = Arc::new(BlockCopy::new(
            LEN,
            CL,
            false,
            OnCbwError::BreakGuestWrite,
            None,
        ));
        let cbw = g
            .add_node(
                "cbw",
                Box::new(CopyBeforeWrite { bcs: bcs.clone() }),
                vec![file_edge(src.clone()), target_edge(tgt.clone())],
                LEN,
            )
            .unwrap();
        let guest = g
            .new_backend(
                "guest",
                &cbw,
                Perm::CONSISTENT_READ | Perm::WRITE,
                Perm::ALL,
            )
            .unwrap();
        // a write inside cluster 1: that cluster is copied first, nothing else
        let (r, _) = guest
            .write(100_000, IoBuf::from_slice(&[0x22; 1000]), ReqFlags::NONE)
            .await;
        r.unwrap();
        assert_eq!(read(&tgt, CL, CL).await, vec![0x11; CL as usize]);
        assert_eq!(read(&tgt, 0, CL).await, vec![0; CL as usize]);
        assert_eq!(read(&tgt, 2 * CL, CL).await, vec![0; CL as usize]);
        assert_eq!(read(&src, 100_000, 1000).await, vec![0x22; 1000]);
        assert!(bcs.copied().get(1) && !bcs.copied().get(0));
        // again: not copied a second time (the target keeps the old data)
        let (r, _) = guest
            .write(CL, IoBuf::from_slice(&[0x33; 4096]), ReqFlags::NONE)
            .await;
        r.unwrap();
        assert_eq!(read(&tgt, CL, CL).await, vec![0x11; CL as usize]);
        // the view: old data everywhere, from the target or the source
        let (r, view) = bcs
            .snapshot_read(&src, &tgt, 0, IoBuf::new(4 * CL as usize, 4096))
            .await;
        r.unwrap();
        assert!(view.iter().all(|&b| b == 0x11));
        // the reader is done with cluster 5: a write there is not copied any more
        bcs.snapshot_discard(5 * CL, CL);
        let (r, _) = guest
            .write(5 * CL, IoBuf::from_slice(&[0x44; 512]), ReqFlags::NONE)
            .await;
        r.unwrap();
        assert_eq!(read(&tgt, 5 * CL, CL).await, vec![0; CL as usize]);
        // write-zeroes copies first too
        guest
            .write_zeroes(7 * CL, CL, ReqFlags::NONE)
            .await
            .unwrap();
        assert_eq!(read(&tgt, 7 * CL, CL).await, vec![0x11; CL as usize]);
        // the backup's copy of the rest: the target is the source as it was (but cluster 5)
        let n = bcs.copy(&src, &tgt, 0, LEN).await.unwrap();
        // all but clusters 1 and 7 (copied on the guest writes) and 5 (discarded)
        assert_eq!(n, LEN - 3 * CL, "data copied by the job");
        assert_eq!(bcs.remaining(), 0);
        let t = read(&tgt, 0, LEN).await;
        for c in 0..LEN / CL {
            let want = if c == 5 { 0 } else { 0x11 };
            let got = &t[(c * CL) as usize..((c + 1) * CL) as usize];
            assert!(got.iter().all(|&b| b == want), "target cluster {c}");
        }
        guest.detach(&g);
    })
    .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
