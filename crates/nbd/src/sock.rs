//! Whole-message socket I/O on the calling thread's ring: receive exactly N bytes, send every
//! byte of a list of buffers. Built on blockd-aio's `recv`/`send_vectored`.

use std::io;
use std::os::fd::RawFd;

use blockd_aio::{IoBuf, ops};

fn eof() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed by peer")
}

/// Receive exactly `len` bytes into a new buffer.
pub async fn recv_exact(fd: RawFd, len: usize) -> io::Result<IoBuf> {
    let buf = IoBuf::new(len, 64);
    let (r, buf) = recv_fill(fd, buf).await;
    r.map(|_| buf)
}

/// Fill `buf` completely (MSG_WAITALL; a short receive continues where it stopped).
pub async fn recv_fill(fd: RawFd, buf: IoBuf) -> (io::Result<()>, IoBuf) {
    let want = buf.len();
    if want == 0 {
        return (Ok(()), buf);
    }
    let (r, mut buf) = ops::recv(fd, buf, libc::MSG_WAITALL).await;
    let mut got = match r {
        Ok(0) => return (Err(eof()), buf),
        Ok(n) => n,
        Err(e) => return (Err(e), buf),
    };
    while got < want {
        let tmp = IoBuf::new((want - got).min(1 << 20), 64);
        let (r, tmp) = ops::recv(fd, tmp, libc::MSG_WAITALL).await;
        match r {
            Ok(0) => return (Err(eof()), buf),
            Ok(n) => {
                buf[got..got + n].copy_from_slice(&tmp[..n]);
                got += n;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return (Err(e), buf),
        }
    }
    (Ok(()), buf)
}

/// Receive and throw away `len` bytes (an unwanted payload), in bounded pieces.
pub async fn discard(fd: RawFd, mut len: u64) -> io::Result<()> {
    while len > 0 {
        let n = len.min(1 << 20) as usize;
        recv_exact(fd, n).await?;
        len -= n as u64;
    }
    Ok(())
}

/// Send every byte of `bufs`, in order. `MSG_WAITALL` makes the kernel finish a stream send
/// itself (io_uring retries when the socket drains), so large replies are not split into short
/// sends whose unsent rest would have to be copied; short sends (errors, signals) still continue
/// where they stopped.
pub async fn send_all(fd: RawFd, mut bufs: Vec<IoBuf>) -> io::Result<()> {
    bufs.retain(|b| !b.is_empty());
    while !bufs.is_empty() {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let (r, back) = if bufs.len() == 1 {
            let b = bufs.pop().expect("one");
            let (r, b) = ops::send(fd, b, libc::MSG_WAITALL).await;
            (r, vec![b])
        } else {
            ops::send_vectored(fd, bufs, libc::MSG_WAITALL).await
        };
        let mut sent = match r {
            Ok(0) => {
                // Nothing of a non-empty message went out: the peer is gone; do not spin.
                return Err(io::Error::from_raw_os_error(libc::EPIPE));
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
            Err(e) => return Err(e),
        };
        if sent == total {
            return Ok(());
        }
        // Keep what was not sent.
        let mut rest = Vec::with_capacity(back.len());
        for b in back {
            if sent >= b.len() {
                sent -= b.len();
                continue;
            }
            if sent > 0 {
                rest.push(IoBuf::from_slice(&b[sent..]));
                sent = 0;
            } else {
                rest.push(b);
            }
        }
        bufs = rest;
    }
    Ok(())
}

/// Send one byte slice completely.
pub async fn send_slice(fd: RawFd, data: &[u8]) -> io::Result<()> {
    send_all(fd, vec![IoBuf::from_slice(data)]).await
}
