//! Process plumbing: termination signals through a signalfd watched on the main context (no
//! work in a signal handler at all), the pid file, and `--daemonize`.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Block SIGINT, SIGTERM and SIGHUP in this thread (and so in every thread started later) and
/// return a signalfd that reports them.
pub fn signal_fd() -> std::io::Result<OwnedFd> {
    // SAFETY: sigset_t is plain data; the calls only write into `set`.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; these calls have no other preconditions.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    // SAFETY: `set` is valid; the returned descriptor is checked and then owned.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Wait on the main context for one of the signals; returns its number.
pub async fn next_signal(fd: &OwnedFd) -> i32 {
    let mut file = File::from(fd.try_clone().expect("dup signalfd"));
    loop {
        let _ = blockd_aio::ops::poll_add(fd.as_raw_fd(), libc::POLLIN).await;
        let mut info = [0u8; 128]; // struct signalfd_siginfo
        if let Ok(128) = file.read(&mut info) {
            return i32::from_ne_bytes([info[0], info[1], info[2], info[3]]);
        }
    }
}

/// A pid file, locked while the daemon runs and removed when dropped.
pub struct PidFile {
    path: String,
    _file: File,
}

impl PidFile {
    pub fn create(path: &str) -> Result<PidFile, String> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| format!("Could not create '{path}': {}", blockd_block::strerror(&e)))?;
        f.try_lock()
            .map_err(|_| format!("Cannot lock pid file '{path}': another process holds it"))?;
        f.set_len(0)
            .and_then(|_| f.write_all(format!("{}\n", std::process::id()).as_bytes()))
            .map_err(|e| {
                format!(
                    "Failed to write pid file '{path}': {}",
                    blockd_block::strerror(&e)
                )
            })?;
        Ok(PidFile {
            path: path.to_string(),
            _file: f,
        })
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The child's end of `--daemonize`: tell the waiting parent that start-up succeeded.
pub struct DaemonPipe {
    fd: Option<OwnedFd>,
}

impl DaemonPipe {
    pub fn none() -> DaemonPipe {
        DaemonPipe { fd: None }
    }

    /// Start-up is complete: the parent exits 0, and the standard streams go to /dev/null.
    pub fn ready(&mut self) {
        if let Some(fd) = self.fd.take() {
            let mut f = File::from(fd);
            let _ = f.write_all(&[0]);
            if let Ok(null) = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
            {
                for target in 0..3 {
                    // SAFETY: dup2 onto the standard descriptors; `null` stays open meanwhile.
                    unsafe { libc::dup2(null.as_raw_fd(), target) };
                }
            }
        }
    }
}

/// Fork: the parent waits for the child's start-up and exits with its outcome (0 when the
/// child reported ready, 1 when it exited first); the child returns its end of the pipe.
/// Must run before any thread or event loop exists.
pub fn daemonize() -> Result<DaemonPipe, String> {
    let mut fds = [0i32; 2];
    // SAFETY: fds has room for the two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!("pipe: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: fresh descriptors owned by nobody else.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: the process is still single-threaded here (checked by the caller's ordering),
    // so the child may run arbitrary code after fork.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", std::io::Error::last_os_error()));
    }
    if pid > 0 {
        drop(wr);
        let mut f = File::from(rd);
        let mut b = [0u8; 1];
        let code = match f.read(&mut b) {
            Ok(1) if b[0] == 0 => 0,
            _ => 1,
        };
        std::process::exit(code);
    }
    drop(rd);
    // SAFETY: setsid has no preconditions; it makes the child a session leader.
    unsafe { libc::setsid() };
    Ok(DaemonPipe { fd: Some(wr) })
}
