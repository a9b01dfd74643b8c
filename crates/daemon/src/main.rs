//! blockd-storage-daemon: qemu-storage-daemon's command line and QMP monitor on blockd.
//!
//! Start-up, in QEMU's order: the options are applied in the order given (objects, block
//! nodes, chardevs, monitors, exports); then the pid file is written and, with
//! `--daemonize`, the parent is told that start-up succeeded. Only then are connections
//! served. The daemon runs until `quit` or SIGINT/SIGTERM/SIGHUP; shutdown drains every node,
//! flushes and closes the images, stops the iothreads and removes the pid file.
//!
//! The main thread runs the main context (`block_on` at the top of the program is the one
//! place a loop is entered); everything else is a task on it or on an iothread.

mod backup;
mod bitmaps;
mod bitmaps_txn;
mod block;
mod chardev;
mod cli;
mod commands;
mod hmp;
mod image_files;
mod internal_snapshot;
mod iothreads;
mod jobs;
mod nbd;
mod process;
mod snapshot;
mod state;
mod transaction;

use std::rc::Rc;
use std::time::Duration;

use blockd_qmp::Server;
use serde_json::json;

use crate::chardev::Chardevs;
use crate::cli::{Opt, PROG};
use crate::state::Daemon;

fn setup_tracing(patterns: &[String]) -> Result<(), String> {
    use tracing_subscriber::prelude::*;
    let mut globs: Vec<String> = Vec::new();
    let mut file: Option<String> = None;
    for p in patterns {
        for item in blockd_block::options::split_list(p) {
            match item.split_once('=') {
                Some(("enable", v)) => globs.push(v.to_string()),
                Some(("events", path)) => {
                    let text = std::fs::read_to_string(path).map_err(|e| {
                        format!(
                            "{PROG}: -T {p}: cannot read {path}: {}",
                            blockd_block::strerror(&e)
                        )
                    })?;
                    globs.extend(
                        text.lines()
                            .map(str::trim)
                            .filter(|l| !l.is_empty() && !l.starts_with('#'))
                            .map(String::from),
                    );
                }
                Some(("file", path)) => file = Some(path.to_string()),
                Some((k, _)) => return Err(format!("{PROG}: -T {p}: Invalid parameter '{k}'")),
                None => globs.push(item),
            }
        }
    }
    if globs.is_empty() {
        // no tracing asked for: warnings and errors only
        let _ = tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_max_level(tracing::Level::WARN)
            .try_init();
        return Ok(());
    }
    // QEMU's trace patterns are globs over event names; blockd's events are tracing
    // targets (module paths such as `blockd_qmp::server`), matched the same way.
    let filter = tracing_subscriber::filter::filter_fn(move |meta| {
        let t = meta.target();
        meta.level() <= &tracing::Level::WARN || globs.iter().any(|g| glob(g, t))
    });
    let layer = tracing_subscriber::fmt::layer();
    let r = match file {
        Some(path) => {
            let f = std::fs::File::create(&path).map_err(|e| {
                format!(
                    "{PROG}: cannot open trace file {path}: {}",
                    blockd_block::strerror(&e)
                )
            })?;
            tracing_subscriber::registry()
                .with(
                    layer
                        .with_writer(std::sync::Mutex::new(f))
                        .with_ansi(false)
                        .with_filter(filter),
                )
                .try_init()
        }
        None => tracing_subscriber::registry()
            .with(layer.with_writer(std::io::stderr).with_filter(filter))
            .try_init(),
    };
    r.map_err(|e| format!("{PROG}: tracing: {e}"))
}

/// `*` and `?` globbing.
fn glob(pat: &str, s: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pat.chars().collect(), s.chars().collect());
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

fn main() {
    let argv0 = std::env::args().next().unwrap_or_else(|| PROG.into());
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cmd = match cli::parse(&argv0, &args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    };
    if cmd.help {
        print!("{}", cli::help_text());
        return;
    }
    if cmd.version {
        print!("{}", cli::version_text());
        return;
    }
    if let Err(e) = setup_tracing(&cmd.trace) {
        eprintln!("{e}");
        std::process::exit(1);
    }
    // Fork before any thread or ring exists.
    let mut pipe = if cmd.daemonize {
        match process::daemonize() {
            Ok(p) => p,
            Err(e) => {
                eprintln!("{PROG}: {e}");
                std::process::exit(1);
            }
        }
    } else {
        process::DaemonPipe::none()
    };
    // Blocked here, the signals stay blocked in every thread started later.
    let sigfd = match process::signal_fd() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("{PROG}: signalfd: {e}");
            std::process::exit(1);
        }
    };
    let code = match blockd_aio::block_on(run(cmd, &mut pipe, sigfd)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{PROG}: {e}");
            1
        }
    };
    std::process::exit(code);
}

