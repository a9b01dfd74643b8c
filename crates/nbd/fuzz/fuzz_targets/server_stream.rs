//! The server's handshake and request parser fed from a byte stream: the fuzz input is what a
//! client sends on a fresh connection to a server with one writable 16 MiB null-co export
//! named "x". Run: `cargo +nightly fuzz run server_stream` in crates/nbd.
#![no_main]

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use blockd_block::{Graph, Perm};
use blockd_nbd::server::serve_socket;
use blockd_nbd::{ExportConfig, NbdServer, ServerConfig};
use libfuzzer_sys::fuzz_target;

thread_local! {
    static SERVER: (Graph, NbdServer) = {
        let mut graph = Graph::new();
        let opts = serde_json::json!({"driver": "null-co", "size": 16 << 20, "read-zeroes": true});
        let node = graph.open(opts.as_object().unwrap().clone()).unwrap();
        let backend = graph
            .new_backend("", &node, Perm::CONSISTENT_READ | Perm::WRITE, Perm::ALL)
            .unwrap();
        let server = NbdServer::new(ServerConfig {
            max_connections: 0,
            handshake_timeout: Duration::from_secs(1),
        })
        .unwrap();
        server
            .add_export(ExportConfig {
                id: "x".into(),
                name: "x".into(),
                description: None,
                backend,
                writable: true,
                writethrough: false,
                allocation_depth: true,
                bitmaps: Vec::new(),
                multi_conn: true,
                iothread: None,
                detect_zeroes: Default::default(),
            })
            .unwrap();
        (graph, server)
    };
}

fuzz_target!(|data: &[u8]| {
    SERVER.with(|(_, server)| {
        let (client, srv) = UnixStream::pair().unwrap();
        let mut w = client.try_clone().unwrap();
        let input = data.to_vec();
        let writer = std::thread::spawn(move || {
            let _ = w.write_all(&input);
            let _ = w.shutdown(std::net::Shutdown::Write);
        });
        let mut rd = client;
        let reader = std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 16];
            while matches!(rd.read(&mut buf), Ok(n) if n > 0) {}
        });
        serve_socket(server, OwnedFd::from(srv));
        blockd_aio::block_on(async {
            while server.active_connections() > 0 {
                blockd_aio::sleep(Duration::from_millis(1)).await;
            }
        })
        .unwrap();
        writer.join().unwrap();
        reader.join().unwrap();
    });
});
