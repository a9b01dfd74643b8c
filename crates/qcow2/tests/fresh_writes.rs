//! Allocating writes into fresh clusters of an image with no backing file, the path that
//! hands the caller's buffer to the file as is when it is exactly the data (whole clusters,
//! aligned runs) and pads with zeroes otherwise: blockd reads back its model, `qemu-img check`
//! finds nothing and qemu-img reads the same bytes. Cluster sizes 4 KiB and 64 KiB, extended L2.

mod common;
use common::*;

use blockd_aio::block_on;

fn case(dir: &TempDir, tag: &str, list: &str) {
    let path = dir.path(&format!("{tag}.qcow2"));
    ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-o", list, &path, "8M"],
    );
    let mut model = vec![0u8; 8 << 20];
    let k = 1024usize;
    // (offset, length): whole clusters, several clusters at once, an aligned 4 KiB piece of a
    // cluster, a run starting mid-cluster, sector-sized pieces, the image's last cluster.
    let writes = [
        (0, 64 * k),
        (128 * k, 128 * k),
        (520 * k, 4 * k),
        (1024 * k + 32 * k, 64 * k),
        (2048 * k, 192 * k),
        (3072 * k + 512, 512),
        (4096 * k, 4 * k),
        (4100 * k, 4 * k),
        (8192 * k - 64 * k, 64 * k),
    ];
    let mut g = graph();
    let node = open_qcow2(&mut g, &path, "").unwrap_or_else(|e| panic!("{tag}: {e}"));
    let be = backend(&g, &node);
    block_on(async {
        for (i, &(off, len)) in writes.iter().enumerate() {
            let data: Vec<u8> = (0..len)
                .map(|j| (j as u8) ^ (i as u8).wrapping_mul(37).wrapping_add(1))
                .collect();
            write(&be, off as u64, &data).await;
            model[off..off + len].copy_from_slice(&data);
        }
        be.flush().await.unwrap();
        let got = read_all(&be).await;
        assert_eq!(first_diff(&got, &model), None, "{tag}: blockd reads back");
    })
    .unwrap();
    be.detach(&g);
    drop(node);
    drop(g);
    qemu_check_clean(&path);
    assert_eq!(
        first_diff(&qemu_raw(dir, &path), &model),
        None,
        "{tag}: qemu-img reads what blockd wrote"
    );
}

#[test]
fn fresh_cluster_writes_read_back_through_qemu() {
    if !have("qemu-img") {
        assert!(
            std::env::var_os("BLOCKD_REQUIRE_INTEROP").is_none(),
            "qemu-img is required"
        );
        eprintln!("SKIP fresh_writes: qemu-img missing");
        return;
    }
    let dir = TempDir::new("fresh-writes");
    case(&dir, "c64k", "cluster_size=65536");
    case(&dir, "c4k", "cluster_size=4096");
    case(&dir, "ext", "cluster_size=65536,extended_l2=on");
}
