//! The ring operations the layers above use, each a future on the calling thread's context.
//!
//! Buffers go in by value and come back with the result, so the ring can own them while the
//! kernel does. File descriptors are borrowed as raw fds: the kernel holds its own reference to
//! the file for the duration of an operation.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

use io_uring::{opcode, types};

use crate::buf::IoBuf;
use crate::op::{Op, OpId, cvt};

/// Result and buffer of a single-buffer transfer.
pub type BufResult = (io::Result<usize>, IoBuf);
/// Result and buffers of a vectored transfer.
pub type BufsResult = (io::Result<usize>, Vec<IoBuf>);

fn ret_buf(res: i32, _f: u32, buf: IoBuf) -> BufResult {
    (cvt(res).map(|n| n as usize), buf)
}

fn ret_bufs(res: i32, _f: u32, v: Iovecs) -> BufsResult {
    (cvt(res).map(|n| n as usize), v.bufs)
}

fn ret_unit<T>(res: i32, _f: u32, _d: T) -> io::Result<()> {
    cvt(res).map(|_| ())
}

fn len32(len: usize) -> u32 {
    u32::try_from(len).expect("single I/O larger than 4 GiB")
}

/// Read `buf.len()` bytes at `offset` (short reads are reported, not retried).
pub fn read_at(fd: RawFd, mut buf: IoBuf, offset: u64) -> Op<IoBuf, BufResult> {
    let sqe = opcode::Read::new(types::Fd(fd), buf.as_mut_ptr(), len32(buf.len()))
        .offset(offset)
        .build();
    // SAFETY: the pointer is into `buf`'s heap allocation, owned by the Op.
    unsafe { Op::submit(sqe, buf, ret_buf) }
}

/// Write `buf` at `offset`.
pub fn write_at(fd: RawFd, buf: IoBuf, offset: u64) -> Op<IoBuf, BufResult> {
    write_at_flags(fd, buf, offset, 0)
}

/// Write with `pwritev2` flags (e.g. `RWF_DSYNC` for FUA).
pub fn write_at_flags(fd: RawFd, buf: IoBuf, offset: u64, rw_flags: i32) -> Op<IoBuf, BufResult> {
    let sqe = opcode::Write::new(types::Fd(fd), buf.as_ptr(), len32(buf.len()))
        .offset(offset)
        .rw_flags(rw_flags)
        .build();
    // SAFETY: the pointer is into `buf`'s heap allocation, owned by the Op.
    unsafe { Op::submit(sqe, buf, ret_buf) }
}

/// Buffers plus the iovec array that points into them (both heap, both owned by the Op).
pub struct Iovecs {
    bufs: Vec<IoBuf>,
    iov: Vec<libc::iovec>,
}

impl Iovecs {
    fn new(mut bufs: Vec<IoBuf>) -> Iovecs {
        let iov = bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        Iovecs { bufs, iov }
    }
}

/// Scatter read at `offset` into `bufs` in order.
pub fn readv_at(fd: RawFd, bufs: Vec<IoBuf>, offset: u64) -> Op<Iovecs, BufsResult> {
    let v = Iovecs::new(bufs);
    let sqe = opcode::Readv::new(types::Fd(fd), v.iov.as_ptr(), len32(v.iov.len()))
        .offset(offset)
        .build();
    // SAFETY: iovec array and the buffers it points to are heap memory owned by `v`.
    unsafe { Op::submit(sqe, v, ret_bufs) }
}

/// Gather write of `bufs` at `offset`.
pub fn writev_at(fd: RawFd, bufs: Vec<IoBuf>, offset: u64) -> Op<Iovecs, BufsResult> {
    writev_at_flags(fd, bufs, offset, 0)
}

pub fn writev_at_flags(
    fd: RawFd,
    bufs: Vec<IoBuf>,
    offset: u64,
    rw_flags: i32,
) -> Op<Iovecs, BufsResult> {
    let v = Iovecs::new(bufs);
    let sqe = opcode::Writev::new(types::Fd(fd), v.iov.as_ptr(), len32(v.iov.len()))
        .offset(offset)
        .rw_flags(rw_flags)
        .build();
    // SAFETY: iovec array and the buffers it points to are heap memory owned by `v`.
    unsafe { Op::submit(sqe, v, ret_bufs) }
}