fn apply(
    d: &Rc<Daemon>,
    server: &Rc<Server>,
    chardevs: &mut Chardevs,
    o: &Opt,
) -> Result<(), String> {
    let arg = o.arg();
    match o {
        Opt::Object(_) => {
            let m = cli::parse_arg(arg, Some("qom-type"))?;
            if m.get("qom-type").and_then(|v| v.as_str()) == Some("help") {
                println!("Available object backend types:\n  iothread");
                std::process::exit(0);
            }
            d.iothreads.borrow_mut().add(m)
        }
        Opt::Blockdev(_) => {
            let m = cli::parse_arg(arg, Some("driver"))?;
            // the command line is checked against the same schema as blockdev-add; dotted
            // values are strings, which the block layer reads in QEMU's keyval syntax
            if let Some(drv) = m.get("driver").and_then(|v| v.as_str()) {
                let names = d.graph.borrow().driver_names();
                if !names.contains(&drv) {
                    return Err(format!("Parameter 'driver' does not accept value '{drv}'"));
                }
            }
            block::blockdev_add(d, m)
        }
        Opt::Chardev(_) => chardevs.add(cli::parse_arg(arg, Some("backend"))?),
        Opt::Monitor(_) => chardevs.monitor(cli::parse_arg(arg, Some("chardev"))?, server),
        Opt::NbdServer(_) => nbd::cli_server(d, arg),
        Opt::Export(_) => nbd::cli_export(d, arg),
    }
}

async fn run(
    cmd: cli::CmdLine,
    pipe: &mut process::DaemonPipe,
    sigfd: std::os::fd::OwnedFd,
) -> i32 {
    let d = Daemon::new();
    let server = Server::new(json!({
        "qemu": {"major": 10, "minor": 0, "micro": 2},
        "package": format!("blockd {}", env!("CARGO_PKG_VERSION")),
    }));
    *d.server.borrow_mut() = Some(server.clone());
    // events the block layer and drivers report, from any thread
    let sink = server.event_sink();
    blockd_block::events::set_sink(Box::new(move |name, data| sink.emit(name, Some(data))));
    commands::register(&server, &d);
    nbd::register(&server, &d);
    if let Err(e) = nbd::init(&d) {
        eprintln!("{PROG}: {e}");
        return 1;
    }
    let mut chardevs = Chardevs::default();
    let mut failed = false;
    for o in &cmd.opts {
        if let Err(e) = apply(&d, &server, &mut chardevs, o) {
            eprintln!("{PROG}: {} {}: {e}", o.flag(), o.arg());
            failed = true;
            break;
        }
    }
    let pidfile = if failed {
        None
    } else if let Some(p) = &cmd.pidfile {
        match process::PidFile::create(p) {
            Ok(f) => Some(f),
            Err(e) => {
                eprintln!("{PROG}: cannot create PID file: {e}");
                failed = true;
                None
            }
        }
    } else {
        None
    };
    if failed {
        shutdown(&d, &server).await;
        chardevs.cleanup();
        return 1;
    }
    pipe.ready();
    tracing::debug!("started");

    // Serve until quit or a signal.
    let sig = blockd_aio::spawn({
        let d = d.clone();
        async move {
            let s = process::next_signal(&sigfd).await;
            tracing::info!(signal = s, "terminating on signal");
            d.request_quit("host-signal");
        }
    });
    d.wait_quit().await;
    drop(sig);
    server.emit(
        "SHUTDOWN",
        Some(json!({"guest": false, "reason": d.quit_reason.get()})),
    );
    // let the reply to `quit` reach its monitor
    let _ = blockd_aio::timeout(Duration::from_secs(2), server.flush()).await;
    shutdown(&d, &server).await;
    chardevs.cleanup();
    drop(pidfile);
    0
}

/// Drain every node, flush and close them (users first), stop the iothreads.
async fn shutdown(d: &Rc<Daemon>, _server: &Rc<Server>) {
    // let monitor commands doing I/O (qemu-io, block_resize) finish, for a while
    for _ in 0..500 {
        if d.busy.get() == 0 {
            break;
        }
        blockd_aio::sleep(Duration::from_millis(10)).await;
    }
    // exports first: their clients go away and their backends are detached
    nbd::shutdown(d);
    for _ in 0..50 {
        let busy = d
            .nbd
            .borrow()
            .as_ref()
            .is_some_and(|st| !st.server().exports().is_empty());
        if !busy {
            break;
        }
        blockd_aio::sleep(Duration::from_millis(20)).await;
        nbd::reap_now(d);
    }
    // then the jobs end (cancelled, with their events) before the nodes are drained
    jobs::shutdown().await;
    let nodes: Vec<_> = d.graph.borrow().nodes().cloned().collect();
    {
        let _drain = blockd_block::drained_all(&nodes).await;
        for n in &nodes {
            if let Err(e) = n.driver().flush(n).await {
                tracing::warn!(node = n.name(), "flush at exit failed: {e}");
            }
        }
    }
    drop(nodes);
    // close: remove nodes nobody uses until none is left (parents before children)
    loop {
        let names: Vec<String> = d
            .graph
            .borrow()
            .nodes()
            .filter(|n| n.parent_count() == 0)
            .map(|n| n.name().to_string())
            .collect();
        if names.is_empty() {
            break;
        }
        for n in names {
            let _ = d.graph.borrow_mut().remove(&n);
        }
    }
    d.prune();
    let threads = d.iothreads.borrow_mut().take_all();
    for t in threads {
        t.stop_async().await;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn glob() {
        assert!(super::glob("blockd_qmp*", "blockd_qmp::server"));
        assert!(super::glob("*server", "blockd_qmp::server"));
        assert!(!super::glob("blockd_io*", "blockd_qmp::server"));
        assert!(super::glob("b?ockd*", "blockd"));
    }
}
