//! `null-co` / `null-aio`: a device of a given size that drops writes and, with
//! `read-zeroes=on`, reads zeroes (otherwise reads leave the buffer as it was, like QEMU).
//! `latency-ns` delays every request by a timer on the submitting context.

use std::io;
use std::time::Duration;

use blockd_aio::IoBuf;

use crate::driver::{
    BlockDriver, BlockStatus, BufResult, IoFuture, ReopenPrepared, ReopenRequest, ReqFlags,
    cannot_change,
};
use crate::drivers::Opened;
use crate::node::Node;
use crate::options::Opts;

pub struct NullDriver {
    name: &'static str,
    read_zeroes: bool,
    latency: Duration,
}

pub(crate) fn open(driver: &str, o: &mut Opts) -> Result<Opened, String> {
    let size = o.take_size("size")?.unwrap_or(1 << 30);
    let read_zeroes = o.take_bool("read-zeroes")?.unwrap_or(false);
    let latency = Duration::from_nanos(o.take_u64("latency-ns")?.unwrap_or(0));
    Ok(Opened {
        driver: Box::new(NullDriver {
            name: if driver == "null-aio" {
                "null-aio"
            } else {
                "null-co"
            },
            read_zeroes,
            latency,
        }),
        children: Vec::new(),
        length: size,
    })
}

impl NullDriver {
    async fn delay(&self) {
        if !self.latency.is_zero() {
            blockd_aio::sleep(self.latency).await;
        }
    }
}

impl BlockDriver for NullDriver {
    fn format_name(&self) -> &'static str {
        self.name
    }

    fn read<'a>(&'a self, _n: &'a Node, _off: u64, mut buf: IoBuf) -> IoFuture<'a, BufResult> {
        Box::pin(async move {
            self.delay().await;
            if self.read_zeroes {
                buf.fill(0);
            }
            (Ok(()), buf)
        })
    }

    fn write<'a>(
        &'a self,
        _n: &'a Node,
        _off: u64,
        buf: IoBuf,
        _f: ReqFlags,
    ) -> IoFuture<'a, BufResult> {
        Box::pin(async move {
            self.delay().await;
            (Ok(()), buf)
        })
    }

    fn flush<'a>(&'a self, _n: &'a Node) -> IoFuture<'a, io::Result<()>> {
        Box::pin(async { Ok(()) })
    }

    fn discard<'a>(&'a self, _n: &'a Node, _o: u64, _l: u64) -> IoFuture<'a, io::Result<()>> {
        Box::pin(async move {
            self.delay().await;
            Ok(())
        })
    }

    fn write_zeroes<'a>(
        &'a self,
        _n: &'a Node,
        _o: u64,
        _l: u64,
        _f: ReqFlags,
    ) -> IoFuture<'a, io::Result<()>> {
        Box::pin(async move {
            self.delay().await;
            Ok(())
        })
    }

    fn block_status<'a>(
        &'a self,
        _n: &'a Node,
        off: u64,
        len: u64,
    ) -> IoFuture<'a, io::Result<BlockStatus>> {
        Box::pin(async move {
            Ok(BlockStatus {
                len,
                data: true,
                zero: self.read_zeroes,
                allocated: true,
                offset: Some(off),
            })
        })
    }

    fn truncate<'a>(&'a self, _n: &'a Node, _len: u64) -> IoFuture<'a, io::Result<u64>> {
        Box::pin(async { Err(crate::driver::not_supported()) })
    }

    /// Only the generic state (read-only) changes; the driver's options stay as opened.
    fn reopen_prepare(
        &self,
        node: &Node,
        req: &mut ReopenRequest<'_>,
    ) -> Result<ReopenPrepared, String> {
        let o = &mut *req.opts;
        if let Some(size) = o.take_size("size")?
            && size.div_ceil(512) * 512 != node.length()
        {
            return Err(cannot_change("size"));
        }
        if let Some(z) = o.take_bool("read-zeroes")?
            && z != self.read_zeroes
        {
            return Err(cannot_change("read-zeroes"));
        }
        if let Some(ns) = o.take_u64("latency-ns")?
            && u128::from(ns) != self.latency.as_nanos()
        {
            return Err(cannot_change("latency-ns"));
        }
        Ok(ReopenPrepared::nothing())
    }
}