pub fn fsync(fd: RawFd) -> Op<(), io::Result<()>> {
    let sqe = opcode::Fsync::new(types::Fd(fd)).build();
    // SAFETY: no pointers.
    unsafe { Op::submit(sqe, (), ret_unit) }
}

pub fn fdatasync(fd: RawFd) -> Op<(), io::Result<()>> {
    let sqe = opcode::Fsync::new(types::Fd(fd))
        .flags(types::FsyncFlags::DATASYNC)
        .build();
    // SAFETY: no pointers.
    unsafe { Op::submit(sqe, (), ret_unit) }
}

/// `fallocate(2)` with `mode` (see [`punch_hole`] and [`zero_range`]).
pub fn fallocate(fd: RawFd, mode: i32, offset: u64, len: u64) -> Op<(), io::Result<()>> {
    let sqe = opcode::Fallocate::new(types::Fd(fd), len)
        .offset(offset)
        .mode(mode)
        .build();
    // SAFETY: no pointers.
    unsafe { Op::submit(sqe, (), ret_unit) }
}

/// Deallocate a range (reads back as zeroes); the file size is unchanged.
pub fn punch_hole(fd: RawFd, offset: u64, len: u64) -> Op<(), io::Result<()>> {
    fallocate(
        fd,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        offset,
        len,
    )
}

/// Zero a range, keeping it allocated where the filesystem can.
pub fn zero_range(fd: RawFd, offset: u64, len: u64) -> Op<(), io::Result<()>> {
    fallocate(fd, libc::FALLOC_FL_ZERO_RANGE, offset, len)
}

/// What `statx` reports that the block layer uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Statx {
    pub size: u64,
    pub blocks: u64,
    pub blksize: u32,
    pub mode: u16,
    /// For block devices: major/minor of the device itself.
    pub rdev_major: u32,
    pub rdev_minor: u32,
    /// Direct I/O memory and offset alignment (0 if the kernel does not say).
    pub dio_mem_align: u32,
    pub dio_offset_align: u32,
}

pub struct StatxBuf {
    path: CString,
    buf: Box<libc::statx>,
}

fn ret_statx(res: i32, _f: u32, d: StatxBuf) -> io::Result<Statx> {
    cvt(res)?;
    let s = &*d.buf;
    Ok(Statx {
        size: s.stx_size,
        blocks: s.stx_blocks,
        blksize: s.stx_blksize,
        mode: s.stx_mode,
        rdev_major: s.stx_rdev_major,
        rdev_minor: s.stx_rdev_minor,
        dio_mem_align: s.stx_dio_mem_align,
        dio_offset_align: s.stx_dio_offset_align,
    })
}

fn statx_op(dirfd: RawFd, path: CString, flags: i32) -> Op<StatxBuf, io::Result<Statx>> {
    // SAFETY: statx is plain old data; all-zero is a valid value.
    let mut d = StatxBuf {
        path,
        buf: Box::new(unsafe { std::mem::zeroed() }),
    };
    let sqe = opcode::Statx::new(
        types::Fd(dirfd),
        d.path.as_ptr(),
        (&mut *d.buf as *mut libc::statx).cast(),
    )
    .flags(flags)
    .mask(libc::STATX_BASIC_STATS | libc::STATX_DIOALIGN)
    .build();
    // SAFETY: path and statx buffer are heap memory owned by `d`.
    unsafe { Op::submit(sqe, d, ret_statx) }
}

/// `statx` of an open file.
pub fn statx_fd(fd: RawFd) -> Op<StatxBuf, io::Result<Statx>> {
    statx_op(fd, CString::default(), libc::AT_EMPTY_PATH)
}

/// `statx` of a path (following symlinks).
pub fn statx_path(path: &Path) -> io::Result<Op<StatxBuf, io::Result<Statx>>> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    Ok(statx_op(libc::AT_FDCWD, c, 0))
}

