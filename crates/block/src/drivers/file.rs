//! `file` and `host_device`: a regular file or block device, with QEMU's three I/O engines:
//! `aio=io_uring` (the default here: the context's own ring), `aio=native` (Linux AIO, needs
//! `cache.direct=on` as in QEMU) and `aio=threads` (the blocking pool). `cache.direct=on` opens
//! with O_DIRECT and reports the device's alignment, so BlockBackend bounces unaligned requests.
//! Discard punches holes (with `discard=unmap`), write-zeroes uses fallocate, block status uses
//! SEEK_DATA/SEEK_HOLE.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwap;
use blockd_aio::{IoBuf, blocking, linux_aio, ops};

use crate::driver::{
    BlockDriver, BlockStatus, BufResult, IoFuture, Limits, ReopenPrepared, ReopenRequest, ReqFlags,
    cannot_change,
};
use crate::drivers::Opened;
use crate::graph::OpenFlags;
use crate::node::Node;
use crate::options::Opts;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aio {
    IoUring,
    Native,
    Threads,
}

pub struct FileDriver {
    name: &'static str,
    /// Swapped by a reopen (read-only ↔ read-write), inside a drained section.
    file: ArcSwap<File>,
    aio: Aio,
    no_flush: AtomicBool,
    discard_unmap: AtomicBool,
    /// Opened with O_DIRECT (a reopen may change it, and with it the node's limits).
    direct: AtomicBool,
    limits: Limits,
    filename: String,
    locking: bool,
}

pub(crate) fn open(driver: &str, o: &mut Opts, flags: OpenFlags) -> Result<Opened, String> {
    let discard_unmap = flags.discard_unmap;
    let filename = o
        .take_str("filename")?
        .ok_or_else(|| "Parameter 'filename' is required".to_string())?;
    let aio = match o.take_str("aio")? {
        None => Aio::IoUring,
        Some(a) => parse_aio(&a)?,
    };
    let use_locks = match o.take_str("locking")? {
        None => true,
        Some(l) => parse_locking(&l)?,
    };
    let _ = o.take_u64("aio-max-batch")?;
    let _ = o.take_bool("drop-cache")?;
    if aio == Aio::Native && !flags.cache_direct {
        return Err(
            "aio=native was specified, but it requires cache.direct=on, which was not specified."
                .into(),
        );
    }
    let file = open_fd(&filename, flags.read_only, flags.cache_direct)
        .map_err(|e| format!("Could not open '{filename}': {}", crate::strerror(&e)))?;
    let meta = file
        .metadata()
        .map_err(|e| format!("Could not stat '{filename}': {e}"))?;
    let is_blk = meta.file_type().is_block_device();
    if driver == "file" && is_blk {
        return Err(format!(
            "'{filename}' refers to a block device; use driver 'host_device'"
        ));
    }
    if driver == "host_device" && !is_blk && !meta.file_type().is_char_device() {
        return Err(format!("'{filename}' is not a block device"));
    }
    let length = if is_blk {
        blk_size(file.as_raw_fd())?
    } else {
        meta.len()
    };
    let limits = if flags.cache_direct {
        direct_limits(file.as_raw_fd())
    } else {
        Limits::default()
    };
    if aio == Aio::Native {
        linux_aio::available().map_err(|e| format!("Unable to use native AIO: {e}"))?;
    }
    Ok(Opened {
        driver: Box::new(FileDriver {
            name: if driver == "host_device" {
                "host_device"
            } else {
                "file"
            },
            file: ArcSwap::from_pointee(file),
            aio,
            no_flush: AtomicBool::new(flags.no_flush),
            discard_unmap: AtomicBool::new(discard_unmap),
            direct: AtomicBool::new(flags.cache_direct),
            limits,
            filename,
            locking: use_locks,
        }),
        children: Vec::new(),
        length,
    })
}

/// What O_DIRECT needs of requests on `fd`.
fn direct_limits(fd: RawFd) -> Limits {
    let (mem, off) = dio_alignment(fd);
    Limits {
        request_alignment: off,
        max_transfer: 0,
        min_mem_alignment: mem,
    }
}

