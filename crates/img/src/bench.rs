//! `qemu-img bench`: `depth` worker tasks on the main loop share one BlockBackend and a request
//! counter; each owns one I/O buffer for the whole run (filled once with the pattern for
//! writes), so the steady state allocates nothing beyond what the block layer does.
//!
//! Request *i* goes to `offset + i*step`, wrapped modulo the image size after each step (the
//! start offset itself is not wrapped). With `--flush-interval N` a flush follows every N
//! completed requests; without `--no-drain` new requests wait until the requests in flight
//! have completed and the flush is done.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::io;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::Instant;

use blockd_aio::IoBuf;
use blockd_block::{BlockBackend, Perm, ReqFlags};

use crate::getopt::{self, LongOpt};
use crate::image::{self, Cache, OpenRequest};
use crate::num::{self, NumError};
use crate::{CmdResult, Failure};

const OPT_IMAGE_OPTS: u32 = 256;
const OPT_PATTERN: u32 = 257;
const OPT_FLUSH_INTERVAL: u32 = 258;
const OPT_NO_DRAIN: u32 = 259;

const LONG: &[LongOpt] = &[
    LongOpt {
        name: "help",
        has_arg: false,
        code: b'h' as u32,
    },
    LongOpt {
        name: "format",
        has_arg: true,
        code: b'f' as u32,
    },
    LongOpt {
        name: "image-opts",
        has_arg: false,
        code: OPT_IMAGE_OPTS,
    },
    LongOpt {
        name: "cache",
        has_arg: true,
        code: b't' as u32,
    },
    LongOpt {
        name: "count",
        has_arg: true,
        code: b'c' as u32,
    },
    LongOpt {
        name: "depth",
        has_arg: true,
        code: b'd' as u32,
    },
    LongOpt {
        name: "buffer-size",
        has_arg: true,
        code: b's' as u32,
    },
    LongOpt {
        name: "offset",
        has_arg: true,
        code: b'o' as u32,
    },
    LongOpt {
        name: "step-size",
        has_arg: true,
        code: b'S' as u32,
    },
    LongOpt {
        name: "aio",
        has_arg: true,
        code: b'i' as u32,
    },
    LongOpt {
        name: "native",
        has_arg: false,
        code: b'n' as u32,
    },
    LongOpt {
        name: "write",
        has_arg: false,
        code: b'w' as u32,
    },
    LongOpt {
        name: "pattern",
        has_arg: true,
        code: OPT_PATTERN,
    },
    LongOpt {
        name: "flush-interval",
        has_arg: true,
        code: OPT_FLUSH_INTERVAL,
    },
    LongOpt {
        name: "no-drain",
        has_arg: false,
        code: OPT_NO_DRAIN,
    },
    LongOpt {
        name: "force-share",
        has_arg: false,
        code: b'U' as u32,
    },
];

/// The parsed command line.
#[derive(Debug, Clone)]
pub struct Params {
    pub count: u64,
    pub depth: u64,
    pub bufsize: u64,
    pub offset: u64,
    pub step: u64,
    pub write: bool,
    pub pattern: u8,
    pub flush_interval: u64,
    pub drain_on_flush: bool,
}

fn int_opt(v: &str, what: &str, min: i64, max: i64) -> Result<i64, Failure> {
    match num::strtol(v) {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        Ok(_) | Err(NumError::Range) => Err(Failure::new(format!(
            "Invalid {what} specified. Must be between {min} and {max}."
        ))),
        Err(NumError::Invalid) => Err(Failure::new(format!("Invalid {what} specified: '{v}'."))),
    }
}

fn size_opt(v: &str, what: &str, min: u64, max: u64) -> Result<u64, Failure> {
    match num::cvtnum(v) {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        Ok(_) | Err(NumError::Range) => Err(Failure::new(format!(
            "Invalid {what} specified. Must be between {min} and {max}."
        ))),
        Err(NumError::Invalid) => Err(Failure::new(format!("Invalid {what} specified: '{v}'."))),
    }
}