/// Wait until `fd` is ready for `events` (`libc::POLLIN` etc.); returns the revents.
pub fn poll_add(fd: RawFd, events: i16) -> Op<(), io::Result<i16>> {
    let sqe = opcode::PollAdd::new(types::Fd(fd), events as u16 as u32).build();
    // SAFETY: no pointers.
    unsafe { Op::submit_peer(sqe, (), |res, _f, ()| cvt(res).map(|r| r as i16)) }
}

/// Accept a connection on a listening socket; the new socket is close-on-exec.
pub fn accept(fd: RawFd) -> Op<(), io::Result<OwnedFd>> {
    let sqe = opcode::Accept::new(types::Fd(fd), std::ptr::null_mut(), std::ptr::null_mut())
        .flags(libc::SOCK_CLOEXEC)
        .build();
    // SAFETY: null address pointers: the peer address is not requested.
    unsafe { Op::submit_peer(sqe, (), accepted) }
}

fn accepted(res: i32, _f: u32, _d: ()) -> io::Result<OwnedFd> {
    // SAFETY: a non-negative result of accept is a new descriptor we own.
    cvt(res).map(|fd| unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// A socket address in kernel form.
pub struct SockAddr {
    storage: Box<libc::sockaddr_storage>,
    len: libc::socklen_t,
}

impl SockAddr {
    pub fn inet(addr: std::net::SocketAddr) -> SockAddr {
        // SAFETY: sockaddr_storage is plain old data; zero is valid.
        let mut storage: Box<libc::sockaddr_storage> = Box::new(unsafe { std::mem::zeroed() });
        let len = match addr {
            std::net::SocketAddr::V4(a) => {
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: a.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_ne_bytes(a.ip().octets()),
                    },
                    sin_zero: [0; 8],
                };
                // SAFETY: sockaddr_in fits in sockaddr_storage, which is suitably aligned.
                unsafe {
                    std::ptr::write((&mut *storage as *mut libc::sockaddr_storage).cast(), sin)
                };
                std::mem::size_of::<libc::sockaddr_in>()
            }
            std::net::SocketAddr::V6(a) => {
                let sin6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: a.port().to_be(),
                    sin6_flowinfo: a.flowinfo(),
                    sin6_addr: libc::in6_addr {
                        s6_addr: a.ip().octets(),
                    },
                    sin6_scope_id: a.scope_id(),
                };
                // SAFETY: sockaddr_in6 fits in sockaddr_storage, which is suitably aligned.
                unsafe {
                    std::ptr::write((&mut *storage as *mut libc::sockaddr_storage).cast(), sin6)
                };
                std::mem::size_of::<libc::sockaddr_in6>()
            }
        };
        SockAddr {
            storage,
            len: len as libc::socklen_t,
        }
    }

    pub fn unix(path: &Path) -> io::Result<SockAddr> {
        // SAFETY: sockaddr_storage is plain old data; zero is valid.
        let mut storage: Box<libc::sockaddr_storage> = Box::new(unsafe { std::mem::zeroed() });
        let bytes = path.as_os_str().as_bytes();
        // SAFETY: sockaddr_un fits in sockaddr_storage; we only write within sun_path.
        let sun = unsafe {
            &mut *(&mut *storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_un>()
        };
        if bytes.len() >= sun.sun_path.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "unix socket path too long",
            ));
        }
        sun.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (d, s) in sun.sun_path.iter_mut().zip(bytes) {
            *d = *s as libc::c_char;
        }
        let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
        Ok(SockAddr {
            storage,
            len: len as libc::socklen_t,
        })
    }
}

/// Connect a socket to `addr`.
pub fn connect(fd: RawFd, addr: SockAddr) -> Op<SockAddr, io::Result<()>> {
    let sqe = opcode::Connect::new(
        types::Fd(fd),
        (&*addr.storage as *const libc::sockaddr_storage).cast(),
        addr.len,
    )
    .build();
    // SAFETY: the address is heap memory owned by `addr`.
    unsafe { Op::submit(sqe, addr, ret_unit) }
}

/// Receive into `buf` (up to its length).
pub fn recv(fd: RawFd, mut buf: IoBuf, flags: i32) -> Op<IoBuf, BufResult> {
    let sqe = opcode::Recv::new(types::Fd(fd), buf.as_mut_ptr(), len32(buf.len()))
        .flags(flags)
        .build();
    // SAFETY: the pointer is into `buf`'s heap allocation, owned by the Op.
    unsafe { Op::submit_peer(sqe, buf, ret_buf) }
}