fn parse_aio(a: &str) -> Result<Aio, String> {
    match a {
        "io_uring" => Ok(Aio::IoUring),
        "native" => Ok(Aio::Native),
        "threads" => Ok(Aio::Threads),
        other => Err(format!("Parameter 'aio' does not accept value '{other}'")),
    }
}

fn parse_locking(l: &str) -> Result<bool, String> {
    match l {
        "auto" | "on" => Ok(true),
        "off" => Ok(false),
        l => Err(format!("Parameter 'locking' does not accept value '{l}'")),
    }
}

fn open_fd(filename: &str, read_only: bool, direct: bool) -> io::Result<File> {
    let mut oo = std::fs::OpenOptions::new();
    oo.read(true).write(!read_only);
    let mut custom = libc::O_CLOEXEC;
    if direct {
        custom |= libc::O_DIRECT;
    }
    oo.custom_flags(custom);
    oo.open(filename)
}

/// A prepared reopen of a file node.
struct FileReopen {
    /// A new descriptor when the access mode or O_DIRECT changes.
    file: Option<File>,
    direct: bool,
    no_flush: bool,
    discard_unmap: bool,
}

fn blk_size(fd: RawFd) -> Result<u64, String> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes a u64 through the pointer.
    let r = unsafe { libc::ioctl(fd, 0x80081272, &mut size) };
    if r < 0 {
        return Err(format!(
            "Could not get device size: {}",
            io::Error::last_os_error()
        ));
    }
    Ok(size)
}

/// Direct I/O alignment (memory, offset) from statx, or a safe 4 KiB when the kernel is silent.
fn dio_alignment(fd: RawFd) -> (u32, u32) {
    // SAFETY: statx is plain old data.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd, empty path with AT_EMPTY_PATH, valid output buffer.
    let r = unsafe {
        libc::statx(
            fd,
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut st,
        )
    };
    if r == 0 && st.stx_mask & libc::STATX_DIOALIGN != 0 && st.stx_dio_offset_align != 0 {
        (st.stx_dio_mem_align.max(1), st.stx_dio_offset_align)
    } else {
        (4096, 4096)
    }
}

impl FileDriver {
    fn fd(&self) -> RawFd {
        self.file.load().as_raw_fd()
    }

    /// The open file. A reopen may replace it (inside a drained section); the returned `Arc`
    /// keeps this one open, so I/O the kernel runs later (a splice) cannot hit a reused fd.
    pub fn open_file(&self) -> Arc<File> {
        self.file.load_full()
    }

    pub fn filename(&self) -> &str {
        &self.filename
    }

    async fn read_full(&self, offset: u64, buf: IoBuf) -> BufResult {
        let want = buf.len();
        let (r, buf) = match self.aio {
            Aio::IoUring => ops::read_at(self.fd(), buf, offset).await,
            Aio::Native => linux_aio::read_at(self.fd(), buf, offset).await,
            Aio::Threads => {
                self.on_pool(want, move |f| {
                    let mut buf = buf;
                    (f.read_at(&mut buf, offset), buf)
                })
                .await
            }
        };
        match r {
            Ok(n) if n == want => (Ok(()), buf),
            // Short read: a partial transfer, or the end of the file inside the node's last
            // (rounded-up) sector: finish it, reading zeroes past the end like QEMU.
            Ok(n) => self.read_tail(offset, buf, n).await,
            Err(e) => (Err(e), buf),
        }
    }

    /// Run a transfer on the blocking pool (`aio=threads`). If the pool thread dies the buffer
    /// is lost with it; a fresh one comes back with the error.
    async fn on_pool(
        &self,
        want: usize,
        job: impl FnOnce(&File) -> (io::Result<usize>, IoBuf) + Send + 'static,
    ) -> (io::Result<usize>, IoBuf) {
        let f = self.file.load_full();
        blocking::spawn_blocking(move || job(&f))
            .await
            .unwrap_or_else(|_| {
                (
                    Err(io::Error::other("I/O thread died")),
                    IoBuf::new(want, 512),
                )
            })
    }