pub fn run(argv: &[String]) -> CmdResult {
    let p = getopt::parse(
        argv,
        ":hc:d:f:ni:o:qs:S:t:wU",
        LONG,
        &format!("{} bench", crate::prog()),
    )
    .map_err(|e| Failure::getopt(e, "bench"))?;
    let mut params = Params {
        count: 75000,
        depth: 64,
        bufsize: 4096,
        offset: 0,
        step: 0,
        write: false,
        pattern: 0,
        flush_interval: 0,
        drain_on_flush: true,
    };
    let mut format: Option<String> = None;
    let mut image_opts = false;
    let mut cache = Cache::WRITEBACK;
    let mut aio: Option<&'static str> = None;
    let mut force_share = false;
    const I32MAX: i64 = i32::MAX as i64;
    for (code, arg) in p.opts {
        let arg = arg.unwrap_or_default();
        match code {
            OPT_IMAGE_OPTS => image_opts = true,
            OPT_PATTERN => params.pattern = int_opt(&arg, "pattern byte", 0, 255)? as u8,
            OPT_FLUSH_INTERVAL => {
                params.flush_interval = int_opt(&arg, "flush interval", 0, I32MAX)? as u64
            }
            OPT_NO_DRAIN => params.drain_on_flush = false,
            _ => match char::from_u32(code).unwrap_or('\0') {
                'h' => {
                    print!("{}", crate::help::BENCH);
                    return Ok(());
                }
                'c' => params.count = int_opt(&arg, "request count", 1, I32MAX)? as u64,
                'd' => params.depth = int_opt(&arg, "queue depth", 1, I32MAX)? as u64,
                'f' => format = Some(arg),
                'n' => aio = Some("native"),
                'i' => {
                    aio = Some(match arg.as_str() {
                        "threads" => "threads",
                        "native" => "native",
                        "io_uring" => "io_uring",
                        _ => return Err(Failure::new(format!("Invalid aio option: {arg}"))),
                    })
                }
                'o' => params.offset = size_opt(&arg, "offset", 0, i64::MAX as u64)?,
                'q' => {}
                's' => params.bufsize = size_opt(&arg, "buffer size", 1, I32MAX as u64)?,
                'S' => params.step = size_opt(&arg, "step size", 0, I32MAX as u64)?,
                't' => {
                    cache = Cache::parse(&arg).ok_or_else(|| Failure::new("Invalid cache mode"))?
                }
                'w' => params.write = true,
                'U' => force_share = true,
                _ => {}
            },
        }
    }
    if p.args.len() != 1 {
        return Err(Failure::usage("Expecting one image file name", "bench"));
    }
    if params.flush_interval > 0 && !params.write {
        return Err(Failure::new(
            "--flush-interval is only available in write tests",
        ));
    }
    if params.write && params.flush_interval > 0 && params.flush_interval < params.depth {
        return Err(Failure::new("Flush interval can't be smaller than depth"));
    }
    if image_opts && format.is_some() {
        return Err(Failure::new(
            "--image-opts and --format are mutually exclusive",
        ));
    }
    if params.step == 0 {
        params.step = params.bufsize;
    }
    let name = &p.args[0];
    let req = OpenRequest {
        name,
        image_opts,
        format: format.as_deref(),
        cache,
        aio,
        read_only: !params.write,
        force_share,
        warn_probe: params.write,
    };
    let opened = image::open(&req).map_err(Failure::new)?;
    let perm = if params.write {
        Perm::CONSISTENT_READ | Perm::WRITE
    } else {
        Perm::CONSISTENT_READ
    };
    let blk = BlockBackend::new(&opened._graph, "", &opened.node, perm, Perm::ALL)
        .map_err(|e| Failure::new(format!("Could not open '{name}': {e}")))?;

    println!(
        "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {}, step size {})",
        params.count,
        if params.write { "write" } else { "read" },
        params.bufsize,
        params.depth,
        params.offset,
        params.step
    );
    if params.write && params.flush_interval > 0 {
        println!("Sending flush every {} requests", params.flush_interval);
    }
    let flags = if cache.writethrough {
        ReqFlags::FUA
    } else {
        ReqFlags::NONE
    };
    let r = blockd_aio::block_on(run_bench(blk, params, flags))
        .map_err(|e| Failure::new(format!("cannot run the event loop: {}", e.context)))?;
    match r {
        Ok(secs) => {
            println!("Run completed in {secs:.3} seconds.");
            Ok(())
        }
        Err(e) => Err(Failure::new(format!(
            "Failed request: {}",
            blockd_block::strerror(&e)
        ))),
    }
}

/// A gate tasks wait at while a draining flush runs (single-threaded: Cell/RefCell only).
#[derive(Default)]
struct Gate {
    closed: Cell<bool>,
    waiters: RefCell<Vec<Waker>>,
}