/// Receive up to `len` bytes into `buf[start..]` (the bytes before `start` are kept: a buffer
/// filled in steps).
pub fn recv_into(
    fd: RawFd,
    mut buf: IoBuf,
    start: usize,
    len: usize,
    flags: i32,
) -> Op<IoBuf, BufResult> {
    assert!(
        start.checked_add(len).is_some_and(|e| e <= buf.len()),
        "recv_into: range past the buffer"
    );
    // SAFETY: `start` is within the buffer, so the pointer stays inside its allocation.
    let ptr = unsafe { buf.as_mut_ptr().add(start) };
    let sqe = opcode::Recv::new(types::Fd(fd), ptr, len32(len))
        .flags(flags)
        .build();
    // SAFETY: the pointer is into `buf`'s heap allocation, owned by the Op.
    unsafe { Op::submit_peer(sqe, buf, ret_buf) }
}

/// Send `buf` (`MSG_NOSIGNAL` is always added: a closed peer is an error, not a signal).
pub fn send(fd: RawFd, buf: IoBuf, flags: i32) -> Op<IoBuf, BufResult> {
    let sqe = opcode::Send::new(types::Fd(fd), buf.as_ptr(), len32(buf.len()))
        .flags(flags | libc::MSG_NOSIGNAL)
        .build();
    // SAFETY: the pointer is into `buf`'s heap allocation, owned by the Op.
    unsafe { Op::submit(sqe, buf, ret_buf) }
}

/// A message header with its iovecs and buffers, all owned together.
pub struct MsgBufs {
    v: Iovecs,
    hdr: Box<libc::msghdr>,
}

impl MsgBufs {
    fn new(bufs: Vec<IoBuf>) -> MsgBufs {
        let mut v = Iovecs::new(bufs);
        // SAFETY: msghdr is plain old data; zero is valid.
        let mut hdr: Box<libc::msghdr> = Box::new(unsafe { std::mem::zeroed() });
        hdr.msg_iov = v.iov.as_mut_ptr();
        hdr.msg_iovlen = v.iov.len();
        MsgBufs { v, hdr }
    }
}

fn ret_msg(res: i32, _f: u32, m: MsgBufs) -> BufsResult {
    (cvt(res).map(|n| n as usize), m.v.bufs)
}

/// Vectored receive (`recvmsg`).
pub fn recv_vectored(fd: RawFd, bufs: Vec<IoBuf>, flags: i32) -> Op<MsgBufs, BufsResult> {
    let mut m = MsgBufs::new(bufs);
    let sqe = opcode::RecvMsg::new(types::Fd(fd), &mut *m.hdr)
        .flags(flags as u32)
        .build();
    // SAFETY: header, iovecs and buffers are heap memory owned by `m`.
    unsafe { Op::submit_peer(sqe, m, ret_msg) }
}

/// Vectored send (`sendmsg`), with `MSG_NOSIGNAL`.
pub fn send_vectored(fd: RawFd, bufs: Vec<IoBuf>, flags: i32) -> Op<MsgBufs, BufsResult> {
    let m = MsgBufs::new(bufs);
    let sqe = opcode::SendMsg::new(types::Fd(fd), &*m.hdr)
        .flags((flags | libc::MSG_NOSIGNAL) as u32)
        .build();
    // SAFETY: header, iovecs and buffers are heap memory owned by `m`.
    unsafe { Op::submit(sqe, m, ret_msg) }
}

/// Close a descriptor through the ring.
pub fn close(fd: OwnedFd) -> Op<(), io::Result<()>> {
    let raw = fd.into_raw_fd();
    let sqe = opcode::Close::new(types::Fd(raw)).build();
    // SAFETY: no pointers; the descriptor's ownership passes to the kernel's close.
    unsafe { Op::submit(sqe, (), ret_unit) }
}