    /// Complete a short read: read the remainder, or zero-fill at end of file.
    async fn read_tail(
        &self,
        offset: u64,
        mut buf: IoBuf,
        mut done: usize,
    ) -> (io::Result<()>, IoBuf) {
        while done < buf.len() {
            let mut rest = IoBuf::new(buf.len() - done, 4096);
            let (r, b) = ops::read_at(self.fd(), rest, offset + done as u64).await;
            rest = b;
            match r {
                Ok(0) => {
                    buf[done..].fill(0);
                    return (Ok(()), buf);
                }
                Ok(n) => {
                    buf[done..done + n].copy_from_slice(&rest[..n]);
                    done += n;
                }
                Err(e) => return (Err(e), buf),
            }
        }
        (Ok(()), buf)
    }

    async fn write_full(&self, offset: u64, buf: IoBuf, flags: ReqFlags) -> BufResult {
        let want = buf.len();
        let rw = if flags.contains(ReqFlags::FUA) {
            libc::RWF_DSYNC
        } else {
            0
        };
        let (r, buf) = match self.aio {
            Aio::IoUring => ops::write_at_flags(self.fd(), buf, offset, rw).await,
            Aio::Native => linux_aio::write_at(self.fd(), buf, offset, rw).await,
            Aio::Threads => {
                let fua = rw != 0;
                self.on_pool(want, move |f| {
                    let r = f
                        .write_all_at(&buf, offset)
                        .and_then(|_| if fua { f.sync_data() } else { Ok(()) });
                    (r.map(|_| want), buf)
                })
                .await
            }
        };
        match r {
            Ok(n) if n == want => (Ok(()), buf),
            Ok(_) => (Err(io::Error::from_raw_os_error(libc::ENOSPC)), buf),
            Err(e) => (Err(e), buf),
        }
    }
}