impl Gate {
    async fn pass(&self) {
        poll_fn(|cx| {
            if self.closed.get() {
                self.waiters.borrow_mut().push(cx.waker().clone());
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await
    }

    fn open(&self) {
        self.closed.set(false);
        for w in self.waiters.borrow_mut().drain(..) {
            w.wake();
        }
    }
}

struct State {
    blk: BlockBackend,
    p: Params,
    flags: ReqFlags,
    size: u64,
    /// Requests handed out so far.
    issued: Cell<u64>,
    /// Offset of the next request.
    next_offset: Cell<u64>,
    /// Requests completed since the last flush.
    since_flush: Cell<u64>,
    in_flight: Cell<u64>,
    error: RefCell<Option<io::Error>>,
    /// Closed while a draining flush waits for requests in flight and runs.
    gate: Gate,
    /// Woken when `in_flight` drops to zero (for the draining flusher).
    idle: RefCell<Option<Waker>>,
    /// Workers still running, and the waker of the run waiting for them (or for an error).
    running: Cell<u64>,
    main: RefCell<Option<Waker>>,
    /// `--no-drain` flushes still running.
    flushes: RefCell<Vec<blockd_aio::Task<()>>>,
}

impl State {
    fn take(&self) -> Option<u64> {
        let i = self.issued.get();
        if i >= self.p.count || self.error.borrow().is_some() {
            return None;
        }
        self.issued.set(i + 1);
        let off = self.next_offset.get();
        let mut next = off.saturating_add(self.p.step);
        if self.size > 0 && next >= self.size {
            next %= self.size;
        }
        self.next_offset.set(next);
        Some(off)
    }

    fn fail(&self, e: io::Error) {
        let mut slot = self.error.borrow_mut();
        if slot.is_none() {
            *slot = Some(e);
        }
        drop(slot);
        self.wake_main();
    }

    fn wake_main(&self) {
        if let Some(w) = self.main.borrow_mut().take() {
            w.wake();
        }
    }

    async fn wait_idle(&self) {
        poll_fn(|cx| {
            if self.in_flight.get() == 0 {
                Poll::Ready(())
            } else {
                *self.idle.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }

    fn done_one(&self) {
        let n = self.in_flight.get() - 1;
        self.in_flight.set(n);
        if n == 0
            && let Some(w) = self.idle.borrow_mut().take()
        {
            w.wake();
        }
    }
}

async fn worker(st: Rc<State>) {
    work(&st).await;
    st.running.set(st.running.get() - 1);
    if st.running.get() == 0 {
        st.wake_main();
    }
}

async fn work(st: &Rc<State>) {
    let len = st.p.bufsize as usize;
    let mut buf = Some(IoBuf::new(len, 4096));
    if st.p.write
        && let Some(b) = buf.as_mut()
    {
        b.as_mut_slice().fill(st.p.pattern);
    }
    loop {
        if st.gate.closed.get() {
            st.gate.pass().await;
        }
        let Some(off) = st.take() else { break };
        st.in_flight.set(st.in_flight.get() + 1);
        let b = buf.take().unwrap_or_else(|| IoBuf::new(len, 4096));
        let (r, b) = if st.p.write {
            st.blk.write(off, b, st.flags).await
        } else {
            st.blk.read(off, b).await
        };
        buf = Some(b);
        st.done_one();
        if let Err(e) = r {
            st.fail(e);
            break;
        }
        if st.p.flush_interval > 0 {
            let n = st.since_flush.get() + 1;
            if n >= st.p.flush_interval {
                st.since_flush.set(0);
                if st.p.drain_on_flush {
                    st.gate.closed.set(true);
                    st.wait_idle().await;
                    let r = st.blk.flush().await;
                    st.gate.open();
                    if let Err(e) = r {
                        st.fail(e);
                        break;
                    }
                } else {
                    let st2 = Rc::clone(st);
                    let t = blockd_aio::spawn(async move {
                        if let Err(e) = st2.blk.flush().await {
                            st2.fail(e);
                        }
                    });
                    st.flushes.borrow_mut().push(t);
                }
            } else {
                st.since_flush.set(n);
            }
        }
    }
}

async fn run_bench(blk: BlockBackend, p: Params, flags: ReqFlags) -> io::Result<f64> {
    let size = blk.length();
    let workers = p.depth.min(p.count);
    let st = Rc::new(State {
        blk,
        flags,
        size,
        issued: Cell::new(0),
        next_offset: Cell::new(p.offset),
        since_flush: Cell::new(0),
        in_flight: Cell::new(0),
        error: RefCell::new(None),
        gate: Gate::default(),
        idle: RefCell::new(None),
        flushes: RefCell::new(Vec::new()),
        running: Cell::new(workers),
        main: RefCell::new(None),
        p,
    });
    let start = Instant::now();
    let tasks: Vec<_> = (0..workers)
        .map(|_| blockd_aio::spawn(worker(st.clone())))
        .collect();
    // Like qemu-img, the first failed request ends the run: no new request is issued, and the
    // ones already issued finish (qemu-img's are in the kernel already; ours may still be
    // queued for this turn's submission, so they are awaited rather than dropped).
    poll_fn(|cx| {
        if st.running.get() == 0 || st.error.borrow().is_some() {
            Poll::Ready(())
        } else {
            *st.main.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        }
    })
    .await;
    if st.error.borrow().is_some() {
        for t in tasks {
            t.await;
        }
        let e = st.error.borrow_mut().take();
        return Err(e.expect("error recorded"));
    }
    drop(tasks);
    let flushes: Vec<_> = st.flushes.borrow_mut().drain(..).collect();
    for t in flushes {
        t.await;
    }
    let secs = start.elapsed().as_secs_f64();
    match st.error.borrow_mut().take() {
        Some(e) => Err(e),
        None => Ok(secs),
    }
}