/// A ring timeout (IORING_OP_TIMEOUT): completes after `d`.
pub fn ring_timeout(d: Duration) -> Op<Box<types::Timespec>, io::Result<()>> {
    let ts = Box::new(types::Timespec::from(d));
    let sqe = opcode::Timeout::new(&*ts).build();
    // SAFETY: the timespec is heap memory owned by the Op.
    unsafe {
        Op::submit_peer(sqe, ts, |res, _f, _ts| match res {
            r if r == -libc::ETIME || r >= 0 => Ok(()),
            r => Err(io::Error::from_raw_os_error(-r)),
        })
    }
}

/// Ask the kernel to cancel the operation `id`. Its own future then completes (usually with
/// `ECANCELED`). Resolves to `Err(ENOENT)` if it had completed already.
pub fn cancel(id: OpId) -> Op<(), io::Result<()>> {
    let sqe = opcode::AsyncCancel::new(id.0).build();
    // SAFETY: no pointers.
    unsafe { Op::submit(sqe, (), ret_unit) }
}

/// A no-op through the ring (for measuring the executor).
pub fn nop() -> Op<(), io::Result<()>> {
    let sqe = opcode::Nop::new().build();
    // SAFETY: no pointers.
    unsafe { Op::submit(sqe, (), ret_unit) }
}

/// A pipe used to move file data to a socket without copying it through user memory: page
/// cache pages go into the pipe by reference ([`splice_file_to_pipe`]) and from there into the
/// socket's buffers ([`splice_pipe_to`]; unix and TCP sockets take them without a copy).
#[derive(Debug)]
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

impl Pipe {
    /// A pipe whose buffer holds `want` bytes if the system allows (`fs.pipe-max-size`),
    /// else the default size. [`Pipe::capacity`] tells which.
    pub fn new(want: usize) -> io::Result<Pipe> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two descriptors into the array.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fresh descriptors we own.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let want = libc::c_int::try_from(want).unwrap_or(libc::c_int::MAX);
        // SAFETY: fcntl on our own descriptor; no memory involved.
        let mut cap = unsafe { libc::fcntl(fds[1], libc::F_SETPIPE_SZ, want) };
        if cap < 0 {
            // SAFETY: as above.
            cap = unsafe { libc::fcntl(fds[1], libc::F_GETPIPE_SZ) };
        }
        if cap <= 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Pipe {
            read,
            write,
            capacity: cap as usize,
        })
    }

    /// Bytes the pipe holds at most.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

/// Move `len` bytes (at most; a short count is possible) of `file` at `offset` into `pipe`.
/// For page cache data no bytes are copied: the pipe refers to the cached pages. The file
/// (an owner of its descriptor: `OwnedFd`, `File`, `Arc<File>`) is held by the operation: the
/// kernel looks the descriptor up only when the splice runs (in an io_uring worker), so a
/// borrowed number could meanwhile have been closed and reused.
pub fn splice_file_to_pipe<F: AsRawFd + 'static>(
    file: F,
    offset: u64,
    pipe: Pipe,
    len: usize,
) -> Op<(F, Pipe), (io::Result<usize>, F, Pipe)> {
    let len = len.min(pipe.capacity);
    let sqe = opcode::Splice::new(
        types::Fd(file.as_raw_fd()),
        offset as i64,
        types::Fd(pipe.write.as_raw_fd()),
        -1,
        len32(len),
    )
    .build();
    // SAFETY: no pointers; both descriptors are owned by the Op until the completion.
    unsafe {
        Op::submit(sqe, (file, pipe), |res, _f, (file, pipe)| {
            (cvt(res).map(|n| n as usize), file, pipe)
        })
    }
}

/// Move up to `len` bytes from `pipe` to `fd` (a socket; blocking sockets wait for room).
pub fn splice_pipe_to(pipe: Pipe, fd: RawFd, len: usize) -> Op<Pipe, (io::Result<usize>, Pipe)> {
    let sqe = opcode::Splice::new(
        types::Fd(pipe.read.as_raw_fd()),
        -1,
        types::Fd(fd),
        -1,
        len32(len),
    )
    .build();
    // SAFETY: no pointers; the pipe (whose read end the kernel looks up when the splice runs)
    // is owned by the Op until the completion.
    unsafe {
        Op::submit(sqe, pipe, |res, _f, pipe| {
            (cvt(res).map(|n| n as usize), pipe)
        })
    }
}