impl BlockDriver for FileDriver {
    fn format_name(&self) -> &'static str {
        self.name
    }

    fn filename(&self) -> Option<String> {
        Some(self.filename.clone())
    }

    /// The limits at open (a reopen that changes cache.direct gives the node new ones).
    fn limits(&self) -> Limits {
        self.limits
    }

    fn set_perm(&self, perm: crate::perm::Perm, shared: crate::perm::Perm) -> Result<(), String> {
        if !self.locking {
            return Ok(());
        }
        locking::apply(self.fd(), &self.filename, perm, shared)
    }

    fn check_perm(&self, perm: crate::perm::Perm, shared: crate::perm::Perm) -> Result<(), String> {
        if !self.locking {
            return Ok(());
        }
        // Our own locks are on this open file description, which OFD lock queries ignore.
        locking::check(self.fd(), &self.filename, perm, shared)
    }

    fn reopen_prepare(
        &self,
        _node: &Node,
        req: &mut ReopenRequest<'_>,
    ) -> Result<ReopenPrepared, String> {
        let o = &mut *req.opts;
        if let Some(f) = o.take_str("filename")?
            && f != self.filename
        {
            return Err(cannot_change("filename"));
        }
        if let Some(a) = o.take_str("aio")? {
            let aio = parse_aio(&a)?;
            if aio != self.aio {
                return Err(cannot_change("aio"));
            }
        }
        if let Some(l) = o.take_str("locking")?
            && parse_locking(&l)? != self.locking
        {
            return Err(cannot_change("locking"));
        }
        let _ = o.take_u64("aio-max-batch")?;
        let _ = o.take_bool("drop-cache")?;
        let direct = req.flags.cache_direct;
        let was_direct = self.direct.load(Ordering::Relaxed);
        if self.aio == Aio::Native && !direct {
            return Err(
                "aio=native was specified, but it requires cache.direct=on, which was not specified."
                    .into(),
            );
        }
        // the access mode of the open file description
        // SAFETY: F_GETFL on a valid fd.
        let fl = unsafe { libc::fcntl(self.fd(), libc::F_GETFL) };
        let was_read_only = fl >= 0 && fl & libc::O_ACCMODE == libc::O_RDONLY;
        let file = if was_read_only != req.read_only || direct != was_direct {
            Some(
                open_fd(&self.filename, req.read_only, direct)
                    .map_err(|e| format!("Could not reopen file: {}", crate::strerror(&e)))?,
            )
        } else {
            None
        };
        let limits = match &file {
            Some(f) if direct => Some(direct_limits(f.as_raw_fd())),
            Some(_) => Some(Limits::default()),
            None => None,
        };
        Ok(ReopenPrepared {
            limits,
            state: Box::new(FileReopen {
                file,
                direct,
                no_flush: req.flags.no_flush,
                discard_unmap: req.flags.discard_unmap,
            }),
            child_perms: Vec::new(),
            length: None,
        })
    }

    fn reopen_commit(&self, _node: &Node, state: Box<dyn std::any::Any + Send>) {
        let Ok(st) = state.downcast::<FileReopen>() else {
            return;
        };
        if let Some(f) = st.file {
            if self.locking {
                // the new descriptor takes the locks when the graph refreshes the permissions
                locking::release(self.fd());
            }
            self.file.store(Arc::new(f));
        }
        self.direct.store(st.direct, Ordering::Relaxed);
        self.no_flush.store(st.no_flush, Ordering::Relaxed);
        self.discard_unmap
            .store(st.discard_unmap, Ordering::Relaxed);
    }

    fn read<'a>(&'a self, _n: &'a Node, off: u64, buf: IoBuf) -> IoFuture<'a, BufResult> {
        Box::pin(self.read_full(off, buf))
    }

    fn write<'a>(
        &'a self,
        node: &'a Node,
        off: u64,
        buf: IoBuf,
        flags: ReqFlags,
    ) -> IoFuture<'a, BufResult> {
        Box::pin(async move {
            let end = off + buf.len() as u64;
            let r = self.write_full(off, buf, flags).await;
            if r.0.is_ok() && end > node.length() {
                node.set_length(end);
            }
            r
        })
    }

    fn flush<'a>(&'a self, _n: &'a Node) -> IoFuture<'a, io::Result<()>> {
        Box::pin(async move {
            if self.no_flush.load(Ordering::Relaxed) {
                return Ok(());
            }
            ops::fdatasync(self.fd()).await
        })
    }

    fn discard<'a>(&'a self, _n: &'a Node, off: u64, len: u64) -> IoFuture<'a, io::Result<()>> {
        Box::pin(async move {
            if !self.discard_unmap.load(Ordering::Relaxed) {
                return Ok(());
            }
            match ops::punch_hole(self.fd(), off, len).await {
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
                r => r,
            }
        })
    }

    fn write_zeroes<'a>(
        &'a self,
        _n: &'a Node,
        off: u64,
        len: u64,
        flags: ReqFlags,
    ) -> IoFuture<'a, io::Result<()>> {
        Box::pin(async move {
            let r = if flags.contains(ReqFlags::MAY_UNMAP)
                && self.discard_unmap.load(Ordering::Relaxed)
            {
                ops::punch_hole(self.fd(), off, len).await
            } else {
                ops::zero_range(self.fd(), off, len).await
            };
            match r {
                Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EINVAL)) => {
                    Err(crate::driver::not_supported())
                }
                r => r,
            }
        })
    }

    fn block_status<'a>(
        &'a self,
        _n: &'a Node,
        off: u64,
        len: u64,
    ) -> IoFuture<'a, io::Result<BlockStatus>> {
        Box::pin(async move { seek_status(self.fd(), off, len) })
    }

    fn truncate<'a>(&'a self, _n: &'a Node, len: u64) -> IoFuture<'a, io::Result<u64>> {
        Box::pin(async move {
            let f = self.file.load_full();
            blocking::spawn_blocking(move || f.set_len(len).map(|_| len))
                .await
                .map_err(|_| io::Error::other("I/O thread died"))?
        })
    }
}

/// Data or hole at `off` via SEEK_DATA/SEEK_HOLE.
fn seek_status(fd: RawFd, off: u64, len: u64) -> io::Result<BlockStatus> {
    let end = off + len;
    // SAFETY: lseek on a valid fd.
    let data = unsafe { libc::lseek(fd, off as libc::off_t, libc::SEEK_DATA) };
    let (is_data, until) = if data < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            // No data after `off`: a hole to the end.
            (false, end)
        } else {
            // Filesystem cannot tell: report data.
            (true, end)
        }
    } else if data as u64 > off {
        (false, (data as u64).min(end))
    } else {
        // SAFETY: lseek on a valid fd.
        let hole = unsafe { libc::lseek(fd, off as libc::off_t, libc::SEEK_HOLE) };
        let h = if hole < 0 {
            end
        } else {
            (hole as u64).min(end)
        };
        (true, h.max(off + 1))
    };
    Ok(BlockStatus {
        len: until - off,
        data: is_data,
        zero: !is_data,
        allocated: true,
        offset: Some(off),
    })
}

