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
    recv_fill_from(fd, buf, 0).await
}

/// Fill `buf[from..]` completely; the bytes before `from` are already there.
pub async fn recv_fill_from(fd: RawFd, mut buf: IoBuf, mut from: usize) -> (io::Result<()>, IoBuf) {
    while from < buf.len() {
        let len = buf.len() - from;
        let (r, b) = ops::recv_into(fd, buf, from, len, libc::MSG_WAITALL).await;
        buf = b;
        match r {
            Ok(0) => return (Err(eof()), buf),
            Ok(n) => from += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return (Err(e), buf),
        }
    }
    (Ok(()), buf)
}

/// Buffered receiving for a request stream: one receive takes whatever the peer has sent, so
/// at a queue depth above one several request headers (and small payloads) cost one ring trip
/// instead of one each.
pub struct RecvBuf {
    /// `None` only while a receive into it is in flight.
    buf: Option<IoBuf>,
    start: usize,
    end: usize,
}

impl RecvBuf {
    pub fn new(capacity: usize) -> RecvBuf {
        RecvBuf {
            buf: Some(IoBuf::new(capacity, 64)),
            start: 0,
            end: 0,
        }
    }

    /// Bytes received and not yet taken.
    pub fn available(&self) -> usize {
        self.end - self.start
    }

    /// Receive until at least `n` (at most the capacity) bytes are available, taking at most
    /// `max` (≥ `n`) per receive: what follows in the stream is known to be large (a write
    /// payload goes straight into its own buffer instead of through this one).
    pub async fn fill(&mut self, fd: RawFd, n: usize, max: usize) -> io::Result<()> {
        while self.available() < n {
            let mut buf = self.buf.take().expect("RecvBuf: buffer present");
            assert!(n <= buf.len(), "RecvBuf::fill beyond the capacity");
            if buf.len() - self.start < n {
                buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            let want = max.max(n - self.available());
            let len = (buf.len() - self.end).min(want);
            let (r, b) = ops::recv_into(fd, buf, self.end, len, 0).await;
            self.buf = Some(b);
            match r {
                Ok(0) => return Err(eof()),
                Ok(k) => self.end += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Take `n` available bytes.
    pub fn take(&mut self, n: usize) -> &[u8] {
        assert!(n <= self.available(), "RecvBuf::take beyond the data");
        let s = self.start;
        self.start += n;
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        }
        &self.buf.as_ref().expect("RecvBuf: buffer present")[s..s + n]
    }

    /// Move available bytes into the front of `dst`; returns how many.
    pub fn take_into(&mut self, dst: &mut [u8]) -> usize {
        let n = dst.len().min(self.available());
        dst[..n].copy_from_slice(self.take(n));
        n
    }

    /// Drop up to `n` available bytes; returns how many.
    pub fn skip(&mut self, n: u64) -> u64 {
        let k = n.min(self.available() as u64);
        self.take(k as usize);
        k
    }
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
