//! `--chardev socket,...` (listening sockets for monitors) and `--monitor`.
//!
//! A socket chardev listens on a unix path, a TCP address, or an inherited descriptor
//! (`fd=N`); `--monitor chardev=ID` accepts connections on it (one at a time per chardev is
//! QEMU's rule for a chardev; here every accepted connection gets its own monitor, so several
//! clients can share one socket) and serves each as a QMP monitor.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;
use std::rc::Rc;

use blockd_aio::ops;
use blockd_qmp::Server;
use serde_json::{Map, Value};

pub struct Chardev {
    /// with `wait=on`: the client start-up waited for, served once a monitor uses the chardev
    first: Option<OwnedFd>,
    listener: OwnedFd,
    /// unix socket path to remove at exit
    pub path: Option<PathBuf>,
    pub used: bool,
}

#[derive(Default)]
pub struct Chardevs {
    pub devs: BTreeMap<String, Chardev>,
}

fn text(m: &Map<String, Value>, k: &str) -> Option<String> {
    match m.get(k)? {
        Value::String(s) => Some(s.clone()),
        Value::Bool(b) => Some(if *b { "on".into() } else { "off".into() }),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn on_off(m: &Map<String, Value>, k: &str, default: bool) -> Result<bool, String> {
    match text(m, k).as_deref() {
        None => Ok(default),
        Some("on" | "yes" | "true") => Ok(true),
        Some("off" | "no" | "false") => Ok(false),
        Some(v) => Err(format!("Parameter '{k}' expects 'on' or 'off', got '{v}'")),
    }
}

impl Chardevs {
    /// `--chardev` with its options (`backend` is the implied first key).
    pub fn add(&mut self, m: Map<String, Value>) -> Result<(), String> {
        let backend = text(&m, "backend").unwrap_or_default();
        let id = text(&m, "id").ok_or("Parameter 'id' is missing")?;
        if self.devs.contains_key(&id) {
            return Err(format!(
                "attempt to add duplicate property '{id}' to object (type 'container')"
            ));
        }
        if backend != "socket" {
            return Err(format!(
                "chardev backend '{backend}' is not supported by blockd yet (only 'socket')"
            ));
        }
        for k in m.keys() {
            if ![
                "backend", "id", "path", "host", "port", "server", "wait", "fd", "ipv4", "ipv6",
            ]
            .contains(&k.as_str())
            {
                return Err(format!("Invalid parameter '{k}'"));
            }
        }
        let server = on_off(&m, "server", false)?;
        let wait = on_off(&m, "wait", true)?;
        let fd = text(&m, "fd");
        let path = text(&m, "path");
        let host = text(&m, "host");
        let port = text(&m, "port");
        let (listener, unlink) = if let Some(fd) = fd {
            // an inherited listening socket (socket activation)
            let n: i32 = fd
                .parse()
                .map_err(|_| format!("Parameter 'fd' expects a file descriptor, got '{fd}'"))?;
            // SAFETY: fcntl on any integer is harmless; it only tells whether it is open.
            if n < 0 || unsafe { libc::fcntl(n, libc::F_GETFD) } < 0 {
                return Err(format!("File descriptor '{n}' is not valid"));
            }
            // SAFETY: the descriptor is open (checked above) and was handed to this process
            // on the command line for this chardev alone, which takes ownership of it.
            let owned = unsafe { OwnedFd::from_raw_fd(n) };
            (owned, None)
        } else {
            if !server {
                return Err(
                    "client chardev sockets (server=off) are not supported by blockd yet".into(),
                );
            }
            if let Some(p) = path {
                let pb = PathBuf::from(&p);
                // a socket left by an earlier run is replaced, as QEMU does
                if std::fs::symlink_metadata(&pb).is_ok_and(|m| m.file_type().is_socket()) {
                    let _ = std::fs::remove_file(&pb);
                }
                let l = std::os::unix::net::UnixListener::bind(&pb).map_err(|e| {
                    format!(
                        "Failed to bind socket to {p}: {}",
                        blockd_block::strerror(&e)
                    )
                })?;
                (OwnedFd::from(l), Some(pb))
            } else if let (Some(h), Some(port)) = (host.clone(), port) {
                let addr = format!(
                    "{}:{port}",
                    if h.contains(':') { format!("[{h}]") } else { h }
                );
                let l = std::net::TcpListener::bind(&addr).map_err(|e| {
                    format!(
                        "Failed to bind socket to {addr}: {}",
                        blockd_block::strerror(&e)
                    )
                })?;
                (OwnedFd::from(l), None)
            } else {
                return Err(
                    "chardev: socket: no address given (path, host and port, or fd)".into(),
                );
            }
        };
        // wait=on (the default for servers): start-up waits for the first client, as QEMU's
        // does; nothing is being served yet, so a blocking accept holds up nothing.
        let first = if server && wait {
            let what = match (&unlink, &host) {
                (Some(p), _) => format!("unix:{}", p.display()),
                (None, Some(h)) => format!("tcp:{h}:{}", text(&m, "port").unwrap_or_default()),
                _ => "fd".to_string(),
            };
            eprintln!(
                "{}: info: QEMU waiting for connection on: disconnected:{what},server=on",
                crate::cli::PROG
            );
            let fd = listener.try_clone().map_err(|e| e.to_string())?;
            let conn = if unlink.is_some() {
                std::os::unix::net::UnixListener::from(fd)
                    .accept()
                    .map(|(c, _)| OwnedFd::from(c))
            } else {
                std::net::TcpListener::from(fd)
                    .accept()
                    .map(|(c, _)| OwnedFd::from(c))
            };
            Some(conn.map_err(|e| format!("accept: {e}"))?)
        } else {
            None
        };
        self.devs.insert(
            id.clone(),
            Chardev {
                first,
                listener,
                path: unlink,
                used: false,
            },
        );
        Ok(())
    }

    /// `--monitor`: serve connections of the chardev as QMP monitors.
    pub fn monitor(&mut self, m: Map<String, Value>, server: &Rc<Server>) -> Result<(), String> {
        let id = text(&m, "chardev").ok_or("Parameter 'chardev' is missing")?;
        for k in m.keys() {
            if !["chardev", "mode", "pretty", "id"].contains(&k.as_str()) {
                return Err(format!("Parameter '{k}' is unexpected"));
            }
        }
        match text(&m, "mode").as_deref() {
            None | Some("control") => {}
            Some("readline") => return Err("Only QMP is supported".into()),
            Some(v) => return Err(format!("Parameter 'mode' does not accept value '{v}'")),
        }
        let pretty = on_off(&m, "pretty", false)?;
        let dev = self
            .devs
            .get_mut(&id)
            .ok_or_else(|| format!("chardev \"{id}\" not found"))?;
        if dev.used {
            return Err(format!("Device '{id}' is in use"));
        }
        dev.used = true;
        if let Some(conn) = dev.first.take() {
            server.serve(conn, pretty);
        }
        let fd = dev.listener.try_clone().map_err(|e| e.to_string())?;
        let server = server.clone();
        blockd_aio::spawn(async move {
            loop {
                match ops::accept(fd.as_raw_fd()).await {
                    Ok(conn) => server.serve(conn, pretty),
                    Err(e) if e.raw_os_error() == Some(libc::EMFILE) => {
                        // out of descriptors: back off instead of spinning
                        blockd_aio::sleep(std::time::Duration::from_millis(100)).await;
                    }
                    Err(e) => {
                        tracing::warn!(chardev = %id, "accept failed: {e}");
                        blockd_aio::sleep(std::time::Duration::from_millis(10)).await;
                    }
                }
            }
        })
        .detach();
        Ok(())
    }

    /// Remove the unix socket files (at exit).
    pub fn cleanup(&mut self) {
        for d in self.devs.values() {
            if let Some(p) = &d.path {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}