/// Image locking with open-file-description locks on the byte offsets QEMU uses, so blockd and
/// QEMU's tools see each other's uses of an image: a shared lock on byte 100+n while a user holds
/// permission n, and on byte 200+n while a user does not share permission n. A conflict is a
/// lock another open file description holds on the opposite byte.
mod locking {
    use std::os::fd::RawFd;

    use crate::perm::Perm;

    const PERM_BASE: i64 = 100;
    const SHARED_BASE: i64 = 200;
    const BITS: [(Perm, &str); 4] = [
        (Perm::CONSISTENT_READ, "consistent read"),
        (Perm::WRITE, "write"),
        (Perm::WRITE_UNCHANGED, "write unchanged"),
        (Perm::RESIZE, "resize"),
    ];

    /// Would `perm`/`shared` conflict with another open file description's locks?
    pub(super) fn check(fd: RawFd, path: &str, perm: Perm, shared: Perm) -> Result<(), String> {
        for (i, (bit, name)) in BITS.iter().enumerate() {
            if perm.contains(*bit) && held_by_other(fd, SHARED_BASE + i as i64) {
                return Err(format!(
                    "Failed to get \"{name}\" lock\nIs another process using the image [{path}]?"
                ));
            }
            if !shared.contains(*bit) && held_by_other(fd, PERM_BASE + i as i64) {
                return Err(format!(
                    "Failed to get shared \"{name}\" lock\nIs another process using the image [{path}]?"
                ));
            }
        }
        Ok(())
    }

    /// Drop every lock this open file description holds (before a reopen closes it).
    pub(super) fn release(fd: RawFd) {
        for i in 0..BITS.len() as i64 {
            let _ = lock(fd, PERM_BASE + i, libc::F_UNLCK as i16, libc::F_OFD_SETLK);
            let _ = lock(fd, SHARED_BASE + i, libc::F_UNLCK as i16, libc::F_OFD_SETLK);
        }
    }

    fn lock(fd: RawFd, byte: i64, kind: i16, cmd: libc::c_int) -> std::io::Result<libc::flock> {
        let mut fl = libc::flock {
            l_type: kind,
            l_whence: libc::SEEK_SET as i16,
            l_start: byte,
            l_len: 1,
            l_pid: 0,
        };
        // SAFETY: fcntl with a valid flock structure on a valid fd.
        let r = unsafe { libc::fcntl(fd, cmd, &mut fl) };
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(fl)
        }
    }

    /// Is byte `byte` locked by another open file description?
    fn held_by_other(fd: RawFd, byte: i64) -> bool {
        matches!(lock(fd, byte, libc::F_WRLCK as i16, libc::F_OFD_GETLK), Ok(fl) if fl.l_type != libc::F_UNLCK as i16)
    }

    /// Take the locks for `perm`/`shared` after checking nobody conflicts.
    pub(super) fn apply(fd: RawFd, path: &str, perm: Perm, shared: Perm) -> Result<(), String> {
        for (i, (bit, name)) in BITS.iter().enumerate() {
            if perm.contains(*bit) && held_by_other(fd, SHARED_BASE + i as i64) {
                return Err(format!(
                    "Failed to get \"{name}\" lock\nIs another process using the image [{path}]?"
                ));
            }
            if !shared.contains(*bit) && held_by_other(fd, PERM_BASE + i as i64) {
                return Err(format!(
                    "Failed to get shared \"{name}\" lock\nIs another process using the image [{path}]?"
                ));
            }
        }
        for (i, (bit, _)) in BITS.iter().enumerate() {
            let set = |byte: i64, on: bool| {
                let kind = if on { libc::F_RDLCK } else { libc::F_UNLCK };
                lock(fd, byte, kind as i16, libc::F_OFD_SETLK)
            };
            set(PERM_BASE + i as i64, perm.contains(*bit))
                .and_then(|_| set(SHARED_BASE + i as i64, !shared.contains(*bit)))
                .map_err(|e| format!("Failed to lock byte {}: {e}", PERM_BASE + i as i64))?;
        }
        Ok(())
    }
}
